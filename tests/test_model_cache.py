"""A GGUF base is converted to torch weights once; later loads read the cached copy."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from forged.common.config import TrainConfig  # noqa: E402
from forged.common.models import resolve_base  # noqa: E402
from forged.worker.train.backend import open_backend  # noqa: E402
from forged.worker.train.models import cached_dequantized  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from tiny import make_tiny_gguf  # noqa: E402
from tiny import tokenizer_dir as tiny_tokenizer_dir  # noqa: E402


def test_gguf_base_is_converted_once_and_the_copy_gives_the_same_model(tmp_path, monkeypatch):
    monkeypatch.setenv("FORGED_HOME", str(tmp_path / "home"))
    from forged.common.paths import resolve

    g = make_tiny_gguf(tmp_path / "g")
    base = resolve_base(str(g))
    # The tiny model's tokenizer is SmolLM2's: seed the tokenizer cache (converting it is ~10 s).
    shutil.copytree(tiny_tokenizer_dir(), resolve().cache_dir / "tokenizers" / base.sha256[:16])
    cfg = TrainConfig(backend="torch", base_model=str(g))
    text = "def add(a, b):\n    return a + b\n"

    assert cached_dequantized(base) is None
    first = open_backend(cfg, name="torch")
    cached = cached_dequantized(base)
    assert cached is not None and (cached / "config.json").is_file()
    assert not list(cached.parent.glob("*.tmp*")), "the temporary build directory was left behind"

    second = open_backend(cfg, name="torch")
    assert torch.equal(torch.from_numpy(first.logits(text)), torch.from_numpy(second.logits(text)))
    # Tied embeddings stay tied in the copy (SmolLM2 ties lm_head to embed_tokens).
    assert (second.model.lm_head.weight.data_ptr() == second.model.model.embed_tokens.weight.data_ptr()) == (
        first.model.lm_head.weight.data_ptr() == first.model.model.embed_tokens.weight.data_ptr())

    # A different file (different hash) is never served from another file's copy.
    other = resolve_base(str(make_tiny_gguf(tmp_path / "g2", seed=1)))
    assert cached_dequantized(other) is None
