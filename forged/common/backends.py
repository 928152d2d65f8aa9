"""Which training back end this machine can run, from the platform and installed packages.

Looks only at ``sys.platform`` and ``importlib.util.find_spec``, so the daemon and
``forgectl doctor`` can call it without importing anything heavy.
"""

from __future__ import annotations

import importlib.util
import platform
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from forged.common.config import TrainConfig


class BackendError(RuntimeError):
    """A back end cannot be used here (not installed, unsupported model); says what to do."""


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
