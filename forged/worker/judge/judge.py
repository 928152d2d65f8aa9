"""Judge: score base, live and candidate on the held-out split with the same code.

Metrics (all on ``valid.jsonl``, which training never sees):

* ``bpb`` — bits per UTF-8 byte of held-out code (``{"text"}`` records): total NLL in
  bits over total bytes. Tokenizer-independent, so models with different vocabularies
  stay comparable. Lower is better.
* ``fim_bpb`` — FIM-middle bits per byte: teacher-forced NLL of each held-out middle and
  its stop token given the prompt, in bits, over the middles' UTF-8 bytes; all held-out
  FIM examples (it is cheap). Lower is better.
* ``fim_exact`` / ``fim_edit_sim`` / ``fim_exact_line`` — greedy fill-in-the-middle as an
  editor gets it (meta kind ``fim``): the prompt rendered by the dataset's
  :class:`~forged.common.fim.FimFormat` (checked byte for byte against the mined one),
  generation ended by the format's stop token, the text before it compared with the
  held-out middle (trailing whitespace aside): exact match, 1 − Levenshtein / max length,
  and exact match on the middles within one line. ``max_fim`` examples. Each FIM metric
  comes with ``n`` and a 95% bootstrap interval (``*_ci``).
* ``raft_acc_oracle`` / ``raft_acc_distractors`` — RAFT questions: the model answers
  the chat, the text after ``<ANSWER>:`` (to the end of its line) must equal the
  record's ``meta.answer``; split by whether the oracle document was in context.
  Generation stops at the end of the first answer line, so the first answer counts.

Every model is scored on the same examples, so each metric is also compared per example
(candidate − reference, :mod:`forged.worker.judge.stats`): ``JudgeResult.deltas`` holds
the difference with its 95% bootstrap interval and n, and the gate reads those intervals.

Generation is batched (``Backend.generate_many``): prompts of similar length decode
together and each row stops as soon as its answer is complete (FIM: the reference's
number of lines; RAFT: the ``<ANSWER>`` line), or at its token budget.

Generation dominates the cost, so FIM and RAFT are capped at ``max_generate``
(RAFT at ``max_raft`` if set) examples each and bpb at ``max_examples`` texts; the subset is chosen once
(deterministically) and shared by all models.

This module imports nothing heavy at import time; the model is loaded through
``forged.worker.train.load_model`` inside :func:`judge` (worker process only). The daemon
needs only :func:`gate_decision`, which lives in :mod:`forged.worker.judge.gate`.
"""

from __future__ import annotations

import gc
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forged.common.fim import FimFormat, from_manifest
from forged.worker.judge import retrieval
from forged.worker.judge.gate import gate_decision, summary_line
from forged.worker.judge.shown import shown_examples, shown_indices

if TYPE_CHECKING:
    from forged.common.config import JudgeConfig, TrainConfig
    from forged.worker.judge.retrieval import RagSet

__all__ = [
    "FimExample", "Heldout", "JudgeError", "JudgeResult", "ModelScores", "RaftExample",
    "edit_similarity", "extract_answer", "gate_decision", "judge", "load_heldout",
    "score_model", "summary_line",
]

ANSWER_TAG = "<ANSWER>:"
FIM_MAX_NEW = 128
RAFT_MAX_NEW = 256
NLL_BATCH = 8  # texts per nll() call: progress granularity, not a speed knob
GEN_CHUNK = 16  # prompts per generate_many() call: the back end batches within it
# The interval half-width each paired difference should reach (its unit: bits/byte, or a
# fraction of examples). compare() records how many examples that takes, from the interval
# it got, so the sample sizes can be chosen for it (docs/judge-export.md, "Sample sizes").
TARGET_HALF_WIDTH = {"bpb": 0.01, "fim_bpb": 0.02, "fim_bpb_rag": 0.02, "fim_exact": 0.10, "fim_exact_line": 0.10,
                     "fim_edit_sim": 0.05, "raft_acc_oracle": 0.15, "raft_acc_distractors": 0.15}
MAX_SIM_CHARS = 2000  # edit distance is O(n·m) in Python; longer spans are cut


class JudgeError(ValueError):
    """The held-out split is missing or malformed; one line naming the problem."""


@dataclass
class FimExample:
    prompt: str
    completion: str  # the middle, without its stop token
    stop: str = ""  # the stop token the mined completion ends with
    mode: str = ""  # inline | line | lines | empty (examples.FIM_MODES); "" for old datasets
    # The cursor's surroundings and file, when the dataset names its FIM format: what the
    # report shows and what retrieval queries with ("" otherwise).
    prefix: str = ""
    suffix: str = ""
    path: str = ""

    @property
    def single_line(self) -> bool:
        return self.mode in ("inline", "line")


