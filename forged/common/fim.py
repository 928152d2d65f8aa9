"""Fill-in-the-middle formats: one per base, used by the miner, the judge and the template.

A base's FIM format is found from the base itself (:func:`detect`):

1. the GGUF's ``tokenizer.ggml.fim_pre_token_id`` / ``fim_suf_token_id`` /
   ``fim_mid_token_id`` (llama.cpp's converter writes them where it knows them);
2. otherwise a known family's tokens, looked up in the vocabulary;
3. otherwise forged's own textual format, :data:`FORGED_TEXT`: StarCoder's strings in
   StarCoder's suffix-prefix-middle (SPM) order, ``<fim_prefix><fim_suffix>{suffix}<fim_middle>{prefix}``.

Every stage renders through :meth:`FimFormat.render`, so the training examples, the
judge's prompts and the published template are the same bytes for the same prefix and
suffix. Bases with FIM tokens get the prefix-suffix-middle (PSM) order they were trained
in. A base without them has never seen FIM: in SPM order the middle continues the prefix
as plain text, which such a base already predicts, and only the suffix is new to it. The
published template's Suffix branch renders that order, so editors that send Ollama's
``suffix`` field need no configuration; a raw-prompt template must name the order.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class FimFormat:
    """The strings around a FIM request; ``stop`` ends a middle (the base's EOT / file separator)."""

    name: str
    prefix: str
    suffix: str
    middle: str
    stop: tuple[str, ...] = ()
    special: bool = True  # the markers are single tokens of the base's vocabulary
    spm: bool = False  # StarCoder's SPM order: the prefix last, right before the middle

    def render(self, prefix: str, suffix: str, marker: Callable[[str], str] = str) -> str:
        """The prompt that asks for the middle between ``prefix`` and ``suffix``;
        ``marker`` maps each marker (a template writer quotes them)."""
        p, s, m = (marker(x) for x in self.markers())
        return f"{p}{s}{suffix}{m}{prefix}" if self.spm else f"{p}{prefix}{s}{suffix}{m}"

    def split(self, prompt: str, prefix_chars: int) -> tuple[str, str] | None:
        """(prefix, suffix) of a prompt this format rendered with a prefix of
        ``prefix_chars`` characters; None if it did not render it."""
        if not 0 <= prefix_chars <= len(prompt):
            return None
        if self.spm:
            at = len(prompt) - prefix_chars
            prefix, rest = prompt[at:], prompt[:at]
        else:
            at = len(self.prefix) + prefix_chars
            prefix, rest = prompt[len(self.prefix):at], self.prefix + prompt[at:]
        lead, tail = self.prefix + self.suffix, self.middle
        if len(rest) < len(lead) + len(tail) or not (rest.startswith(lead) and rest.endswith(tail)):
            return None
        suffix = rest[len(lead): len(rest) - len(tail)]
        return (prefix, suffix) if self.render(prefix, suffix) == prompt else None

    def markers(self) -> tuple[str, str, str]:
        return self.prefix, self.suffix, self.middle

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "prefix": self.prefix, "suffix": self.suffix, "middle": self.middle,
                "stop": list(self.stop), "special": self.special, "spm": self.spm}

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> FimFormat:
        stop = d.get("stop") or ()
        return cls(str(d["name"]), str(d["prefix"]), str(d["suffix"]), str(d["middle"]),
                   tuple(str(s) for s in stop) if isinstance(stop, (list, tuple)) else (),
                   bool(d.get("special", True)), bool(d.get("spm", False)))


def from_manifest(manifest: object) -> FimFormat | None:
    """The FIM format a dataset was mined in (its manifest's ``fim_format``), if recorded and
    well formed."""
    d = manifest.get("fim_format") if isinstance(manifest, Mapping) else None
    if not isinstance(d, Mapping) or not all(isinstance(d.get(k), str) for k in ("name", "prefix", "suffix", "middle")):
        return None
    return FimFormat.from_dict(d)


QWEN = FimFormat("qwen", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>",
                 ("<|endoftext|>", "<|fim_pad|>", "<|file_sep|>", "<|repo_name|>"))
STARCODER = FimFormat("starcoder", "<fim_prefix>", "<fim_suffix>", "<fim_middle>",
                      ("<|endoftext|>", "<file_sep>"))
CODELLAMA = FimFormat("codellama", "<PRE> ", " <SUF>", " <MID>", ("<EOT>",))
DEEPSEEK = FimFormat("deepseek", "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>", ("<|EOT|>", "<｜end▁of▁sentence｜>"))
CODEGEMMA = FimFormat("codegemma", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>",
                      ("<|file_separator|>", "<eos>"))

# Known families, most specific first: CodeGemma shares Qwen's markers and differs by its stop.
FAMILIES: tuple[FimFormat, ...] = (CODEGEMMA, QWEN, STARCODER, CODELLAMA, DEEPSEEK)

