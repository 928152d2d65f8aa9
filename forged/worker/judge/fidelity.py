"""Check an exported GGUF adapter (or fused model) against the engine Ollama uses (llama.cpp).

We compare *effects*, not raw predictions: the trainer and llama.cpp see the same base
weights but compute differently (llama.cpp quantizes activations for its Q4/Q8 matmuls),
so their raw logits differ a little even without an adapter. What must agree is what
the adapter *changes*: ``Δ = logits(base+adapter) − logits(base)`` in each engine,
token by token over held-out text, fed the exact same token ids. A wrong q/k
permutation, a lost scale (alpha), a transposed or missing tensor all show up as a low
correlation or a loss change of the wrong size.

A fused export (a full GGUF with the adapter merged, ``general.type`` not ``adapter``)
is checked the same way, its Δ being ``logits(fused) − logits(base)``.

Two conditions, both required:

* Pearson correlation of the two Δ (all positions × vocabulary) ≥ ``min_corr``;
* the held-out loss improvement (nats/token, adapter vs. own base) in llama.cpp is
  within ``loss_tolerance`` (relative, with a small absolute floor) of the trainer's.

A fused version is checked as it will be served, quantized by llama.cpp
(:func:`check_served`): there the gain must also keep at least ``min_gain`` of the
trainer's, and a quantization that loses more is replaced by the next precision up.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forged.worker.judge.agreement import Moments, mean_nll
from forged.worker.judge.llama_engine import (
    FidelityError,
    adapted_llama,
    is_adapter,
    llama_logits,
    open_llama,
)

if TYPE_CHECKING:
    import numpy as np

    from forged.common.config import TrainConfig
    from forged.worker.train.backend import Backend

# Fidelity runs on a handful of held-out texts; longer ones are cut (by characters,
# before tokenizing) so the check stays a few seconds even on the real base.
MAX_CHARS = 1500
QK_MIN_CORR = 0.5  # q/k-only effect: correct 0.87, un-permuted 0.07 on SmolLM2 Q4_1
ABS_LOSS_FLOOR = 0.01  # nats/token: below this a gain difference is noise, not a bug


@dataclass
class FidelityResult:
    """Outcome of comparing the adapter's effect in llama.cpp and in the trainer."""

    correlation: float
    loss_base_llama: float
    loss_adapter_llama: float
    loss_base_trainer: float
    loss_adapter_trainer: float
    passed: bool
    reason: str
    n_texts: int = 0
    n_tokens: int = 0
    top1_agree_adapter: float = 0.0  # share of positions where both engines' argmax agree
    delta_norm_ratio: float = 0.0  # |Δ llama| / |Δ trainer|: ~1 when the scale is right
    correlation_qk: float | None = None  # the q/k projections' part alone (PEFT adapters)
    seconds: float = 0.0
    gain_kept: float | None = None  # llama.cpp's held-out loss gain / the trainer's
    quantization: str | None = None  # fused versions: the precision checked (what is served)
    steps: list[dict[str, Any]] | None = None  # fused: each precision tried and why it failed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BaseSide:
    """The base model on the check's texts in both engines: the same for every export of
    one adapter (the whole adapter, its q/k part, each quantization tried), so it is
    computed once per check and reused."""

    texts: list[str]
    ids: list[list[int]]
    llama: list[np.ndarray]
    trainer: list[np.ndarray]
    nll_llama: float
    nll_trainer: float


def base_side(backend: Backend, base_gguf: Path, texts: list[str]) -> BaseSide:
    """Tokenize ``texts`` with the trainer and run the base in both engines (adapter off)."""
    import numpy as np

    texts = [t[:MAX_CHARS] for t in texts if t and t.strip()]
    if not texts:
        raise FidelityError("fidelity check needs at least one non-empty held-out text")
    pairs = [(t, ids) for t in texts if len(ids := list(backend.input_ids(t))) >= 2]
    texts, ids_list = [t for t, _ in pairs], [ids for _, ids in pairs]  # kept aligned
    if not ids_list:
        raise FidelityError("held-out texts are too short to score (need 2+ tokens)")
    llm = open_llama(base_gguf, None, max(len(ids) for ids in ids_list) + 8)
    try:
        backend.set_adapter_enabled(False)
        trainer = [np.asarray(backend.logits(text), dtype=np.float32) for text in texts]
        llama = [llama_logits(llm, ids) for ids in ids_list]
    finally:
        backend.set_adapter_enabled(True)
        del llm
    for ids, bt, bl in zip(ids_list, trainer, llama, strict=True):
        if bt.shape != bl.shape:
            raise FidelityError(
                f"trainer returned logits {bt.shape} for {len(ids)} tokens, llama.cpp {bl.shape} "
                "(vocabulary or tokenization mismatch between the trainer's model and the GGUF base)"
            )
    return BaseSide(texts, ids_list, llama, trainer,
                    sum(mean_nll(z, ids)[0] for z, ids in zip(llama, ids_list, strict=True)),
                    sum(mean_nll(z, ids)[0] for z, ids in zip(trainer, ids_list, strict=True)))


