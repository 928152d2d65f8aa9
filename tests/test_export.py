"""Export of trained adapters to GGUF LoRA, and the llama.cpp fidelity check.

Real parts only: a tiny random llama written as GGUF, PEFT adapters trained/initialized
on the model transformers reads from that GGUF, the ``gguf`` package to read the
export back, and llama.cpp (llama-cpp-python) for the fidelity tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from lora_fixtures import (
    TARGETS,
    make_peft_adapter,
    make_pissa_adapter,
    tiny_base,
    tiny_hf,
    write_meta,
)
from tiny import TINY, bundled_gguf

from forged.worker.judge.export import (
    HF_TO_GGUF,
    ExportError,
    export_adapter,
    export_fused,
    load_gguf_tensors,
    read_gguf_header,
    rewrite_gguf,
)

gguf = pytest.importorskip("gguf")
pytest.importorskip("peft")


@pytest.fixture(scope="module")
def base() -> Path:
    """The tiny llama as GGUF: what llama.cpp (Ollama) loads and exports are checked against."""
    return tiny_base()


@pytest.fixture(scope="module")
def hf(base: Path) -> Path:
    """The same weights as an HF directory: what the trainer trains on in most tests."""
    return tiny_hf()


def read_gguf(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Metadata and float32 tensors of a small GGUF (the adapter), via the gguf package."""
    r = gguf.GGUFReader(str(path))
    kv = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {}
    for t in r.tensors:
        if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            tensors[t.name] = np.array(t.data, dtype=np.float32).reshape(tuple(reversed([int(x) for x in t.shape])))
        else:
            tensors[t.name] = gguf.quants.dequantize(t.data, t.tensor_type)
    return kv, tensors


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """GGUF → HF q/k rows, using transformers' own implementation (what the trainer saw)."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    return LlamaTensorProcessor(config={})._reverse_permute_weights(w, n_head, n_head)


def heads(module: str) -> int:
    return TINY["num_attention_heads"] if module == "q_proj" else TINY["num_key_value_heads"]


def hf_weights_after_export(base: Path, adapter_gguf: Path) -> dict[str, np.ndarray]:
    """What llama.cpp's weights become with the adapter (W + alpha/r·B·A), in HF layout."""
    bt = load_gguf_tensors(base)  # GGUFReader would spend ~15 s parsing the vocabulary
    kv, at = read_gguf(adapter_gguf)
    alpha = kv["adapter.lora.alpha"]
    out = {}
    for layer in range(TINY["num_hidden_layers"]):
        for module, g in HF_TO_GGUF.items():
            name = f"blk.{layer}.{g}.weight"
            a, b = at[name + ".lora_a"], at[name + ".lora_b"]
            w = bt[name] + (alpha / a.shape[0]) * (b @ a)
            if module in ("q_proj", "k_proj"):
                w = unpermute(w, heads(module))
            out[f"{layer}.{module}"] = w
    return out


def merged_hf_weights(base: Path, adapter_dir: Path) -> dict[str, np.ndarray]:
    """What PEFT computes: the adapter merged into the model transformers reads from the GGUF."""
    from lora_fixtures import load_hf
    from peft import PeftModel

    merged = PeftModel.from_pretrained(load_hf(base), str(adapter_dir)).merge_and_unload()
    out = {}
    for layer in range(TINY["num_hidden_layers"]):
        blk = merged.model.layers[layer]
        for module in HF_TO_GGUF:
            parent = blk.self_attn if module.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else blk.mlp
            out[f"{layer}.{module}"] = getattr(parent, module).weight.detach().numpy()
    return out


def assert_same_weights(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-4, err_msg=k)


def test_lora_export_applies_the_trained_delta(base: Path, hf: Path, tmp_path: Path) -> None:
    ad = make_peft_adapter(hf, tmp_path / "ad", rank=4, alpha=8.0, rslora=True)
    res = export_adapter(ad, base, tmp_path / "a.gguf")
    kv, tensors = read_gguf(res.path)
    assert kv["general.type"] == "adapter" and kv["adapter.type"] == "lora"
    assert kv["general.architecture"] == "llama"
    # rsLoRA: scale = alpha/sqrt(r) = 4; llama.cpp multiplies by alpha_gguf/r → alpha_gguf = 16.
    assert res.rank == 4 and res.alpha == pytest.approx(16.0) and res.permuted_qk
    assert kv["adapter.lora.alpha"] == pytest.approx(16.0)
    assert res.n_tensors == len(tensors) == 2 * len(TARGETS) * TINY["num_hidden_layers"]
    assert tensors["blk.0.attn_q.weight.lora_a"].shape == (4, 64)
    assert tensors["blk.0.attn_k.weight.lora_b"].shape == (32, 4)
    assert_same_weights(hf_weights_after_export(base, res.path), merged_hf_weights(hf, ad))


