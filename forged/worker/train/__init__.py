"""Training: fine-tune an adapter on a mined dataset (runs inside the worker subprocess).

Importing this package is cheap — nothing heavy (torch, transformers, peft, mlx, gguf,
numpy) is imported until a function that needs it is called, so the daemon can import
``choose_backend`` and the memory estimate.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from forged.common.backends import BackendError, choose_backend
from forged.common.memory import estimate_for, estimate_peak_memory
from forged.common.models import BaseModel, ModelError, resolve_base

if TYPE_CHECKING:
    from forged.common.config import TrainConfig
    from forged.worker.train.backend import Backend
    from forged.worker.train.run import TrainResult

__all__ = [
    "BackendError", "BaseModel", "ModelError", "choose_backend", "estimate_for", "estimate_peak_memory",
    "load_model", "resolve_base", "train",
]


def train(dataset_dir: Path, out_dir: Path, cfg: TrainConfig, *, warm_start: Path | None = None,
          resume: bool = True, progress: Callable[[dict], None] | None = None,
          stop: threading.Event | None = None) -> TrainResult:
    """Train an adapter; see :func:`forged.worker.train.run.train`."""
    from forged.worker.train.run import train as _train

    return _train(dataset_dir, out_dir, cfg, warm_start=warm_start, resume=resume, progress=progress, stop=stop)


def load_model(cfg: TrainConfig, adapter_dir: Path | None = None) -> Backend:
    """The base of ``cfg`` (in the back end that trained ``adapter_dir``, if given) with the adapter applied."""
    import json

    from forged.worker.train.backend import open_backend

    name, base = None, None
    if adapter_dir is not None:
        meta_file = Path(adapter_dir) / "forged_meta.json"
        if meta_file.exists():
            meta = json.loads(meta_file.read_text())
            name = meta.get("backend")
            if meta.get("base_model"):
                base = resolve_base(meta["base_model"])  # the base it was trained on
    be = open_backend(cfg, base, name=name)
    if adapter_dir is not None:
        be.load_adapter(Path(adapter_dir))
    return be

