"""Training examples from mined files, without a teacher model.

Every generator is deterministic: randomness comes from an RNG seeded by the config seed
and the example's own identity (blob sha, chunk index, symbol), so an unchanged file
yields the same examples in every cycle.

Weights (``[mine.kinds]``): 0 turns a kind off; otherwise a weight w gives each eligible
unit (chunk, documented function, symbol question, commit) floor(w) examples plus one more
with probability frac(w). Kinds whose examples would be identical copies (continuation,
doc↔code, commit→diff) give at most one per unit.
"""

from __future__ import annotations

import hashlib
import random
import re
from bisect import bisect_right
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

from forged.common.fim import FORGED_TEXT, FimFormat
from forged.worker.bm25 import CodeIndex
from forged.worker.mine.chunker import Chunk, FileAnalysis, Symbol

BEGIN_QUOTE, END_QUOTE, ANSWER = "##begin_quote##", "##end_quote##", "<ANSWER>:"
RAFT_SYSTEM = (
    "Answer the question using the documents. Quote the lines you rely on between "
    f"{BEGIN_QUOTE} and {END_QUOTE}, then give the exact answer after {ANSWER}"
)
CODE_LANGS = frozenset({"python", "javascript", "typescript", "tsx", "go", "rust", "java"})
# Bumped when example lines change for the same inputs (part of the line store's key).
EXAMPLES_FORMAT = 6

# Examples must fit the trainer's context ([train] seq_len): it keeps the head of a longer
# one, which for chat examples is the prompt without the answer. What a chat example costs
# besides its texts, in tokens (SmolLM2's tokenizer): the template's role markers; and per
# RAFT document its "<DOCUMENT>" tags and line break.
_FRAME_TOKENS = 16
_DOC_TAG_TOKENS = 10
# Share of the context an example may fill by the estimate (``_est_tokens``): the margin
# for its error (at most 1.3x on the corpora measured).
_FILL = 0.75
_MIN_DOC_TOKENS = 32


# Tokens estimated as one piece per run of ASCII letters, digit, underscore, punctuation
# mark, non-ASCII character, line break and indentation run, counted with bytes.translate
# rather than a regex (faster). How close it comes to SmolLM2's count: docs/benchmarks.md.
_LETTERS = bytes(range(65, 91)) + bytes(range(97, 123))
_LETTERS_ONLY = bytes(b if b in _LETTERS else 32 for b in range(256))
_NOT_A_PIECE = _LETTERS + b" \t\r\x0b\x0c" + bytes(range(0x80, 0xC0))  # + UTF-8 continuations


def _est_tokens(text: str) -> int:
    """Tokens of ``text`` by a tokenizer-free estimate (see above)."""
    b = text.encode("utf-8", "surrogateescape")
    return (len(b.translate(_LETTERS_ONLY).split()) + len(b.translate(None, _NOT_A_PIECE))
            + b.count(b"\n  ") + b.count(b"\n\t"))


@dataclass
class MinedFile:
    path: str
    lang: str
    blob: str
    analysis: FileAnalysis
    changed: bool
    split: str  # "train" | "valid"


@dataclass
class Example:
    record: dict[str, Any]  # the mlx-lm record, without meta
    kind: str
    path: str | None
    lang: str | None
    changed: bool
    split: str
    extra: dict[str, Any] | None = None  # more meta (raft: answer, oracle)

    def to_json(self) -> dict[str, Any]:
        meta = {"kind": self.kind, "path": self.path, "lang": self.lang, "changed": self.changed}
        if self.extra:
            meta.update(self.extra)
        return {**self.record, "meta": meta}


def rng_for(seed: int, *parts: object) -> random.Random:
    h = hashlib.sha1(repr((seed, *parts)).encode()).digest()
    return random.Random(int.from_bytes(h[:8], "big"))


def count(weight: float, rng: random.Random, cap: int | None = None) -> int:
    n = int(weight) + (1 if rng.random() < weight - int(weight) else 0)
    return min(n, cap) if cap is not None else n


def _ex(f: MinedFile, kind: str, record: dict[str, Any], extra: dict[str, Any] | None = None) -> Example:
    return Example(record, kind, f.path, f.lang, f.changed, f.split, extra)


# ------------------------------------------------------------- per-file kinds


def continuation(f: MinedFile, weight: float, seed: int) -> Iterator[Example]:
    """Chunks as plain text after a path header."""
    for i, c in enumerate(f.analysis.chunks):
        if c.text.strip() and count(weight, rng_for(seed, "cont", f.blob, i), cap=1):
            yield _ex(f, "continuation", {"text": c.render()})