def compare_engines(
    backend: Backend,
    exported: Path,
    base_gguf: Path,
    base: BaseSide,
    min_corr: float = 0.95,
    loss_tolerance: float = 0.25,
    min_gain: float | None = None,
) -> FidelityResult:
    """Fidelity check given a trainer back end that already has the adapter loaded.

    ``exported`` is a GGUF LoRA adapter for ``base_gguf`` or a fused model made from it;
    ``base`` is the base model's side on the check's texts (:func:`base_side`).

    ``backend`` decides the token ids, and llama.cpp is fed exactly those, so tokenizer
    differences cannot blur the comparison.
    """
    import time

    import numpy as np

    t0 = time.monotonic()
    ada_llm = adapted_llama(exported, base_gguf, max(len(ids) for ids in base.ids) + 8)
    moments = Moments()
    nll_llama = nll_trainer = 0.0
    n_tok = agree = 0
    try:
        backend.set_adapter_enabled(True)
        for text, ids, bl, bt in zip(base.texts, base.ids, base.llama, base.trainer, strict=True):
            al = llama_logits(ada_llm, ids)
            at = np.asarray(backend.logits(text), dtype=np.float32)
            moments.add(al - bl, at - bt)
            nll_llama += mean_nll(al, ids)[0]
            nll_trainer += mean_nll(at, ids)[0]
            n_tok += len(ids) - 1
            agree += int((al.argmax(1) == at.argmax(1)).sum())
    finally:
        del ada_llm

    per_tok = 1 / max(n_tok, 1)
    sq_llama, sq_train = moments.sums_of_squares()
    norm_t = math.sqrt(sq_train)
    gains = _Gains(llama=(base.nll_llama - nll_llama) * per_tok, trainer=(base.nll_trainer - nll_trainer) * per_tok)
    corr, ratio = moments.correlation(), (math.sqrt(sq_llama) / norm_t if norm_t > 0 else float("nan"))
    passed, reason = _verdict(corr, ratio, norm_t == 0, gains, min_corr, loss_tolerance, min_gain)
    return FidelityResult(
        correlation=corr,
        loss_base_llama=base.nll_llama * per_tok,
        loss_adapter_llama=nll_llama * per_tok,
        loss_base_trainer=base.nll_trainer * per_tok,
        loss_adapter_trainer=nll_trainer * per_tok,
        passed=passed,
        reason=reason,
        n_texts=len(base.ids),
        n_tokens=n_tok,
        top1_agree_adapter=agree / max(n_tok + len(base.ids), 1),
        delta_norm_ratio=ratio,
        seconds=time.monotonic() - t0,
        gain_kept=gains.kept,
    )


@dataclass(frozen=True)
class _Gains:
    """The adapter's held-out loss gain (nats/token, base − adapter) in each engine."""

    llama: float
    trainer: float

    @property
    def kept(self) -> float | None:
        return self.llama / self.trainer if self.trainer > 0 else None


