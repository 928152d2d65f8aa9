"""Quantize a fused model with llama.cpp's own quantizer (``llama_model_quantize``).

Ollama 0.34.1 and later refuse create-time quantization of a GGUF ("quantize GGUF models
with llama.cpp tools before importing"), so a fused version is quantized here, by the
same llama.cpp code Ollama's runner is built from, and the fidelity check then measures
exactly the bytes that are uploaded and served.

``choose_quantization`` picks the precision of ``[publish] quantize = "auto"``: the type
of the ladder (q4_K_M, q8_0, f16) whose bits per weight are closest to the base's own,
never below 8-bit for a base under 1B parameters (a small model's trained change is
small enough for a 4-bit step to round it away).
"""

from __future__ import annotations

import ctypes
import math
import os
from pathlib import Path

from forged.common.gguf import GGUFHeader
from forged.worker.judge.export import ExportError, read_gguf_header
from forged.worker.judge.llama_engine import quiet_stderr

LADDER = ("q4_K_M", "q8_0", "f16")  # the fidelity check steps up this list
BITS = {"q4_K_M": 4.89, "q8_0": 8.5, "f16": 16.0}  # bits per weight, llama.cpp's quantize README
SMALL_BASE_PARAMS = 1_000_000_000


def _ftype(quant: str) -> int:
    import llama_cpp

    return {"q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
            "f16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16}[quant]


def parameter_count(header: GGUFHeader) -> int:
    return sum(math.prod(t.shape) for t in header.tensors.values())


def bits_per_weight(header: GGUFHeader) -> float:
    """The base's average bits per weight over all its tensors (from the ggml types)."""
    import gguf

    bits = n = 0
    for t in header.tensors.values():
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t.ggml_type)]
        count = math.prod(t.shape)
        bits += count * size * 8 / block
        n += count
    return bits / max(n, 1)


def choose_quantization(base_gguf: Path, setting: str = "auto") -> str:
    """The precision a fused version starts at: ``setting`` itself unless it is "auto"."""
    if setting != "auto":
        if setting not in BITS:
            raise ExportError(f"publish.quantize: {setting!r} is not one of auto, {', '.join(LADDER)}")
        return setting
    header = read_gguf_header(Path(base_gguf))
    bpw = bits_per_weight(header)
    choice = min(LADDER, key=lambda q: abs(BITS[q] - bpw))
    if parameter_count(header) < SMALL_BASE_PARAMS and BITS[choice] < 8:
        choice = "q8_0"
    return choice


def steps_from(quant: str) -> list[str]:
    """``quant`` and the precisions above it, in the order the fidelity check tries them."""
    return list(LADDER[LADDER.index(quant):])


def quantize_gguf(src: Path, dst: Path, quant: str, *, threads: int = 0) -> Path:
    """Write ``src`` quantized to ``quant`` at ``dst`` with llama.cpp's quantizer.

    Tensors already quantized (the base's own, kept by the fused export) are dequantized
    and quantized again (``allow_requantize``), as quantizing an F16 export would do.
    Metadata, ``forged.*`` keys included, is copied; ``general.file_type`` is set.
    """
    try:
        import llama_cpp
    except ImportError:
        raise ExportError("llama-cpp-python is not installed (needed to quantize a fused model)") from None
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = _ftype(quant)
    params.allow_requantize = True
    params.nthread = threads or max(1, min(4, os.cpu_count() or 1))
    try:
        with quiet_stderr():
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0 or not tmp.is_file():
            raise ExportError(f"llama.cpp could not quantize {src.name} to {quant} (code {rc})")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst
