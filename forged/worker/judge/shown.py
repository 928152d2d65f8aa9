"""The held-out FIM completions the report shows side by side: base against candidate.

A few examples, spread over the generated subset (not the best or the worst: the report
shows what the metrics average over), their text cut short so the stored result stays small.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from forged.worker.judge.judge import FimExample, ModelScores

SHOWN = 3
MAX_CHARS = 400  # each shown text; a middle longer than that is cut with an ellipsis
CONTEXT_LINES = 6  # of the prefix's tail; the suffix's head gets half


def shown_indices(n: int) -> list[int]:
    """``SHOWN`` indices spread evenly over ``n`` generated examples (deterministic)."""
    return sorted({i * n // SHOWN for i in range(SHOWN)}) if n else []


def _cut(text: str, limit: int = MAX_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _tail(text: str, lines: int) -> str:
    return _cut("\n".join(text.split("\n")[-lines:])[-MAX_CHARS:])


def _head(text: str, lines: int) -> str:
    return _cut("\n".join(text.split("\n")[:lines]))


def shown_examples(fim: list[FimExample], base: ModelScores, candidate: ModelScores) -> list[dict[str, str]]:
    """``{path, prefix, suffix, reference, base, candidate}`` for each shown example both models generated."""
    out = []
    for i in shown_indices(len(fim)):
        if i not in base.shown or i not in candidate.shown:
            continue
        ex = fim[i]
        out.append({"path": ex.path, "prefix": _tail(ex.prefix, CONTEXT_LINES),
                    "suffix": _head(ex.suffix, CONTEXT_LINES // 2), "reference": _cut(ex.completion),
                    "base": _cut(base.shown[i]), "candidate": _cut(candidate.shown[i])})
    return out
