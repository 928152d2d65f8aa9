"""Against retrieval: does fine-tuning add to what an editor's context provider already gives?

An editor without a fine-tuned model still helps a base model with the repo's code: its
context provider retrieves chunks that look like the text around the cursor (keyword /
BM25 search over the repo) and puts them, each headed by its file path as a comment,
before the prefix. The judge does the same for a capped subset of the held-out FIM
examples: the top ``RAG_K`` BM25 chunks of the **training-side** code (``train.jsonl``'s
continuation chunks, which carry their ``path`` header; never a file that has a held-out
record) within ``RAG_MAX_CHARS``, prepended to the prefix inside the FIM prefix token, so
the model is asked exactly as the published template asks, with more prefix.

Each model gets ``fim_bpb_rag`` (teacher-forced FIM-middle bits per byte with the
context, cheap: no generation) with n and a 95% interval; :func:`summarize` then compares
base, base + context, candidate and candidate + context on the same middles (paired
intervals): fine-tuning alone, retrieval alone, both, and fine-tuning on top of
retrieval. Informational: the gate does not read it.

RAFT questions are not scored twice: their prompts already carry retrieved documents
(the oracle and BM25 hard-negative distractors), so ``raft_acc_*`` *is* the with-retrieval
score.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from forged.common.fim import FimFormat
    from forged.worker.judge.judge import FimExample, Heldout, ModelScores

RAG_K = 2  # chunks per example (editors' snippet providers give a handful; the cost grows with them)
RAG_MAX_CHARS = 1200  # context budget per example, ~300-400 tokens of code: bounds the judge's added time
QUERY_PREFIX_LINES = 30  # the text around the cursor that is searched with
QUERY_SUFFIX_LINES = 10
NLL_BATCH = 8
QA_NOTE = ("QA: RAFT questions already carry retrieved documents (the oracle and BM25 distractors), "
           "so the QA accuracies are with retrieval; they are not scored twice.")


@dataclass(frozen=True)
class Chunk:
    path: str
    text: str  # as mined: starts with the path as a comment in the file's language


@dataclass
class RagExample:
    index: int  # into Heldout.fim_all (its per-example fim_bpb is the no-context value)
    prompt: str  # the FIM prompt with the retrieved chunks before the prefix
    paths: list[str] = field(default_factory=list)  # where the chunks came from
    context: str = ""  # the retrieved chunks as the prompt carries them


@dataclass
class RagSet:
    """The retrieval baseline's inputs, built once and shared by every model."""

    examples: list[RagExample]
    corpus: int  # training-side chunks indexed
    excluded: int  # chunks left out because their file has held-out records
    k: int = RAG_K
    max_chars: int = RAG_MAX_CHARS


def heldout_paths(dataset_dir: Path) -> set[str]:
    """Every file with a record in ``valid.jsonl``: retrieval never draws from them."""
    out: set[str] = set()
    with open(Path(dataset_dir) / "valid.jsonl", encoding="utf-8") as f:
        for line in f:
            try:
                meta = json.loads(line).get("meta") or {}
            except (ValueError, AttributeError):
                continue
            if isinstance(meta, dict) and isinstance(meta.get("path"), str):
                out.add(meta["path"])
    return out


def train_chunks(dataset_dir: Path, exclude: set[str]) -> tuple[list[Chunk], int]:
    """The training split's code chunks (continuation records), minus ``exclude``d files."""
    from forged.worker.mine import linked
    from forged.worker.train.data import read_jsonl

    path = Path(dataset_dir) / "train.jsonl"
    if not linked.exists(path):
        return [], 0
    chunks, excluded = [], 0
    for rec in read_jsonl(path):
        p = rec.meta.get("path")
        if rec.kind != "text" or rec.meta.get("kind") != "continuation" or not isinstance(p, str):
            continue
        if p in exclude:
            excluded += 1
            continue
        chunks.append(Chunk(p, rec.data["text"]))
    return chunks, excluded


def query(ex: FimExample) -> str:
    """The text around the cursor, as a context provider searches with."""
    before = "\n".join(ex.prefix.split("\n")[-QUERY_PREFIX_LINES:])
    return before + "\n" + "\n".join(ex.suffix.split("\n")[:QUERY_SUFFIX_LINES])


def context(chunks: list[Chunk], k: int = RAG_K, max_chars: int = RAG_MAX_CHARS) -> str:
    """Up to ``k`` chunks, each cut to its share of the budget at a line end, a blank line apart."""
    share = max_chars // max(k, 1)
    parts = []
    for c in chunks[:k]:
        text = c.text if len(c.text) <= share else c.text[: c.text.rfind("\n", 0, share) + 1 or share]
        parts.append(text.rstrip("\n") + "\n\n")
    return "".join(parts)