def test_without_qk_permutation_the_delta_is_wrong(base: Path, hf: Path, tmp_path: Path, monkeypatch) -> None:
    # Guards the test above: it must be able to see a missing permutation.
    import forged.worker.judge.export

    ad = make_peft_adapter(hf, tmp_path / "ad", rank=4)
    monkeypatch.setattr(forged.worker.judge.export, "PERMUTED_QK_ARCHS", set())
    res = export_adapter(ad, base, tmp_path / "a.gguf")
    got, want = hf_weights_after_export(base, res.path), merged_hf_weights(hf, ad)
    assert not np.allclose(got["0.q_proj"], want["0.q_proj"], atol=1e-3)
    np.testing.assert_allclose(got["0.v_proj"], want["0.v_proj"], rtol=1e-4, atol=1e-4)


def test_per_module_alpha_is_folded_into_lora_b(base: Path, hf: Path, tmp_path: Path) -> None:
    ad = make_peft_adapter(hf, tmp_path / "ad", rank=4, alpha=8.0,
                           rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 2.0})
    res = export_adapter(ad, base, tmp_path / "a.gguf")
    assert res.alpha == pytest.approx(8.0)
    assert_same_weights(hf_weights_after_export(base, res.path), merged_hf_weights(hf, ad))


def test_pissa_exports_as_rank_2r_lora_on_the_original_base(base: Path, hf: Path, tmp_path: Path) -> None:
    ad, effective = make_pissa_adapter(hf, tmp_path / "pissa", rank=4, alpha=4.0)
    res = export_adapter(ad, base, tmp_path / "p.gguf")
    assert res.rank == 8
    got = hf_weights_after_export(base, res.path)
    for key, w in effective.items():  # "0.self_attn.q_proj" → "0.q_proj"
        layer, module = key.split(".")[0], key.rsplit(".", 1)[-1]
        np.testing.assert_allclose(got[f"{layer}.{module}"], w, rtol=1e-4, atol=2e-4, err_msg=key)


def test_mlx_layout_exports_like_peft(base: Path, hf: Path, tmp_path: Path) -> None:
    """An mlx-lm adapter (x@A@B, absolute scale, trained on GGUF q/k order) gives the same file."""
    from safetensors.numpy import load_file, save_file

    from forged.worker.judge.export import permute_rows

    peft_dir = make_peft_adapter(hf, tmp_path / "peft", rank=4, alpha=8.0)
    want = read_gguf(export_adapter(peft_dir, base, tmp_path / "peft.gguf").path)[1]
    mlx = tmp_path / "mlx"
    mlx.mkdir()
    out = {}
    for k, v in load_file(str(peft_dir / "adapter_model.safetensors")).items():
        i = k.split("layers.")[1].split(".")[0]
        part, module = k.split(".")[-2], k.split(".")[-3]
        group = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        if part == "lora_B" and module in ("q_proj", "k_proj"):
            v = permute_rows(v, heads(module))  # MLX trains on GGUF's permuted q/k
        out[f"model.layers.{i}.{group}.{module}.{part.lower()}"] = np.ascontiguousarray(v.T)
    save_file(out, str(mlx / "adapters.safetensors"))
    (mlx / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "lora_parameters": {"rank": 4, "scale": 2.0, "dropout": 0.0}}))
    write_meta(mlx, hf, backend="mlx", layout="gguf", rank=4, scale=2.0)
    got = read_gguf(export_adapter(mlx, base, tmp_path / "mlx.gguf").path)[1]
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, err_msg=k)
    # ... and the same fused model
    want = fused_hf_weights(export_fused(peft_dir, base, tmp_path / "peft-fused.gguf").path)
    assert_same_weights(fused_hf_weights(export_fused(mlx, base, tmp_path / "mlx-fused.gguf").path), want)