def _verdict(corr: float, ratio: float, no_delta: bool, gains: _Gains, min_corr: float,
             loss_tolerance: float, min_gain: float | None) -> tuple[bool, str]:
    """Whether the two engines agree on the adapter's effect, and the one-line reason."""
    g_l, g_t, kept = gains.llama, gains.trainer, gains.kept
    allowed = max(loss_tolerance * abs(g_t), ABS_LOSS_FLOOR)
    # The share kept is only meaningful for a gain above the noise floor; where it is
    # checked it replaces the lower side of the tolerance.
    by_share = min_gain is not None and g_t > ABS_LOSS_FLOOR
    if no_delta:
        return False, "the adapter changes nothing in the trainer (all-zero delta): nothing to verify"
    if not math.isfinite(corr) or corr < min_corr:
        return False, (f"adapter effect differs between llama.cpp and the trainer: correlation {corr:.3f} < "
                       f"{min_corr} (delta size ratio {ratio:.2f}) — wrong tensor layout or scale in the export")
    if by_share and kept is not None and kept < (min_gain or 0.0):
        return False, (f"llama.cpp keeps {kept:.0%} of the trainer's held-out loss gain ({g_l:+.4f} vs "
                       f"{g_t:+.4f} nats/token), below fidelity_min_gain {min_gain:.0%}")
    if g_l - g_t > allowed or (not by_share and g_t - g_l > allowed):
        return False, (f"held-out loss gain in llama.cpp {g_l:+.4f} nats/token vs trainer {g_t:+.4f} "
                       f"(allowed difference {allowed:.4f})")
    return True, f"ok: correlation {corr:.3f}, loss gain llama.cpp {g_l:+.4f} vs trainer {g_t:+.4f} nats/token"


def _qk_only_gguf(src: Path, dst: Path) -> int:
    """Copy the attn_q/attn_k tensors (and alpha) of a GGUF adapter; returns how many."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dst), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(reader.fields[gguf.Keys.Adapter.LORA_ALPHA].contents()))
    n = 0
    for t in reader.tensors:
        if ".attn_q." in t.name or ".attn_k." in t.name:
            writer.add_tensor(t.name, np.array(t.data))
            n += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return n


def _qk_only_peft(src: Path, dst: Path) -> bool:
    """Copy a PEFT adapter keeping only q_proj/k_proj; False if it has none (or is not PEFT)."""
    import json
    import shutil

    from safetensors.numpy import load_file, save_file

    weights = src / "adapter_model.safetensors"
    if not weights.is_file():
        return False
    keep = {k: v for k, v in load_file(str(weights)).items() if ".q_proj." in k or ".k_proj." in k}
    if not keep:
        return False
    dst.mkdir(parents=True, exist_ok=True)
    save_file(keep, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["target_modules"] = [m for m in ("q_proj", "k_proj") if any(f".{m}." in k for k in keep)]
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    shutil.copy(src / "forged_meta.json", dst / "forged_meta.json")
    return True


def _qk_only_export(exported: Path, base_gguf: Path, qk_adapter: Path, dst: Path) -> bool:
    """The q/k part of an export at ``dst``: the adapter's q/k tensors, or a fused model
    made from the q/k-only adapter dir ``qk_adapter``. False if there is no q/k part."""
    if is_adapter(exported):
        return _qk_only_gguf(exported, dst) > 0
    from forged.worker.judge.export import export_fused

    export_fused(qk_adapter, base_gguf, dst)
    return True


@dataclass
class BaseMemo:
    """The first check's base side, kept for the next checks of the same adapter and texts."""

    side: BaseSide | None = None


def _load_and_compare(
    cfg_train: TrainConfig, adapter_dir: Path, exported: Path, base_gguf: Path, texts: list[str],
    min_corr: float, loss_tolerance: float, min_gain: float | None, memo: BaseMemo,
) -> FidelityResult:
    """Load ``adapter_dir`` in the trainer's back end, compare it with ``exported``, free it."""
    import gc

    from forged.worker.train import load_model

    backend = load_model(cfg_train, adapter_dir)
    try:
        if memo.side is None:
            memo.side = base_side(backend, base_gguf, texts)
        return compare_engines(backend, exported, base_gguf, memo.side, min_corr, loss_tolerance, min_gain)
    finally:
        del backend
        gc.collect()