def _header(c: Chunk) -> str:
    r = c.render()
    return r[: len(r) - len(c.text.strip("\n").rstrip() + "\n")]


# Where an editor's cursor is when it asks for a completion (Refact's fine-tuning split):
# inside a line, from the cursor to the end of its line, or across several lines; and now
# and then nothing is missing at all, so that the model learns to stop at once.
FIM_MODES = (("inline", 0.05), ("line", 0.50), ("lines", 0.40), ("empty", 0.05))
# The most lines an editor sends before and after the cursor (llama.vscode: 256 / 64;
# Continue cuts by tokens, ~30% prefix / 20% suffix of 1,024): cut to the context after.
FIM_PREFIX_LINES, FIM_SUFFIX_LINES = 64, 24
FIM_MAX_LINES = 8  # a multi-line middle spans 2..8 lines
# Held-out files get this many times the cursors: the judge wants >= 64 generated middles
# and a tight interval, and held-out examples cost no training time.
HELDOUT_FIM = 8


def _file_lines(f: MinedFile) -> list[str]:
    """The file's lines (with their line breaks) as its chunks give them; a line no chunk
    covers (blank lines between definitions) is an empty line."""
    if not f.analysis.chunks:
        return []
    end = max(c.end_line for c in f.analysis.chunks)
    out = ["\n"] * end
    for c in f.analysis.chunks:
        for k, ln in enumerate(c.text.splitlines(keepends=True)):
            if c.start_line - 1 + k < end:
                out[c.start_line - 1 + k] = ln if ln.endswith("\n") else ln + "\n"
    return out


def _path_line(f: MinedFile) -> str:
    """The file's path as editors put it above the code (a comment in the file's language)."""
    from forged.worker.mine.chunker import COMMENT_PREFIX

    pre = "#" if f.lang == "python" else COMMENT_PREFIX.get(f.lang, "//")
    return f"{pre} path: {f.path}\n"


def _pick_mode(rng: random.Random) -> str:
    r = rng.random()
    for mode, share in FIM_MODES:
        if r < share:
            return mode
        r -= share
    return FIM_MODES[-1][0]


def _cursor_split(lines: list[str], a: int, mode: str, rng: random.Random) -> tuple[str, str, str] | None:
    """(prefix, middle, suffix) of the file for a cursor on line ``a`` in ``mode``."""
    body = lines[a].rstrip("\n")
    indent = len(body) - len(body.lstrip())
    before, after = "".join(lines[:a]), "".join(lines[a + 1:])
    if mode == "inline":
        if len(body) - indent < 8:
            return None
        i = rng.randrange(indent, len(body) - 3)
        j = rng.randrange(i + 1, len(body) - 1)
        return before + body[:i], body[i:j], body[j:] + "\n" + after
    if mode == "line":
        i = rng.randrange(indent, len(body)) if rng.random() < 0.7 else indent
        return before + body[:i], body[i:], "\n" + after
    if mode == "empty":
        return before + body, "", "\n" + after
    b = min(len(lines), a + rng.randint(2, FIM_MAX_LINES))
    if b - a < 2:  # the file's last line: no several lines to hide
        return None
    i = indent if rng.random() < 0.6 else rng.randrange(indent, len(body))
    rest = body[i:] + "\n" + "".join(lines[a + 1:])
    mid = rest[: len(body) - i + 1 + sum(map(len, lines[a + 1:b]))].rstrip("\n")
    if "\n" not in mid:  # blank lines only below the cursor's
        return None
    return before + body[:i], mid, rest[len(mid):]


