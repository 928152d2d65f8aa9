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

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_hf(base_gguf: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(base_gguf.parent), gguf_file=base_gguf.name, dtype=torch.float32)
    return m.eval()


def write_meta(dir: Path, base_gguf: Path, **fields: Any) -> None:
    meta = {"backend": "torch", "base_model": str(base_gguf), "base_path": str(base_gguf),
            "architecture": "llama", "method": "lora", "layout": "hf", "target_modules": TARGETS}
    meta.update(fields)
    (dir / "forged_meta.json").write_text(json.dumps(meta))


def make_peft_adapter(
    base_gguf: Path,
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
) -> Path:
    """A LoRA with random (non-zero) A and B, as if trained; returns ``out``."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = load_hf(base_gguf)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets or TARGETS, use_rslora=rslora,
                     use_dora=dora, init_lora_weights=False, rank_pattern=rank_pattern or {})
    peft = get_peft_model(model, cfg)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_" in n:
                p.normal_(0.0, std)
    peft.save_pretrained(str(out))
    scale = alpha / (math.sqrt(rank) if rslora else rank)
    write_meta(out, base_gguf, rank=rank, alpha=alpha, scale=scale, rslora=rslora, dora=dora,
               target_modules=targets or TARGETS)
    return out


def make_pissa_adapter(base_gguf: Path, out: Path, *, rank: int = 4, alpha: float = 4.0, seed: int = 0,
                       step: float = 0.05) -> tuple[Path, dict[str, Any]]:
    """A PiSSA adapter 'trained' by a random step, converted by PEFT to a rank-2r LoRA.

    Returns (adapter dir, {module name: effective trained weight}) so tests can check
    that base + exported delta reproduces what the trained model computes.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = load_hf(base_gguf)
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
    write_meta(out, base_gguf, method="pissa", rank=2 * rank, alpha=2 * alpha, scale=alpha / rank, rslora=False)
    return out, effective
