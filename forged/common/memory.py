"""Peak-memory estimate for a training run — pure Python, no heavy imports.

Used by the daemon's memory gate before it starts a worker, and by the worker itself
before training (a run that does not fit fails with a message instead of swapping).

The model is a sum of parts, each sized from the architecture:

- runtime: the interpreter plus torch / MLX libraries (measured constants);
- weights: fp32 for PyTorch (transformers dequantizes GGUF), and a transient second
  copy while transformers converts a GGUF; 4/8-bit for MLX QLoRA;
- adapter: parameters, gradients and two AdamW moments (fp32);
- activations: what autograd keeps per token and layer (linear inputs, MLP
  intermediates, attention probabilities over the row), all layers unless gradient
  checkpointing keeps one;
- the LM head at target tokens: logits, their softmax and gradient.

Coefficients were fitted against measured peaks (docs/benchmarks.md, "Training").
"""

from __future__ import annotations

import os
from typing import Any

MB = 1 << 20
RUNTIME = {"torch": 520 * MB, "mlx": 300 * MB}


def n_params(d: dict[str, Any]) -> int:
    h, i, L, v = d["hidden"], d["intermediate"], d["layers"], d["vocab"]
    hd = d.get("head_dim") or h // d["heads"]
    q, kv = d["heads"] * hd, d["kv_heads"] * hd
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h
    return v * h * (1 if d.get("tied", True) else 2) + L * per_layer + h


def adapter_params(d: dict[str, Any], rank: int, targets: list[str]) -> int:
    h, i = d["hidden"], d["intermediate"]
    hd = d.get("head_dim") or h // d["heads"]
    q, kv = d["heads"] * hd, d["kv_heads"] * hd
    shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
              "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    per_layer = sum(rank * (a + b) for t, (a, b) in shapes.items() if t in targets)
    return d["layers"] * per_layer


def estimate_peak_memory(dims: dict[str, Any], *, rank: int = 16, targets: list[str] | None = None,
                         seq_len: int = 512, batch_size: int = 4, method: str = "pissa",
                         quantized: bool = False, dora: bool = False, grad_checkpoint: bool = False,
                         backend: str = "torch", source: str = "gguf") -> int:
    """Predicted peak resident memory in bytes of one training worker.

    ``dims``: layers, hidden, intermediate, vocab, heads, kv_heads[, head_dim, tied] —
    what :func:`forged.common.models.model_dims` returns.
    """
    targets = targets or ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    P = n_params(dims)
    h, i, L, v = dims["hidden"], dims["intermediate"], dims["layers"], dims["vocab"]
    heads = dims["heads"]
    tokens = seq_len * batch_size
    # MLX QLoRA keeps 4-bit weights + scales/biases (8-bit embedding); otherwise fp32.
    weights = P * 0.6 if backend == "mlx" and quantized else P * 4.0
    if backend == "torch" and source == "gguf":
        weights *= 2.0  # transformers holds the dequantized numpy copy while building the model
    if method == "pissa":
        weights += 3 * max(h, i) * max(h, i) * 4  # one full-precision SVD workspace at a time
    A = adapter_params(dims, rank, targets)
    adapter = A * 4 * 4 + (L * len(targets) * max(h, i) * 4 * 3 if dora else 0)
    # per token per layer (frozen base: autograd keeps the linear inputs the LoRA
    # gradients need, the MLP intermediates, norms, RoPE'd q/k and residual sums): ~6
    # hidden-sized + 4 intermediate-sized fp32 tensors and the low-rank intermediates; plus
    # the attention probabilities over the row, ~1.5 copies (a custom 4D mask sends PyTorch's
    # SDPA to its math kernel, which keeps them). Refit to measured peaks of forged's PyTorch
    # trainer on SmolLM2-135M (4x512, 2x256; docs/benchmarks.md, "Training").
    per_tok_layer = 4 * (6 * h + 4 * i + 2 * rank * len(targets)) + 6 * heads * seq_len
    if grad_checkpoint:
        # one layer recomputed in full, plus what PEFT + transformers' non-reentrant
        # checkpointing was measured to keep per layer (~3 hidden + 2 intermediate fp32)
        acts = tokens * per_tok_layer + tokens * L * 4 * (3 * h + 2 * i)
    else:
        acts = tokens * per_tok_layer * L
    head = tokens * v * 4 * 4  # logits, fp32 copy, softmax, gradient (upper bound: every token a target)
    total = RUNTIME.get(backend, RUNTIME["torch"]) + weights + adapter + acts + head
    return int(total * 1.1)  # allocator fragmentation: freed blocks stay resident


def estimate_for(base: Any, cfg: Any, backend: str) -> int:
    """Estimate for a resolved base (forged.common.models.BaseModel) and a TrainConfig."""
    from forged.common.models import model_dims

    return estimate_peak_memory(
        model_dims(base), rank=cfg.rank, targets=list(cfg.target_modules), seq_len=cfg.seq_len,
        batch_size=cfg.batch_size, method=cfg.method, quantized=cfg.quantized, dora=cfg.dora,
        grad_checkpoint=cfg.grad_checkpoint, backend=backend, source=base.kind,
    )


def available_memory() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # psutil is a daemon dependency; fall back to /proc
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
    return 1 << 62


def check_fits(base: Any, cfg: Any, backend: str, available: int | None = None) -> int:
    """Raise MemoryError with advice when the estimate exceeds available memory."""
    need = estimate_for(base, cfg, backend)
    have = available if available is not None else available_memory()
    if os.environ.get("FORGED_SKIP_MEMORY_CHECK") != "1" and need > have:
        raise MemoryError(
            f"training {base.spec} needs about {need / 2**30:.1f} GiB but {have / 2**30:.1f} GiB is available: "
            "lower train.batch_size or train.seq_len, set train.grad_checkpoint = true, or free memory"
        )
    return need