# ---------------------------------------------------------------- fused export


@pytest.fixture(scope="module")
def q4_base(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny base with its projections in Q4_1, as in the bundled SmolLM2 GGUF."""
    q4 = gguf.GGMLQuantizationType.Q4_1
    names = [n for n, t in read_gguf_header(base).tensors.items() if n.startswith("blk.") and len(t.shape) == 2]
    w = load_gguf_tensors(base, names)
    out = tmp_path_factory.mktemp("q4") / "tiny-q4_1.gguf"
    rewrite_gguf(base, out, dict.fromkeys(names, q4), lambda n: gguf.quants.quantize(w[n], q4))
    return out


def fused_hf_weights(fused: Path) -> dict[str, np.ndarray]:
    """The seven projections of a fused GGUF, dequantized, in HF layout (q/k un-permuted)."""
    out = {}
    for layer in range(TINY["num_hidden_layers"]):
        for module, g in HF_TO_GGUF.items():
            w = load_gguf_tensors(fused, [f"blk.{layer}.{g}.weight"])[f"blk.{layer}.{g}.weight"]
            out[f"{layer}.{module}"] = unpermute(w, heads(module)) if module in ("q_proj", "k_proj") else w
    return out


def test_fused_export_is_the_base_with_the_delta_merged(base: Path, hf: Path, tmp_path: Path) -> None:
    ad = make_peft_adapter(hf, tmp_path / "ad", rank=4, alpha=8.0, rslora=True,
                           rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 2.0})
    res = export_fused(ad, base, tmp_path / "f.gguf")
    assert res.kind == "fused" and res.permuted_qk and res.n_tensors == len(TARGETS) * TINY["num_hidden_layers"]
    assert_same_weights(fused_hf_weights(res.path), merged_hf_weights(hf, ad))
    # Everything else is the base's, byte for byte: metadata (tokenizer, chat template), other tensors.
    hb, hf_ = read_gguf_header(base), read_gguf_header(res.path)
    raw_b, raw_f = base.read_bytes(), res.path.read_bytes()
    assert set(hf_.kv_spans) == set(hb.kv_spans) | {"forged.export", "forged.method", "forged.backend"}
    for key, (a, b) in hb.kv_spans.items():
        fa, fb = hf_.kv_spans[key]
        assert raw_f[fa:fb] == raw_b[a:b], key
    assert hf_.kv["forged.export"] == "fused" and hf_.kv.get("general.type", "model") == "model"
    assert list(hf_.tensors) == list(hb.tensors)
    merged = {f"blk.{i}.{g}.weight" for i in range(TINY["num_hidden_layers"]) for g in HF_TO_GGUF.values()}
    for name, t in hb.tensors.items():
        f = hf_.tensors[name]
        assert f.shape == t.shape and f.ggml_type == t.ggml_type == 0  # F32 base: merged stay F32
        if name not in merged:
            n = 4 * int(np.prod(t.shape))
            assert raw_f[f.offset:f.offset + n] == raw_b[t.offset:t.offset + n], name


@pytest.mark.parametrize("which", ["f32", "q4_1"])
def test_fused_model_in_llama_cpp_equals_base_plus_adapter(
    base: Path, q4_base: Path, hf: Path, tmp_path: Path, llama_cpp, which: str
) -> None:
    """llama.cpp's logits from the fused GGUF equal its own base + GGUF adapter."""
    from forged.worker.judge.agreement import pearson
    from forged.worker.judge.llama_engine import llama_logits, open_llama

    b = base if which == "f32" else q4_base
    ad = make_peft_adapter(hf, tmp_path / "ad", rank=4, alpha=8.0, rslora=True, std=0.2)
    fused = export_fused(ad, b, tmp_path / "f.gguf").path
    types = {n: t.ggml_type for n, t in read_gguf_header(fused).tensors.items()}
    # Q4_1 base: merged projections are F16 (no lossy re-quantization), untouched ones stay Q4_1.
    assert types["blk.0.attn_q.weight"] == (0 if which == "f32" else 1)
    lora = export_adapter(ad, b, tmp_path / "a.gguf").path
    ids = [1, 504, 2734, 3013, 1012, 30, 2367, 28, 258, 4165, 7, 198, 330, 2]
    z_base = llama_logits(open_llama(b, None, 32), ids)
    z_lora = llama_logits(open_llama(b, lora, 32), ids)
    z_fused = llama_logits(open_llama(fused, None, 32), ids)
    effect = np.abs(z_lora - z_base).max()
    assert effect > 0.5  # the adapter matters
    if which == "f32":
        np.testing.assert_allclose(z_fused, z_lora, atol=1e-3)  # float32 sums in another order
    else:  # llama.cpp multiplies Q4_1 weights with Q8_1 activations, F16 weights with F16 ones
        assert np.abs(z_fused - z_lora).max() < 0.05 * effect
        assert pearson(z_fused - z_base, z_lora - z_base) > 0.999


def test_fused_pissa_and_dora(base: Path, hf: Path, tmp_path: Path) -> None:
    """PiSSA (a rank-2r LoRA on the original base) fuses to the trained weights; DoRA, which a
    GGUF LoRA cannot carry, fuses to what PEFT's merge_and_unload computes."""
    ad, effective = make_pissa_adapter(hf, tmp_path / "pissa", rank=4, alpha=4.0)
    got = fused_hf_weights(export_fused(ad, base, tmp_path / "p.gguf").path)
    for key, w in effective.items():  # "0.self_attn.q_proj" → "0.q_proj"
        layer, module = key.split(".")[0], key.rsplit(".", 1)[-1]
        np.testing.assert_allclose(got[f"{layer}.{module}"], w, rtol=1e-4, atol=2e-4, err_msg=key)

    dora = make_peft_adapter(hf, tmp_path / "dora", rank=4, alpha=8.0, dora=True, std=0.1)
    res = export_fused(dora, base, tmp_path / "d.gguf")
    assert_same_weights(fused_hf_weights(res.path), merged_hf_weights(hf, dora))
    with pytest.raises(ExportError, match="DoRA"):
        export_adapter(dora, base, tmp_path / "d-lora.gguf")


@pytest.mark.parametrize(
    "setup, message",
    [
        ("dora", "DoRA"),
        ("no_meta", "no forged_meta.json"),
        ("lm_head", "not a supported LoRA projection"),
        ("other_base", "different base"),
        ("sha", "differs from the base"),
        ("no_weights", "no adapter weights"),
    ],
)
def test_export_refuses_bad_input(base: Path, hf: Path, tmp_path: Path, setup: str, message: str) -> None:
    target = base
    if setup == "dora":
        ad = make_peft_adapter(hf, tmp_path / "ad", dora=True, targets=["q_proj"])
    elif setup == "lm_head":
        ad = make_peft_adapter(hf, tmp_path / "ad", targets=["lm_head"])
    else:
        ad = make_peft_adapter(hf, tmp_path / "ad", targets=["q_proj"])
    if setup == "no_meta":
        (ad / "forged_meta.json").unlink()
    elif setup == "other_base":
        target = bundled_gguf()
    elif setup == "sha":
        write_meta(ad, base, base_sha256="0" * 64, rank=4, scale=2.0)
    elif setup == "no_weights":
        (ad / "adapter_model.safetensors").unlink()
    with pytest.raises(ExportError, match=message) as e:
        export_adapter(ad, target, tmp_path / "out.gguf")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out.gguf").exists()


# ---------------------------------------------------------------- fidelity (llama.cpp)

HELDOUT = [
    "def add(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n    return a + b\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n        self.items.append(x)\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i, 'is even')\n",
]


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp")


def _cfg(base: Path):
    from forged.common.config import TrainConfig

    return TrainConfig(backend="torch", base_model=str(base))


def rewrite_alpha(src: Path, dst: Path, factor: float) -> None:
    """Copy a GGUF adapter with adapter.lora.alpha multiplied by ``factor`` (a lost-scale bug)."""
    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), "llama")
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(r.fields["adapter.lora.alpha"].contents()) * factor)
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_fidelity_passes_for_a_correct_export(base: Path, hf: Path, tmp_path: Path, llama_cpp) -> None:
    from forged.worker.judge.fidelity import check_fidelity

    ad = make_peft_adapter(hf, tmp_path / "ad", rank=4, alpha=8.0, rslora=True, std=0.2)
    # The production path: the trainer reads the GGUF base (transformers un-permutes q/k)
    # — the same weights as the HF directory the adapter was made on.
    write_meta(ad, base, rank=4, alpha=8.0, scale=4.0, rslora=True)
    res = export_adapter(ad, base, tmp_path / "a.gguf")
    fid = check_fidelity(ad, res.path, base, _cfg(base), HELDOUT)
    assert fid.passed, fid.reason
    assert fid.correlation >= 0.95
    assert fid.delta_norm_ratio == pytest.approx(1.0, abs=0.1)
    gain_llama = fid.loss_base_llama - fid.loss_adapter_llama
    gain_trainer = fid.loss_base_trainer - fid.loss_adapter_trainer
    assert gain_llama == pytest.approx(gain_trainer, abs=max(0.25 * abs(gain_trainer), 0.01))
    assert fid.n_tokens > 30
    assert fid.correlation_qk is not None and fid.correlation_qk >= 0.95  # F32 base: no 4-bit noise


