"""llama.cpp, the engine Ollama serves with, as the fidelity check and the benches use it."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np


class FidelityError(RuntimeError):
    """The check could not run (llama.cpp missing, artifact unloadable); one line."""


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """llama.cpp prints its load log (and its quantizer every tensor) on fd 2 even with
    verbose=False; keep worker logs clean."""
    try:
        fd = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(fd, 2)
        os.close(fd)


def open_llama(base_gguf: Path, lora: Path | None, n_ctx: int) -> Any:
    """llama.cpp on the CPU with logits for every position: ``base_gguf`` (+ the GGUF ``lora``)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise FidelityError(
            "llama-cpp-python is not installed (needed to verify the export): pip install 'forged[verify]'"
        ) from None
    threads = max(1, min(4, os.cpu_count() or 1))
    try:
        with quiet_stderr():
            return Llama(
                model_path=str(base_gguf),
                lora_path=str(lora) if lora else None,
                n_ctx=n_ctx,
                n_batch=n_ctx,
                n_ubatch=n_ctx,
                n_threads=threads,
                n_threads_batch=threads,
                logits_all=True,
                n_gpu_layers=0,
                seed=0,
                verbose=False,
            )
    except (ValueError, RuntimeError) as e:
        what = f"adapter {lora}" if lora else f"model {base_gguf}"
        raise FidelityError(f"llama.cpp could not load {what}: {e}") from None


def is_adapter(exported: Path) -> bool:
    """Whether an export is a GGUF LoRA adapter (else a fused full model)."""
    from forged.worker.judge.export import ExportError, read_gguf_header

    try:
        return read_gguf_header(exported).kv.get("general.type") == "adapter"
    except (OSError, ExportError) as e:
        raise FidelityError(f"cannot read the export {exported}: {e}") from None


def adapted_llama(exported: Path, base_gguf: Path, n_ctx: int) -> Any:
    """llama.cpp with the trained weights: base + GGUF adapter, or the fused model alone."""
    return open_llama(base_gguf, exported, n_ctx) if is_adapter(exported) else open_llama(exported, None, n_ctx)


def llama_logits(llm: Any, ids: list[int]) -> np.ndarray:
    """float32 [len(ids), vocab] logits of llama.cpp for exactly these token ids."""
    import numpy as np

    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)
