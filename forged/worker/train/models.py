"""Cached conversions of a base model for the training back ends (tokenizer, fp32 weights)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from forged.common.chat import CHATML_JINJA
from forged.common.models import BaseModel

# ---------------------------------------------------------------- conversions (cached)

# transformers converts a GGUF to fp32 torch weights in ~25 s (~55 s on a loaded 2-core
# box) — paid by every worker stage that loads the model (train, judge, fidelity ×2).
# A safetensors copy loads in ~1 s, so bases up to this size are converted once and
# kept; larger ones (a 1.5B base would be 6 GB of fp32) are converted on every load.
DEQUANT_CACHE_MAX_BYTES = 2 << 30
DEQUANTIZED, DEQUANTIZED_MARKER = "dequantized", "model.safetensors"  # cache kind, file written last


def _conversion_dir(kind: str, base: BaseModel) -> Path:
    from forged.common.paths import resolve

    return resolve().cache_dir / kind / base.sha256[:16]


def _cached_conversion(kind: str, base: BaseModel, done_marker: str, build: Any) -> Path:
    """``cache/<kind>/<sha>``, built once by ``build(tmp_dir)`` and renamed into place.

    The rename makes it atomic: a concurrent builder's copy is discarded, a crashed one
    leaves only a ``.tmp<pid>`` directory that is never read.
    """
    cache = _conversion_dir(kind, base)
    if (cache / done_marker).exists():
        return cache
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    build(tmp)
    try:
        tmp.rename(cache)
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return cache


def tokenizer_dir(base: BaseModel) -> Path:
    """A HF tokenizer directory for ``base``; GGUF tokenizers are converted once and cached.

    Converting a GGUF tokenizer with transformers takes ~10 s, so the result is kept in
    forged's cache keyed by the file hash.
    """
    if base.kind == "hf":
        return base.path

    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(base.path.parent), gguf_file=base.path.name).save_pretrained(tmp)

    return _cached_conversion("tokenizers", base, "tokenizer_config.json", build)


def dequantized_dir(base: BaseModel, model: Any) -> Path | None:
    """Save ``model`` (``base`` converted from GGUF to fp32 torch) as a cached HF directory.

    Returns the directory, or None when the base is too large to keep a copy of
    (``DEQUANT_CACHE_MAX_BYTES``) or the copy cannot be written (a cache, not a need).
    """
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    if base.kind != "gguf" or size > DEQUANT_CACHE_MAX_BYTES:
        return None

    def build(tmp: Path) -> None:
        import copy

        from safetensors.torch import save_model

        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights are plain fp32 now
        config.save_pretrained(tmp)
        save_model(model, str(tmp / DEQUANTIZED_MARKER))  # handles tied embeddings

    try:
        return _cached_conversion(DEQUANTIZED, base, DEQUANTIZED_MARKER, build)
    except OSError:
        return None


def cached_dequantized(base: BaseModel) -> Path | None:
    """The cached fp32 HF directory of a GGUF base, if an earlier load wrote one."""
    if base.kind != "gguf":
        return None
    d = _conversion_dir(DEQUANTIZED, base)
    return d if (d / DEQUANTIZED_MARKER).exists() else None


def load_tokenizer(base: BaseModel) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir(base)))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        tok.chat_template = CHATML_JINJA  # a base without a chat format: published alike (common/chat.py)
    return tok
