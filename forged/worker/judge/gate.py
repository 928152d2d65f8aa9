"""The judge's gate: pure functions over score dicts, safe for the daemon to import.

The candidate must beat the reference model (the live one, or the base when nothing is
live yet) on held-out bits per byte by ``min_bpb_gain`` and must not lose more than
``tolerance`` (absolute, in fraction points) on any other metric both models were
measured on; FIM-middle bits per byte (lower is better) must not rise by more than
``tolerance`` of the reference's. A metric with no examples (``None``) is not gated.
"""

from __future__ import annotations

import math
from typing import Any

# Higher is better for all of these; bits per byte (lower is better) is gated apart.
OTHER_METRICS = ("fim_exact", "fim_edit_sim", "fim_exact_line", "raft_acc_oracle", "raft_acc_distractors")
LOWER_METRICS = ("fim_bpb",)  # lower is better; gated relative to the reference


def _num(d: dict[str, Any] | None, key: str) -> float | None:
    v = (d or {}).get(key)
    if v is None or isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(v):
        return None
    return float(v)


def gate_decision(
    base: dict[str, Any], live: dict[str, Any] | None, candidate: dict[str, Any], cfg: Any
) -> tuple[bool, list[str]]:
    """(passed, reasons). ``reasons`` lists every failed condition, one line each.

    ``cfg`` is a JudgeConfig (``min_bpb_gain``, ``tolerance``); the score dicts are
    ``ModelScores.to_dict()`` outputs.
    """
    ref_name, ref = ("live", live) if live else ("base", base)
    reasons: list[str] = []
    c_bpb, r_bpb = _num(candidate, "bpb"), _num(ref, "bpb")
    if c_bpb is None or r_bpb is None:
        reasons.append("no held-out code to measure bits per byte on")
    else:
        gain = r_bpb - c_bpb
        if gain < cfg.min_bpb_gain:
            reasons.append(
                f"bits/byte {c_bpb:.4f} vs {ref_name} {r_bpb:.4f}: gain {gain:+.4f} < required {cfg.min_bpb_gain:.4f}"
            )
    for key in LOWER_METRICS:
        c, r = _num(candidate, key), _num(ref, key)
        if c is not None and r is not None and c > r * (1 + cfg.tolerance) + 1e-12:
            reasons.append(f"{key} {c:.4f} vs {ref_name} {r:.4f}: rose more than {cfg.tolerance:.0%}")
    for key in OTHER_METRICS:
        c, r = _num(candidate, key), _num(ref, key)
        if c is None or r is None:
            continue
        if c < r - cfg.tolerance - 1e-12:
            reasons.append(
                f"{key} {c:.3f} vs {ref_name} {r:.3f}: regressed {r - c:.3f} > tolerance {cfg.tolerance:.3f}"
            )
    return not reasons, reasons


def summary_line(judge: dict[str, Any]) -> str:
    """One line for logs and notifications: candidate vs reference on every metric."""
    cand = judge.get("candidate") or {}
    ref_name = "live" if judge.get("live") else "base"
    ref = judge.get(ref_name) or {}
    parts = []
    for key in ("bpb", *LOWER_METRICS, *OTHER_METRICS):
        c, r = _num(cand, key), _num(ref, key)
        if c is not None and r is not None:
            parts.append(f"{key} {r:.3f}→{c:.3f}")
    verdict = "passed" if judge.get("passed") else "rejected"
    return f"judge {verdict} (vs {ref_name}): " + ", ".join(parts)