def test_moments_merge_pieces_into_the_whole_arrays_correlation() -> None:
    from forged.worker.judge.agreement import Moments, mean_nll, pearson

    rng = np.random.default_rng(0)
    # Pieces with different means and sizes, as per-text logit deltas are.
    xs = [rng.normal(loc=m, size=(n, 50)).astype(np.float32) for m, n in ((5.0, 7), (-3.0, 20), (0.5, 1))]
    ys = [(0.6 * x + rng.normal(size=x.shape)).astype(np.float32) for x in xs]
    m = Moments()
    for x, y in zip(xs, ys, strict=True):
        m.add(x, y)
    whole = np.corrcoef(np.concatenate([x.ravel() for x in xs]), np.concatenate([y.ravel() for y in ys]))[0, 1]
    assert m.correlation() == pytest.approx(whole, abs=1e-6) and m.n == 28 * 50
    assert pearson(xs[1], ys[1]) == pytest.approx(np.corrcoef(xs[1].ravel(), ys[1].ravel())[0, 1], abs=1e-6)
    assert np.isnan(pearson(np.ones(5, np.float32), np.arange(5, dtype=np.float32)))
    # mean_nll in float32 agrees with a float64 log-softmax
    z = rng.normal(scale=8.0, size=(6, 1000)).astype(np.float32)
    ids = [0, 3, 999, 10, 500, 7]
    z64 = z[:-1].astype(np.float64)
    ref = (np.log(np.exp(z64 - z64.max(1, keepdims=True)).sum(1)) + z64.max(1) - z64[np.arange(5), ids[1:]]).sum()
    assert mean_nll(z, ids) == (pytest.approx(ref, rel=1e-6), 5)


