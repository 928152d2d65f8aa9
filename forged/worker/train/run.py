"""The training loop driver: data → batches → steps, checkpoints, resume, budget, progress.

Layout of ``out_dir``::

    checkpoints/step-000040/   adapter + optimizer (back-end files) + state.json
    checkpoints/init/          PiSSA's initial A0/B0 (to convert to a plain LoRA)
    adapter/                   the publishable adapter + forged_meta.json

A checkpoint holds everything the next step depends on — adapter, optimizer moments,
step (→ learning rate), RNG states and the data position — so a resumed run takes the
same next batch and follows the same loss curve. Checkpoints are written to a temp
directory and renamed, so a kill -9 leaves either the old or the new one.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from forged.worker.train.data import load_dataset, select_replay, tokenize
from forged.worker.train.packing import RowStream, collate, epoch_rows


class TrainError(RuntimeError):
    """Training failed; ``checkpoint`` names the last good checkpoint, if any."""

    def __init__(self, msg: str, checkpoint: Path | None = None) -> None:
        super().__init__(msg)
        self.checkpoint = checkpoint


@dataclass
class TrainResult:
    steps: int
    tokens: int  # target (non-padding, loss-bearing) tokens trained on
    stopped: bool  # stopped early by stop.set() (checkpointed; resume continues)
    final_loss: float | None  # mean train loss over the last steps
    heldout_loss: float | None  # mean NLL per target token on valid.jsonl (None if no valid set)
    heldout_loss_start: float | None
    adapter_dir: Path | None
    loss_curve: list[float] = field(default_factory=list)
    peak_mem: int = 0
    seconds: float = 0.0
    backend: str = ""
    reason: str = ""  # why it ended: max_steps | max_minutes | max_tokens | stopped

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["adapter_dir"] = str(self.adapter_dir) if self.adapter_dir else None
        return d


def lr_at(step: int, total: int, cfg: Any) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then the schedule."""
    base = cfg.learning_rate
    if step < cfg.warmup_steps:
        return base * (step + 1) / (cfg.warmup_steps + 1)
    if cfg.lr_schedule == "constant" or total <= cfg.warmup_steps:
        return base
    frac = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    if cfg.lr_schedule == "linear":
        return base * (1 - frac) + base * 0.1 * frac
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))  # cosine to 10%


def _latest_checkpoint(ckpt_dir: Path) -> Path | None:
    cands = sorted(p for p in ckpt_dir.glob("step-*") if (p / "state.json").exists())
    return cands[-1] if cands else None


