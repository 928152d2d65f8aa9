"""MLX back end on a tiny random llama GGUF: PiSSA, adapters, DoRA, resume, layout."""

from __future__ import annotations

import json
import math
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from forged.common.config import TrainConfig  # noqa: E402
from forged.worker.train import load_model, train  # noqa: E402
from forged.worker.train.backend import open_backend  # noqa: E402
from forged.worker.train.data import load_dataset  # noqa: E402
from forged.worker.train.pissa import pissa_init, principal, to_plain_lora  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from tiny import make_tiny_gguf, write_code_dataset  # noqa: E402
from tiny import tokenizer_dir as tiny_tokenizer_dir  # noqa: E402


@pytest.fixture(autouse=True)
def _home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FORGED_HOME", str(tmp_path_factory.getbasetemp() / "home"))


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    import os
    import shutil

    from forged.common.models import resolve_base

    g = make_tiny_gguf(tmp_path_factory.mktemp("tinyg"))
    # Its tokenizer is SmolLM2's: seed forged's tokenizer cache instead of converting
    # the GGUF vocab again (~10 s).
    old = os.environ.get("FORGED_HOME")
    os.environ["FORGED_HOME"] = str(tmp_path_factory.getbasetemp() / "home")
    try:
        from forged.common.paths import resolve

        cache = resolve().cache_dir / "tokenizers" / resolve_base(str(g)).sha256[:16]
        if not cache.exists():
            shutil.copytree(tiny_tokenizer_dir(), cache)
    finally:
        if old is None:
            os.environ.pop("FORGED_HOME", None)
        else:
            os.environ["FORGED_HOME"] = old
    return g


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_code_dataset(tmp_path_factory.mktemp("ds"), n_text=16, n_fim=4, n_chat=4, n_valid=3)


def cfg_for(base: Path, **kw) -> TrainConfig:
    c = dict(backend="mlx", base_model=str(base), seq_len=256, batch_size=2, max_steps=4, warmup_steps=1,
             checkpoint_every=100, rank=4, alpha=8.0, learning_rate=5e-3, max_minutes=0, threads=1)
    c.update(kw)
    return TrainConfig(**c)


def test_pissa_math_numpy():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 32)).astype(np.float32)
    for niter in (0, 4):
        a, b, res = pissa_init(w, 4, scale=2.0, niter=niter)
        assert a.shape == (32, 4) and b.shape == (4, 48)
        assert np.allclose(res + 2.0 * (a @ b).T, w, atol=1e-4)  # residual + principal == W
    sv = np.linalg.svd(w, compute_uv=False)
    _, s, _ = principal(w, 4, niter=6)
    assert np.allclose(s, sv[:4], rtol=2e-2)  # randomized SVD finds the top singular values
    a, b, _ = pissa_init(w, 4, scale=2.0, niter=0)
    a1, b1 = a + 0.1, b - 0.2
    a2, b2 = to_plain_lora(a1, b1, a, b)
    assert np.allclose((a2 @ b2), a1 @ b1 - a @ b, atol=1e-5)  # ΔW of the rank-2r plain LoRA


def test_gguf_base_matches_torch_and_pissa_keeps_function(tiny_gguf, tmp_path):
    cfg = cfg_for(tiny_gguf, method="pissa", pissa_niter=0)
    be = open_backend(cfg, name="mlx")
    text = "def add(a, b):\n    return a + b\n"
    before = be.logits(text)
    try:  # same weights through transformers (HF q/k order) give the same logits
        import torch  # noqa: F401
        from tiny import make_tiny_llama

        # the same weights as an HF directory (faster for transformers than its GGUF reader)
        hf = make_tiny_llama(tmp_path / "hf", seed=0)
        tb = open_backend(cfg_for(hf), name="torch")
        assert abs(tb.logits(text) - before).max() < 1e-3
    except ImportError:
        pass
    be.attach_adapter(cfg, warm_start=None, init_dir=tmp_path / "init")
    after = be.logits(text)
    assert abs(after - before).max() < 1e-3
    assert (tmp_path / "init" / "pissa_init.safetensors").exists()
    lora = be.lora[0][2]
    assert float(mx.abs(lora.lora_b).max()) > 0  # adapter holds the principal part, not zeros


def test_train_save_reload_resume(tiny_gguf, dataset, tmp_path):
    cfg = cfg_for(tiny_gguf, method="pissa")
    full = train(dataset, tmp_path / "full", cfg)
    assert full.heldout_loss < full.heldout_loss_start
    meta = json.loads((full.adapter_dir / "forged_meta.json").read_text())
    assert meta["backend"] == "mlx" and meta["layout"] == "gguf" and meta["rank"] == 8
    assert math.isclose(meta["scale"], 8.0 / math.sqrt(4))
    conf = json.loads((full.adapter_dir / "adapter_config.json").read_text())
    assert conf["lora_parameters"]["rank"] == 8 and (full.adapter_dir / "adapters.safetensors").exists()
    # the plain LoRA on the original base reproduces the trained held-out loss
    be = load_model(cfg, full.adapter_dir)
    valid = [r.data["text"] for r in load_dataset(dataset).valid]
    n = sum(len(be.encode(t)) for t in valid)
    assert math.isclose(sum(be.nll(valid)) / n, full.heldout_loss, rel_tol=1e-4)
    be.set_adapter_enabled(False)
    assert math.isclose(sum(be.nll(valid)) / n, full.heldout_loss_start, rel_tol=1e-4)
    # stop after step 2 (SIGTERM in the worker), resume: same curve
    stop = threading.Event()
    part = train(dataset, tmp_path / "part", cfg, stop=stop,
                 progress=lambda e: stop.set() if e["event"] == "step" and e["step"] == 2 else None)
    assert part.stopped and part.steps == 2
    rest = train(dataset, tmp_path / "part", cfg)
    assert rest.loss_curve == pytest.approx(full.loss_curve, rel=1e-4, abs=1e-5)


def test_dora_wires_through(tiny_gguf, dataset, tmp_path):
    cfg = cfg_for(tiny_gguf, method="lora", dora=True, rslora=False, max_steps=2)
    res = train(dataset, tmp_path / "o", cfg)
    conf = json.loads((res.adapter_dir / "adapter_config.json").read_text())
    meta = json.loads((res.adapter_dir / "forged_meta.json").read_text())
    assert conf["fine_tune_type"] == "dora" and meta["dora"] and math.isclose(meta["scale"], 2.0)
    w = mx.load(str(res.adapter_dir / "adapters.safetensors"))
    assert any(k.endswith(".m") for k in w)
