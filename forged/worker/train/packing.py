"""Rows for training: packing (PyTorch) and real-length bucketing (MLX).

Packing puts several examples into one ``seq_len`` row; each keeps its own positions
(``position_ids`` restart at 0) and attends only to itself (``segment_ids`` → a
block-diagonal causal mask), so a packed batch has the same loss as the same examples
padded one per row — minus nearly all the padding.

Bucketing (for back ends without per-example masks) keeps one example per row and
batches examples of similar *token* length together, padding each batch only to its
longest row (mlx-lm sorts by the number of JSON keys, which buckets nothing).

The order is a pure function of (examples, seed, epoch), so a resumed run sees the
same rows: the data position is just (epoch, row index).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from forged.worker.train.data import Example

IGNORE = -100


@dataclass
class Row:
    ids: list[int]
    labels: list[int]  # labels[t] = ids[t+1] if that token is a target of the same example, else IGNORE
    pos: list[int]
    seg: list[int]  # 1.. per example; 0 = padding

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_targets(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def _append(row: Row, ex: Example) -> None:
    seg = (row.seg[-1] if row.seg else 0) + 1
    n = len(ex.ids)
    row.ids.extend(ex.ids)
    row.labels.extend([ex.ids[t + 1] if ex.mask[t + 1] else IGNORE for t in range(n - 1)] + [IGNORE])
    row.pos.extend(range(n))
    row.seg.extend([seg] * n)


def pack(examples: list[Example], seq_len: int, window: int = 64) -> list[Row]:
    """First-fit packing in the given order (over the last ``window`` open rows)."""
    rows: list[Row] = []
    fill: list[int] = []
    open_from = 0
    for ex in examples:
        n = len(ex.ids)
        if n > seq_len:
            raise ValueError(f"example of {n} tokens is longer than seq_len {seq_len}")
        placed = False
        for i in range(max(open_from, len(rows) - window), len(rows)):
            if fill[i] + n <= seq_len:
                _append(rows[i], ex)
                fill[i] += n
                placed = True
                break
        if not placed:
            rows.append(Row([], [], [], []))
            fill.append(0)
            _append(rows[-1], ex)
            fill[-1] = n
    return rows


def single(examples: list[Example]) -> list[Row]:
    """One example per row (unpacked)."""
    rows = []
    for ex in examples:
        r = Row([], [], [], [])
        _append(r, ex)
        rows.append(r)
    return rows


def epoch_rows(examples: list[Example], *, seq_len: int, seed: int, epoch: int, mode: str,
               batch_size: int = 1) -> list[Row]:
    """The rows of one epoch, in training order ("pack" | "bucket" | "none")."""
    order = list(examples)
    rng = random.Random(seed * 1_000_003 + epoch)
    rng.shuffle(order)
    if mode == "pack":
        rows = pack(order, seq_len)
        rng.shuffle(rows)
        return rows
    if mode == "bucket":
        # Sort by length inside windows of 16 batches, batch, then shuffle the batches:
        # similar lengths share a batch while the data order stays random.
        chunk = 16 * batch_size
        batches: list[list[Row]] = []
        for i in range(0, len(order), chunk):
            part = sorted(order[i : i + chunk], key=len)
            rows = single(part)
            batches.extend(rows[j : j + batch_size] for j in range(0, len(rows), batch_size))
        rng.shuffle(batches)
        # A short batch (end of the last window) goes last, so the stream's batch
        # boundaries stay aligned with the length-sorted groups.
        batches.sort(key=lambda b: len(b) < batch_size)
        return [r for b in batches for r in b]
    return single(order)


class RowStream:
    """An endless, resumable stream of rows over epochs."""

    def __init__(self, examples: list[Example], *, seq_len: int, seed: int, mode: str, batch_size: int,
                 epoch: int = 0, index: int = 0) -> None:
        if not examples:
            raise ValueError("no examples to train on")
        self.examples, self.seq_len, self.seed, self.mode, self.batch_size = examples, seq_len, seed, mode, batch_size
        self.epoch, self.index = epoch, index
        self._rows = self._epoch(epoch)

    def _epoch(self, e: int) -> list[Row]:
        return epoch_rows(self.examples, seq_len=self.seq_len, seed=self.seed, epoch=e, mode=self.mode,
                          batch_size=self.batch_size)

    def take(self, n: int) -> list[Row]:
        out: list[Row] = []
        while len(out) < n:
            if self.index >= len(self._rows):
                self.epoch += 1
                self.index = 0
                self._rows = self._epoch(self.epoch)
            k = min(n - len(out), len(self._rows) - self.index)
            out.extend(self._rows[self.index : self.index + k])
            self.index += k
        return out

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def rows_per_epoch(self) -> int:
        return len(self._rows)


def collate(rows: list[Row], pad_id: int, multiple: int = 8) -> dict[str, list[list[int]]]:
    """Pad rows to the longest (rounded up to ``multiple``); plain lists, framework-agnostic."""
    T = max(len(r) for r in rows)
    T = -(-T // multiple) * multiple
    out: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": [], "segment_ids": []}
    for r in rows:
        p = T - len(r)
        out["input_ids"].append(r.ids + [pad_id] * p)
        out["labels"].append(r.labels + [IGNORE] * p)
        out["position_ids"].append(r.pos + [0] * p)
        out["segment_ids"].append(r.seg + [0] * p)
    return out
