"""Reading GGUF headers in pure Python: metadata and tensor layout, no numpy or gguf package."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class GGUFError(ValueError):
    """A file that is not a readable GGUF; the message names the path."""

# ---------------------------------------------------------------- GGUF header (pure Python)

_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


@dataclass
class TensorInfo:
    """A tensor in a GGUF file: numpy shape (out, in), ggml type id, absolute byte offset."""

    shape: tuple[int, ...]
    ggml_type: int
    offset: int


@dataclass
class GGUFHeader:
    """A GGUF file's header: metadata, where each key/value entry lies, its tensors."""

    version: int
    kv: dict[str, Any]  # scalars and strings; arrays only when read with arrays=True
    kv_spans: dict[str, tuple[int, int]]  # key → byte range of its whole entry, for verbatim copies
    tensors: dict[str, TensorInfo]  # in file order
    alignment: int


def read_gguf_header(path: Path, *, arrays: bool = False) -> GGUFHeader:
    """The header of a GGUF file, parsed with the standard library only (the daemon reads
    metadata too, and must not import ML libraries).

    Arrays (the tokenizer's 50–100k-entry lists) are skipped unless ``arrays``:
    ``gguf.GGUFReader`` builds numpy views for every entry (15 s of CPU for SmolLM2 on a
    busy 2-core box), and nothing but a vocabulary count needs them.
    """
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed by the with below
    except OSError as e:
        raise GGUFError(f"{path}: cannot read ({e})") from None
    with f:

        def rd(fmt: str) -> Any:
            size = struct.calcsize("<" + fmt)
            data = f.read(size)
            if len(data) != size:
                raise GGUFError(f"{path}: truncated GGUF header")
            return struct.unpack("<" + fmt, data)[0]

        def rstr() -> str:
            return f.read(rd("Q")).decode("utf-8", "replace")

        def rval(t: int, keep: bool) -> Any:
            if t in _GGUF_SCALARS:
                return rd(_GGUF_SCALARS[t])
            if t == 8:
                if keep:
                    return rstr()
                f.seek(rd("Q"), 1)
                return None
            if t == 9:
                sub, n = rd("I"), rd("Q")
                if keep:
                    return [rval(sub, True) for _ in range(n)]
                if sub in _GGUF_SCALARS:
                    f.seek(n * struct.calcsize("<" + _GGUF_SCALARS[sub]), 1)
                else:
                    for _ in range(n):
                        rval(sub, False)
                return None
            raise GGUFError(f"{path}: unknown GGUF value type {t}")

        if f.read(4) != b"GGUF":
            raise GGUFError(f"{path}: not a GGUF file (bad magic)")
        version = rd("I")
        if version < 2:
            raise GGUFError(f"{path}: GGUF version {version} is too old")
        n_tensors, n_kv = rd("Q"), rd("Q")
        kv: dict[str, Any] = {}
        spans: dict[str, tuple[int, int]] = {}
        for _ in range(n_kv):
            start = f.tell()
            key, t = rstr(), rd("I")
            if t == 9 and not arrays:
                rval(t, False)
            else:
                kv[key] = rval(t, True)
            spans[key] = (start, f.tell())
        raw: list[tuple[str, tuple[int, ...], int, int]] = []
        for _ in range(n_tensors):
            name = rstr()
            ne = [rd("Q") for _ in range(rd("I"))]
            raw.append((name, tuple(reversed(ne)), rd("I"), rd("Q")))  # ggml ne (in, out) → numpy
        align = int(kv.get("general.alignment", 32))
        start = -(-f.tell() // align) * align
    tensors = {name: TensorInfo(shape, t, start + off) for name, shape, t, off in raw}
    return GGUFHeader(version, kv, spans, tensors, align)


def read_gguf_metadata(path: Path, *, skip_arrays: bool = True) -> dict[str, Any]:
    """Key/value metadata of a GGUF file (arrays left out unless ``skip_arrays`` is False)."""
    return read_gguf_header(path, arrays=not skip_arrays).kv


