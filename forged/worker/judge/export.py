"""Export a trained adapter as a GGUF LoRA adapter that llama.cpp (inside Ollama) applies.

llama.cpp computes ``W x + (alpha / r) · B (A x)`` per tensor, with ``r`` the tensor's
own rank and ``alpha`` one number for the whole file (``adapter.lora.alpha``). We write
``alpha = scale × rank`` so the trained multiplier survives; a tensor whose scale or
rank differs from the common one (PEFT ``rank_pattern``/``alpha_pattern``) gets the
difference folded into its ``lora_b``.

Layouts:

* PEFT (``adapter_model.safetensors``): ``lora_A`` (r, in), ``lora_B`` (out, r) — the
  GGUF numpy shapes already. Trained on Hugging Face layout ("hf"): transformers
  un-permutes llama q/k rows when it reads a GGUF, so ``lora_b`` of q/k gets
  llama.cpp's row permutation back on export.
* mlx-lm (``adapters.safetensors``): ``lora_a`` (in, r), ``lora_b`` (r, out) —
  transposed. Trained on the GGUF tensors directly ("gguf"), so no permutation.

A PiSSA adapter arrives already converted to a plain rank-2r LoRA against the original
base (the trainer does that on save), so it exports like any LoRA. DoRA cannot be
expressed as a GGUF LoRA and is refused; use the fused export for it.

The fused export (:func:`export_fused`, ``[publish] export = "fused"``) writes a full
model instead: the base GGUF with each adapted projection replaced by
``W + scale · B @ A`` (DoRA: rescaled per output row to the trained magnitude) in the
same GGUF layout, every other byte — metadata, tokenizer, chat template, untouched
tensors — copied from the base as it is.

Heavy imports (numpy, gguf, safetensors) happen inside functions: this module is
only ever imported in the worker subprocess, but keep it cheap to import anyway.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from forged.common import gguf as gguf_header
from forged.common.gguf import GGUFHeader, TensorInfo

# Hugging Face module name → llama.cpp tensor name (per block).
HF_TO_GGUF = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}
# ... and the other architectures' names for the same tensors (StarCoder2's ungated MLP).
MODULE_TO_GGUF = {**HF_TO_GGUF, "c_fc": "ffn_up", "c_proj": "ffn_down"}
# GGUF architectures whose q/k rows llama.cpp stores permuted (and transformers
# un-permutes on load); see transformers' LlamaTensorProcessor. llama.cpp's converter
# permutes for the llama family only (Mistral and CodeLlama are written as "llama");
# qwen2, starcoder2, gemma... keep the Hugging Face row order.
PERMUTED_QK_ARCHS = {"llama"}

_PEFT_KEY = re.compile(
    r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.(lora_A|lora_B|lora_magnitude_vector|lora_bias)"
    r"(?:\.[\w-]+)?(?:\.weight)?$"  # PEFT saves the DoRA magnitude without ".weight"
)
_MLX_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.(lora_a|lora_b|m)$")


class ExportError(ValueError):
    """An adapter that cannot be exported; the message is one line for the user."""


@dataclass
class ExportResult:
    """What was written: the GGUF adapter (or fused model) and how it scales."""

    path: Path
    sha256: str
    n_tensors: int
    alpha: float
    rank: int
    kind: str = "lora"  # "lora" (GGUF LoRA adapter) or "fused" (full model)
    scale: float = 0.0
    permuted_qk: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


@dataclass
class LoraPair:
    """One adapted projection in GGUF orientation: delta = scale · B @ A."""

    layer: int
    module: str  # HF name, e.g. "q_proj"
    a: Any  # np.ndarray (r, in)
    b: Any  # np.ndarray (out, r)
    scale: float
    magnitude: Any = None  # DoRA: np.ndarray (out,), the trained norm of each output row

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def gguf_name(self) -> str:
        return f"blk.{self.layer}.{MODULE_TO_GGUF[self.module]}.weight"


# ---------------------------------------------------------------- reading adapters


def read_meta(adapter_dir: Path) -> dict[str, Any]:
    """``forged_meta.json`` of a saved adapter (ExportError if missing or unreadable)."""
    path = Path(adapter_dir) / "forged_meta.json"
    if not path.is_file():
        raise ExportError(f"{adapter_dir}: not a forged adapter (no forged_meta.json)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ExportError(f"{path}: unreadable: {e}") from None
    if not isinstance(meta, dict):
        raise ExportError(f"{path}: expected a JSON object")
    return meta


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ExportError(f"{path}: unreadable: {e}") from None
    return data if isinstance(data, dict) else {}


def _pattern_value(patterns: dict[str, Any], module_path: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches a module path suffix."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return default


@dataclass(frozen=True)
class _Format:
    """Where one trainer keeps its adapter and how its tensors are named."""

    weights: str  # file name in the adapter dir
    key: re.Pattern[str]  # → (layer, module, part)
    a: str  # part names of the two LoRA matrices and the DoRA magnitude
    b: str
    magnitude: str
    transposed: bool  # stored as x @ A @ B: A (in, r), B (r, out)


_PEFT = _Format("adapter_model.safetensors", _PEFT_KEY, "lora_A", "lora_B", "lora_magnitude_vector", False)
_MLX = _Format("adapters.safetensors", _MLX_KEY, "lora_a", "lora_b", "m", True)


def _scale_of(adapter_dir: Path, fmt: _Format, cfg: dict[str, Any], meta: dict[str, Any]) -> Any:
    """module path → the multiplier the trainer applied to B @ A for that module."""
    meta_scale = meta.get("scale")
    if fmt is _MLX:
        scale = (cfg.get("lora_parameters") or {}).get("scale", meta_scale)
        if scale is None:
            raise ExportError(f"{adapter_dir}: mlx-lm adapter without a scale (lora_parameters.scale)")
        return lambda _path: float(scale)
    if not cfg:
        if meta_scale is None:
            raise ExportError(f"{adapter_dir}: no adapter_config.json and no scale in forged_meta.json")
        return lambda _path: float(meta_scale)

    def peft_scale(path: str) -> float:
        r = _pattern_value(cfg.get("rank_pattern", {}), path, cfg.get("r"))
        alpha = _pattern_value(cfg.get("alpha_pattern", {}), path, cfg.get("lora_alpha"))
        if not r or alpha is None:
            raise ExportError(f"{adapter_dir}/adapter_config.json: missing r or lora_alpha")
        return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r

    return peft_scale


def load_lora_pairs(adapter_dir: Path, *, dora: bool = False) -> tuple[list[LoraPair], dict[str, Any]]:
    """Read a saved adapter (PEFT or mlx-lm layout) into GGUF-oriented pairs + its meta.

    The per-tensor scale comes from the framework's own config (what the trainer
    actually applied); ``forged_meta.json``'s ``scale`` is the fallback. DoRA adapters
    are refused unless ``dora`` (the fused export can merge them; a GGUF LoRA cannot
    hold them), in which case each pair carries its magnitude vector.
    """
    import numpy as np
    from safetensors.numpy import load_file

    adapter_dir = Path(adapter_dir)
    meta = read_meta(adapter_dir)
    fmt = next((f for f in (_PEFT, _MLX) if (adapter_dir / f.weights).is_file()), None)
    if fmt is None:
        raise ExportError(
            f"{adapter_dir}: no adapter weights (adapter_model.safetensors or adapters.safetensors)"
        )
    cfg = _read_json(adapter_dir / "adapter_config.json")
    is_dora = bool(meta.get("dora") or cfg.get("use_dora") or cfg.get("fine_tune_type") == "dora"
                   or (cfg.get("lora_parameters") or {}).get("use_dora"))
    if is_dora and not dora:
        raise ExportError(
            f"{adapter_dir}: DoRA adapters cannot be written as a GGUF LoRA adapter "
            "(llama.cpp has no magnitude vector); train with dora = false or export fused"
        )
    scale_of = _scale_of(adapter_dir, fmt, cfg, meta)

    slots: dict[tuple[int, str], dict[str, Any]] = {}
    parts = {fmt.a: "a", fmt.b: "b", fmt.magnitude: "m"}
    for key, value in load_file(str(adapter_dir / fmt.weights)).items():
        m = fmt.key.search(key)
        if not m:
            raise ExportError(f"{fmt.weights}: tensor {key!r} is not a supported LoRA projection")
        layer, module, part = int(m.group(1)), m.group(2), m.group(3)
        if part not in parts or (parts[part] == "m" and not is_dora):
            what = "DoRA magnitude" if part in (fmt.magnitude, "lora_magnitude_vector") else part
            raise ExportError(f"{fmt.weights}: {what} ({key}) has no GGUF LoRA equivalent")
        slot = slots.setdefault((layer, module), {"path": key.split(f".{part}")[0]})
        v = value.astype(np.float32)
        # mlx-lm stores x @ A @ B: A (in, r), B (r, out); GGUF wants (r, in), (out, r).
        slot[parts[part]] = np.ascontiguousarray(v.T) if fmt.transposed and v.ndim == 2 else v

    out: list[LoraPair] = []
    for (layer, module), slot in sorted(slots.items()):
        if module not in MODULE_TO_GGUF:
            raise ExportError(
                f"{adapter_dir}: LoRA on {module!r} cannot be exported "
                f"(supported: {', '.join(MODULE_TO_GGUF)})"
            )
        if "a" not in slot or "b" not in slot:
            raise ExportError(f"{adapter_dir}: layer {layer} {module} has only one of lora_A/lora_B")
        a, b = slot["a"], slot["b"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ExportError(
                f"{adapter_dir}: layer {layer} {module}: lora_A {a.shape} and lora_B {b.shape} do not chain"
            )
        mag = slot.get("m")
        if is_dora and (mag is None or mag.reshape(-1).shape != (b.shape[0],)):
            raise ExportError(f"{adapter_dir}: layer {layer} {module}: DoRA magnitude missing or misshaped")
        out.append(LoraPair(layer, module, a, b, float(scale_of(slot["path"])),
                            None if mag is None else mag.reshape(-1)))
    if not out:
        raise ExportError(f"{adapter_dir}: adapter holds no LoRA tensors")
    return out, meta


# ---------------------------------------------------------------- base model facts


@dataclass
class BaseInfo:
    """What export needs to know about the GGUF base."""

    architecture: str
    n_head: int
    n_head_kv: int
    shapes: dict[str, tuple[int, int]]  # tensor name → numpy shape (out, in)


def read_gguf_header(path: Path) -> GGUFHeader:
    """The header of a GGUF file (:func:`forged.common.gguf.read_gguf_header`), its
    errors as :class:`ExportError`."""
    try:
        return gguf_header.read_gguf_header(path)
    except gguf_header.GGUFError as e:
        raise ExportError(str(e)) from None


def _nbytes(shape: tuple[int, ...], ggml_type: int) -> int:
    import gguf

    block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    return math.prod(shape) // block * type_size


def _dequantize(mm: Any, info: TensorInfo) -> Any:
    """One tensor of a memory-mapped GGUF file as a float32 numpy array."""
    import gguf
    import numpy as np

    qtype = gguf.GGMLQuantizationType(info.ggml_type)
    raw = mm[info.offset : info.offset + _nbytes(info.shape, info.ggml_type)]
    if qtype == gguf.GGMLQuantizationType.F32:
        arr = raw.view(np.float32).reshape(info.shape)
    elif qtype == gguf.GGMLQuantizationType.F16:
        arr = raw.view(np.float16).reshape(info.shape)
    else:
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        arr = gguf.quants.dequantize(raw.reshape(*info.shape[:-1], info.shape[-1] // block * type_size), qtype)
    return np.array(arr, dtype=np.float32)


def load_gguf_tensors(path: Path, names: list[str] | None = None) -> dict[str, Any]:
    """Tensors of a GGUF file as float32 numpy arrays (dequantized), read via mmap."""
    import numpy as np

    infos = read_gguf_header(path).tensors
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    return {name: _dequantize(mm, infos[name]) for name in (names if names is not None else list(infos))}


def _gguf_str(s: str) -> bytes:
    import struct

    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def rewrite_gguf(
    src: Path,
    out_path: Path,
    new_types: dict[str, int],
    produce: Callable[[str], Any],
    set_strings: dict[str, str] | None = None,
) -> None:
    """Copy GGUF ``src`` to ``out_path`` with some tensors replaced; all else byte for byte.

    ``new_types`` names the replaced tensors and their ggml type; ``produce(name)`` gives
    each one's data (a numpy array whose bytes are that type's encoding, same shape),
    called once per tensor in file order, so only one is in memory at a time. Metadata
    entries are copied verbatim except the ``set_strings`` keys, which are (re)written.
    Output goes to ``*.tmp`` and is renamed.
    """
    import struct

    import numpy as np

    src, out_path = Path(src), Path(out_path)
    h = read_gguf_header(src)
    mm = np.memmap(src, dtype=np.uint8, mode="r")
    set_strings = set_strings or {}
    kv = [mm[a:b].tobytes() for key, (a, b) in h.kv_spans.items() if key not in set_strings]
    kv += [_gguf_str(k) + struct.pack("<I", 8) + _gguf_str(v) for k, v in set_strings.items()]
    pad = lambda n: -n % h.alignment  # noqa: E731
    infos, plan, offset = [], [], 0
    for name, t in h.tensors.items():
        ggml_type = new_types.get(name, t.ggml_type)
        size = _nbytes(t.shape, ggml_type)
        infos.append(_gguf_str(name) + struct.pack(f"<I{len(t.shape)}QIQ", len(t.shape), *reversed(t.shape),
                                                   ggml_type, offset))
        plan.append((name, t, size))
        offset += size + pad(size)
    head = b"GGUF" + struct.pack("<IQQ", h.version, len(h.tensors), len(kv)) + b"".join(kv) + b"".join(infos)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(head + b"\0" * pad(len(head)))
            for name, t, size in plan:
                data = produce(name) if name in new_types else mm[t.offset : t.offset + size]
                buf = memoryview(np.ascontiguousarray(data)).cast("B")
                if len(buf) != size:
                    raise ExportError(f"{name}: {len(buf)} bytes of tensor data, expected {size}")
                f.write(buf)
                f.write(b"\0" * pad(size))
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)


def read_base(base_gguf: Path) -> BaseInfo:
    """Architecture, head counts and 2-D tensor shapes of a GGUF model file."""
    base_gguf = Path(base_gguf)
    if not base_gguf.is_file():
        raise ExportError(f"{base_gguf}: base GGUF not found")
    try:
        header = read_gguf_header(base_gguf)
    except (OSError, UnicodeDecodeError) as e:
        raise ExportError(f"{base_gguf}: not a readable GGUF file: {e}") from None
    kv, shapes = header.kv, header.tensors
    arch = kv.get("general.architecture")
    if not arch:
        raise ExportError(f"{base_gguf}: no general.architecture")
    if kv.get("general.type") == "adapter":
        raise ExportError(f"{base_gguf}: is an adapter, not a base model")
    n_head = kv.get(f"{arch}.attention.head_count") or 0
    n_head_kv = kv.get(f"{arch}.attention.head_count_kv") or n_head
    two_d = {name: (int(t.shape[0]), int(t.shape[1])) for name, t in shapes.items() if len(t.shape) == 2}
    return BaseInfo(str(arch), int(n_head), int(n_head_kv), two_d)


def permute_rows(w: Any, n_head: int) -> Any:
    """llama.cpp's q/k permutation of output rows (HF rotate-half → GGUF interleaved)."""
    rows = w.shape[0]
    return (
        w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def gguf_oriented(pairs: list[LoraPair], meta: dict[str, Any], base: BaseInfo) -> tuple[list[LoraPair], bool]:
    """Pairs checked against the base's shapes and with q/k rows in llama.cpp's layout."""
    layout = meta.get("layout", "hf")
    if layout not in ("hf", "gguf"):
        raise ExportError(f"forged_meta.json: layout must be 'hf' or 'gguf' (got {layout!r})")
    permute = layout == "hf" and base.architecture in PERMUTED_QK_ARCHS
    out: list[LoraPair] = []
    for p in pairs:
        shape = base.shapes.get(p.gguf_name)
        if shape is None:
            raise ExportError(f"base model has no tensor {p.gguf_name} for layer {p.layer} {p.module}")
        want = (p.b.shape[0], p.a.shape[1])
        if shape != want:
            raise ExportError(
                f"{p.gguf_name}: adapter delta is {want[0]}x{want[1]} but the base tensor is "
                f"{shape[0]}x{shape[1]} — adapter trained for a different base?"
            )
        b, mag = p.b, p.magnitude
        if permute and p.module in ("q_proj", "k_proj"):
            heads = base.n_head if p.module == "q_proj" else base.n_head_kv
            if not heads or b.shape[0] % (2 * heads):
                raise ExportError(f"{p.gguf_name}: cannot permute {b.shape[0]} rows over {heads} heads")
            b = permute_rows(b, heads)
            mag = None if mag is None else permute_rows(mag, heads)
        out.append(LoraPair(p.layer, p.module, p.a, b, p.scale, mag))
    return out, permute


def _oriented_pairs(adapter_dir: Path, base_gguf: Path, *, dora: bool = False
                    ) -> tuple[list[LoraPair], dict[str, Any], BaseInfo, bool]:
    """The adapter's pairs checked against ``base_gguf`` and in its layout (both exports)."""
    pairs, meta = load_lora_pairs(adapter_dir, dora=dora)
    base = read_base(base_gguf)
    _check_base_identity(meta, base_gguf)
    pairs, permuted = gguf_oriented(pairs, meta, base)
    return pairs, meta, base, permuted


def _common_scale_rank(pairs: list[LoraPair]) -> tuple[float, int]:
    """The commonest (scale, rank): the file-wide alpha of a GGUF LoRA is scale × rank."""
    return Counter((p.scale, p.rank) for p in pairs).most_common(1)[0][0]


# ---------------------------------------------------------------- writing


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_base_identity(meta: dict[str, Any], base_gguf: Path) -> None:
    """Refuse a GGUF base that is not the one a GGUF-trained adapter was trained on."""
    want = meta.get("base_sha256")
    if not want or meta.get("layout") != "gguf" and not str(meta.get("base_path", "")).endswith(".gguf"):
        return  # trained on an HF checkpoint: shapes are the only check available
    got = _sha256(base_gguf)
    if got != want:
        raise ExportError(
            f"{base_gguf}: sha256 {got[:12]}… differs from the base the adapter was trained on "
            f"({want[:12]}…, {meta.get('base_model', '?')})"
        )


def _forged_keys(meta: dict[str, Any]) -> dict[str, str]:
    """Provenance written into every export: ``forged.method``, ``.backend``, ``.base_sha256``."""
    return {f"forged.{k}": str(meta[k]) for k in ("method", "backend", "base_sha256") if meta.get(k)}


def export_adapter(adapter_dir: Path, base_gguf: Path, out_path: Path) -> ExportResult:
    """Write ``adapter_dir`` as a GGUF LoRA adapter for ``base_gguf`` at ``out_path``.

    Raises :class:`ExportError` (one line) for anything that would not apply
    correctly: missing/foreign tensors, shape mismatches, DoRA, a different base.
    """
    import gguf
    import numpy as np

    adapter_dir, base_gguf, out_path = Path(adapter_dir), Path(base_gguf), Path(out_path)
    pairs, meta, base, permuted = _oriented_pairs(adapter_dir, base_gguf)

    # One file-wide alpha: the commonest (scale·rank); fold any other into lora_b.
    scale, rank = _common_scale_rank(pairs)
    alpha = scale * rank

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), base.architecture)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    writer.add_name(f"forged adapter for {meta.get('base_model', base_gguf.name)}")
    for key, value in _forged_keys(meta).items():
        writer.add_string(key, value)
    for p in pairs:
        b = p.b
        fold = (p.scale * p.rank) / alpha
        if not math.isclose(fold, 1.0, rel_tol=1e-6):
            b = b * np.float32(fold)
        writer.add_tensor(p.gguf_name + ".lora_a", np.ascontiguousarray(p.a, dtype=np.float32))
        writer.add_tensor(p.gguf_name + ".lora_b", np.ascontiguousarray(b, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out_path)
    return ExportResult(
        path=out_path,
        sha256=_sha256(out_path),
        n_tensors=2 * len(pairs),
        alpha=float(alpha),
        rank=int(rank),
        kind="lora",
        scale=float(scale),
        permuted_qk=permuted,
    )


def merged_weight(w: Any, p: LoraPair) -> Any:
    """``w + scale · B @ A`` in float32; DoRA: each output row rescaled to its trained norm.

    Both PEFT and mlx-lm compute DoRA's norm per output row of the adapted weight and
    multiply by ``magnitude / norm``; rows are permuted together with the magnitude, so
    this holds in GGUF's q/k order as well.
    """
    import numpy as np

    out = w + np.float32(p.scale) * (p.b @ p.a)
    if p.magnitude is not None:
        out *= (p.magnitude / np.linalg.norm(out, axis=1)).astype(np.float32)[:, None]
    return out


def export_fused(adapter_dir: Path, base_gguf: Path, out_path: Path) -> ExportResult:
    """Write ``base_gguf`` with ``adapter_dir`` merged into it, as a full GGUF model.

    Each adapted projection is dequantized (``gguf.quants``), merged (:func:`merged_weight`)
    and written as F16 — or F32 where the base tensor is F32 — so the merge loses nothing
    to re-quantization: F16 keeps ~3 significant digits, finer than any 4- or 8-bit base
    and than the trained delta. Everything else (metadata, tokenizer, chat template, the
    untouched tensors in their own types) is copied from the base byte for byte, plus
    ``forged.export = "fused"`` and the provenance keys of the adapter export. DoRA,
    which a GGUF LoRA cannot hold, merges here.
    """
    import gguf
    import numpy as np

    adapter_dir, base_gguf, out_path = Path(adapter_dir), Path(base_gguf), Path(out_path)
    pairs, meta, _base, permuted = _oriented_pairs(adapter_dir, base_gguf, dora=True)
    header = read_gguf_header(base_gguf)
    f32, f16 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16
    by_name = {p.gguf_name: p for p in pairs}
    types = {n: f32 if header.tensors[n].ggml_type == f32 else f16 for n in by_name}
    mm = np.memmap(base_gguf, dtype=np.uint8, mode="r")

    def fused(name: str) -> Any:
        w = merged_weight(_dequantize(mm, header.tensors[name]), by_name[name])
        out = w.astype(np.float16 if types[name] == f16 else np.float32)
        if not np.isfinite(out).all():
            raise ExportError(f"{name}: fused weights do not fit in {types[name].name}")
        return out

    rewrite_gguf(base_gguf, out_path, types, fused, {"forged.export": "fused", **_forged_keys(meta)})
    scale, rank = _common_scale_rank(pairs)
    return ExportResult(
        path=out_path,
        sha256=_sha256(out_path),
        n_tensors=len(pairs),
        alpha=float(scale * rank),
        rank=int(rank),
        kind="fused",
        scale=float(scale),
        permuted_qk=permuted,
    )
