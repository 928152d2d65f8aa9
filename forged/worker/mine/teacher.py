"""The optional teacher: an Ollama model that writes question/answer pairs about chunks.

Off unless ``[mine] teacher`` names a model (and ``[mine.kinds] teacher`` > 0); nothing
else in the miner needs it, and everything here fails soft: Ollama down, the model
missing, timeouts or garbage output leave the mine without teacher examples and say why
in the report (``MineReport.teacher``). forged never pulls a model.

One chat call per selected chunk: the chunk (already redacted, rendered with its path
header) → ``{"question", "answer"}``, asked for as JSON with Ollama's ``format`` set to a
JSON schema (grammar-constrained sampling, so even a small model returns parseable
output), temperature 0 and the config seed. Replies are parsed defensively, then pass the
secret scan (:func:`forged.worker.mine.redact.redact`) before anything is cached or written.

Selection is deterministic: a code chunk with at least one *anchor* (a name it defines,
or a distinctive identifier it uses: one with an underscore, a camelCase hump or a
digit) is picked with probability ``[mine.kinds] teacher`` (at most one question per
chunk: the same prompt at temperature 0 gives the same answer), seeded by ``seed`` and
the chunk's text, so an unchanged chunk keeps its place in every cycle.

Acceptance (checked when examples are built, so a rule change never needs re-asking):
the reply parses into two strings, neither empty nor over the schema's lengths, and the
question or the answer names one of the chunk's anchors (the cheap grounding rule: an
answer that names nothing the code defines or uses is not about this code). Within a
file a repeated question is a duplicate. Every rejection is counted by reason.

Answers are cached in the miner's SQLite cache keyed by (model, :data:`PROMPT_VERSION`,
hash of the prompt, which holds the path and the rendered chunk but no line numbers): a
re-mine never asks again for a chunk whose prompt did not change. The standard library only at import time; the
``ollama`` client is imported when a call is actually made.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from forged.worker.mine.chunker import Chunk
from forged.worker.mine.examples import CODE_LANGS, Example, MinedFile, count, rng_for
from forged.worker.mine.redact import redact

# Bump when the prompt, schema or options change: cached answers are keyed by it.
PROMPT_VERSION = "1"
# Bump when the acceptance rules or the example format change: stored lines are keyed by it.
RULES_VERSION = "1"

MAX_QUESTION = 300  # characters
MAX_ANSWER = 1500
NUM_PREDICT = 768  # tokens: room for both strings at their maximum lengths
MAX_ERRORS_IN_A_ROW = 3

# No maxLength: Ollama's sampler (llama.cpp) turns ``maxLength: n`` into ``char{0,n}`` and
# its grammar parser refuses repetitions past a sanity cap (~2,000, scaled by the rules
# before it), failing every call. Lengths are bounded by num_predict and checked after
# parsing instead.
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"question": {"type": "string"}, "answer": {"type": "string"}},
    "required": ["question", "answer"],
}

SYSTEM = (
    "You write training data for a code assistant that is fine-tuned on one repository. "
    "Given a piece of the repository's code, write one question a developer working in "
    "this repository would ask about it, and its answer. Both must be grounded in the "
    "code shown: name the function, class, method or variable the question is about, and "
    "state only what the code shows. Keep the answer short (one to four sentences; a "
    "short code snippet is fine). Reply with a JSON object: "
    '{"question": "...", "answer": "..."}'
)

_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DISTINCT = re.compile(r"[A-Za-z0-9]_[A-Za-z0-9]|[a-z][A-Z]|[A-Za-z][0-9]")
_FENCE = re.compile(r"^```[\w-]*\s*\n?|\n?```\s*$")


# ------------------------------------------------------------------- selection


@dataclass
class Item:
    """One selected chunk of a file, with its prompt and cache key."""

    index: int  # chunk index in the file
    chunk: Chunk
    anchors: frozenset[str]
    messages: list[dict[str, str]]
    key: str  # answer cache key


def anchors(chunk: Chunk, names: Iterable[str]) -> frozenset[str]:
    """Names a grounded question or answer about ``chunk`` can be expected to use.

    ``names``: what the chunk defines (symbol names and qualname parts) and where it sits
    (its enclosing symbol path). Plus identifiers in the text distinctive enough not to be
    English words: with an inner underscore, a camelCase hump or a digit (``max_retries``,
    ``parseArgs``, ``v2``). At least three characters each.
    """
    out = {n for n in names if len(n) >= 3}
    out.update(w for w in set(_WORD.findall(chunk.text)) if len(w) >= 3 and _DISTINCT.search(w))
    return frozenset(out)


def prompt(chunk: Chunk, lang: str) -> list[dict[str, str]]:
    """The chat messages for one chunk: its path, its enclosing signatures and its text, and
    nothing that moves when unrelated lines of the file change (no line numbers), so the
    answer stays cached while the chunk does."""
    user = (f"File `{chunk.path}` ({lang}):\n\n```{lang}\n{chunk.render()}```\n\n"
            "Write one question about this code and its answer, as JSON.")
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def cache_key(model: str, messages: list[dict[str, str]]) -> str:
    body = json.dumps([PROMPT_VERSION, model, messages], ensure_ascii=False)
    return hashlib.sha1(body.encode("utf-8", "surrogateescape")).hexdigest()


def select(f: MinedFile, weight: float, seed: int, model: str) -> list[Item]:
    """The chunks of ``f`` the teacher is asked about (deterministic: seed + chunk text)."""
    if f.lang not in CODE_LANGS or weight <= 0:
        return []
    syms = f.analysis.symbols
    out = []
    for i, c in enumerate(f.analysis.chunks):
        if sum(1 for ln in c.text.splitlines() if ln.strip()) < 3:
            continue
        th = hashlib.sha1(c.text.encode("utf-8", "surrogateescape")).hexdigest()
        if not count(weight, rng_for(seed, "teacher", th), cap=1):
            continue
        names = [p for s in syms if c.start_line <= s.line <= c.end_line
                 for p in (s.name, *s.qualname.split("."))]
        names += c.symbol.split(".") if c.symbol else []
        anc = anchors(c, names)
        if not anc:
            continue
        msgs = prompt(c, f.lang)
        out.append(Item(i, c, anc, msgs, cache_key(model, msgs)))
    return out


# ------------------------------------------------------------- replies, rules


def parse_reply(text: str, done_reason: str | None = None) -> tuple[dict[str, str], Counter[str]]:
    """A reply → ``{"q", "a"}`` (redacted) or ``{"bad": reason}``; plus redaction counts.

    Defensive: code fences, text around the object, a one-element list, keys in any case.
    """
    t = _FENCE.sub("", text.strip()).strip()
    obj: Any = None
    try:
        obj = json.loads(t)
    except ValueError:
        i, j = t.find("{"), t.rfind("}")
        if 0 <= i < j:
            try:
                obj = json.loads(t[i:j + 1])
            except ValueError:
                obj = None
    if isinstance(obj, list) and obj and isinstance(obj[0], dict):
        obj = obj[0]
    if not isinstance(obj, dict):
        return {"bad": "truncated" if done_reason == "length" else "unparseable"}, Counter()
    low = {str(k).strip().lower(): v for k, v in obj.items()}
    q, a = low.get("question"), low.get("answer")
    if not isinstance(q, str) or not isinstance(a, str):
        return {"bad": "bad_fields"}, Counter()
    q, cq = redact(q.strip())
    a, ca = redact(a.strip())
    return {"q": q, "a": a}, cq + ca


def check(entry: dict[str, str], anc: frozenset[str]) -> str | None:
    """Why a cached reply is rejected (None: accepted). Duplicates are found per file."""
    if "bad" in entry:
        return entry["bad"]
    q, a = entry["q"].strip(), entry["a"].strip()
    if not _WORD.search(q) or not _WORD.search(a):
        return "empty"
    if len(q) > MAX_QUESTION or len(a) > MAX_ANSWER:
        return "too_long"
    if anc.isdisjoint(_WORD.findall(q)) and anc.isdisjoint(_WORD.findall(a)):
        return "ungrounded"
    return None


def examples(f: MinedFile, items: list[Item], answers: dict[str, dict[str, str]],
             model: str) -> tuple[list[Example], list[str | None]]:
    """Teacher examples of one file from the answers known, and each item's verdict
    (None: accepted, a reason, or "pending" when no answer is known yet)."""
    out: list[Example] = []
    verdicts: list[str | None] = []
    seen: set[str] = set()
    for it in items:
        entry = answers.get(it.key)
        if entry is None:
            verdicts.append("pending")
            continue
        why = check(entry, it.anchors)
        norm = " ".join(entry.get("q", "").lower().split())
        if why is None and norm in seen:
            why = "duplicate"
        verdicts.append(why)
        if why is not None:
            continue
        seen.add(norm)
        user = f"In `{f.path}`: {entry['q']}"
        out.append(Example({"messages": [{"role": "user", "content": user},
                                         {"role": "assistant", "content": entry["a"]}]},
                           "teacher", f.path, f.lang, f.changed, f.split, {"teacher": model}))
    return out, verdicts


# --------------------------------------------------------------------- Ollama


def _base_name(model: str) -> str:
    return model if ":" in model.rsplit("/", 1)[-1] else model + ":latest"


class Stop(Exception):
    """No more calls this mine (the reason is in :attr:`Teacher.reason`)."""


@dataclass
class Teacher:
    """One mine's conversation with Ollama: bounded by calls, time and errors in a row.

    Talks to Ollama the way :mod:`forged.daemon.publish` does (the ``ollama`` client on
    ``[publish] ollama_host``). Never pulls: a missing model stops it with a reason.
    """

    host: str
    model: str
    timeout: float
    max_calls: int
    max_seconds: float
    seed: int = 0
    asked: int = 0
    errors: int = 0
    seconds: float = 0.0
    reason: str = ""
    unavailable: bool = False
    error_kinds: Counter[str] = field(default_factory=Counter)
    _client: Any = None
    _t0: float = field(default_factory=time.monotonic)
    _in_a_row: int = 0
    _was_loaded: bool = True

    def _stop(self, reason: str, unavailable: bool = False) -> Stop:
        self.reason = reason
        self.unavailable = unavailable
        return Stop(reason)

    def _missing(self) -> str:
        return (f"teacher model {self.model!r} is not in Ollama at {self.host} "
                f"(forged never pulls models: `ollama pull {self.model}`)")

    def _open(self) -> None:
        import httpx
        import ollama

        # A host that does not answer at all (a laptop's Ollama on another machine, asleep)
        # costs at most 10 s to find out, not a whole call's timeout.
        self._client = ollama.Client(host=self.host,
                                     timeout=httpx.Timeout(self.timeout, connect=min(10.0, self.timeout)))
        try:
            loaded = {_base_name(m.model or "") for m in self._client.ps().models}
            self._was_loaded = _base_name(self.model) in loaded
            self._client.show(self.model)
        except ollama.ResponseError as e:
            if e.status_code == 404:
                raise self._stop(self._missing(), True) from None
            raise self._stop(f"Ollama at {self.host} failed: {e.error} (HTTP {e.status_code})",
                             True) from None
        except (ConnectionError, httpx.TransportError) as e:
            detail = "connection refused" if isinstance(e, ConnectionError) else type(e).__name__
            raise self._stop(f"Ollama at {self.host} is unreachable ({detail})", True) from None

    def ask(self, messages: list[dict[str, str]]) -> tuple[str, str | None]:
        """The reply's text and done reason; raises :class:`Stop` when no more calls may be
        made, returns ("", "error") for a failed call (counted)."""
        if self.asked >= self.max_calls:
            raise self._stop(f"call cap reached (teacher_max_calls = {self.max_calls})")
        if time.monotonic() - self._t0 > self.max_seconds:
            raise self._stop(f"time budget reached (teacher_max_minutes = {self.max_seconds / 60:g})")
        if self._client is None:
            self._open()
        import httpx
        import ollama

        self.asked += 1
        t = time.monotonic()
        try:
            r = self._client.chat(
                model=self.model, messages=messages, format=SCHEMA, stream=False,
                options={"temperature": 0, "seed": self.seed, "num_predict": NUM_PREDICT})
            self._in_a_row = 0
            return (r.message.content or ""), r.done_reason
        except ollama.ResponseError as e:
            if e.status_code == 404:  # removed while we were asking
                raise self._stop(self._missing()) from None
            what = f"HTTP {e.status_code}: {e.error}"
            kind = f"http_{e.status_code}"
        except ConnectionError:
            raise self._stop(f"Ollama at {self.host} is unreachable (connection refused)") from None
        except httpx.TimeoutException:
            what = f"no reply within {self.timeout:g} s (teacher_timeout_seconds)"
            kind = "timeout"
        except (httpx.TransportError, ValueError) as e:  # dropped connection, bad response
            what = f"{type(e).__name__}: {e}"[:200]
            kind = type(e).__name__
        finally:
            self.seconds += time.monotonic() - t
        self.errors += 1
        self.error_kinds[kind] += 1
        self._in_a_row += 1
        if self._in_a_row >= MAX_ERRORS_IN_A_ROW:
            raise self._stop(f"{self._in_a_row} teacher calls in a row failed, last: {what}")
        return "", "error"

    def close(self) -> None:
        """Unload the teacher if this mine loaded it (training comes next and needs the
        memory); a model the user already had loaded stays loaded."""
        if self._client is None:
            return
        try:
            if self.asked and not self._was_loaded:
                self._client.generate(model=self.model, keep_alive=0)
        except Exception:  # noqa: BLE001 - best effort; the mine is done either way
            pass
        finally:
            self._client.close()
            self._client = None
