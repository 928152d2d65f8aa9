"""One small interface over the training back ends (MLX via mlx-lm, PyTorch via PEFT).

``choose_backend`` only looks at the platform and at which packages are installed
(``importlib.util.find_spec``), so the daemon and ``forgectl doctor`` can call it
without importing anything heavy.
"""

from __future__ import annotations

import importlib.util
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy

    from forged.config import TrainConfig
    from forged.train.models import BaseModel


class BackendError(RuntimeError):
    """A back end cannot be used here (not installed, unsupported model); says what to do."""


class Backend(Protocol):
    """What the judge and the export check use. Training methods are below."""

    name: str  # "torch" | "mlx"
    base: BaseModel
    start_id: int  # token prepended to every sequence (see data.start_id)

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

    def set_adapter_enabled(self, enabled: bool) -> None: ...

    def chat_prompt(self, messages: list[dict]) -> str: ...


class TrainableBackend(Backend, Protocol):
    """The extra methods ``forged.train.run`` drives."""

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


def is_apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


def _has(mod: str) -> bool:
    try:
        return importlib.util.find_spec(mod) is not None
    except (ImportError, ValueError):
        return False


def torch_available() -> bool:
    return all(_has(m) for m in ("torch", "transformers", "peft"))


def mlx_available() -> bool:
    return _has("mlx") and _has("mlx_lm")


def openblas_preload() -> str | None:
    """The OpenBLAS library to LD_PRELOAD for MLX on Linux (Debian libopenblas0-pthread), if installed.

    MLX's Linux CPU wheel links the reference BLAS (~5 GFLOP/s here); OpenBLAS makes
    training ~10x faster. The daemon sets it when it spawns an MLX worker.
    """
    if not sys.platform.startswith("linux"):
        return None
    for p in ("/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
              "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3"):
        if Path(p).exists():
            return p
    return None


def choose_backend(cfg: TrainConfig) -> tuple[str, str]:
    """(name, reason) for cfg.backend; no heavy imports. Raises BackendError if none fits."""
    want = cfg.backend
    if want == "torch":
        if not torch_available():
            raise BackendError("train.backend = 'torch' but torch/transformers/peft are not installed: pip install 'forged[torch]'")
        return "torch", "configured (train.backend = 'torch')"
    if want == "mlx":
        if not mlx_available():
            extra = " (on Linux also mlx-cpu)" if sys.platform.startswith("linux") else ""
            raise BackendError(f"train.backend = 'mlx' but mlx/mlx-lm are not installed: pip install 'forged[mlx]'{extra}")
        return "mlx", "configured (train.backend = 'mlx')"
    if is_apple_silicon() and mlx_available():
        return "mlx", "auto: Apple silicon with mlx installed (MLX uses the GPU and unified memory)"
    if torch_available():
        why = "auto: not Apple silicon and PyTorch is installed (faster than MLX on CPU)"
        if is_apple_silicon():
            why = "auto: Apple silicon but mlx/mlx-lm are not installed; using PyTorch"
        return "torch", why
    if mlx_available():
        return "mlx", "auto: PyTorch is not installed; using MLX (on Linux CPU, preload OpenBLAS for speed)"
    raise BackendError("no training back end installed: pip install 'forged[torch]' (or 'forged[mlx]' on a Mac)")


def open_backend(cfg: TrainConfig, base: BaseModel | None = None, *, name: str | None = None) -> TrainableBackend:
    """Load the base model of ``cfg`` in the chosen back end."""
    from forged.train.models import resolve_base

    name = name or choose_backend(cfg)[0]
    base = base or resolve_base(cfg.base_model)
    if name == "torch":
        from forged.train.torch_backend import TorchBackend

        return TorchBackend(base, cfg)
    from forged.train.mlx_backend import MLXBackend

    return MLXBackend(base, cfg)