def check_fidelity(
    adapter_dir: Path,
    exported: Path,
    base_gguf: Path,
    cfg_train: TrainConfig,
    texts: list[str],
    min_corr: float = 0.95,
    loss_tolerance: float = 0.25,
    min_corr_qk: float = QK_MIN_CORR,
    min_gain: float | None = None,
    memo: BaseMemo | None = None,
) -> FidelityResult:
    """Load the trained adapter in the trainer's back end and compare it with llama.cpp.

    ``exported`` is the GGUF LoRA adapter (applied to ``base_gguf``) or the fused model.
    Two comparisons: the whole adapter, then (PEFT adapters) its q/k part alone. The
    second exists because a q/k layout mistake (the one transformation only those two
    projections get) hides in the whole-adapter number: on the tiny test model an
    export with q/k left un-permuted still correlated 0.953 overall, since v/o/MLP
    deltas were right and dominated. The q/k part alone has its own, lower bar
    (``min_corr_qk``): its effect is small, so the 4-bit base's noise weighs more — on
    SmolLM2 Q4_1 a correct q/k export correlated 0.87, an un-permuted one 0.07. For a
    fused export the q/k part is a second fused model made from the q/k-only adapter.

    A failed check (``passed=False``) must fail the cycle: the exported file would not
    do in Ollama what the judge measured.
    """
    import tempfile

    adapter_dir, exported, base_gguf = Path(adapter_dir), Path(exported), Path(base_gguf)
    for p, what in ((exported, "export"), (base_gguf, "base GGUF")):
        if not p.is_file():
            raise FidelityError(f"{what} not found: {p}")
    memo = memo or BaseMemo()  # the base side, shared by the whole-adapter and q/k comparisons
    result = _load_and_compare(cfg_train, adapter_dir, exported, base_gguf, texts, min_corr, loss_tolerance,
                               min_gain, memo)
    if not result.passed:
        return result
    with tempfile.TemporaryDirectory(prefix="forged-fid-") as tmp:
        sub, qk_export = Path(tmp) / "qk", Path(tmp) / "qk.gguf"
        if not _qk_only_peft(adapter_dir, sub) or not _qk_only_export(exported, base_gguf, sub, qk_export):
            return result
        qk = _load_and_compare(cfg_train, sub, qk_export, base_gguf, texts, min_corr, loss_tolerance, None, memo)
    result.correlation_qk = qk.correlation
    result.seconds += qk.seconds
    if not (math.isfinite(qk.correlation) and qk.correlation >= min_corr_qk):
        result.passed = False
        result.reason = (
            f"q/k part of the adapter differs between llama.cpp and the trainer: correlation "
            f"{qk.correlation:.3f} < {min_corr_qk} (whole adapter {result.correlation:.3f}) — q/k row layout wrong in the export"
        )
    else:
        result.reason += f"; q/k alone {qk.correlation:.3f}"
    return result


def check_served(
    adapter_dir: Path, fused: Path, base_gguf: Path, cfg_train: TrainConfig, texts: list[str], *,
    start: str, out_dir: Path, min_corr: float = 0.95, loss_tolerance: float = 0.25, min_gain: float = 0.9,
    warn: Callable[[str], None] | None = None,
) -> tuple[FidelityResult, Path | None]:
    """Check a fused model as Ollama will serve it: quantized by llama.cpp to ``start``.

    Below ``min_gain`` of the trainer's loss gain (or the correlation bar), the next
    precision up is tried (q4_K_M → q8_0 → f16), and ``warn`` says so. Returns the result
    of the last precision tried and the file that passed (``out_dir/model-<q>.gguf``), or
    None when even f16 fails: such a version must not be published.
    """
    from forged.worker.judge.quantize import quantize_gguf, steps_from

    steps: list[dict[str, Any]] = []
    result: FidelityResult | None = None
    ladder = steps_from(start)
    memo = BaseMemo()  # every precision is compared against the same base side
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    for i, quant in enumerate(ladder):
        served = Path(out_dir) / f"model-{quant}.gguf"
        quantize_gguf(fused, served, quant)
        result = check_fidelity(adapter_dir, served, base_gguf, cfg_train, texts, min_corr, loss_tolerance,
                                min_gain=min_gain, memo=memo)
        result.quantization = quant
        steps.append({"quantization": quant, "passed": result.passed, "gain_kept": result.gain_kept,
                      "correlation": result.correlation, "reason": result.reason})
        result.steps = steps
        if result.passed:
            return result, served
        served.unlink(missing_ok=True)
        if warn is not None and i + 1 < len(ladder):
            warn(f"fused model at {quant} fails the fidelity check ({result.reason}); trying {ladder[i + 1]}")
    assert result is not None
    result.reason = f"not published: the fused model fails the fidelity check even at f16: {result.reason}"
    return result, None