def _read_meta(adapter_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((adapter_dir / "forged_meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def train(dataset_dir: Path, out_dir: Path, cfg: Any, *, warm_start: Path | None = None, resume: bool = True,
          progress: Callable[[dict], None] | None = None, stop: threading.Event | None = None,
          backend_name: str | None = None) -> TrainResult:
    """Train an adapter on ``dataset_dir``; see the module docstring for ``out_dir``."""
    from forged.common.backends import choose_backend
    from forged.common.memory import check_fits
    from forged.common.models import resolve_base
    from forged.worker.train.backend import open_backend

    emit = progress or (lambda _e: None)
    stop = stop or threading.Event()
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"

    # ---- everything that can fail on bad input fails here, before any training
    ds = load_dataset(Path(dataset_dir))
    base = resolve_base(cfg.base_model)
    name, why = (backend_name, "requested") if backend_name else choose_backend(cfg)
    check_fits(base, cfg, name)
    if warm_start is not None:
        meta = _read_meta(Path(warm_start))
        problem = None
        if not (Path(warm_start) / "forged_meta.json").exists():
            problem = "has no forged_meta.json"
        elif meta.get("backend") != name:
            problem = f"was trained with the {meta.get('backend')} back end, this run uses {name}"
        elif meta.get("base_sha256") != base.sha256:
            problem = "was trained on a different base model"
        if problem:
            emit({"event": "warning", "message": f"warm start {warm_start} {problem}; training from scratch"})
            warm_start = None
    emit({"event": "loading", "backend": name, "reason": why, "base": base.spec})
    be = open_backend(cfg, base, name=name)
    for note in getattr(be, "notes", []):
        emit({"event": "warning", "message": note})

    records = select_replay(ds.train, cfg.replay_ratio, cfg.seed) if warm_start is not None else ds.train
    dropped: Counter[str] = Counter()
    train_ex = tokenize(be.tok, records, cfg.seq_len, dropped, fim_loss=getattr(cfg, "fim_loss", "middle"))
    valid_ex = tokenize(be.tok, ds.valid, cfg.seq_len, dropped)
    if dropped:  # said out loud: a whole kind of example can vanish this way
        kinds = ", ".join(f"{k} {n}" for k, n in dropped.most_common())
        emit({"event": "warning", "message": f"{sum(dropped.values())} examples left nothing to learn "
              f"once cut to seq_len {cfg.seq_len} and were skipped ({kinds}); a larger [train] "
              "seq_len keeps them"})
    if not train_ex:
        raise TrainError(f"{ds.dir}: no example has a token to learn from after tokenization")
    mode = getattr(be, "batching", "pack")
    pad = int(be.tok.pad_token_id)

    ckpt = _latest_checkpoint(ckpt_dir) if resume else None
    if not resume and ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)
    state: dict[str, Any] = json.loads((ckpt / "state.json").read_text()) if ckpt else {}
    if state and state.get("warm_start") is not None:
        warm_start = Path(state["warm_start"])
    info = be.attach_adapter(cfg, warm_start=warm_start, init_dir=ckpt_dir / "init")

    stream = RowStream(train_ex, seq_len=cfg.seq_len, seed=cfg.seed, mode=mode, batch_size=cfg.batch_size,
                       **(state.get("data") or {}))
    per_step = cfg.batch_size * cfg.grad_accum
    total_steps = cfg.max_steps or max(1, math.ceil(stream.rows_per_epoch() / per_step))
    valid_batches = [collate(rows[i : i + cfg.batch_size], pad)
                     for rows in [epoch_rows(valid_ex, seq_len=cfg.seq_len, seed=0, epoch=0, mode=mode,
                                             batch_size=cfg.batch_size)] if rows
                     for i in range(0, len(rows), cfg.batch_size)]

    def heldout() -> float | None:
        if not valid_batches:
            return None
        s, n = be.eval_loss(valid_batches)
        return s / max(n, 1)

    step, tokens = int(state.get("step", 0)), int(state.get("tokens", 0))
    curve: list[float] = list(state.get("loss_curve", []))
    evals: list[list[float]] = list(state.get("evals", []))
    elapsed_before = float(state.get("seconds", 0.0))
    h0 = state.get("heldout_start")
    if ckpt:
        be.load_checkpoint(ckpt)
        be.set_rng_state(state["rng"]["backend"])
        random.setstate(_tuplify(state["rng"]["python"]))
        emit({"event": "resumed", "checkpoint": str(ckpt), "step": step})
    else:
        random.seed(cfg.seed)
        h0 = heldout()
        if h0 is not None:
            evals.append([0, h0])
    emit({"event": "start", "backend": name, "reason": why, "method": info["method"], "rank": info["rank"],
          "examples": len(train_ex), "valid_examples": len(valid_ex), "total_steps": total_steps,
          "heldout_loss": h0, "step": step})

    last_good = ckpt

    def save_ckpt() -> Path:
        nonlocal last_good
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        final = ckpt_dir / f"step-{step:06d}"
        tmp = ckpt_dir / f".tmp-step-{step:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        be.save_checkpoint(tmp)
        st = {"step": step, "tokens": tokens, "loss_curve": curve, "evals": evals, "data": stream.position(),
              "seconds": elapsed_before + time.monotonic() - t_start, "heldout_start": h0,
              "warm_start": str(warm_start) if warm_start else None,
              "rng": {"backend": be.rng_state(), "python": random.getstate()}}
        (tmp / "state.json").write_text(json.dumps(st))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in sorted(ckpt_dir.glob("step-*"))[:-2]:  # keep the two newest
            shutil.rmtree(old, ignore_errors=True)
        last_good = final
        emit({"event": "checkpoint", "step": step, "path": str(final)})
        return final

    t_start = time.monotonic()
    run_tokens = 0
    reason = "max_steps"
    while True:
        if cfg.max_steps and step >= cfg.max_steps:
            reason = "max_steps"
            break
        if cfg.max_minutes and (elapsed_before + time.monotonic() - t_start) >= cfg.max_minutes * 60:
            reason = "max_minutes"
            break
        if cfg.max_tokens and tokens >= cfg.max_tokens:
            reason = "max_tokens"
            break
        if stop.is_set():
            reason = "stopped"
            break
        rows = stream.take(per_step)
        micro = [collate(rows[i : i + cfg.batch_size], pad) for i in range(0, per_step, cfg.batch_size)]
        lr = lr_at(step, total_steps, cfg)
        loss, n, gnorm = be.train_step(micro, lr)
        if not (math.isfinite(loss) and math.isfinite(gnorm)):
            msg = (f"loss became {loss} at step {step + 1} (grad norm {gnorm}); stopped without saving it. "
                   f"Last good checkpoint: {last_good or 'none'} — lower train.learning_rate and retry")
            emit({"event": "error", "message": msg, "checkpoint": str(last_good) if last_good else None})
            raise TrainError(msg, last_good)
        step += 1
        tokens += n
        run_tokens += n
        curve.append(loss)
        dt = time.monotonic() - t_start
        tps = run_tokens / dt if dt > 0 else 0.0
        eta = _eta(step, tokens, total_steps, cfg, tps, elapsed_before + dt)
        emit({"event": "step", "step": step, "total_steps": total_steps, "loss": round(loss, 5), "lr": lr,
              "grad_norm": round(gnorm, 4), "tokens": tokens, "tokens_per_s": round(tps, 1),
              "eta_s": None if eta is None else round(eta, 1), "peak_mem": be.peak_memory(),
              "epoch": stream.epoch})
        if getattr(cfg, "eval_every", 0) and step % cfg.eval_every == 0 and valid_batches:
            h = heldout()
            evals.append([step, h])
            emit({"event": "eval", "step": step, "heldout_loss": h})
        if step % cfg.checkpoint_every == 0:
            save_ckpt()

    if reason == "stopped":
        save_ckpt()
        emit({"event": "stopped", "step": step})
        return TrainResult(step, tokens, True, _tail(curve), None, h0, None, curve, be.peak_memory(),
                           elapsed_before + time.monotonic() - t_start, name, reason)
    if step and (last_good is None or last_good.name != f"step-{step:06d}"):
        save_ckpt()  # the finished state, so a crash while exporting need not retrain

    h = heldout()
    if h is not None and (not evals or evals[-1][0] != step):
        evals.append([step, h])
    adapter_dir = out_dir / "adapter"
    tmp = out_dir / ".adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    fields = be.save_adapter(tmp)
    seconds = elapsed_before + time.monotonic() - t_start
    meta = {
        "backend": name, "base_model": base.spec, "base_path": str(base.path), "base_sha256": base.sha256,
        "architecture": base.architecture, "method": info["method"], **fields,
        "dataset_manifest": ds.manifest,
        "metrics": {"steps": step, "tokens": tokens, "final_loss": _tail(curve), "heldout_loss": h,
                    "heldout_loss_start": h0, "evals": evals, "seconds": round(seconds, 2),
                    "peak_mem": be.peak_memory(), "warm_start": str(warm_start) if warm_start else None,
                    "examples": len(train_ex)},
    }
    (tmp / "forged_meta.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(adapter_dir, ignore_errors=True)
    tmp.rename(adapter_dir)
    res = TrainResult(step, tokens, False, _tail(curve), h, h0, adapter_dir, curve, be.peak_memory(), seconds,
                      name, reason)
    emit({"event": "done", **res.to_dict(), "loss_curve": None, "evals": evals})
    return res


def _tail(curve: list[float], n: int = 10) -> float | None:
    return sum(curve[-n:]) / len(curve[-n:]) if curve else None


def _eta(step: int, tokens: int, total: int, cfg: Any, tps: float, elapsed: float) -> float | None:
    """Seconds left: the nearest of the step, token and time budgets."""
    cands = []
    if cfg.max_steps and step:
        cands.append((cfg.max_steps - step) * elapsed / step)
    if cfg.max_tokens and tps > 0:
        cands.append(max(0.0, (cfg.max_tokens - tokens) / tps))
    if cfg.max_minutes:
        cands.append(max(0.0, cfg.max_minutes * 60 - elapsed))
    return min(cands) if cands else None


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(i) for i in x) if isinstance(x, list) else x
