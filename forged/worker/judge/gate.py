"""The judge's gate: pure functions over score dicts, safe for the daemon to import.

The candidate must beat the reference model (the live one, or the base when nothing is
live yet) on held-out bits per byte by ``min_bpb_gain`` and must not lose more than
``tolerance`` (absolute, in fraction points) on any other metric both models were
measured on; FIM-middle bits per byte (lower is better) must not rise by more than
``tolerance`` of the reference's. A metric with no examples (``None``) is not gated.

With ``deltas`` (the judge's paired per-example comparisons, candidate − reference, each
with a 95% bootstrap interval: :func:`forged.worker.judge.judge.compare`) the gate decides
on intervals, not point estimates: the bits/byte gain's interval must exclude zero, and a
drop in another metric counts as a regression only when its whole interval lies below
zero (and the drop exceeds ``tolerance``). A noisy metric on a few examples can then
neither publish a candidate nor block one.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from forged.common.config import JudgeConfig

# Higher is better for all of these; bits per byte (lower is better) is gated apart.
OTHER_METRICS = ("fim_exact", "fim_edit_sim", "fim_exact_line", "raft_acc_oracle", "raft_acc_distractors")
LOWER_METRICS = ("fim_bpb",)  # lower is better; gated relative to the reference


def _num(d: dict[str, Any] | None, key: str) -> float | None:
    v = (d or {}).get(key)
    if v is None or isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(v):
        return None
    return float(v)


def _ci(d: dict[str, Any] | None) -> str:
    """`` [lo, hi] n=N`` for a paired delta, '' without one."""
    if not d:
        return ""
    return f" (95% CI [{d['lo']:+.4f}, {d['hi']:+.4f}], n={d['n']})"


def gate_decision(
    base: dict[str, Any], live: dict[str, Any] | None, candidate: dict[str, Any], cfg: JudgeConfig,
    deltas: dict[str, dict[str, Any]] | None = None,
) -> tuple[bool, list[str]]:
    """(passed, reasons). ``reasons`` lists every failed condition, one line each.

    ``cfg`` is a JudgeConfig (``min_bpb_gain``, ``tolerance``); the score dicts are
    ``ModelScores.to_dict()`` outputs; ``deltas`` maps a metric to its paired
    candidate − reference difference (``diff``, ``lo``, ``hi``, ``n``).
    """
    deltas = deltas or {}
    ref_name, ref = ("live", live) if live else ("base", base)
    reasons: list[str] = []
    c_bpb, r_bpb = _num(candidate, "bpb"), _num(ref, "bpb")
    if c_bpb is None or r_bpb is None:
        reasons.append("no held-out code to measure bits per byte on")
    else:
        gain, d = r_bpb - c_bpb, deltas.get("bpb")
        if gain < cfg.min_bpb_gain:
            reasons.append(f"bits/byte {c_bpb:.4f} vs {ref_name} {r_bpb:.4f}: gain {gain:+.4f} < required "
                           f"{cfg.min_bpb_gain:.4f}{_ci(d)}")
        elif d and not d["hi"] < 0:
            reasons.append(f"bits/byte {c_bpb:.4f} vs {ref_name} {r_bpb:.4f}: gain {gain:+.4f} is within noise"
                           f"{_ci(d)}: the interval of candidate − {ref_name} includes zero")
    for key in LOWER_METRICS:
        c, r = _num(candidate, key), _num(ref, key)
        if c is not None and r is not None and c > r * (1 + cfg.tolerance) + 1e-12:
            reasons.append(f"{key} {c:.4f} vs {ref_name} {r:.4f}: rose more than {cfg.tolerance:.0%}")
    for key in OTHER_METRICS:
        c, r = _num(candidate, key), _num(ref, key)
        if c is None or r is None:
            continue
        d = deltas.get(key)
        if c < r - cfg.tolerance - 1e-12 and (d is None or d["hi"] < 0):
            reasons.append(f"{key} {c:.3f} vs {ref_name} {r:.3f}: regressed {r - c:.3f} > tolerance "
                           f"{cfg.tolerance:.3f}{_ci(d)}")
    return not reasons, reasons


def summary_line(judge: dict[str, Any]) -> str:
    """One line for logs and notifications: candidate vs reference on every metric."""
    cand = judge.get("candidate") or {}
    ref_name = "live" if judge.get("live") else "base"
    ref = judge.get(ref_name) or {}
    deltas = judge.get("deltas") or {}
    parts = []
    for key in ("bpb", *LOWER_METRICS, *OTHER_METRICS):
        c, r = _num(cand, key), _num(ref, key)
        if c is not None and r is not None:
            d = deltas.get(key)
            ci = f" (Δ [{d['lo']:+.3f}, {d['hi']:+.3f}] n={d['n']})" if d else ""
            parts.append(f"{key} {r:.3f}→{c:.3f}{ci}")
    verdict = "passed" if judge.get("passed") else "rejected"
    return f"judge {verdict} (vs {ref_name}): " + ", ".join(parts)
