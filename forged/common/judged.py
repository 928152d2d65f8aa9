"""A judged cycle's metrics as short text, each with its n and 95% interval.

One wording for every place a user reads the judge's numbers (``forgectl status``, the
approval notification, the report), so they never disagree. Reads the judge's stored
result (``JudgeResult.to_dict()``: per-model scores and ``deltas``, the paired
candidate − reference differences with ``lo``/``hi``/``n``); standard library only, as
the daemon imports it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# metric → (label, unit); "ratio" is a lower-is-better rate in bits, "share" a 0..1 rate.
METRICS: dict[str, tuple[str, str]] = {
    "bpb": ("bpb", "ratio"),
    "fim_bpb": ("FIM-middle bpb", "ratio"),
    "fim_bpb_rag": ("FIM-middle bpb + retrieval", "ratio"),
    "fim_exact": ("FIM exact", "share"),
    "fim_exact_line": ("FIM exact (one line)", "share"),
    "fim_edit_sim": ("FIM edit similarity", "share"),
    "raft_acc_oracle": ("QA accuracy (oracle in context)", "share"),
    "raft_acc_distractors": ("QA accuracy (distractors only)", "share"),
}
# Where a score dict counts the examples behind a metric (for results stored without deltas).
N_FIELDS = {"bpb": "n_texts", "fim_bpb": "n_fim_bpb", "fim_bpb_rag": "n_fim_rag", "fim_exact": "n_fim",
            "fim_exact_line": "n_fim_line", "fim_edit_sim": "n_fim", "raft_acc_oracle": "n_raft_oracle",
            "raft_acc_distractors": "n_raft_distractors"}
MINUS = "−"


@dataclass(frozen=True)
class Change:
    """A paired change as shown: the point value and its 95% interval, in ``unit``."""

    value: float
    lo: float
    hi: float
    unit: str  # "%" of the reference, or " pts"

    @property
    def finite(self) -> bool:
        return all(map(math.isfinite, (self.value, self.lo, self.hi)))


@dataclass(frozen=True)
class MetricLine:
    """One metric of a judged cycle: reference → candidate, the paired difference's interval."""

    key: str
    label: str
    unit: str
    reference: float
    candidate: float
    diff: float | None = None  # candidate − reference, None when no paired delta was stored
    lo: float | None = None
    hi: float | None = None
    n: int | None = None
    paired_reference: float | None = None  # the reference's mean over the paired examples

    @property
    def lower_is_better(self) -> bool:
        return self.unit == "ratio"

    def change(self) -> Change | None:
        """The change for display: a rate's in percentage points, a ratio's relative to the
        reference's mean (the difference's interval over a fixed denominator: the reference's
        own noise is in the paired difference already); None without an interval."""
        if self.diff is None or self.lo is None or self.hi is None:
            return None
        if self.unit == "share":
            scale, suffix = 100.0, " pts"
        else:
            denominator = self.paired_reference or self.reference
            scale, suffix = (100.0 / denominator if denominator else math.nan), "%"
        return Change(self.diff * scale, self.lo * scale, self.hi * scale, suffix)

    def verdict(self) -> int:
        """+1 better, −1 worse (the whole interval on one side of zero), 0 within noise or unknown."""
        c = self.change()
        if c is None or not (c.lo > 0 or c.hi < 0):
            return 0
        return 1 if (c.lo > 0) != self.lower_is_better else -1

    def text(self) -> str:
        """E.g. ``FIM-middle bpb 1.80→1.54 (−14.5%, 95% CI −15.7…−13.4%, n=276)``."""
        if self.unit == "share":
            head = f"{self.label} {self.reference:.1%}→{self.candidate:.1%}"
        else:
            head = f"{self.label} {self.reference:.2f}→{self.candidate:.2f}"
        n = f"n={self.n}" if self.n is not None else "n=?"
        c = self.change()
        if c is None:
            return f"{head} ({n}, no interval stored)"
        return f"{head} ({_signed(c.value)}{c.unit}, 95% CI {_signed(c.lo)}…{_signed(c.hi)}{c.unit}, {n})"


def paired_line(key: str, label: str, unit: str, d: Any, reference: Any = None, candidate: Any = None,
                n: Any = None) -> MetricLine | None:
    """A MetricLine from a stored paired delta (``{candidate, reference, diff, lo, hi, n}``),
    the point values taken from the delta unless given; None without both values."""
    d = _dict(d)
    r = finite_number(reference) if reference is not None else finite_number(d.get("reference"))
    c = finite_number(candidate) if candidate is not None else finite_number(d.get("candidate"))
    if r is None or c is None:
        return None
    count = next((v for v in (d.get("n"), n) if isinstance(v, int) and not isinstance(v, bool) and v >= 0), None)
    return MetricLine(key, label, unit, r, c, finite_number(d.get("diff")), finite_number(d.get("lo")), finite_number(d.get("hi")), count,
                      finite_number(d.get("reference")))


def _signed(x: float) -> str:
    return f"{x:+.1f}".replace("-", MINUS) if math.isfinite(x) else "?"


def finite_number(v: Any) -> float | None:
    """A stored value as a float when it is a finite number (not a bool), else None."""
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


def _dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def reference_name(judge: dict[str, Any]) -> str:
    """The model the candidate is compared with: the live one, or the base."""
    ref = judge.get("reference")
    if ref in ("live", "base"):
        return str(ref)
    return "live" if isinstance(judge.get("live"), dict) and judge["live"] else "base"


def metric_lines(judge: Any) -> list[MetricLine]:
    """Every known metric both models were scored on, in a fixed order; tolerant of any stored JSON."""
    judge = _dict(judge)
    cand, ref = _dict(judge.get("candidate")), _dict(judge.get(reference_name(judge)))
    deltas = _dict(judge.get("deltas"))
    out: list[MetricLine] = []
    for key, (label, unit) in METRICS.items():
        line = paired_line(key, label, unit, deltas.get(key), reference=ref.get(key), candidate=cand.get(key),
                           n=cand.get(N_FIELDS[key]))
        if line is not None:
            out.append(line)
    return out


def judge_text(judge: Any) -> list[str]:
    """``metric_lines`` as text, one line per metric."""
    return [m.text() for m in metric_lines(judge)]