# The bundled SmolLM2 has no FIM tokens: StarCoder's strings as plain text in SPM order,
# ended by its EOS.
FORGED_TEXT = FimFormat("forged-text", STARCODER.prefix, STARCODER.suffix, STARCODER.middle,
                        ("<|endoftext|>",), special=False, spm=True)

_GGUF_KEYS = ("tokenizer.ggml.fim_pre_token_id", "tokenizer.ggml.fim_suf_token_id", "tokenizer.ggml.fim_mid_token_id")
_GGUF_STOP_KEYS = ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.fim_sep_token_id", "tokenizer.ggml.eos_token_id")


def detect(tokens: Sequence[str], metadata: Mapping[str, object] | None = None) -> FimFormat:
    """The FIM format of a base with vocabulary ``tokens`` (GGUF ``tokenizer.ggml.tokens``)."""
    meta = metadata or {}
    tokens = [_norm(t) for t in tokens]
    vocab = set(tokens)
    ids = [meta.get(k) for k in _GGUF_KEYS]
    if all(isinstance(i, int) and 0 <= i < len(tokens) for i in ids):
        pre, suf, mid = (tokens[i] for i in ids)  # type: ignore[index]
        family = next((f for f in FAMILIES if tuple(map(_norm, f.markers())) == (pre, suf, mid)
                       and _stops(f, vocab)), None)
        if family is not None:
            return family
        stop = tuple(dict.fromkeys(tokens[i] for k in _GGUF_STOP_KEYS
                                   if isinstance(i := meta.get(k), int) and 0 <= i < len(tokens)))
        return FimFormat("gguf", pre, suf, mid, stop)
    for f in FAMILIES:
        if all(_norm(m) in vocab for m in f.markers()) and _stops(f, vocab):
            return f
    for f in FAMILIES:  # markers known, stop tokens named differently: keep the ones present
        if all(_norm(m) in vocab for m in f.markers()):
            return FimFormat(f.name, f.prefix, f.suffix, f.middle, tuple(s for s in f.stop if s in vocab))
    eos = meta.get("tokenizer.ggml.eos_token_id")
    stop = (tokens[eos],) if isinstance(eos, int) and 0 <= eos < len(tokens) else FORGED_TEXT.stop
    return dataclasses.replace(FORGED_TEXT, stop=stop)


def _stops(f: FimFormat, vocab: set[str]) -> bool:
    return any(_norm(s) in vocab for s in f.stop)


def _norm(token: str) -> str:
    """A vocabulary entry as text: SentencePiece marks a leading space with U+2581 (CodeLlama's ``▁<PRE>``)."""
    return token.replace("\u2581", " ").strip()


class FimError(ValueError):
    """A base whose vocabulary cannot be read; the message names the path."""


def for_base(kind: str, path: Path) -> FimFormat:
    """The FIM format of a resolved base (``BaseModel.kind`` / ``.path``), read cheaply:
    a GGUF's header (tokens and FIM ids) or an HF directory's tokenizer files, no model load."""
    if kind == "gguf":
        from forged.common.gguf import GGUFError, read_gguf_header

        try:
            kv = read_gguf_header(Path(path), arrays=True).kv
        except GGUFError as e:
            raise FimError(str(e)) from None
        tokens = kv.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list):
            raise FimError(f"{path}: GGUF has no tokenizer.ggml.tokens")
        return detect([str(t) for t in tokens], {k: v for k, v in kv.items() if not isinstance(v, list)})
    return detect(*_hf_vocab(Path(path)))


def _hf_vocab(d: Path) -> tuple[list[str], dict[str, object]]:
    """An HF directory's vocabulary in id order (tokenizer.json's model vocab and added
    tokens) and its EOS id as GGUF metadata would give it."""
    try:
        tj = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
        tc_file = d / "tokenizer_config.json"
        tc = json.loads(tc_file.read_text(encoding="utf-8")) if tc_file.is_file() else {}
    except (OSError, ValueError) as e:
        raise FimError(f"{d}: cannot read tokenizer.json ({e})") from None
    by_id: dict[int, str] = {}
    vocab = (tj.get("model") or {}).get("vocab") or {}
    if isinstance(vocab, dict):
        by_id.update({int(i): str(t) for t, i in vocab.items()})
    elif isinstance(vocab, list):  # Unigram: [piece, score] pairs
        by_id.update({i: str(p[0]) for i, p in enumerate(vocab)})
    by_id.update({int(a["id"]): str(a["content"]) for a in tj.get("added_tokens") or []})
    tokens = [by_id.get(i, "") for i in range(max(by_id, default=-1) + 1)]
    meta: dict[str, object] = {}
    eos = tc.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    if isinstance(eos, str) and eos in tokens:
        meta["tokenizer.ggml.eos_token_id"] = tokens.index(eos)
    return tokens, meta
