"""A cycle's report: one self-contained HTML file (loss curve, metrics, dataset stats)."""

from __future__ import annotations

import html
import json
import time
from pathlib import Path
from typing import Any


def _load(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


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


def _point(i: int, p: Any) -> tuple[float, float]:
    """A loss-curve entry: a bare loss per step (the trainer's format), a [step, loss] pair or a dict."""
    if isinstance(p, list | tuple):
        return float(p[0]), float(p[1])
    if isinstance(p, dict):
        return float(p["step"]), float(p["loss"])
    return float(i + 1), float(p)


def write_report(cycle_dir: Path, repo: str, cycle: dict[str, Any]) -> Path:
    metrics = json.loads(cycle.get("metrics") or "{}") if isinstance(cycle.get("metrics"), str) else (
        cycle.get("metrics") or {})
    train = (_load(cycle_dir / "train.result.json").get("train") or metrics.get("train") or {})
    judged = _load(cycle_dir / "judge.result.json") or {}
    judge = judged.get("judge") or metrics.get("judge") or {}
    manifest = _load(cycle_dir / "dataset" / "manifest.json") or metrics.get("dataset") or {}
    curve = [_point(i, p) for i, p in enumerate(train.get("loss_curve") or [])]
    said = [f"<li>{html.escape(str(w.get('stage')))}: {html.escape(str(w.get('message')))}</li>"
            for w in metrics.get("warnings") or []]
    warnings = ["<h2>Warnings</h2>", f"<ul>{''.join(said)}</ul>"] if said else []
    parts = [
        "<!doctype html><meta charset=utf-8>",
        f"<title>forged report — {html.escape(repo)} cycle {cycle.get('id')}</title>",
        "<style>body{font:14px system-ui;margin:2em;max-width:900px}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f4f6}</style>",
        f"<h1>{html.escape(repo)} — cycle {cycle.get('id')}</h1>",
        f"<p>Stage: <b>{html.escape(str(cycle.get('stage')))}</b> · {html.escape(str(cycle.get('reason') or ''))}"
        f" · commit {html.escape(str(cycle.get('head_commit') or '')[:12])}"
        f" · generated {time.strftime('%Y-%m-%d %H:%M:%S')}</p>",
        *warnings,
        "<h2>Training loss</h2>", _svg_curve(curve),
        _table([[k, v] for k, v in train.items() if not isinstance(v, list | dict)], ["train", "value"]),
    ]
    if judge:
        models = [m for m in ("base", "live", "candidate") if judge.get(m)]
        keys = sorted({k for m in models for k, v in judge[m].items() if isinstance(v, int | float)})
        parts += ["<h2>Judge</h2>",
                  f"<p>Passed: <b>{judge.get('passed')}</b> {html.escape('; '.join(judge.get('reasons', [])))}</p>",
                  _table([[k, *[judge[m].get(k) for m in models]] for k in keys], ["metric", *models])]
    if judged.get("fidelity"):
        parts += ["<h2>Export fidelity (llama.cpp vs trainer)</h2>",
                  _table([[k, v] for k, v in judged["fidelity"].items()], ["check", "value"])]
    if manifest:
        flat = [[k, json.dumps(v) if isinstance(v, dict | list) else v] for k, v in manifest.items()]
        parts += ["<h2>Dataset</h2>", _table(flat, ["field", "value"])]
    out = cycle_dir / "report.html"
    out.write_text("\n".join(parts), encoding="utf-8")
    return out
