"""One small interface over the training back ends (MLX via mlx-lm, PyTorch via PEFT).

Which back end fits this machine is decided in :mod:`forged.common.backends`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from forged.common.backends import choose_backend

if TYPE_CHECKING:
    import numpy

    from forged.common.config import TrainConfig
    from forged.common.models import BaseModel


class Backend(Protocol):
    """What the judge and the export check use. Training methods are below."""

    name: str  # "torch" | "mlx"
    base: BaseModel
    tok: Any  # the base's Hugging Face tokenizer
    start_id: int  # token prepended to every sequence (see data.start_id)
    notes: list[str]  # what loading changed that the user should know (e.g. no 4-bit without CUDA)

    def encode(self, text: str) -> list[int]: ...

    def input_ids(self, text: str) -> list[int]:
        """``[start_id] + encode(text)``: exactly what nll/logits/generate feed the model."""
        ...

    def nll(self, texts: list[str]) -> list[float]:
        """Total NLL (nats) of each text's tokens given the start token."""
        ...

    def logits(self, text: str) -> numpy.ndarray:
        """float32 [len(input_ids(text)), vocab]: the logits at every input position."""
        ...

    def generate(self, prompt: str, max_new_tokens: int = 64, stop: list[str] | None = None) -> str: ...

    def generate_many(self, prompts: list[str], max_new_tokens: list[int],
                      until: list[Callable[[str], bool] | None] | None = None) -> list[str]:
        """Greedy completions of several prompts (batched where that is faster); row i ends
        at ``max_new_tokens[i]``, at EOS, or as soon as ``until[i](text so far)`` is true."""
        ...

    def load_adapter(self, adapter_dir: Path) -> None:
        """Apply a saved adapter (a ``save_adapter`` directory) to the base."""
        ...

    def set_adapter_enabled(self, enabled: bool) -> None: ...

    def chat_prompt(self, messages: list[dict]) -> str: ...


class TrainableBackend(Backend, Protocol):
    """The extra methods ``forged.worker.train.run`` drives."""

    batching: str  # how rows are batched: "pack" (several examples per row) or "bucket" (by length)

    def attach_adapter(self, cfg: TrainConfig, *, warm_start: Path | None, init_dir: Path) -> dict[str, Any]:
        """Add a trainable adapter (fresh, PiSSA or warm-started); returns its description."""
        ...

    def train_step(self, micro_batches: list[dict[str, Any]], lr: float) -> tuple[float, int, float]:
        """One optimizer step over micro-batches: (mean loss, target tokens, grad norm)."""
        ...

    def eval_loss(self, batches: list[dict[str, Any]]) -> tuple[float, int]:
        """(summed NLL, target tokens) over batches, no grad."""
        ...

    def save_checkpoint(self, dir: Path) -> None: ...

    def load_checkpoint(self, dir: Path) -> None: ...

    def save_adapter(self, dir: Path) -> dict[str, Any]:
        """Write a plain LoRA on the original base in the framework layout; returns meta fields."""
        ...

    def peak_memory(self) -> int: ...

    def rng_state(self) -> Any: ...

    def set_rng_state(self, state: Any) -> None: ...


def open_backend(cfg: TrainConfig, base: BaseModel | None = None, *, name: str | None = None) -> TrainableBackend:
    """Load the base model of ``cfg`` in the chosen back end."""
    from forged.common.models import resolve_base

    name = name or choose_backend(cfg)[0]
    base = base or resolve_base(cfg.base_model)
    if name == "torch":
        from forged.worker.train.torch_backend import TorchBackend

        return TorchBackend(base, cfg)
    from forged.worker.train.mlx_backend import MLXBackend

    return MLXBackend(base, cfg)