def fim(f: MinedFile, weight: float, seed: int, context_tokens: int = 0,
        fmt: FimFormat = FORGED_TEXT) -> Iterator[Example]:
    """Editor-like autocomplete requests on the file's code, in the base's FIM format ``fmt``.

    Per chunk, ``weight`` cursors on its non-blank lines (see :data:`FIM_MODES`); the prompt
    holds the file's path line and up to :data:`FIM_PREFIX_LINES` / :data:`FIM_SUFFIX_LINES`
    of the file around the cursor, less the lines farthest from it until it fits
    ``context_tokens``. The completion is the middle ended by the base's stop token, so
    generation ends where an editor expects it to.
    """
    if f.lang not in CODE_LANGS:
        return
    lines = _file_lines(f)
    head = _path_line(f)
    for i, c in enumerate(f.analysis.chunks):
        rng = rng_for(seed, "fim", f.blob, i)
        rows = [r for r in range(c.start_line - 1, min(c.end_line, len(lines))) if lines[r].strip()]
        if len(rows) < 3:
            continue
        seen: set[tuple[int, str]] = set()
        for _ in range(count(weight, rng)):
            a, mode = rng.choice(rows[1:]), _pick_mode(rng)  # the first row is often a signature
            if (a, mode) in seen:
                continue
            seen.add((a, mode))
            lo, hi = max(0, a - FIM_PREFIX_LINES), min(len(lines), a + FIM_SUFFIX_LINES + FIM_MAX_LINES)
            got = _cursor_split(lines[lo:hi], a - lo, mode, rng)
            if got is None or (mode != "empty" and not got[1].strip()):
                continue
            yield _fim_ex(f, fmt, head, got, mode, context_tokens)


def _fim_ex(f: MinedFile, fmt: FimFormat, head: str, parts: tuple[str, str, str], mode: str,
            context_tokens: int) -> Example:
    pre, mid, suf = parts
    sl = suf.splitlines(keepends=True)
    suf = "".join(sl[:FIM_SUFFIX_LINES])
    if context_tokens:
        room = context_tokens * _FILL - _est_tokens(head + "".join(fmt.markers())) - 4
        pre, suf = _fit_around(pre, mid, suf, room)
    prefix = head + pre
    stop = fmt.stop[0] if fmt.stop else ""
    return _ex(f, "fim", {"prompt": fmt.render(prefix, suf), "completion": mid + stop},
               {"fim": {"mode": mode, "prefix_chars": len(prefix), "stop": stop}})


def _fit_around(pre: str, mid: str, suf: str, room: float) -> tuple[str, str]:
    """``pre`` and ``suf`` less their lines farthest from ``mid`` (first lines of ``pre``,
    last of ``suf``, the longer side first) until the three fit ``room`` estimated tokens;
    the lines touching ``mid`` always stay."""
    pl, sl = pre.splitlines(keepends=True), suf.splitlines(keepends=True)
    cp, cs = [_est_tokens(x) for x in pl], [_est_tokens(x) for x in sl]
    total = sum(cp) + sum(cs) + _est_tokens(mid)
    i, j = 0, len(sl)  # keep pl[i:] and sl[:j]
    while total > room and (i < len(pl) - 1 or j > 1):
        if i < len(pl) - 1 and (len(pl) - i >= j or j <= 1):
            total -= cp[i]
            i += 1
        else:
            j -= 1
            total -= cs[j]
    return "".join(pl[i:]), "".join(sl[:j])


def _documented(f: MinedFile) -> Iterator[Symbol]:
    for s in f.analysis.symbols:
        if s.doc and s.code and len(s.doc) >= 12 and s.kind in (
                "function", "method", "class", "constructor"):
            yield s


def doc_to_code(f: MinedFile, weight: float, seed: int) -> Iterator[Example]:
    for s in _documented(f):
        if count(weight, rng_for(seed, "d2c", f.blob, s.qualname, s.line), cap=1):
            user = f"In `{f.path}`, write the {s.kind} `{s.qualname}` documented as:\n\n{s.doc}"
            yield _ex(f, "doc_to_code", {"messages": [
                {"role": "user", "content": user},
                {"role": "assistant", "content": s.code.strip("\n")}]})


def code_to_doc(f: MinedFile, weight: float, seed: int, context_tokens: int = 0) -> Iterator[Example]:
    """Code → its documentation; with ``context_tokens``, only where the code leaves room
    for the documentation (the trainer keeps the head of a longer example: with a long
    enough code, the code without any of its answer; a long answer it learns in part)."""
    for s in _documented(f):
        if count(weight, rng_for(seed, "c2d", f.blob, s.qualname, s.line), cap=1):
            user = (f"Write the documentation for the {s.kind} `{s.qualname}` in `{f.path}`:\n\n"
                    f"```{f.lang}\n{s.code.strip(chr(10))}\n```")
            if context_tokens and _est_tokens(user) + _FRAME_TOKENS > context_tokens * _FILL:
                continue
            yield _ex(f, "code_to_doc", {"messages": [
                {"role": "user", "content": user},
                {"role": "assistant", "content": s.doc}]})


# ----------------------------------------------------------------------- RAFT