def test_fidelity_reuses_the_base_side_across_checks(base: Path, hf: Path, tmp_path: Path, llama_cpp) -> None:
    """The q/k comparison and every quantization tried share one base side; a shared memo
    is what they read (poisoning it changes the next check's numbers)."""
    from forged.worker.judge.fidelity import BaseMemo, check_fidelity

    ad = make_peft_adapter(hf, tmp_path / "ad", rank=4, alpha=8.0, rslora=True, std=0.05)
    fused = export_fused(ad, base, tmp_path / "f.gguf").path
    memo = BaseMemo()
    first = check_fidelity(ad, fused, base, _cfg(hf), HELDOUT, memo=memo)
    assert first.passed and memo.side is not None and len(memo.side.ids) == first.n_texts
    again = check_fidelity(ad, fused, base, _cfg(hf), HELDOUT, memo=memo)
    assert again.correlation == pytest.approx(first.correlation, abs=1e-9)
    assert again.loss_base_llama == pytest.approx(first.loss_base_llama, abs=1e-9)
    memo.side.llama = [z + np.float32(1.0) * np.arange(z.shape[1], dtype=np.float32) / z.shape[1] for z in memo.side.llama]
    poisoned = check_fidelity(ad, fused, base, _cfg(hf), HELDOUT, memo=memo)
    assert poisoned.correlation < first.correlation - 0.01


def test_fidelity_passes_for_pissa(base: Path, hf: Path, tmp_path: Path, llama_cpp) -> None:
    from forged.worker.judge.fidelity import check_fidelity

    ad, _ = make_pissa_adapter(hf, tmp_path / "pissa", rank=4, alpha=4.0, step=0.1)
    res = export_adapter(ad, base, tmp_path / "p.gguf")
    fid = check_fidelity(ad, res.path, base, _cfg(hf), HELDOUT)
    assert fid.passed, fid.reason


