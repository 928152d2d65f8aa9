"""A cycle's report: one self-contained HTML file a user would rather look at than read.

Sections, each a function of :class:`ReportData` returning HTML parts (``SECTIONS``; a new
section is one more entry): what changed, each metric's paired difference with its 95%
interval and n (drawn), training loss next to held-out loss, held-out completions base
against candidate, fine-tuning against retrieval, the full score table, export fidelity,
dataset composition. Plots are inline SVG drawn here (no plotting dependency, no script,
nothing fetched), and every stored value is escaped: the report renders whatever the
stored JSON holds, a section it cannot draw says so instead of failing the report.
"""

from __future__ import annotations

import html
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forged.common.judged import (
    Change,
    MetricLine,
    finite_number,
    judge_text,
    metric_lines,
    paired_line,
)

BLUE, ORANGE, GREEN, RED, GREY = "#2563eb", "#ea580c", "#16a34a", "#dc2626", "#6b7280"
# Wide fonts (DejaVu Sans, the Linux fallback for system-ui) average about 0.6 em a character.
CHAR_PX = 6.6
TICK_ROOM = 36  # px between two axis numbers so that they do not overprint
SPLITS = (("train", BLUE), ("valid", ORANGE))  # dataset composition: training side, held-out side


def _load(path: Path) -> dict[str, Any]:
    try:
        return _dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


def _dict(v: Any) -> dict[str, Any]:
    """Stored JSON is rendered as found: whatever is not an object where one belongs is empty."""
    return v if isinstance(v, dict) else {}


def _text(v: Any) -> str:
    """Any stored value as escaped text (lists joined with '; ')."""
    if isinstance(v, list | tuple):
        return "; ".join(_text(x) for x in v)
    return html.escape(str(v if v is not None else ""))


def _finite(v: Any) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) and not isinstance(v, bool) else None


# ---------------------------------------------------------------- inputs


@dataclass
class ReportData:
    """What a report is drawn from: the cycle row and the stage results in its directory."""

    repo: str
    cycle: dict[str, Any]
    metrics: dict[str, Any]  # the cycle's stored metrics
    train: dict[str, Any]  # TrainResult.to_dict()
    judged: dict[str, Any]  # judge.result.json (judge, fidelity, export)
    judge: dict[str, Any]  # JudgeResult.to_dict()
    manifest: dict[str, Any]  # the dataset's manifest.json
    forward: list[dict[str, Any]] = field(default_factory=list)  # forward gain per version, oldest first


def _metrics(cycle: dict[str, Any]) -> dict[str, Any]:
    m = cycle.get("metrics")
    if isinstance(m, str):
        try:
            m = json.loads(m or "{}")
        except ValueError:
            return {}
    return _dict(m)


def load_data(cycle_dir: Path, repo: str, cycle: dict[str, Any],
              forward: list[dict[str, Any]] | None = None) -> ReportData:
    metrics = _metrics(cycle)
    train = _dict(_load(cycle_dir / "train.result.json").get("train") or metrics.get("train"))
    judged = _load(cycle_dir / "judge.result.json")
    judge = _dict(judged.get("judge") or metrics.get("judge"))
    manifest = _load(cycle_dir / "dataset" / "manifest.json") or _dict(metrics.get("dataset"))
    return ReportData(repo, cycle, metrics, train, judged, judge, manifest, list(forward or []))


# ---------------------------------------------------------------- SVG