@dataclass
class _Question:
    file: MinedFile
    chunk_index: int
    question: str
    quote: str
    answer: str
    reason: str
    key: str
    name: str  # the identifier asked about: distractor excerpts centre on a line naming it


def _chunk_at(f: MinedFile, line: int) -> int:
    for i, c in enumerate(f.analysis.chunks):
        if c.start_line <= line <= c.end_line:
            return i
    return -1


def _line_with(text: str, needle: str) -> str:
    for ln in text.splitlines():
        if needle in ln and ln.strip():
            return ln.strip()
    return ""


def symbol_summary(fa: FileAnalysis) -> dict[str, list]:
    """What RAFT's repo-wide uniqueness checks need from one file (small, cacheable)."""
    return {"quals": [s.qualname for s in fa.symbols], "names": [s.name for s in fa.symbols],
            "pairs": sorted({(c.callee, c.caller) for c in fa.calls
                             if c.caller.rsplit(".", 1)[-1] != c.callee})}


def question_specs(summaries: Iterable[tuple[str, dict[str, list]]]) -> dict[str, tuple]:
    """path → (unique qualnames defined there, (callee, caller) pairs whose only call site is there).

    Questions are only asked when the answer is unique in the repo: a qualname defined once;
    a callee name defined once with exactly one caller. ``summaries``: (path, symbol_summary).
    """
    summaries = list(summaries)
    quals: dict[str, int] = defaultdict(int)
    names: dict[str, int] = defaultdict(int)
    owner: dict[str, str] = {}
    for path, sm in summaries:
        for q in sm["quals"]:
            quals[q] += 1
            owner[q] = path
        for n in sm["names"]:
            names[n] += 1
    callers: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for path, sm in summaries:
        for callee, caller in sm["pairs"]:
            if callee in names:
                callers[callee].append((path, caller))
    spec: dict[str, tuple[set[str], list[tuple[str, str]]]] = defaultdict(lambda: (set(), []))
    for q, n in quals.items():
        if n == 1 and len(q) >= 3 and not q.rsplit(".", 1)[-1].startswith("__"):
            spec[owner[q]][0].add(q)
    for name, who in callers.items():
        if len(who) != 1 or names[name] != 1 or len(name) < 3 or name.startswith("__"):
            continue
        path, caller = who[0]
        spec[path][1].append((name, caller))
    return {p: (tuple(sorted(qs)), tuple(sorted(cs))) for p, (qs, cs) in spec.items()}


def file_questions(f: MinedFile, quals: Iterable[str], calls: Iterable[tuple[str, str]]) -> list[_Question]:
    """The questions about one file, given its repo-wide unique qualnames and sole call sites."""
    quals = set(quals)
    qs: list[_Question] = []
    for s in f.analysis.symbols:
        if s.qualname not in quals:
            continue
        qual = s.qualname
        ci = _chunk_at(f, s.line)
        if ci < 0:
            continue
        text = f.analysis.chunks[ci].text
        sig = s.signature.strip()
        if sig and sig in text:
            qs.append(_Question(f, ci, f"Where is `{qual}` defined?", sig, f.path,
                                f"The definition of `{qual}` is in the document for `{f.path}`",
                                f"where:{qual}", s.name))
            if s.returns:
                line = _line_with(text[text.index(sig):], s.returns)
                if line:
                    qs.append(_Question(f, ci, f"What does `{qual}` return?", line, s.returns,
                                        f"The signature of `{qual}` declares its return type",
                                        f"returns:{qual}", s.name))
        if len(s.raises) == 1:
            exc = s.raises[0]
            for cj in range(ci, len(f.analysis.chunks)):
                c = f.analysis.chunks[cj]
                if c.start_line > s.end_line:
                    break
                line = next((ln.strip() for ln in c.text.splitlines()
                             if re.search(rf"\b(raise|throw)\b.*\b{re.escape(exc)}\b", ln)), "")
                if line:
                    qs.append(_Question(f, cj, f"What exception does `{qual}` raise?", line, exc,
                                        f"`{qual}` raises it directly", f"raises:{qual}", s.name))
                    break
    for name, caller in calls:
        line = next((c.line for c in f.analysis.calls if c.callee == name and c.caller == caller), None)
        if line is None:
            continue
        ci = _chunk_at(f, line)
        if ci < 0:
            continue
        quote = _line_with(f.analysis.chunks[ci].text, name + "(")
        if quote:
            qs.append(_Question(f, ci, f"Which function calls `{name}`?", quote, caller,
                                f"The call to `{name}` is inside `{caller}`", f"calls:{name}", name))
    return qs