def build(dataset_dir: Path, data: Heldout, max_examples: int, seed: int = 0) -> RagSet | None:
    """Retrieve for up to ``max_examples`` held-out FIM examples; None when there is nothing to
    retrieve from or no FIM example whose prefix and suffix are known (an old dataset)."""
    fmt = data.fim_format
    usable = [i for i, ex in enumerate(data.fim_all) if ex.prefix or ex.suffix]
    if fmt is None or not usable or max_examples <= 0:
        return None
    chunks, excluded = train_chunks(dataset_dir, heldout_paths(dataset_dir))
    if not chunks:
        return None
    from forged.worker.bm25 import CodeIndex

    if len(usable) > max_examples:  # the same subset every run and for every model
        usable = sorted(random.Random(seed).sample(usable, max_examples))
    hits = CodeIndex([c.text for c in chunks]).search([query(data.fim_all[i]) for i in usable], RAG_K)
    out = []
    for i, row in zip(usable, hits, strict=True):
        ex, got = data.fim_all[i], [chunks[j] for j in row]
        ctx = context(got)
        out.append(RagExample(i, _prompt(fmt, ctx, ex), [c.path for c in got], ctx))
    return RagSet(out, len(chunks), excluded)


def rendered(rag: RagSet, fim_all: list[FimExample], fmt: FimFormat) -> RagSet:
    """The same retrieved contexts, their prompts rendered in ``fmt``."""
    return replace(rag, examples=[replace(r, prompt=_prompt(fmt, r.context, fim_all[r.index])) for r in rag.examples])


def _prompt(fmt: FimFormat, ctx: str, ex: FimExample) -> str:
    """A FIM prompt with the retrieved chunks before the prefix, as an editor's context provider puts them."""
    return fmt.render(ctx + ex.prefix, ex.suffix)


def score(backend: Any, data: Heldout, s: ModelScores, name: str, report: Callable[[dict], None]) -> None:
    """Teacher-forced FIM-middle bits per byte with the retrieved context (``fim_bpb_rag``)."""
    from forged.worker.judge.judge import bootstrap_ci

    rag = data.rag
    if rag is None or not rag.examples:
        return
    t0 = time.monotonic()
    xs = rag.examples
    nats: list[float] = []
    for i in range(0, len(xs), NLL_BATCH):
        part = xs[i: i + NLL_BATCH]
        fims = [data.fim_all[r.index] for r in part]
        nats += backend.completion_nll([r.prompt for r in part], [ex.completion + ex.stop for ex in fims])
        report({"stage": "judge", "model": name, "metric": "fim_bpb_rag",
                "done": min(i + NLL_BATCH, len(xs)), "total": len(xs)})
    bits = [x / math.log(2) for x in nats]
    nbytes = [max(float(len(data.fim_all[r.index].completion.encode("utf-8"))), 1.0) for r in xs]
    s.n_fim_rag = len(xs)
    s.fim_bpb_rag = sum(bits) / sum(nbytes)
    s.samples["fim_bpb_rag"] = [b / n for b, n in zip(bits, nbytes, strict=True)]
    s.samples["fim_bpb_rag_weight"] = nbytes
    s.fim_bpb_rag_ci = bootstrap_ci(bits, nbytes)
    s.fim_rag_seconds = round(time.monotonic() - t0, 2)


def summarize(rag: RagSet | None, base: ModelScores, candidate: ModelScores, seed: int = 0) -> dict[str, Any]:
    """Fine-tuning against retrieval on the same middles: each value, and each gain with its
    paired 95% interval (``stats.Paired.to_dict()``; negative = fewer bits, better)."""
    from forged.worker.judge import stats

    if rag is None or "fim_bpb_rag" not in base.samples or "fim_bpb_rag" not in candidate.samples:
        return {"note": QA_NOTE + " No FIM retrieval baseline: no training-side chunks or no FIM examples."}
    idx = [r.index for r in rag.examples]
    w = base.samples["fim_bpb_rag_weight"]
    runs = {"base": [base.samples["fim_bpb"][i] for i in idx], "base_rag": base.samples["fim_bpb_rag"],
            "candidate": [candidate.samples["fim_bpb"][i] for i in idx],
            "candidate_rag": candidate.samples["fim_bpb_rag"]}

    def gain(new: str, old: str) -> dict[str, Any]:
        return stats.paired(runs[new], runs[old], w, seed=seed).to_dict()

    return {
        "n": len(idx), "k": rag.k, "max_chars": rag.max_chars,
        "corpus_chunks": rag.corpus, "excluded_chunks": rag.excluded,
        "bpb": {k: sum(v * x for v, x in zip(vals, w, strict=True)) / sum(w) for k, vals in runs.items()},
        "gains": {"retrieval": gain("base_rag", "base"), "fine_tuning": gain("candidate", "base"),
                  "both": gain("candidate_rag", "base"), "fine_tuning_over_retrieval": gain("candidate_rag", "base_rag")},
        "seconds": {"base": base.fim_rag_seconds, "candidate": candidate.fim_rag_seconds},
        "note": QA_NOTE,
    }
