"""The judge stage: judge the candidate, then export what Ollama can take and check each
export in llama.cpp (the engine Ollama runs). What the worker's dispatcher calls for
``forged worker judge``; its result is the cycle's ``judge.result.json``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from forged.common import config
from forged.common.protocol import usable_export


def run_judge(cycle_dir: Path, job: dict[str, Any], cfg: config.Config,
              progress: Callable[[dict], None]) -> dict[str, Any]:
    """Judge ``cycle_dir``'s adapter against the live one and the base; export and check it
    if it passed. ``job["ollama_adapters"]``: whether the server takes adapters (None: unknown)."""
    from forged.common.models import resolve_base
    from forged.worker.judge.judge import judge

    adapter = cycle_dir / "train" / "adapter"
    live = Path(job["live_adapter"]) if job.get("live_adapter") else None
    verdict = judge(cycle_dir / "dataset", cfg.train, cfg.judge, adapter, live, progress=progress)
    out: dict[str, Any] = {"judge": verdict.to_dict(), "passed": verdict.passed}
    if not verdict.passed:
        return out
    base = resolve_base(cfg.train.base_model)
    if base.kind != "gguf":
        out.update(passed=False, export_error=f"export needs a GGUF base; {cfg.train.base_model} is {base.kind}")
        return out
    texts = _heldout_texts(cycle_dir / "dataset" / "valid.jsonl", limit=8)
    exports = _export_and_check(cfg, adapter, Path(base.path), cycle_dir / "export", texts,
                                job.get("ollama_adapters"), progress)
    out.update(_primary(exports, job.get("ollama_adapters")), exports=exports, base_gguf=str(base.path))
    return out


def export_plan(export: str, adapters_accepted: bool | None) -> tuple[bool, bool]:
    """Which exports a judged candidate gets: (GGUF adapter, fused model).

    ``export = "auto"`` makes the fused one always, so that an Ollama refusing adapters
    at publish time (upgraded since it was asked) gets the same candidate fused. The
    adapter is made only where the server is known to take it: Ollama 0.34.1 and later
    refuse adapters, and each export costs a llama.cpp check of its own.
    """
    if export == "adapter":
        return True, False
    if export == "fused":
        return False, True
    return adapters_accepted is True, True


def _export_and_check(cfg: config.Config, adapter: Path, base: Path, out_dir: Path, texts: list[str],
                      adapters_accepted: bool | None, progress: Callable[[dict], None]) -> dict[str, Any]:
    """Export the candidate as planned and check each export in llama.cpp; by kind."""
    from forged.worker.judge.export import ExportError, export_adapter, export_fused
    from forged.worker.judge.fidelity import check_fidelity, check_served
    from forged.worker.judge.quantize import choose_quantization

    want_adapter, want_fused = export_plan(cfg.publish.export, adapters_accepted)
    j = cfg.judge
    exports: dict[str, Any] = {}
    if want_adapter:
        progress({"stage": "export", "text": "exporting the adapter to GGUF"})
        try:
            exported = export_adapter(adapter, base, out_dir / "adapter.gguf")
        except ExportError as e:
            if not want_fused:
                raise
            exports["adapter"] = {"error": str(e)}  # DoRA, say: the fused version still works
        else:
            progress({"stage": "export", "path": str(exported.path),
                      "text": "checking the adapter in llama.cpp against the trainer"})
            fid = check_fidelity(adapter, exported.path, base, cfg.train, texts, min_corr=j.fidelity_min_corr,
                                 loss_tolerance=j.fidelity_loss_tolerance)
            exports["adapter"] = {**exported.to_dict(), "fidelity": fid.to_dict()}
    if want_fused:
        quant = choose_quantization(base, cfg.publish.quantize)
        progress({"stage": "export", "text": f"merging the adapter into the base; checking it at {quant} in llama.cpp"})
        merged = export_fused(adapter, base, out_dir / "fused-unquantized.gguf")
        try:
            fid, served = check_served(
                adapter, merged.path, base, cfg.train, texts, start=quant, out_dir=out_dir,
                min_corr=j.fidelity_min_corr, loss_tolerance=j.fidelity_loss_tolerance, min_gain=j.fidelity_min_gain,
                warn=lambda text: progress({"event": "warning", "message": text}))
        finally:
            merged.path.unlink(missing_ok=True)  # only the quantized file is published
        entry = {**merged.to_dict(), "fidelity": fid.to_dict(), "quantization": fid.quantization}
        if served is not None:
            from forged.worker.judge.export import _sha256

            entry.update(path=str(served), sha256=_sha256(served), size=served.stat().st_size)
        else:
            entry.update(path=None)
        exports["fused"] = entry
    return exports


def _primary(exports: dict[str, Any], adapters_accepted: bool | None) -> dict[str, Any]:
    """The export the daemon publishes first, its fidelity, and whether any export passed."""
    ok = {kind: e for kind, e in exports.items() if usable_export(e)}
    order = ("adapter", "fused") if adapters_accepted is True else ("fused",)
    kind = next((k for k in order if k in ok), None)
    shown = exports.get(kind or next(iter(exports), ""), {})
    return {"export": shown or None, "fidelity": shown.get("fidelity"), "passed": kind is not None}


def _heldout_texts(path: Path, limit: int) -> list[str]:
    texts: list[str] = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            if "text" in rec:
                texts.append(rec["text"][:2000])
            if len(texts) >= limit:
                break
    return texts


