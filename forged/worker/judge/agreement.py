"""How far two engines' logits agree: summed NLL and a streamed Pearson correlation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np


def mean_nll(logits: np.ndarray, ids: list[int]) -> tuple[float, int]:
    """(summed NLL in nats, tokens) of ids[1:] given logits rows [:-1].

    Works in the logits' float32 (a vocabulary-wide float64 copy per position costs more
    than the engines' forward passes); sums are float64.
    """
    import numpy as np

    z = logits[:-1]
    top = z.max(axis=1)
    e = z - top[:, None]
    np.exp(e, out=e)
    lse = np.log(e.sum(axis=1, dtype=np.float64)) + top
    tgt = np.asarray(ids[1:])
    nll = lse - z[np.arange(len(tgt)), tgt]
    return float(nll.sum(dtype=np.float64)), len(tgt)


@dataclass
class Moments:
    """Count, means and centred co-moments of two series, fed a piece at a time: a
    correlation over every position × vocabulary entry without concatenating them."""

    n: int = 0
    mx: float = 0.0
    my: float = 0.0
    sxx: float = 0.0
    syy: float = 0.0
    sxy: float = 0.0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        """Merge a piece (Chan et al.'s pairwise update: each piece centred on its own mean)."""
        import numpy as np

        x, y = x.ravel(), y.ravel()
        k = x.size
        if k == 0:
            return
        ax, ay = float(x.mean(dtype=np.float64)), float(y.mean(dtype=np.float64))
        cx, cy = x - np.float32(ax), y - np.float32(ay)
        n = self.n + k
        dx, dy = ax - self.mx, ay - self.my
        self.sxx += float(cx @ cx) + dx * dx * self.n * k / n
        self.syy += float(cy @ cy) + dy * dy * self.n * k / n
        self.sxy += float(cx @ cy) + dx * dy * self.n * k / n
        self.mx += dx * k / n
        self.my += dy * k / n
        self.n = n

    def sums_of_squares(self) -> tuple[float, float]:
        """Σx² and Σy² (uncentred), from the centred moments and the means."""
        return self.sxx + self.n * self.mx * self.mx, self.syy + self.n * self.my * self.my

    def correlation(self) -> float:
        """Pearson correlation; nan when either series is constant."""
        den = math.sqrt(self.sxx * self.syy)
        return self.sxy / den if den > 0 else float("nan")


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of two flattened arrays; nan when either is constant."""
    m = Moments()
    m.add(x, y)
    return m.correlation()