@dataclass
class RaftExample:
    messages: list[dict[str, str]]  # the conversation up to (not including) the answer
    answer: str
    oracle: bool
    reference: str = ""  # the held-out assistant turn, if any: bounds generation length


@dataclass
class Heldout:
    texts: list[str] = field(default_factory=list)
    fim: list[FimExample] = field(default_factory=list)  # generated (at most max_fim)
    fim_all: list[FimExample] = field(default_factory=list)  # teacher-forced (all)
    fim_format: FimFormat | None = None
    raft: list[RaftExample] = field(default_factory=list)
    skipped: int = 0  # records of other kinds (doc↔code, commit→diff) not scored
    rag: RagSet | None = None  # FIM examples with retrieved training-side context (retrieval.build)


@dataclass
class ModelScores:
    """One model's numbers on the held-out split (None: no examples of that kind)."""

    bpb: float | None = None
    fim_exact: float | None = None
    fim_edit_sim: float | None = None
    fim_bpb: float | None = None
    fim_exact_line: float | None = None
    raft_acc_oracle: float | None = None
    raft_acc_distractors: float | None = None
    n_texts: int = 0
    n_bytes: int = 0
    n_fim: int = 0
    n_fim_bpb: int = 0
    n_fim_line: int = 0
    # 95% bootstrap intervals [lo, hi] of the FIM metrics (None: no examples)
    fim_bpb_ci: list[float] | None = None
    fim_exact_ci: list[float] | None = None
    fim_edit_sim_ci: list[float] | None = None
    fim_exact_line_ci: list[float] | None = None
    # FIM-middle bits/byte with BM25-retrieved training-side context (retrieval.py; not gated)
    fim_bpb_rag: float | None = None
    fim_bpb_rag_ci: list[float] | None = None
    n_fim_rag: int = 0
    fim_rag_seconds: float | None = None
    fim_seconds_per_example: float | None = None  # generation + teacher forcing, per generated one
    n_raft_oracle: int = 0
    n_raft_distractors: int = 0
    seconds: float = 0.0
    # Per-example values behind each metric (same order for every model), for paired intervals.
    samples: dict[str, list[float]] = field(default_factory=dict, repr=False)
    # Generated middles of the examples the report shows (shown.SHOWN of them), by index in Heldout.fim.
    shown: dict[int, str] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["samples"], d["shown"]
        return d


@dataclass
class JudgeResult:
    base: ModelScores
    live: ModelScores | None
    candidate: ModelScores
    passed: bool
    reasons: list[str]
    seconds: float = 0.0
    deltas: dict[str, dict[str, Any]] = field(default_factory=dict)  # metric → paired candidate − reference
    reference: str = "base"
    examples: list[dict[str, str]] = field(default_factory=list)  # shown.shown_examples: side by side
    retrieval: dict[str, Any] | None = None  # retrieval.summarize(): FIM with BM25 context

    def to_dict(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "deltas": self.deltas,
            "examples": self.examples,
            "retrieval": self.retrieval,
            "base": self.base.to_dict(),
            "live": self.live.to_dict() if self.live else None,
            "candidate": self.candidate.to_dict(),
            "passed": self.passed,
            "reasons": list(self.reasons),
            "seconds": self.seconds,
        }


# ---------------------------------------------------------------- held-out data