def _svg(width: int, height: int, label: str, body: list[str]) -> str:
    return (f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="{html.escape(label)}" font-size="11" font-family="system-ui">' + "".join(body) + "</svg>")


def _t(x: float, y: float, s: str, anchor: str = "start", fill: str = "#111") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" fill="{fill}">{html.escape(s)}</text>'


def _text_width(labels: list[str], most: int) -> int:
    """Room for the longest label, right-aligned, at the charts' 11px font (at most ``most``)."""
    return min(max(120, round(CHAR_PX * max(map(len, labels), default=0)) + 16), most)


UNIT_AXES = {"%": "bits per byte: change in % of the reference", " pts": "rates: change in percentage points"}


def svg_deltas(lines: list[MetricLine], width: int = 760) -> str:
    """Each metric's paired change, candidate − reference, as a dot on its 95% interval bar,
    n in the label. One axis per unit (ratios in % of the reference, rates in percentage
    points): a +100-point accuracy change must not squash a −14% bits/byte one to a dot."""
    rows = [(m, c) for m in lines if (c := m.change()) is not None and c.finite]
    if not rows:
        return "<p>No paired differences recorded.</p>"
    labels = {m.key: f"{m.label} (n={m.n if m.n is not None else '?'})" for m, _ in rows}
    left, right = _text_width(list(labels.values()), width // 2), 170
    body: list[str] = []
    y = 0
    for unit in dict.fromkeys(c.unit for _, c in rows):
        group = [(m, c) for m, c in rows if c.unit == unit]
        part, y = _delta_axis(group, labels, UNIT_AXES.get(unit, unit.strip()), y, left, width - right)
        body += part
    return _svg(width, y, "metric changes with 95% intervals", body)


def _delta_axis(rows: list[tuple[MetricLine, Change]], labels: dict[str, str], caption: str, top: int,
                left: int, right: int) -> tuple[list[str], int]:
    """One unit's rows on their own axis, from ``top``; returns the SVG parts and the next top."""
    row_h = 24
    lo = min(0.0, *(c.lo for _, c in rows))
    hi = max(0.0, *(c.hi for _, c in rows))
    pad = (hi - lo) * 0.05 or 1.0
    lo, hi = lo - pad, hi + pad

    def x(v: float) -> float:
        return left + (v - lo) / (hi - lo) * (right - left)

    first = top + 34
    bottom = first + row_h * (len(rows) - 1) + 12
    body = [_t(left, top + 14, caption, fill=GREY),
            f'<line x1="{x(0):.1f}" y1="{first - 12}" x2="{x(0):.1f}" y2="{bottom}" stroke="#9ca3af"/>',
            _t(x(0), bottom + 12, "0", "middle", GREY)]
    # An end of the axis that is only the padding beside 0 gets no number: it would print over the 0.
    body += [_t(x(v), bottom + 12, f"{v:+.1f}", anchor, GREY)
             for v, anchor in ((lo, "start"), (hi, "end")) if abs(x(v) - x(0)) >= TICK_ROOM]
    for i, (m, c) in enumerate(rows):
        y = first + i * row_h
        color = {1: GREEN, -1: RED, 0: GREY}[m.verdict()]
        body += [_t(left - 8, y + 4, labels[m.key], "end"),
                 f'<line x1="{x(c.lo):.1f}" y1="{y}" x2="{x(c.hi):.1f}" y2="{y}" stroke="{color}" stroke-width="3"/>',
                 f'<circle cx="{x(c.value):.1f}" cy="{y}" r="4.5" fill="{color}"/>',
                 _t(right + 8, y + 4, f"{c.value:+.1f}{c.unit} [{c.lo:+.1f}, {c.hi:+.1f}]")]
    return body, bottom + 22


def _point(i: int, p: Any) -> tuple[float, float] | None:
    """A loss-curve entry: a bare loss per step (the trainer's format), a [step, loss] pair or
    a dict; None for anything else, or a value that is not a finite number."""
    try:
        if isinstance(p, list | tuple):
            x, y = float(p[0]), float(p[1])
        elif isinstance(p, dict):
            x, y = float(p["step"]), float(p["loss"])
        else:
            x, y = float(i + 1), float(p)
    except (TypeError, ValueError, KeyError, IndexError):
        return None
    return (x, y) if math.isfinite(x) and math.isfinite(y) else None


def _points(raw: Any, bare_is_step: bool = True) -> list[tuple[float, float]]:
    items = raw if isinstance(raw, list) else []
    return [pt for i, p in enumerate(items) if (pt := _point(i, p)) is not None
            and (bare_is_step or isinstance(p, list | tuple | dict))]


TRAIN_LEGEND = "training loss per step, and its moving average (bold)"
HELD_X = 76 + round(CHAR_PX * len(TRAIN_LEGEND)) + 24


def moving_average(points: list[tuple[float, float]], window: int = 0) -> list[tuple[float, float]]:
    """Trailing mean of the loss over ``window`` steps (default: an eighth of the run, at least 3).

    One step's loss is one packed batch's, so it swings with what the batch holds; the trend is
    what a reader compares with the held-out points."""
    k = window or max(3, len(points) // 8)
    out, total = [], 0.0
    for i, (x, y) in enumerate(points):
        total += y - (points[i - k][1] if i >= k else 0.0)
        out.append((x, total / min(i + 1, k)))
    return out


def _polyline(points: list[tuple[float, float]], xy: Callable[[tuple[float, float]], str]) -> str:
    """An SVG path's ``d`` through ``points``, each placed by ``xy``."""
    return " ".join(("M" if i == 0 else "L") + xy(p) for i, p in enumerate(points))


def svg_loss(train: list[tuple[float, float]], heldout: list[tuple[float, float]],
             width: int = 640, height: int = 260) -> str:
    """Training loss per step (line) and held-out loss where it was measured (dots), one scale."""
    if len(train) < 2 and not heldout:
        return "<p>No loss curve recorded.</p>"
    pts = train + heldout
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    sx = (width - 70) / ((x1 - x0) or 1)
    sy = (height - 60) / ((y1 - y0) or 1)

    def xy(p: tuple[float, float]) -> str:
        return f"{55 + (p[0] - x0) * sx:.1f},{height - 25 - (p[1] - y0) * sy:.1f}"

    body = [_t(4, 34, f"{y1:.3f}"), _t(4, height - 25, f"{y0:.3f}"),
            _t(55, height - 6, f"step {x0:g}"), _t(width - 10, height - 6, f"step {x1:g}", "end"),
            f'<rect x="60" y="6" width="12" height="3" fill="{BLUE}"/>', _t(76, 12, TRAIN_LEGEND),
            f'<circle cx="{HELD_X - 8}" cy="8" r="4" fill="{ORANGE}"/>',
            _t(HELD_X, 12, f"held-out loss ({len(heldout)} evaluation{'s' if len(heldout) != 1 else ''})")]
    if len(train) >= 2:
        body += [f'<path d="{_polyline(train, xy)}" fill="none" stroke="{BLUE}" stroke-width="1" stroke-opacity="0.35"/>',
                 f'<path d="{_polyline(moving_average(train), xy)}" fill="none" stroke="{BLUE}" stroke-width="2.5"><title>training loss, '
                 f'moving average</title></path>']
    if len(heldout) >= 2:
        body.append(f'<path d="{_polyline(sorted(heldout), xy)}" fill="none" stroke="{ORANGE}" stroke-width="1.5" stroke-dasharray="4 3"/>')
    for p in heldout:
        cx, cy = xy(p).split(",")
        body.append(f'<circle cx="{cx}" cy="{cy}" r="4" fill="{ORANGE}"><title>step {p[0]:g}: {p[1]:.4f}'
                    f'</title></circle>')
    return _svg(width, height, "training and held-out loss", body)


def svg_bars(title: str, groups: dict[str, dict[str, float]], width: int = 640) -> str:
    """Grouped horizontal bars: for each category, one bar per split (training, held-out)."""
    cats = sorted({c for counts in groups.values() for c in counts},
                  key=lambda c: -sum(groups[s].get(c, 0) for s in groups))
    if not cats:
        return f"<p>No {html.escape(title)} recorded.</p>"
    splits = [(s, color) for s, color in SPLITS if s in groups]
    top = max(v for counts in groups.values() for v in counts.values()) or 1
    left, bar, gap = 130, 11, 8
    height = 22 + len(cats) * (bar * len(splits) + gap)
    body = []
    for j, (s, color) in enumerate(splits):
        body += [f'<rect x="{left + j * 110}" y="4" width="10" height="10" fill="{color}"/>',
                 _t(left + 14 + j * 110, 13, {"train": "training", "valid": "held-out"}[s])]
    y = 22
    for c in cats:
        body.append(_t(left - 6, y + bar * len(splits) / 2 + 4, c, "end"))
        for s, color in splits:
            v = groups[s].get(c, 0)
            w = v / top * (width - left - 70)
            body += [f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar - 1}" fill="{color}"/>',
                     _t(left + w + 4, y + bar - 2, f"{v:,.0f}", fill=GREY)]
            y += bar
        y += gap
    return _svg(width, height, title, body)


# ---------------------------------------------------------------- tables


def _table(rows: list[list[Any]], head: list[str]) -> str:
    def cell(v: Any) -> str:
        return html.escape(f"{v:.4f}" if isinstance(v, float) else str(v if v is not None else "—"))

    out = "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
    for r in rows:
        out += "<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>"
    return out + "</table>"


# ---------------------------------------------------------------- sections


def _warnings(d: ReportData) -> list[str]:
    warned = d.metrics.get("warnings")
    said = [f"<li>{_text(_dict(w).get('stage'))}: {_text(_dict(w).get('message') if isinstance(w, dict) else w)}</li>"
            for w in (warned if isinstance(warned, list) else [])]
    return ["<h2>Warnings</h2>", f"<ul>{''.join(said)}</ul>"] if said else []


def _changes(d: ReportData) -> list[str]:
    lines = metric_lines(d.judge)
    if not lines:
        return []
    ref = "the live model" if d.judge.get("reference") == "live" else "the base model"
    return [f"<h2>What changed (candidate − {ref})</h2>",
            "<p>Each dot is the paired difference over the same held-out examples, its bar the 95% "
            "bootstrap interval; green: better beyond noise, red: worse beyond noise, grey: within noise. "
            "Bits per byte change in % of the reference, rates in percentage points, each on its own axis.</p>",
            svg_deltas(lines), "<ul>" + "".join(f"<li>{_text(t)}</li>" for t in judge_text(d.judge)) + "</ul>"]


def _sample_sizes(d: ReportData) -> list[str]:
    """Each paired difference's n, its interval's half-width, and the n its target width takes."""
    deltas = _dict(d.judge.get("deltas"))
    rows = [[k, x.get("n"), (x["hi"] - x["lo"]) / 2, x.get("target"), x.get("n_for_target") or "—"]
            for k, x in ((k, _dict(v)) for k, v in deltas.items())
            if finite_number(x.get("lo")) is not None and finite_number(x.get("hi")) is not None and x.get("target") is not None]
    if not rows:
        return []
    return ["<h2>Sample sizes</h2>",
            "<p>The 95% interval's half-width each metric got from its n, the half-width the judge aims "
            "for, and the n that would reach it (intervals narrow as 1/√n; — where every pair agreed).</p>",
            _table(rows, ["metric", "n", "half-width", "target", "n for target"])]


def _loss(d: ReportData) -> list[str]:
    train = _points(d.train.get("loss_curve"))
    heldout = _points(d.train.get("evals"), bare_is_step=False)
    flat = [[k, v] for k, v in d.train.items() if not isinstance(v, list | dict)]
    return ["<h2>Training and held-out loss</h2>", svg_loss(train, heldout), _table(flat, ["train", "value"])]


def _examples(d: ReportData) -> list[str]:
    shown = [_dict(e) for e in (d.judge.get("examples") if isinstance(d.judge.get("examples"), list) else [])]
    if not shown:
        return []
    out = ["<h2>Held-out completions, side by side</h2>",
           "<p>The cursor sits between the prefix's end and the suffix; each model filled in the middle "
           "(greedy, cut to the reference's number of lines).</p>",
           "<table class=ex><tr><th>file · prefix … suffix</th><th>reference</th><th>base</th><th>candidate</th></tr>"]
    for e in shown:
        ctx = (f"<b>{_text(e.get('path'))}</b><pre>{_text(e.get('prefix'))}<mark>▮</mark>"
               f"{_text(e.get('suffix'))}</pre>")
        cells = "".join(f"<td><pre>{_text(e.get(k))}</pre></td>" for k in ("reference", "base", "candidate"))
        out.append(f"<tr><td>{ctx}</td>{cells}</tr>")
    return [*out, "</table>"]


RETRIEVAL_ROWS = (  # gain key → what it compares, all on the same FIM middles
    ("retrieval", "retrieval alone (base+ctx − base)"),
    ("fine_tuning", "fine-tuning alone (candidate − base)"),
    ("both", "both (candidate+ctx − base)"),
    ("fine_tuning_over_retrieval", "fine-tuning on top of retrieval"),
)


def _retrieval(d: ReportData) -> list[str]:
    r = _dict(d.judge.get("retrieval"))
    gains = _dict(r.get("gains"))
    lines = [ln for key, label in RETRIEVAL_ROWS
             if (ln := paired_line(key, label, "ratio", gains.get(key))) is not None]
    if not lines:
        return [f"<h2>Fine-tuning vs retrieval</h2><p>{_text(r.get('note'))}</p>"] if r.get("note") else []
    bpb = _dict(r.get("bpb"))
    table = _table([[k, _finite(bpb.get(k))] for k in ("base", "base_rag", "candidate", "candidate_rag")],
                   ["FIM-middle bits/byte", "value"])
    return ["<h2>Fine-tuning vs retrieval vs both</h2>",
            f"<p>FIM-middle bits per byte on {_text(r.get('n'))} held-out middles, without and with the "
            f"top {_text(r.get('k'))} BM25 chunks of the training-side code put before the prefix as an "
            f"editor's context provider would (at most {_text(r.get('max_chars'))} characters). Lower is better; "
            "a negative change is a gain.</p>", svg_deltas(lines), table,
            *([f"<p>{_text(r.get('note'))}</p>"] if r.get("note") else [])]


def _scores(d: ReportData) -> list[str]:
    judge = d.judge
    if not judge:
        return []
    models = [m for m in ("base", "live", "candidate") if isinstance(judge.get(m), dict) and judge[m]]
    keys = sorted({k for m in models for k, v in judge[m].items()
                   if isinstance(v, int | float) and not isinstance(v, bool)})
    return ["<h2>Judge</h2>",
            f"<p>Passed: <b>{_text(judge.get('passed'))}</b> {_text(judge.get('reasons') or '')}</p>",
            _table([[k, *[judge[m].get(k) for m in models]] for k in keys], ["metric", *models])]


def _fidelity(d: ReportData) -> list[str]:
    fidelity = _dict(d.judged.get("fidelity"))
    if not fidelity:
        return []
    return ["<h2>Export fidelity (llama.cpp vs trainer)</h2>",
            _table([[k, v] for k, v in fidelity.items()], ["check", "value"])]


def _composition(field: str, manifest: dict[str, Any]) -> dict[str, dict[str, float]]:
    by = _dict(manifest.get(field))
    return {s: {str(k): x for k, v in _dict(by.get(s)).items() if (x := _finite(v)) is not None}
            for s, _ in SPLITS if s in by}


def _dataset(d: ReportData) -> list[str]:
    if not d.manifest:
        return []
    flat = [[k, json.dumps(v) if isinstance(v, dict | list) else v] for k, v in d.manifest.items()
            if k not in ("by_kind", "by_lang")]
    return ["<h2>Dataset</h2>",
            "<h3>Examples by kind</h3>", svg_bars("examples by kind", _composition("by_kind", d.manifest)),
            "<h3>Examples by language</h3>", svg_bars("examples by language", _composition("by_lang", d.manifest)),
            "<details><summary>manifest</summary>", _table(flat, ["field", "value"]), "</details>"]


def _svg_forward(points: list[tuple[str, float, float, float]], width: int = 640, height: int = 200) -> str:
    """Forward gain per version (%), a dot with its interval bar each, and the zero line."""
    ys = [y for _, v, lo, hi in points for y in (v, lo, hi)] + [0.0]
    y0, y1 = min(ys), max(ys)
    sy = (height - 40) / ((y1 - y0) or 1)
    step = (width - 80) / max(len(points), 1)

    def py(y: float) -> float:
        return height - 25 - (y - y0) * sy

    marks = [f'<line x1="50" x2="{width - 10}" y1="{py(0):.1f}" y2="{py(0):.1f}" stroke="#9ca3af"/>']
    for i, (label, v, lo, hi) in enumerate(points):
        x = 50 + step * (i + 0.5)
        marks += [f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{py(lo):.1f}" y2="{py(hi):.1f}" stroke="#2563eb"/>',
                  f'<circle cx="{x:.1f}" cy="{py(v):.1f}" r="4" fill="#2563eb"/>',
                  f'<text x="{x - 8:.1f}" y="{height - 6}" font-size="11">{_text(label)}</text>']
    return (f'<svg width="{width}" height="{height}" role="img" aria-label="forward gain per version">'
            + "".join(marks) + f'<text x="4" y="14" font-size="11">{y1:+.1f}%</text>'
            f'<text x="4" y="{height - 25}" font-size="11">{y0:+.1f}%</text></svg>')


def _forward_section(trend: list[dict[str, Any]]) -> list[str]:
    """Each version's forward gain: the live model vs the base on the code committed after it."""
    rows = [t for t in (_dict(x) for x in trend)
            if None not in (finite_number(t.get("gain")), finite_number(t.get("lo")), finite_number(t.get("hi")))]
    if not rows:
        return []
    points = [(f"v{t.get('version')}", 100 * t["gain"], 100 * t["lo"], 100 * t["hi"]) for t in rows]
    table = [[f"v{t.get('version')}", f"{100 * t['gain']:+.2f}%", f"[{100 * t['lo']:+.2f}%, {100 * t['hi']:+.2f}%]",
              t.get("n_files"), t.get("n_bytes"), finite_number(t.get("base_bpb")), finite_number(t.get("live_bpb")),
              t.get("cycle_id")] for t in rows]
    return ["<h2>Forward gain</h2>",
            "<p>Each version against the base on the code committed after it went live (new to both, "
            "scored at the next cycle): 1 − its bits/byte over the base's, with a 95% bootstrap interval "
            "over files.</p>", _svg_forward(points),
            _table(table, ["version", "gain", "95% interval", "files", "bytes", "base bpb", "version bpb",
                           "measured by cycle"])]


def _forward(d: ReportData) -> list[str]:
    return _forward_section(d.forward)


Section = Callable[[ReportData], list[str]]
# The report's order; a new section is one more entry.
SECTIONS: list[Section] = [_warnings, _changes, _sample_sizes, _loss, _examples, _retrieval, _forward, _scores,
                           _fidelity, _dataset]

STYLE = ("body{font:14px system-ui;margin:2em;max-width:960px}table{border-collapse:collapse;margin:1em 0}"
         "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right;vertical-align:top}th{background:#f3f4f6}"
         "table.ex td{text-align:left;max-width:220px}pre{margin:0;white-space:pre-wrap;font-size:12px}"
         "mark{background:#fde68a}")


def _section(fn: Section, d: ReportData) -> list[str]:
    """A section, or one line saying it could not be drawn: one odd stored value never costs the whole report."""
    try:
        return fn(d)
    except Exception as e:  # noqa: BLE001 — the report is best effort, section by section
        return [f"<p>({_text(fn.__name__.strip('_'))} could not be drawn: {_text(type(e).__name__)})</p>"]


def write_report(cycle_dir: Path, repo: str, cycle: dict[str, Any],
                 forward: list[dict[str, Any]] | None = None) -> Path:
    """Write ``report.html``; never raises on what the stored JSON holds (all text escaped).

    ``forward``: the repo's forward gain per version, oldest first (``status.forward_trend``)."""
    d = load_data(cycle_dir, repo, cycle, forward)
    parts = [
        "<!doctype html><meta charset=utf-8>",
        f"<title>forged report — {_text(repo)} cycle {_text(cycle.get('id'))}</title>",
        f"<style>{STYLE}</style>",
        f"<h1>{_text(repo)} — cycle {_text(cycle.get('id'))}</h1>",
        f"<p>Stage: <b>{_text(cycle.get('stage'))}</b> · {_text(cycle.get('reason') or '')}"
        f" · commit {_text(str(cycle.get('head_commit') or '')[:12])}"
        f" · generated {time.strftime('%Y-%m-%d %H:%M:%S')}</p>",
    ]
    for fn in SECTIONS:
        parts += _section(fn, d)
    out = cycle_dir / "report.html"
    out.write_text("\n".join(parts), encoding="utf-8")
    return out
