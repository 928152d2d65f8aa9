"""The miner's dataset → token sequences with completion-only loss masks.

A dataset directory holds ``train.jsonl``, ``valid.jsonl`` (optional) and
``manifest.json`` (the miner may keep ``train.jsonl`` linked into its line store,
:mod:`forged.worker.mine.linked`; :func:`read_jsonl` reads either form). Each line is
``{"text"}``, ``{"prompt", "completion"}`` or ``{"messages"}`` plus a ``meta`` object
(kind, path, lang, changed).

Every sequence starts with one *start token* (see :func:`start_id`) so that the first
real token is predicted from context, as in the judge's NLL. Loss is taken on all
tokens of a ``text`` record, on the completion (+ EOS) of a prompt/completion record and
on the assistant turns of a chat record. :class:`LossPolicy` adds more: with ``fim="all"``
a FIM record (meta kind ``fim``) carries loss on its prefix and suffix code as well,
StarCoder-style, but not on the format's markers (see :func:`code_mask`); with
``prompts="all"`` every other prompt and every chat message's content does too (a RAFT
question's documents are code), but not the chat template's markup.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class DatasetError(ValueError):
    """The dataset is missing, empty or malformed; the message names file and line."""


@dataclass
class Record:
    kind: str  # "text" | "prompt" | "messages"
    data: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return bool(self.meta.get("changed", True))


@dataclass
class Example:
    ids: list[int]
    mask: list[bool]  # mask[i]: token i is a loss target (predicted from ids[:i])

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_targets(self) -> int:
        return sum(self.mask)


def read_jsonl(path: Path) -> list[Record]:
    """Parse and validate one JSONL file; any malformed line is an error naming it."""
    from forged.worker.mine import linked

    out: list[Record] = []
    try:
        lines = linked.read_bytes(path).decode("utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read ({e})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path.name}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise DatasetError(f"{where}: expected a JSON object")
        meta = obj.get("meta") or {}
        if not isinstance(meta, dict):
            raise DatasetError(f"{where}: 'meta' must be an object")
        if isinstance(obj.get("text"), str):
            out.append(Record("text", {"text": obj["text"]}, meta))
        elif isinstance(obj.get("prompt"), str) and isinstance(obj.get("completion"), str):
            out.append(Record("prompt", {"prompt": obj["prompt"], "completion": obj["completion"]}, meta))
        elif isinstance(obj.get("messages"), list):
            msgs = obj["messages"]
            for m in msgs:
                if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                    raise DatasetError(f"{where}: each message needs string 'role' and 'content'")
            if not any(m["role"] == "assistant" for m in msgs):
                raise DatasetError(f"{where}: chat record has no assistant message to learn from")
            out.append(Record("messages", {"messages": msgs}, meta))
        else:
            raise DatasetError(
                f"{where}: expected 'text', 'prompt'+'completion' (strings) or 'messages' (list); got keys {sorted(obj)}"
            )
    return out


@dataclass
class Dataset:
    dir: Path
    train: list[Record]
    valid: list[Record]
    manifest: dict[str, Any]


def load_dataset(dataset_dir: Path) -> Dataset:
    d = Path(dataset_dir)
    if not d.is_dir():
        raise DatasetError(f"dataset directory {d} does not exist (run the miner first)")
    from forged.worker.mine import linked

    train_file = d / "train.jsonl"
    if not linked.exists(train_file):
        raise DatasetError(f"{d}: no train.jsonl (is this a forged dataset directory?)")
    train = read_jsonl(train_file)
    if not train:
        raise DatasetError(f"{train_file}: no examples — nothing to train on (did the miner find any source files?)")
    valid = read_jsonl(d / "valid.jsonl") if linked.exists(d / "valid.jsonl") else []
    manifest: dict[str, Any] = {}
    if (d / "manifest.json").is_file():
        try:
            manifest = json.loads((d / "manifest.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DatasetError(f"{d / 'manifest.json'}: unreadable ({e})") from None
    return Dataset(d, train, valid, manifest)


def select_replay(records: list[Record], replay_ratio: float, seed: int) -> list[Record]:
    """Incremental cycles: every changed example plus a replay sample of the unchanged ones.

    ``replay_ratio`` is the replay share of the resulting mix (0.3 → 30% replay), so
    knowledge of untouched code is rehearsed. With nothing marked changed, or nothing
    unchanged, all records are used.
    """
    changed = [r for r in records if r.changed]
    rest = [r for r in records if not r.changed]
    if not changed or not rest:
        return list(records)
    if replay_ratio >= 1:
        return list(records)
    n = round(len(changed) * replay_ratio / (1 - replay_ratio))
    rng = random.Random(seed)
    return changed + rng.sample(rest, min(n, len(rest)))


# ---------------------------------------------------------------- tokenization

def start_id(tok: Any) -> int:
    """The token every sequence starts with.

    The tokenizer's BOS when it adds one itself (llama-style); otherwise the document
    separator ``<|endoftext|>`` when the vocab has one (SmolLM2 was pretrained with it
    between documents; its BOS ``<|im_start|>`` is a chat-turn marker); else BOS/EOS.
    """
    probe = tok("a", add_special_tokens=True)["input_ids"]
    if tok.bos_token_id is not None and probe and probe[0] == tok.bos_token_id:
        return int(tok.bos_token_id)
    vocab = tok.get_vocab()
    if "<|endoftext|>" in vocab:
        return int(vocab["<|endoftext|>"])
    return int(tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id)


def encode(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def special_ids(tok: Any) -> set[int]:
    """Ids of the tokenizer's special tokens (BOS/EOS and added special tokens: FIM markers,
    file separators)."""
    return set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}


def token_ids(tok: Any, tokens: list[str] | tuple[str, ...]) -> list[int]:
    """The ids of those of ``tokens`` that are single tokens of ``tok``'s vocabulary."""
    out = []
    for t in tokens:
        ids = encode(tok, t)
        if len(ids) == 1:
            out.append(ids[0])
    return out