def _questions(files: list[MinedFile]) -> list[_Question]:
    specs = question_specs((f.path, symbol_summary(f.analysis)) for f in files)
    return [q for f in files if f.path in specs for q in file_questions(f, *specs[f.path])]


def _then_random(first: list[int], n: int, rng: random.Random) -> Iterator[int]:
    yield from first
    if n > len(first):
        yield from (rng.randrange(n) for _ in range(64))


class _Doc:
    """A chunk as a RAFT document: rendered, and measured line by line for excerpts."""

    __slots__ = ("full", "est", "chunk", "head", "path_line", "code", "text", "starts", "cost",
                 "head_est", "path_est")

    def __init__(self, c: Chunk) -> None:
        self.full = c.render()
        self.est = _est_tokens(self.full)
        self.chunk = c
        self.code: list[str] = []
        self.text = self.head = self.path_line = ""
        self.starts: list[int] = []
        self.cost: list[float] = []
        self.head_est = self.path_est = 0

    def excerpt(self, budget: float, focus: str) -> tuple[str, float]:
        """The document cut to the lines around the first one holding ``focus`` (the first
        line if none does) that fit ``budget`` estimated tokens with the header, and its
        estimate. Its lines are verbatim lines of the chunk; the focus line is kept whole
        even when it alone is over the budget (an oracle must hold its quote)."""
        if self.est <= budget:
            return self.full, self.est
        if not self.code:  # measured on first use: most chunks are never cut
            self.head = _header(self.chunk)  # path line, enclosing signatures
            self.path_line = self.head[: self.head.index("\n") + 1]
            self.code = self.full[len(self.head):].rstrip("\n").split("\n")
            self.text = "\n".join(self.code)
            self.starts = list(accumulate((len(ln) + 1 for ln in self.code[:-1]), initial=0))
            self.head_est, self.path_est = _est_tokens(self.head), _est_tokens(self.path_line)
            # A line's share of the code's estimate, by its length past the indentation:
            # one estimate per chunk instead of one per line (which was most of RAFT's time).
            sizes = [len(ln.lstrip()) + 1 for ln in self.code]
            rate = (self.est - self.head_est) / sum(sizes)
            self.cost = [n * rate for n in sizes]
        code, cost = self.code, self.cost
        pos = self.text.find(focus) if focus else -1
        at = bisect_right(self.starts, pos) - 1 if pos >= 0 else 0
        a, b = at, at + 1
        head = self.head
        left = budget - self.head_est - cost[at]
        if left < 0:  # no room for the enclosing signatures: the path line alone
            head = self.path_line
            left = budget - self.path_est - cost[at]
        grew = True
        while grew:  # one line below, then one above, while either fits
            grew = False
            if b < len(code) and cost[b] <= left:
                left -= cost[b]
                b += 1
                grew = True
            if a > 0 and cost[a - 1] <= left:
                left -= cost[a - 1]
                a -= 1
                grew = True
        return head + "\n".join(code[a:b]) + "\n", budget - left


def _distractors(q: _Question, hits: list[int], oracle_n: int, files: list[MinedFile], rendered: list[str],
                 want: int, rng: random.Random) -> list[int]:
    """Up to ``want`` distractor documents for ``q``: its BM25 hits first (hard negatives);
    when they run out (tiny or repetitive repos), random chunks. Held-out code never
    enters a training example, and no distractor holds the answer."""
    out: list[int] = []
    for n in _then_random(hits, len(files), rng):
        if n in out or n == oracle_n or (q.file.split == "train" and files[n].split != "train"):
            continue
        if q.quote in rendered[n]:
            continue
        out.append(n)
        if len(out) == want:
            break
    return out