def dataset_fim_format(dataset_dir: Path) -> FimFormat | None:
    """The FIM format the dataset was mined in (its manifest's ``fim_format``), if recorded."""
    try:
        manifest = json.loads((Path(dataset_dir) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return from_manifest(manifest)


def adapter_fim_format(adapter_dir: Path) -> FimFormat | None:
    """The FIM format an adapter was trained in (its ``forged_meta.json``), if recorded."""
    try:
        meta = json.loads((Path(adapter_dir) / "forged_meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return from_manifest(meta)


def served_as(data: Heldout, fmt: FimFormat | None) -> Heldout:
    """The held-out split with its FIM prompts rendered in ``fmt``: a live model trained in
    another format (an older order) is judged in the one its published template serves it
    in, as the editor meets it. The middles, and so the pairing, stay the same."""
    if fmt is None or data.fim_format is None or fmt == data.fim_format:
        return data

    def again(ex: FimExample) -> FimExample:
        return replace(ex, prompt=fmt.render(ex.prefix, ex.suffix))

    fim_all = [again(ex) for ex in data.fim_all]
    rag = retrieval.rendered(data.rag, fim_all, fmt) if data.rag else None
    return replace(data, fim=[again(ex) for ex in data.fim], fim_all=fim_all, fim_format=fmt, rag=rag)


def _fim_example(rec: dict[str, Any], meta: dict[str, Any], fmt: FimFormat | None, where: str) -> FimExample:
    """A held-out FIM record, its prompt rendered again through ``fmt`` from the mined
    prefix and suffix: the judge asks exactly what the trained format (and the published
    template) asks, or refuses a dataset mined in another format."""
    prompt, completion = rec.get("prompt"), rec.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise JudgeError(f"{where}: FIM record needs string prompt and completion")
    info = meta.get("fim") if isinstance(meta.get("fim"), dict) else {}
    stop = str(info.get("stop") or "")
    if stop and completion.endswith(stop):
        completion = completion[: -len(stop)]
    n = info.get("prefix_chars")
    if fmt is not None and isinstance(n, int):
        parts = fmt.split(prompt, n)
        if parts is None:
            raise JudgeError(f"{where}: FIM prompt is not in the {fmt.name} format the manifest names; re-mine")
        prefix, suffix = parts
        return FimExample(prompt, completion, stop, str(info.get("mode") or ""), prefix, suffix, str(meta.get("path") or ""))
    return FimExample(prompt, completion, stop, str(info.get("mode") or ""), path=str(meta.get("path") or ""))


def _add_record(h: Heldout, rec: dict, fmt: FimFormat | None, where: str) -> None:
    """File one held-out record under its task family (RAFT question, FIM, plain text)."""
    meta = rec.get("meta") or {}
    kind = meta.get("kind")
    if "messages" in rec and ("answer" in meta or kind == "raft"):
        msgs = rec["messages"]
        if not isinstance(msgs, list) or "answer" not in meta:
            raise JudgeError(f"{where}: RAFT record needs a messages list and meta.answer")
        reference = ""
        if msgs and msgs[-1].get("role") == "assistant":
            reference, msgs = msgs[-1].get("content", ""), msgs[:-1]
        h.raft.append(RaftExample(msgs, str(meta["answer"]), bool(meta.get("oracle", True)), reference))
    elif kind == "fim":
        h.fim_all.append(_fim_example(rec, meta, fmt, where))
    elif isinstance(rec.get("text"), str):
        if rec["text"].strip():
            h.texts.append(rec["text"])
    else:
        h.skipped += 1


def load_heldout(dataset_dir: Path, max_examples: int = 200, max_generate: int = 64, seed: int = 0,
                 max_raft: int = 0, max_fim: int = 0, fim_format: FimFormat | None = None,
                 max_fim_bpb: int = 0) -> Heldout:
    """Read ``dataset_dir/valid.jsonl`` into the three task families, subsampled
    (FIM: ``max_fim_bpb`` or all for bits per byte, ``max_fim`` or ``max_generate`` of those
    generated).

    Raises :class:`JudgeError` naming the file and line of a malformed record.
    """
    path = Path(dataset_dir) / "valid.jsonl"
    if not path.is_file():
        raise JudgeError(f"{path}: held-out split not found (was the dataset mined?)")
    fmt = fim_format if fim_format is not None else dataset_fim_format(dataset_dir)
    h = Heldout(fim_format=fmt)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise JudgeError(f"{path}:{lineno}: not JSON: {e}") from None
            if not isinstance(rec, dict):
                raise JudgeError(f"{path}:{lineno}: expected a JSON object")
            _add_record(h, rec, fmt, f"{path}:{lineno}")
    rng = random.Random(seed)

    def pick(xs: list, k: int) -> list:
        # Same subset for every model; original order kept for reproducible progress.
        if len(xs) <= k:
            return xs
        idx = sorted(rng.sample(range(len(xs)), k))
        return [xs[i] for i in idx]

    h.texts = pick(h.texts, max_examples)
    if max_fim_bpb:
        h.fim_all = pick(h.fim_all, max_fim_bpb)
    h.fim = pick(h.fim_all, max_fim or max_generate)
    # Keep the oracle / distractor mix: sample each side in proportion.
    ora = [r for r in h.raft if r.oracle]
    dis = [r for r in h.raft if not r.oracle]
    n_raft = max_raft or max_generate
    if len(h.raft) > n_raft:
        k_ora = round(n_raft * len(ora) / len(h.raft))
        ora, dis = pick(ora, k_ora), pick(dis, n_raft - k_ora)
    h.raft = ora + dis
    if not (h.texts or h.fim_all or h.raft):
        raise JudgeError(f"{path}: no scorable held-out records (text, fim or raft)")
    return h


# ---------------------------------------------------------------- metric helpers


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insert/delete/substitute, unit costs)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def edit_similarity(pred: str, ref: str) -> float:
    """1 − Levenshtein(pred, ref) / max(len); 1.0 for two empty strings."""
    pred, ref = pred[:MAX_SIM_CHARS], ref[:MAX_SIM_CHARS]
    n = max(len(pred), len(ref))
    return 1.0 if n == 0 else 1.0 - levenshtein(pred, ref) / n


def fim_prediction(generated: str, reference: str) -> str:
    """The generated middle cut to as many lines as the reference span."""
    n_lines = max(1, len(reference.rstrip("\n").split("\n")))
    return "\n".join(generated.split("\n")[:n_lines])


def _norm_answer(s: str) -> str:
    s = s.strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "`'\"":
        s = s[1:-1].strip()
    return s


def extract_answer(generated: str) -> str | None:
    """Text after the last ``<ANSWER>:`` to the end of its line; None if absent."""
    at = generated.rfind(ANSWER_TAG)
    if at < 0:
        return None
    return _norm_answer(generated[at + len(ANSWER_TAG):].split("\n", 1)[0])


def _fim_done(reference: str) -> Callable[[str], bool]:
    """Generation may stop once it has as many complete lines as the reference span."""
    n_lines = max(1, len(reference.rstrip("\n").split("\n")))
    return lambda text: text.count("\n") >= n_lines


def _answered(text: str) -> bool:
    """Generation may stop once an ``<ANSWER>:`` line is complete (the first answer given counts)."""
    at = text.find(ANSWER_TAG)
    return at >= 0 and "\n" in text[at:]


def bootstrap_ci(values: list[float], weights: list[float] | None = None, n: int = 1000,
                 seed: int = 0) -> list[float] | None:
    """95% percentile-bootstrap interval of mean(values), or of sum(values) / sum(weights)
    (a ratio such as bits per byte) when ``weights`` are given; None for no values."""
    from forged.worker.judge import stats

    if not values:
        return None
    if weights is not None:  # sum(v) / sum(w) is the w-weighted mean of v / w
        values = [v / max(w, 1e-12) for v, w in zip(values, weights, strict=True)]
    e = stats.mean_ci(values, weights, n_boot=n, seed=seed)
    return [round(e.lo, 6), round(e.hi, 6)]


def answer_matches(generated: str, answer: str) -> bool:
    got = extract_answer(generated)
    return got is not None and got == _norm_answer(answer)


# ---------------------------------------------------------------- scoring


def score_model(
    backend: Any, data: Heldout, name: str = "model", progress: Callable[[dict], None] | None = None
) -> ModelScores:
    """Score one model (a ``forged.worker.train`` Backend in its current adapter state)."""
    t0 = time.monotonic()
    s = ModelScores()
    report = progress or (lambda d: None)

    if data.texts:
        per_text: list[float] = []
        for i in range(0, len(data.texts), NLL_BATCH):
            per_text += backend.nll(data.texts[i : i + NLL_BATCH])
            report({"stage": "judge", "model": name, "metric": "bpb",
                    "done": min(i + NLL_BATCH, len(data.texts)), "total": len(data.texts)})
        s.n_texts = len(data.texts)
        nbytes = [max(len(t.encode("utf-8")), 1) for t in data.texts]
        s.n_bytes = sum(nbytes)
        s.bpb = sum(per_text) / math.log(2) / s.n_bytes
        s.samples["bpb"] = [n / math.log(2) / b for n, b in zip(per_text, nbytes, strict=True)]
        s.samples["bpb_weight"] = [float(b) for b in nbytes]

    t_fim = time.monotonic()
    if data.fim_all:
        _score_fim_bpb(backend, data, s, name, report)
    if data.fim:
        _score_fim_generated(backend, data, s, name, report)
        s.fim_seconds_per_example = round((time.monotonic() - t_fim) / len(data.fim), 4)
    retrieval.score(backend, data, s, name, report)  # after the FIM timing: it is timed apart

    if data.raft:
        hits: dict[bool, list[float]] = {True: [], False: []}
        for i in range(0, len(data.raft), GEN_CHUNK):
            part = data.raft[i : i + GEN_CHUNK]
            gens = backend.generate_many(
                [backend.chat_prompt(ex.messages) for ex in part],
                [min(len(backend.encode(ex.reference)) + 16, RAFT_MAX_NEW) if ex.reference else RAFT_MAX_NEW
                 for ex in part],
                [_answered] * len(part),
            )
            for ex, gen in zip(part, gens, strict=True):
                hits[ex.oracle].append(float(answer_matches(gen, ex.answer)))
            report({"stage": "judge", "model": name, "metric": "raft",
                    "done": min(i + GEN_CHUNK, len(data.raft)), "total": len(data.raft)})
        s.n_raft_oracle, s.n_raft_distractors = len(hits[True]), len(hits[False])
        if hits[True]:
            s.raft_acc_oracle = sum(hits[True]) / len(hits[True])
            s.samples["raft_acc_oracle"] = hits[True]
        if hits[False]:
            s.raft_acc_distractors = sum(hits[False]) / len(hits[False])
            s.samples["raft_acc_distractors"] = hits[False]
    s.seconds = time.monotonic() - t0
    return s


def _score_fim_bpb(backend: Any, data: Heldout, s: ModelScores, name: str,
                   report: Callable[[dict], None]) -> None:
    """Teacher-forced bits per byte of the held-out middles (and their stop tokens)."""
    nats: list[float] = []
    xs = data.fim_all
    for i in range(0, len(xs), NLL_BATCH):
        part = xs[i : i + NLL_BATCH]
        nats += backend.completion_nll([ex.prompt for ex in part], [ex.completion + ex.stop for ex in part])
        report({"stage": "judge", "model": name, "metric": "fim_bpb",
                "done": min(i + NLL_BATCH, len(xs)), "total": len(xs)})
    bits = [x / math.log(2) for x in nats]
    nbytes = [float(len(ex.completion.encode("utf-8"))) for ex in xs]
    s.n_fim_bpb = len(xs)
    s.fim_bpb = sum(bits) / max(sum(nbytes), 1.0)
    s.samples["fim_bpb"] = [b / max(n, 1.0) for b, n in zip(bits, nbytes, strict=True)]
    s.samples["fim_bpb_weight"] = [max(n, 1.0) for n in nbytes]
    s.fim_bpb_ci = bootstrap_ci(bits, nbytes)


def fim_budget(backend: Any, ex: FimExample) -> int:
    """New tokens a generated middle may take: the reference's length and a little slack."""
    return min(len(backend.encode(ex.completion)) + 8, FIM_MAX_NEW)


def _score_fim_generated(backend: Any, data: Heldout, s: ModelScores, name: str,
                         report: Callable[[dict], None]) -> None:
    """Greedy middles, ended by the format's stop token, against the held-out ones."""
    stops = list(data.fim_format.stop) if data.fim_format else []
    exact: list[float] = []
    sims: list[float] = []
    line: list[float] = []
    budgets = [fim_budget(backend, ex) for ex in data.fim]
    # Chunks of like budgets: a batch decodes as long as its longest budget.
    order = sorted(range(len(data.fim)), key=budgets.__getitem__)
    gens: dict[int, str] = {}
    for i in range(0, len(order), GEN_CHUNK):
        part = order[i : i + GEN_CHUNK]
        out = backend.generate_many([data.fim[k].prompt for k in part], [budgets[k] for k in part],
                                    [_fim_done(data.fim[k].completion) for k in part], stop_tokens=stops)
        gens.update(zip(part, out, strict=True))
        report({"stage": "judge", "model": name, "metric": "fim",
                "done": min(i + GEN_CHUNK, len(data.fim)), "total": len(data.fim)})
    show = set(shown_indices(len(data.fim)))
    for k, ex in enumerate(data.fim):
        pred = fim_prediction(cut_at_stop(gens[k], stops), ex.completion)
        if k in show:
            s.shown[k] = pred
        ok = float(pred.rstrip() == ex.completion.rstrip())
        exact.append(ok)
        sims.append(edit_similarity(pred.rstrip(), ex.completion.rstrip()))
        if ex.single_line:
            line.append(ok)
    s.n_fim, s.n_fim_line = len(exact), len(line)
    s.fim_exact, s.fim_edit_sim = sum(exact) / len(exact), sum(sims) / len(sims)
    s.samples["fim_exact"], s.samples["fim_edit_sim"] = exact, sims
    s.fim_exact_ci, s.fim_edit_sim_ci = bootstrap_ci(exact), bootstrap_ci(sims)
    if line:
        s.fim_exact_line, s.fim_exact_line_ci = sum(line) / len(line), bootstrap_ci(line)
        s.samples["fim_exact_line"] = line  # the same single-line examples for every model: paired


def cut_at_stop(text: str, stops: list[str]) -> str:
    """Text before the first stop string (a stop that is no single token arrives as text)."""
    for st in stops:
        if st and st in text:
            text = text[: text.index(st)]
    return text


def compare(candidate: ModelScores, reference: ModelScores, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Every metric both models have per-example values for: candidate − reference, paired,
    with a seeded 95% bootstrap interval (``stats.Paired.to_dict()`` per metric)."""
    from forged.worker.judge import stats

    out: dict[str, dict[str, Any]] = {}
    for key, c in candidate.samples.items():
        r = reference.samples.get(key)
        if key.endswith("_weight") or r is None or len(r) != len(c) or not c:
            continue
        w = candidate.samples.get(f"{key}_weight")
        d = stats.paired(c, r, w, seed=seed).to_dict()
        if key in TARGET_HALF_WIDTH:
            target = TARGET_HALF_WIDTH[key]
            d.update(target=target, n_for_target=stats.n_for_half_width(d["lo"], d["hi"], d["n"], target))
        out[key] = d
    return out


def judge(
    dataset_dir: Path,
    cfg_train: TrainConfig,
    cfg: JudgeConfig,
    candidate_adapter: Path,
    live_adapter: Path | None = None,
    progress: Callable[[dict], None] | None = None,
) -> JudgeResult:
    """Score base, live (if any) and candidate on the held-out split and apply the gate.

    The base is the candidate's back end with its adapter disabled, so base and
    candidate share one loaded model. The live adapter is loaded on a fresh base after
    the candidate's model is freed (two models never sit in memory at once).
    """
    from forged.worker.train import load_model

    t0 = time.monotonic()
    fmt = _checked_format(Path(dataset_dir), cfg_train.base_model)
    data = load_heldout(
        Path(dataset_dir), cfg.max_examples, cfg.max_generate, seed=cfg_train.seed, max_raft=cfg.max_raft,
        max_fim=cfg.max_fim, fim_format=fmt, max_fim_bpb=cfg.max_fim_bpb,
    )
    data.rag = retrieval.build(Path(dataset_dir), data, cfg.max_rag, seed=cfg_train.seed)
    if not Path(candidate_adapter).is_dir():
        raise JudgeError(f"candidate adapter not found: {candidate_adapter}")
    if live_adapter is not None and not Path(live_adapter).is_dir():
        raise JudgeError(f"live adapter not found: {live_adapter}")

    backend = load_model(cfg_train, Path(candidate_adapter))
    backend.set_adapter_enabled(False)
    base = score_model(backend, data, "base", progress)
    backend.set_adapter_enabled(True)
    cand = score_model(backend, data, "candidate", progress)
    del backend
    gc.collect()

    live = None
    if live_adapter is not None:
        lb = load_model(cfg_train, Path(live_adapter))
        lb.set_adapter_enabled(True)  # scored exactly as the candidate is (merged, on the torch back end)
        live = score_model(lb, served_as(data, adapter_fim_format(Path(live_adapter))), "live", progress)
        del lb
        gc.collect()

    ref_name, ref = ("live", live) if live is not None else ("base", base)
    deltas = compare(cand, ref, seed=cfg_train.seed)
    passed, reasons = gate_decision(base.to_dict(), live.to_dict() if live else None, cand.to_dict(), cfg,
                                    deltas=deltas)
    return JudgeResult(base, live, cand, passed, reasons, seconds=time.monotonic() - t0, deltas=deltas,
                       reference=ref_name, examples=shown_examples(data.fim, base, cand),
                       retrieval=retrieval.summarize(data.rag, base, cand, seed=cfg_train.seed))


def _checked_format(dataset_dir: Path, base_spec: str) -> FimFormat | None:
    """The dataset's FIM format, refused when it is not the base's (a base changed since the mine)."""
    from forged.common import fim
    from forged.common.models import resolve_base

    fmt = dataset_fim_format(dataset_dir)
    if fmt is None:
        return None
    base = resolve_base(base_spec)
    want = fim.for_base(base.kind, base.path)
    if want != fmt:
        raise JudgeError(f"{dataset_dir}: mined in FIM format {fmt.name!r} {fmt.markers()} but the base "
                         f"{base_spec} uses {want.name!r} {want.markers()}; re-mine")
    return fmt
