"""Paired comparisons with bootstrap intervals: how the judge and the benches tell a gain from noise.

Every metric the judge reports is a (weighted) mean over held-out examples, and every
model is scored on the *same* examples. So a comparison is paired: per example, the
candidate's value minus the reference's. The interval comes from resampling examples
with replacement (percentile bootstrap, seeded, so a judge run is reproducible).

Weights make ratio metrics exact: bits per byte is ``sum(bits) / sum(bytes)``, i.e. the
byte-weighted mean of each example's bits/byte, and resampling resamples numerator and
denominator together.

Only numpy is needed; nothing here knows about models.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

N_BOOT = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class Estimate:
    """A (weighted) mean with its bootstrap interval over ``n`` examples."""

    value: float
    lo: float
    hi: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0

    def fmt(self, digits: int = 4) -> str:
        return f"{self.value:+.{digits}f} [{self.lo:+.{digits}f}, {self.hi:+.{digits}f}] n={self.n}"


@dataclass(frozen=True)
class Paired:
    """Candidate − reference on the same examples: both means and the difference's interval."""

    candidate: float
    reference: float
    diff: Estimate

    @property
    def n(self) -> int:
        return self.diff.n

    def to_dict(self) -> dict[str, Any]:
        return {"candidate": self.candidate, "reference": self.reference, "diff": self.diff.value,
                "lo": self.diff.lo, "hi": self.diff.hi, "n": self.diff.n}


def _arrays(values: Sequence[float], weights: Sequence[float] | None) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(values, dtype=np.float64)
    w = np.ones_like(x) if weights is None else np.asarray(weights, dtype=np.float64)
    if x.ndim != 1 or w.shape != x.shape:
        raise ValueError(f"values and weights must be 1-d and the same length ({x.shape} vs {w.shape})")
    if x.size and (not np.all(np.isfinite(x)) or np.any(w < 0) or w.sum() <= 0):
        raise ValueError("values must be finite and weights non-negative with a positive sum")
    return x, w


def resample_index(n: int, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """``n_boot`` × ``n`` indices drawn with replacement; share one draw to keep comparisons paired."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _interval(stats: np.ndarray, level: float) -> tuple[float, float]:
    a = (1 - level) / 2
    lo, hi = np.quantile(stats, [a, 1 - a])
    return float(lo), float(hi)


def mean_ci(values: Sequence[float], weights: Sequence[float] | None = None, *, n_boot: int = N_BOOT,
            seed: int = 0, level: float = LEVEL) -> Estimate:
    """Weighted mean of ``values`` with a percentile-bootstrap interval (nan with no examples)."""
    x, w = _arrays(values, weights)
    if x.size == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    value = float((x * w).sum() / w.sum())
    idx = resample_index(x.size, n_boot, seed)
    ws = w[idx]
    boot = (x[idx] * ws).sum(1) / np.maximum(ws.sum(1), 1e-300)
    lo, hi = _interval(boot, level)
    return Estimate(value, lo, hi, int(x.size))


def clustered_mean_ci(values: Sequence[float], groups: Sequence[str], *, n_boot: int = N_BOOT, seed: int = 0,
                      level: float = LEVEL) -> Estimate:
    """Mean of ``values`` with an interval that resamples whole groups (e.g. held-out files).

    Several examples cut from one file are not independent draws: resampling examples
    treats them as if they were and gives too narrow an interval. Resampling the files
    keeps each file's examples together. ``n`` is still the number of examples.
    """
    x, _ = _arrays(values, None)
    if x.size == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    if len(groups) != x.size:
        raise ValueError(f"one group per value ({len(groups)} groups, {x.size} values)")
    names, of = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    sums = np.bincount(of, weights=x, minlength=len(names))
    counts = np.bincount(of, minlength=len(names)).astype(float)
    idx = resample_index(len(names), n_boot, seed)
    boot = sums[idx].sum(1) / np.maximum(counts[idx].sum(1), 1.0)
    lo, hi = _interval(boot, level)
    return Estimate(float(x.mean()), lo, hi, int(x.size))


def paired(candidate: Sequence[float], reference: Sequence[float], weights: Sequence[float] | None = None, *,
           n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL) -> Paired:
    """Mean(candidate) − mean(reference) over the same examples, with its bootstrap interval.

    ``candidate[i]`` and ``reference[i]`` are the two models' values on example ``i``;
    ``weights[i]`` (e.g. the example's bytes) weights both means.
    """
    c, w = _arrays(candidate, weights)
    r, _ = _arrays(reference, weights)
    if c.shape != r.shape:
        raise ValueError(f"paired samples differ in length ({c.size} vs {r.size})")
    if c.size == 0:
        return Paired(math.nan, math.nan, Estimate(math.nan, math.nan, math.nan, 0))
    d = mean_ci(c - r, w, n_boot=n_boot, seed=seed, level=level)
    return Paired(float((c * w).sum() / w.sum()), float((r * w).sum() / w.sum()), d)


def relative_gain(candidate: Sequence[float], reference: Sequence[float], weights: Sequence[float] | None = None,
                  *, n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL) -> Estimate:
    """1 − mean(candidate)/mean(reference) (e.g. the share of bits/byte removed), with its interval."""
    c, w = _arrays(candidate, weights)
    r, _ = _arrays(reference, weights)
    if c.size == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    value = 1 - float((c * w).sum() / (r * w).sum())
    idx = resample_index(c.size, n_boot, seed)
    ws = w[idx]
    boot = 1 - (c[idx] * ws).sum(1) / np.maximum((r[idx] * ws).sum(1), 1e-300)
    lo, hi = _interval(boot, level)
    return Estimate(value, lo, hi, int(c.size))


def n_for_half_width(lo: float, hi: float, n: int, target: float) -> int | None:
    """Examples needed for a 95% interval of half-width ``target``, from one of ``n``
    examples spanning ``[lo, hi]`` (a mean's interval narrows as 1/sqrt(n)). None when the
    interval has no width (every pair agreed, e.g. 0/64 exact matches on both sides): the
    spread cannot be estimated from it."""
    half = (hi - lo) / 2
    if n <= 0 or target <= 0:
        raise ValueError("n and target must be positive")
    return math.ceil(n * (half / target) ** 2) if half > 0 else None