def test_fidelity_fails_for_broken_exports(base: Path, hf: Path, tmp_path: Path, llama_cpp, monkeypatch) -> None:
    import forged.worker.judge.export
    from forged.worker.judge.fidelity import check_fidelity

    # A small adapter keeps the logit change near-linear in its scale, so a lost
    # scale shows as a size ratio of ~3 as well as a low correlation.
    ad = make_peft_adapter(hf, tmp_path / "ad", rank=4, alpha=8.0, std=0.05)
    good = export_adapter(ad, base, tmp_path / "good.gguf").path
    rewrite_alpha(good, tmp_path / "scaled.gguf", 3.0)
    fid = check_fidelity(ad, tmp_path / "scaled.gguf", base, _cfg(hf), HELDOUT)
    assert not fid.passed and "correlation" in fid.reason
    assert fid.delta_norm_ratio > 1.5

    monkeypatch.setattr(forged.worker.judge.export, "PERMUTED_QK_ARCHS", set())
    unpermuted = export_adapter(ad, base, tmp_path / "noperm.gguf").path
    fid = check_fidelity(ad, unpermuted, base, _cfg(hf), HELDOUT)
    assert not fid.passed, fid.reason
    # The whole-adapter correlation alone can miss this (0.953 here: v/o/MLP are right);
    # the q/k-only comparison cannot.
    assert fid.correlation_qk is not None and fid.correlation_qk < 0.5
    assert "q/k" in fid.reason


def test_fidelity_checks_fused_exports(base: Path, hf: Path, tmp_path: Path, llama_cpp, monkeypatch) -> None:
    """The same check for a fused model: Δ = llama.cpp(fused) − llama.cpp(base), and the q/k
    part as a fused model of the q/k-only adapter; a q/k layout error still fails it."""
    import forged.worker.judge.export
    from forged.worker.judge.fidelity import check_fidelity

    ad = make_peft_adapter(hf, tmp_path / "ad", rank=4, alpha=8.0, rslora=True, std=0.05)
    fused = export_fused(ad, base, tmp_path / "f.gguf").path
    fid = check_fidelity(ad, fused, base, _cfg(hf), HELDOUT)
    assert fid.passed, fid.reason
    assert fid.correlation >= 0.99 and fid.correlation_qk is not None and fid.correlation_qk >= 0.95
    assert fid.delta_norm_ratio == pytest.approx(1.0, abs=0.05)

    monkeypatch.setattr(forged.worker.judge.export, "PERMUTED_QK_ARCHS", set())
    unpermuted = export_fused(ad, base, tmp_path / "noperm.gguf").path
    fid = check_fidelity(ad, unpermuted, base, _cfg(hf), HELDOUT)
    assert not fid.passed and "correlation" in fid.reason, fid.reason  # whole (0.94 here) or q/k part


@pytest.mark.slow
def test_real_base_export_and_fidelity(tmp_path: Path, llama_cpp) -> None:
    """SmolLM2-135M (bundled Q4_1 GGUF): an rsLoRA adapter on all seven projections,
    exported and verified against llama.cpp — the 4-bit base, 9 q heads / 3 kv heads."""
    from forged.common.config import TrainConfig
    from forged.worker.judge.fidelity import check_fidelity

    base = bundled_gguf()
    # std 0.05: a random adapter's effect must stand well above llama.cpp's Q8 activation
    # rounding for the correlation to measure the layout; at 0.02 it measured 0.937-0.95.
    ad = make_peft_adapter(base, tmp_path / "ad", rank=8, alpha=16.0, rslora=True, std=0.05)
    res = export_adapter(ad, base, tmp_path / "a.gguf")
    assert res.permuted_qk and res.rank == 8 and res.n_tensors == 2 * 7 * 30
    cfg = TrainConfig(backend="torch", base_model="bundled:smollm2-135m")
    fid = check_fidelity(ad, res.path, base, cfg, HELDOUT)
    assert fid.passed, fid.reason
    assert fid.correlation >= 0.95 and fid.correlation_qk >= 0.5
    assert fid.delta_norm_ratio == pytest.approx(1.0, abs=0.15)


