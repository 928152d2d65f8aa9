"""Tiny PEFT adapters on the tiny GGUF base, saved the way forged's trainer saves them.

The HF model is loaded *from the GGUF* through transformers (which un-permutes q/k),
exactly as the PyTorch back end does, so the adapters are in "hf" layout and their
export needs the q/k permutation — the case that goes wrong silently if mishandled.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def tiny_base() -> Path:
    """The tiny GGUF base, built once per version of tests/tiny.py and reused by all sessions.

    Building it parses the bundled SmolLM2 GGUF's tokenizer (~15 s of CPU); the cache
    turns that into a file copy for every test module and run after the first.
    """
    import hashlib
    import os
    import shutil
    import tempfile

    import tiny

    key = hashlib.sha256(Path(tiny.__file__).read_bytes()).hexdigest()[:12]
    cache = Path(tempfile.gettempdir()) / f"forged-tiny-base-{os.getuid()}-{key}"
    if not (cache / "tiny.gguf").exists():
        tmp = Path(tempfile.mkdtemp(prefix="forged-tinyg-"))
        tiny.make_tiny_gguf(tmp)
        tiny.make_tiny_llama(tmp / "hf")  # same seed → same weights, HF layout
        try:
            tmp.rename(cache)  # atomic: a concurrent session's copy wins harmlessly
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return cache / "tiny.gguf"


def tiny_hf() -> Path:
    """The HF directory holding the same weights as :func:`tiny_base` (loads ~10x faster:
    transformers' GGUF reader spends ~15 s of CPU parsing the 49k-token vocabulary)."""
    return tiny_base().parent / "hf"


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_hf(base: Path) -> Any:
    """The model from an HF directory or (slow) from a GGUF file, as forged's trainer reads it."""
    import torch
    from transformers import AutoModelForCausalLM

    if base.is_dir():
        return AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    m = AutoModelForCausalLM.from_pretrained(str(base.parent), gguf_file=base.name, dtype=torch.float32)
    return m.eval()


def write_meta(dir: Path, base: Path, **fields: Any) -> None:
    meta = {"backend": "torch", "base_model": str(base), "base_path": str(base),
            "architecture": "llama", "method": "lora", "layout": "hf", "target_modules": TARGETS}
    meta.update(fields)
    (dir / "forged_meta.json").write_text(json.dumps(meta))


def make_peft_adapter(
    base: Path,
    out: Path,
    *,
    rank: int = 4,
    alpha: float = 8.0,
    rslora: bool = False,
    dora: bool = False,
    std: float = 0.3,
    seed: int = 0,
    targets: list[str] | None = None,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
) -> Path:
    """A LoRA with random (non-zero) A and B, as if trained; returns ``out``."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = load_hf(base)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets or TARGETS, use_rslora=rslora,
                     use_dora=dora, init_lora_weights=False, rank_pattern=rank_pattern or {},
                     alpha_pattern=alpha_pattern or {})
    peft = get_peft_model(model, cfg)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_" in n:
                p.normal_(0.0, std)
    peft.save_pretrained(str(out))
    scale = alpha / (math.sqrt(rank) if rslora else rank)
    write_meta(out, base, rank=rank, alpha=alpha, scale=scale, rslora=rslora, dora=dora,
               target_modules=targets or TARGETS)
    return out


def make_pissa_adapter(base: Path, out: Path, *, rank: int = 4, alpha: float = 4.0, seed: int = 0,
                       step: float = 0.05) -> tuple[Path, dict[str, Any]]:
    """A PiSSA adapter 'trained' by a random step, converted by PEFT to a rank-2r LoRA.

    Returns (adapter dir, {module name: effective trained weight}) so tests can check
    that base + exported delta reproduces what the trained model computes.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = load_hf(base)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights="pissa")
    peft = get_peft_model(model, cfg)
    init_dir = out.parent / (out.name + "-init")
    peft.save_pretrained(str(init_dir))  # A0/B0, needed for the conversion
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn_like(p) * step)
    effective = {}
    for name, mod in peft.named_modules():
        if hasattr(mod, "base_layer") and hasattr(mod, "lora_A"):
            a, b = mod.lora_A["default"].weight, mod.lora_B["default"].weight
            s = mod.scaling["default"]
            effective[name.split("model.layers.", 1)[1]] = (mod.base_layer.weight + s * b @ a).detach().numpy()
    peft.save_pretrained(str(out), path_initial_model_for_weight_conversion=str(init_dir))
    write_meta(out, base, method="pissa", rank=2 * rank, alpha=2 * alpha, scale=alpha / rank, rslora=False)
    return out, effective


def train_lora(base: Path, out: Path, texts: list[str], *, steps: int = 30, rank: int = 8,
               lr: float = 1e-2, seed: int = 0) -> Path:
    """A LoRA really trained (a few Adam steps) to lower the loss of ``texts``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from tiny import tokenizer_dir
    from transformers import AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir()))
    model = load_hf(base)
    peft = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS))
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=lr)
    batches = [torch.tensor([[0, *tok(t, add_special_tokens=False)["input_ids"]]]) for t in texts]
    peft.train()
    for step in range(steps):
        x = batches[step % len(batches)]
        loss = peft(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    peft.save_pretrained(str(out))
    write_meta(out, base, rank=rank, alpha=float(rank), scale=1.0, rslora=False, dora=False)
    return out