def completion_ids(tok: Any, prompt: str, completion: str, specials: set[int] | None = None
                   ) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of a prompt/completion record: tokenized apart, and
    EOS appended to the completion unless it already ends in a special token (a FIM
    middle ends in its format's stop)."""
    return encode(tok, prompt), _ended(tok, encode(tok, completion), specials)


def _ended(tok: Any, c: list[int], specials: set[int] | None) -> list[int]:
    """Completion ids with EOS appended, unless they already end in a special token."""
    if not c or c[-1] not in (specials if specials is not None else special_ids(tok)):
        c.append(int(tok.eos_token_id))
    return c


def code_mask(tok: Any, prompt: str, markers: tuple[str, ...]) -> tuple[list[int], list[bool]]:
    """A FIM prompt's ids (as :func:`encode` splits it) and its loss mask: its prefix and
    suffix code, not the format's markers. A model taught to predict the markers writes
    them back as its middle, most of all where they are plain text (the bundled base's
    ``forged-text`` format)."""
    enc = tok(prompt, add_special_tokens=False, return_offsets_mapping=True)
    spans = [(i, i + len(m)) for m in markers if m for i in _find_all(prompt, m)]
    return list(enc["input_ids"]), [not any(s < b and e > a for a, b in spans) for s, e in enc["offset_mapping"]]


def _find_all(text: str, sub: str) -> Iterator[int]:
    i = text.find(sub)
    while i >= 0:
        yield i
        i = text.find(sub, i + 1)


@dataclass(frozen=True)
class LossPolicy:
    """Which tokens carry loss besides a ``text`` record's, a completion (+ EOS) and the
    assistant turns (``[train] fim_loss`` and ``prompt_loss``)."""

    fim: str = "middle"  # "all": a FIM prompt's prefix and suffix code too (not its markers)
    prompts: str = "none"  # "all": every other prompt, and every chat message's content too
    fim_markers: tuple[str, ...] = ()


def tokenize_record(tok: Any, rec: Record, start: int, specials: set[int] | None = None,
                    loss: LossPolicy = LossPolicy()) -> Example:
    if rec.kind == "text":
        ids = encode(tok, rec.data["text"])
        return Example([start, *ids], [False] + [True] * len(ids))
    if rec.kind == "prompt":
        prompt, fim = rec.data["prompt"], rec.meta.get("kind") == "fim"
        if fim and loss.fim == "all":
            p, on_p = code_mask(tok, prompt, loss.fim_markers)
        else:
            p = encode(tok, prompt)
            on_p = [not fim and loss.prompts == "all"] * len(p)
        c = _ended(tok, encode(tok, rec.data["completion"]), specials)
        return Example([start, *p, *c], [False, *on_p, *[True] * len(c)])
    msgs = rec.data["messages"]
    full = tok.apply_chat_template(msgs, tokenize=False)
    spans: list[tuple[int, int]] = []
    at = 0
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            found = full.find(m["content"], at) if loss.prompts == "all" and m["content"] else -1
            if found >= 0:  # the content, not the template's markup
                at = found + len(m["content"])
                spans.append((found, at))
            continue
        before = tok.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = tok.apply_chat_template(msgs[: i + 1], tokenize=False)
        spans.append((len(before), len(upto)))
        at = len(upto)
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    mask = [any(a <= s < b for a, b in spans) for s, _ in enc["offset_mapping"]]
    return Example([start, *ids], [False, *mask])


def tokenize(tok: Any, records: list[Record], seq_len: int,
             dropped: Counter[str] | None = None, loss: LossPolicy = LossPolicy()) -> list[Example]:
    """Records → examples of at most ``seq_len`` tokens.

    Long ``text`` records are split into ``seq_len`` windows (each with a start token);
    long masked records keep their head; examples left without a target are dropped, and
    counted by kind in ``dropped``.
    """
    start = start_id(tok)
    specials = special_ids(tok)
    out: list[Example] = []
    for rec in records:
        ex = tokenize_record(tok, rec, start, specials, loss)
        if len(ex) <= seq_len:
            pieces = [ex]
        elif rec.kind == "text":
            body, step = ex.ids[1:], seq_len - 1
            pieces = [Example([start, *body[i : i + step]], [False] + [True] * len(body[i : i + step]))
                      for i in range(0, len(body), step)]
        else:
            pieces = [Example(ex.ids[:seq_len], ex.mask[:seq_len])]
        kept = [p for p in pieces if p.n_targets > 0]
        if not kept and dropped is not None:
            dropped[str(rec.meta.get("kind") or rec.kind)] += 1
        out.extend(kept)
    return out


def score_windows(ids: list[int], ctx: int, start_id: int) -> Iterator[list[int]]:
    """Windows of at most ``ctx`` tokens that together score every token of ``ids`` once.

    A text longer than the context is scored in consecutive windows, each re-started
    with the start token (both back ends score held-out loss this way).
    """
    for i in range(0, max(len(ids) - 1, 1), ctx - 1):
        chunk = ids[i : i + ctx] if i == 0 else [start_id, *ids[i + 1 : i + ctx]]
        if len(chunk) < 2:
            return
        yield chunk


def stop_hit(stop: list[str] | None) -> Callable[[str], bool] | None:
    """A predicate: does generated text contain one of the stop strings (None when none)."""
    stop = [s for s in stop or [] if s]
    return (lambda text: any(s in text for s in stop)) if stop else None


def cut_at_stop(text: str, stop: list[str] | None) -> str:
    """Generated text up to the first stop string that occurs in it, in the order given."""
    for s in stop or []:
        if s and s in text:
            text = text[: text.index(s)]
    return text