# ---------------------------------------------------------------- served precision


def test_auto_quantization_follows_the_base_and_keeps_small_bases_at_8_bit(base: Path) -> None:
    from forged.worker.judge.quantize import choose_quantization

    assert choose_quantization(bundled_gguf()) == "q8_0"  # Q4_1 is nearest q4_K_M, but 135M < 1B
    assert choose_quantization(base) == "f16"  # the tiny base is F32
    assert choose_quantization(base, "q4_K_M") == "q4_K_M"
    with pytest.raises(ExportError, match="publish.quantize"):
        choose_quantization(base, "q2_K")


def test_served_check_steps_up_until_the_gain_is_kept(
    base: Path, hf: Path, tmp_path: Path, llama_cpp, monkeypatch
) -> None:
    """A precision that loses the trained change is replaced by the next one up; the file
    checked is the file returned (what will be uploaded and served)."""
    import shutil

    import forged.worker.judge.quantize as quantize
    from forged.worker.judge.fidelity import check_served

    ad = make_peft_adapter(hf, tmp_path / "ad", rank=4, alpha=8.0, rslora=True, std=0.05)
    fused = export_fused(ad, base, tmp_path / "f.gguf").path
    # the same change at half its size: same direction (correlation ~1), about half the gain
    half = make_peft_adapter(hf, tmp_path / "half", rank=4, alpha=4.0, rslora=True, std=0.05)
    halved = export_fused(half, base, tmp_path / "half.gguf").path
    real = quantize.quantize_gguf

    def lossy(src: Path, dst: Path, quant: str, **kw: object) -> Path:
        if quant == "q4_K_M":  # a quantizer that rounds half the change away
            shutil.copy(halved, dst)
            return dst
        return real(src, dst, quant, **kw)

    monkeypatch.setattr(quantize, "quantize_gguf", lossy)
    warnings: list[str] = []
    fid, served = check_served(ad, fused, base, _cfg(hf), HELDOUT, start="q4_K_M", out_dir=tmp_path / "out",
                               min_corr=0.9, min_gain=0.9, warn=warnings.append)
    assert fid.passed, fid.reason
    assert [s["quantization"] for s in fid.steps] == ["q4_K_M", "q8_0"] and not fid.steps[0]["passed"]
    assert "below fidelity_min_gain" in fid.steps[0]["reason"] and "trying q8_0" in warnings[0]
    assert fid.quantization == "q8_0" and fid.gain_kept >= 0.9
    assert served == tmp_path / "out" / "model-q8_0.gguf" and not (tmp_path / "out" / "model-q4_K_M.gguf").exists()
    assert read_gguf_header(served).kv["general.file_type"] == 7 and read_gguf_header(served).kv["forged.export"] == "fused"

    monkeypatch.setattr(quantize, "quantize_gguf", lambda src, dst, q, **kw: shutil.copy(base, dst) and Path(dst))
    fid, served = check_served(ad, fused, base, _cfg(hf), HELDOUT, start="q8_0", out_dir=tmp_path / "out2")
    assert served is None and not fid.passed and "not published" in fid.reason and len(fid.steps) == 2


def test_export_plan_and_primary_export() -> None:
    """auto: the fused model always (a refusal at publish time has something to fall back
    on), the adapter only where the server is known to take it."""
    from forged.worker.judge.stage import _primary, export_plan

    assert export_plan("auto", None) == (False, True) and export_plan("auto", True) == (True, True)
    assert export_plan("auto", False) == (False, True)
    assert export_plan("adapter", False) == (True, False) and export_plan("fused", True) == (False, True)
    ok, bad = {"passed": True, "reason": "ok"}, {"passed": False, "reason": "fails even at f16"}
    both = {"adapter": {"path": "a.gguf", "fidelity": ok}, "fused": {"path": "m.gguf", "fidelity": ok}}
    assert _primary(both, True)["export"]["path"] == "a.gguf"
    assert _primary(both, None)["export"]["path"] == "m.gguf"
    assert _primary(both, False)["export"]["path"] == "m.gguf"
    failed = {"fused": {"path": None, "fidelity": bad}}
    assert _primary(failed, False) == {"export": failed["fused"], "fidelity": bad, "passed": False}