def raft(files: list[MinedFile], weight: float, k: int, p_oracle: float, seed: int,
         questions: list[_Question] | None = None, context_tokens: int = 0) -> list[Example]:
    """Symbol questions in RAFT form, with BM25 hard-negative distractors from ``files``.

    ``questions`` (default: all of ``files``' questions) must be about files in ``files``.
    ``context_tokens`` (the trainer's ``seq_len``; 0 = no limit): each example must fit
    it, or the trainer, which keeps the head of an over-long example, would be left with
    no answer to learn and drop it. Documents are then cut to the lines around the quote
    (oracle) or around a line naming what is asked about (distractors, still hard
    negatives), and there are fewer distractors when even short documents do not fit.
    """
    qs = _questions(files) if questions is None else questions
    if not qs:
        return []
    corpus: list[tuple[MinedFile, int]] = [
        (f, i) for f in files for i in range(len(f.analysis.chunks))]
    index = {(id(f), i): n for n, (f, i) in enumerate(corpus)}
    docs_of = [_Doc(f.analysis.chunks[i]) for f, i in corpus]
    doc_files = [f for f, _ in corpus]
    system_tokens = _est_tokens(RAFT_SYSTEM)
    rendered = [d.full for d in docs_of]
    retriever = CodeIndex(rendered)
    depth = min(len(corpus), k * 4 + 8)
    jobs: list[tuple[_Question, int]] = []
    for q in qs:
        n = count(weight, rng_for(seed, "raft", q.file.blob, q.key))
        jobs.extend((q, j) for j in range(n))
    if not jobs:
        return []
    hits = retriever.search([q.question for q, _ in jobs], depth)
    out: list[Example] = []
    for (q, j), row in zip(jobs, hits, strict=True):
        rng = rng_for(seed, "raft-doc", q.file.blob, q.key, j)
        oracle_n = index[(id(q.file), q.chunk_index)]
        distractors = _distractors(q, row, oracle_n, doc_files, rendered, k + 1, rng)
        keep = rng.random() < p_oracle
        answer = (f"{q.reason}: {BEGIN_QUOTE}{q.quote}{END_QUOTE}\n"
                  f"{ANSWER} {q.answer}")
        n_docs = k + 1
        texts = {n: rendered[n] for n in distractors[:k] + [oracle_n]}
        if context_tokens:
            room = (context_tokens * _FILL - _FRAME_TOKENS - system_tokens
                    - _est_tokens(q.question + answer))
            if room < _MIN_DOC_TOKENS + _DOC_TAG_TOKENS:
                continue  # not even the oracle's line fits: the trainer would skip it
            n_docs = max(1, min(k + 1, int(room // (_MIN_DOC_TOKENS + _DOC_TAG_TOKENS))))
            while True:  # cut the documents to share the room; drop one if cuts overflow
                per_doc = max(room / n_docs - _DOC_TAG_TOKENS, _MIN_DOC_TOKENS)
                chosen = distractors[: n_docs - 1] + [oracle_n] if keep else distractors[:n_docs]
                cut = {n: docs_of[n].excerpt(per_doc, q.quote if n == oracle_n else q.name)
                       for n in chosen}
                texts = {n: t for n, (t, _) in cut.items()}
                used = sum(e + _DOC_TAG_TOKENS for _, e in cut.values())
                if used <= room or n_docs == 1:
                    break
                n_docs -= 1
        docs = distractors[: n_docs - 1] + [oracle_n] if keep else distractors[:n_docs]
        rng.shuffle(docs)
        body = "\n".join(f"<DOCUMENT>{texts[n]}</DOCUMENT>" for n in docs)
        msgs = [{"role": "system", "content": RAFT_SYSTEM},
                {"role": "user", "content": f"{body}\n\nQuestion: {q.question}"},
                {"role": "assistant", "content": answer}]
        out.append(_ex(q.file, "raft", {"messages": msgs}, {"answer": q.answer, "oracle": keep}))
    return out


# ------------------------------------------------------------------- commits

def commit_examples(commits: Iterable[dict[str, Any]], weight: float, seed: int) -> Iterator[Example]:
    """Commit message as the instruction, the diff as the answer.

    ``commits``: dicts {sha, message, changed, parts: [(split, lang, path, diff)]}. A commit
    touching train and held-out files gives one example per side, so held-out code never
    reaches a training example.
    """
    for c in commits:
        if not count(weight, rng_for(seed, "commit", c["sha"]), cap=1):
            continue
        by_split: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
        for split, lang, path, diff in c["parts"]:
            by_split[split].append((lang, path, diff))
        for split, parts in sorted(by_split.items()):
            paths = [p for _, p, _ in parts]
            user = (f"Make this change ({', '.join(f'`{p}`' for p in paths)}):\n\n"
                    f"{c['message'].strip()}")
            diff = "".join(d for _, _, d in parts)
            yield Example({"messages": [{"role": "user", "content": user},
                                        {"role": "assistant", "content": diff}]},
                          "commit_diff", paths[0] if len(paths) == 1 else None, parts[0][0],
                          c["changed"], split)
