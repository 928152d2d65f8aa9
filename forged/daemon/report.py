"""A cycle's report: one self-contained HTML file (loss curve, metrics, dataset stats)."""

from __future__ import annotations

import html
import json
import math
import time
from pathlib import Path
from typing import Any


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


def _svg_curve(points: list[tuple[float, float]], width: int = 640, height: int = 240) -> str:
    if len(points) < 2:
        return "<p>No loss curve recorded.</p>"
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    sx = (width - 60) / ((x1 - x0) or 1)
    sy = (height - 40) / ((y1 - y0) or 1)
    path = " ".join(f"{'M' if i == 0 else 'L'}{50 + (x - x0) * sx:.1f},{height - 25 - (y - y0) * sy:.1f}"
                    for i, (x, y) in enumerate(points))
    return (f'<svg width="{width}" height="{height}" role="img" aria-label="training loss">'
            f'<path d="{path}" fill="none" stroke="#2563eb" stroke-width="2"/>'
            f'<text x="4" y="14" font-size="11">{y1:.3f}</text>'
            f'<text x="4" y="{height - 25}" font-size="11">{y0:.3f}</text>'
            f'<text x="50" y="{height - 6}" font-size="11">step {x0:g}</text>'
            f'<text x="{width - 70}" y="{height - 6}" font-size="11">step {x1:g}</text></svg>')


def _table(rows: list[list[Any]], head: list[str]) -> str:
    def cell(v: Any) -> str:
        return html.escape(f"{v:.4f}" if isinstance(v, float) else str(v if v is not None else "—"))

    out = "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
    for r in rows:
        out += "<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>"
    return out + "</table>"


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


def _metrics(cycle: dict[str, Any]) -> dict[str, Any]:
    m = cycle.get("metrics")
    if isinstance(m, str):
        try:
            m = json.loads(m or "{}")
        except ValueError:
            return {}
    return _dict(m)


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) else None


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
            if None not in (_num(t.get("gain")), _num(t.get("lo")), _num(t.get("hi")))]
    if not rows:
        return []
    points = [(f"v{t.get('version')}", 100 * t["gain"], 100 * t["lo"], 100 * t["hi"]) for t in rows]
    table = [[f"v{t.get('version')}", f"{100 * t['gain']:+.2f}%", f"[{100 * t['lo']:+.2f}%, {100 * t['hi']:+.2f}%]",
              t.get("n_files"), t.get("n_bytes"), _num(t.get("base_bpb")), _num(t.get("live_bpb")),
              t.get("cycle_id")] for t in rows]
    return ["<h2>Forward gain</h2>",
            "<p>Each version against the base on the code committed after it went live (new to both, "
            "scored at the next cycle): 1 − its bits/byte over the base's, with a 95% bootstrap interval "
            "over files.</p>", _svg_forward(points),
            _table(table, ["version", "gain", "95% interval", "files", "bytes", "base bpb", "version bpb",
                           "measured by cycle"])]


def write_report(cycle_dir: Path, repo: str, cycle: dict[str, Any],
                 forward: list[dict[str, Any]] | None = None) -> Path:
    """Write ``report.html``; never raises on what the stored JSON holds (all text escaped).

    ``forward``: the repo's forward gain per version, oldest first (``status.forward_trend``)."""
    metrics = _metrics(cycle)
    train = _load(cycle_dir / "train.result.json").get("train") or metrics.get("train")
    train = _dict(train)
    judged = _load(cycle_dir / "judge.result.json")
    judge = _dict(judged.get("judge") or metrics.get("judge"))
    manifest = _load(cycle_dir / "dataset" / "manifest.json") or _dict(metrics.get("dataset"))
    raw_curve = train.get("loss_curve")
    curve = [pt for i, p in enumerate(raw_curve if isinstance(raw_curve, list) else [])
             if (pt := _point(i, p)) is not None]
    warned = metrics.get("warnings")
    said = [f"<li>{_text(_dict(w).get('stage'))}: {_text(_dict(w).get('message') if isinstance(w, dict) else w)}</li>"
            for w in (warned if isinstance(warned, list) else [])]
    warnings = ["<h2>Warnings</h2>", f"<ul>{''.join(said)}</ul>"] if said else []
    parts = [
        "<!doctype html><meta charset=utf-8>",
        f"<title>forged report — {_text(repo)} cycle {_text(cycle.get('id'))}</title>",
        "<style>body{font:14px system-ui;margin:2em;max-width:900px}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f4f6}</style>",
        f"<h1>{_text(repo)} — cycle {_text(cycle.get('id'))}</h1>",
        f"<p>Stage: <b>{_text(cycle.get('stage'))}</b> · {_text(cycle.get('reason') or '')}"
        f" · commit {_text(str(cycle.get('head_commit') or '')[:12])}"
        f" · generated {time.strftime('%Y-%m-%d %H:%M:%S')}</p>",
        *warnings,
        "<h2>Training loss</h2>", _svg_curve(curve),
        _table([[k, v] for k, v in train.items() if not isinstance(v, list | dict)], ["train", "value"]),
    ]
    if judge:
        models = [m for m in ("base", "live", "candidate") if isinstance(judge.get(m), dict) and judge[m]]
        keys = sorted({k for m in models for k, v in judge[m].items()
                       if isinstance(v, int | float) and not isinstance(v, bool)})
        parts += ["<h2>Judge</h2>",
                  f"<p>Passed: <b>{_text(judge.get('passed'))}</b> {_text(judge.get('reasons') or '')}</p>",
                  _table([[k, *[judge[m].get(k) for m in models]] for k in keys], ["metric", *models])]
    fidelity = _dict(judged.get("fidelity"))
    if fidelity:
        parts += ["<h2>Export fidelity (llama.cpp vs trainer)</h2>",
                  _table([[k, v] for k, v in fidelity.items()], ["check", "value"])]
    parts += _forward_section(forward or [])
    if manifest:
        flat = [[k, json.dumps(v) if isinstance(v, dict | list) else v] for k, v in manifest.items()]
        parts += ["<h2>Dataset</h2>", _table(flat, ["field", "value"])]
    out = cycle_dir / "report.html"
    out.write_text("\n".join(parts), encoding="utf-8")
    return out
