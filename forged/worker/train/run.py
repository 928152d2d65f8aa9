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
from typing import TYPE_CHECKING, Any

from forged.common import fim
from forged.common.config import TrainConfig
from forged.worker.train.data import Dataset, LossPolicy, load_dataset, select_replay, tokenize
from forged.worker.train.packing import RowStream, collate, epoch_rows

if TYPE_CHECKING:
    from forged.common.models import BaseModel
    from forged.worker.train.backend import TrainableBackend

Progress = Callable[[dict[str, Any]], None]


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
    # [step, held-out loss] at the start, every eval_every steps and at the end: the report
    # draws them over the training loss (a falling train loss alone can be memorisation)
    evals: list[list[float]] = field(default_factory=list)
    peak_mem: int = 0
    seconds: float = 0.0
    backend: str = ""
    reason: str = ""  # why it ended: max_steps | max_minutes | max_tokens | stopped

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["adapter_dir"] = str(self.adapter_dir) if self.adapter_dir else None
        return d


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
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


@dataclass
class _Prepared:
    """What a run starts from, all of it checked before any training."""

    ds: Dataset
    base: BaseModel
    backend: str
    why: str  # why this back end
    warm_start: Path | None


def _warm_start_problem(warm_start: Path, backend: str, base: BaseModel) -> str | None:
    """Why an adapter cannot be continued by this run (None when it can)."""
    meta = _read_meta(warm_start)
    if not (warm_start / "forged_meta.json").exists():
        return "has no forged_meta.json"
    if meta.get("backend") != backend:
        return f"was trained with the {meta.get('backend')} back end, this run uses {backend}"
    if meta.get("base_sha256") != base.sha256:
        return "was trained on a different base model"
    return None


def _prepare(dataset_dir: Path, cfg: TrainConfig, warm_start: Path | None, backend_name: str | None,
             emit: Progress) -> _Prepared:
    """Everything that can fail on bad input fails here, before any training."""
    from forged.common.backends import choose_backend
    from forged.common.memory import check_fits
    from forged.common.models import resolve_base

    ds = load_dataset(Path(dataset_dir))
    base = resolve_base(cfg.base_model)
    name, why = (backend_name, "requested") if backend_name else choose_backend(cfg)
    check_fits(base, cfg, name)
    if warm_start is not None:
        problem = _warm_start_problem(Path(warm_start), name, base)
        if problem:
            emit({"event": "warning", "message": f"warm start {warm_start} {problem}; training from scratch"})
            warm_start = None
    return _Prepared(ds, base, name, why, warm_start)


# The trainer's held-out loss (start, eval_every, end) is a progress signal, not the judge:
# a few batches' worth is enough, and held-out files now carry many FIM cursors each.
EVAL_MAX_EXAMPLES = 96


def spread(items: list[Any], n: int) -> list[Any]:
    """At most ``n`` of ``items``, evenly spaced over the whole list (not its head)."""
    if len(items) <= n:
        return items
    return [items[i * len(items) // n] for i in range(n)]


def _examples(be: TrainableBackend, p: _Prepared, cfg: TrainConfig, emit: Progress) -> tuple[list, list]:
    """Tokenized train (with replay when warm-starting) and held-out examples."""
    records = select_replay(p.ds.train, cfg.replay_ratio, cfg.seed) if p.warm_start is not None else p.ds.train
    dropped: Counter[str] = Counter()
    fmt = fim.from_manifest(p.ds.manifest)
    markers = fmt.markers() if fmt else ()
    loss = LossPolicy(fim=cfg.fim_loss, prompts=cfg.prompt_loss, fim_markers=markers)
    train_ex = tokenize(be.tok, records, cfg.seq_len, dropped, loss)
    valid_ex = spread(tokenize(be.tok, p.ds.valid, cfg.seq_len, dropped), EVAL_MAX_EXAMPLES)
    if dropped:  # said out loud: a whole kind of example can vanish this way
        kinds = ", ".join(f"{k} {n}" for k, n in dropped.most_common())
        emit({"event": "warning", "message": f"{sum(dropped.values())} examples left nothing to learn "
              f"once cut to seq_len {cfg.seq_len} and were skipped ({kinds}); a larger [train] "
              "seq_len keeps them"})
    if not train_ex:
        raise TrainError(f"{p.ds.dir}: no example has a token to learn from after tokenization")
    return train_ex, valid_ex


class _Run:
    """One training run's loop state: steps, tokens, curves, checkpoints."""

    def __init__(self, be: TrainableBackend, cfg: TrainConfig, p: _Prepared, out_dir: Path, resume: bool,
                 emit: Progress, stop: threading.Event) -> None:
        self.be, self.cfg, self.p, self.emit, self.stop = be, cfg, p, emit, stop
        self.out_dir = out_dir
        self.ckpt_dir = out_dir / "checkpoints"
        self.train_ex, self.valid_ex = _examples(be, p, cfg, emit)
        self.mode = be.batching
        self.pad = int(be.tok.pad_token_id)
        ckpt = _latest_checkpoint(self.ckpt_dir) if resume else None
        if not resume and self.ckpt_dir.exists():
            shutil.rmtree(self.ckpt_dir)
        state: dict[str, Any] = json.loads((ckpt / "state.json").read_text()) if ckpt else {}
        if state and state.get("warm_start") is not None:
            p.warm_start = Path(state["warm_start"])
        self.info = be.attach_adapter(cfg, warm_start=p.warm_start, init_dir=self.ckpt_dir / "init")
        self.stream = RowStream(self.train_ex, seq_len=cfg.seq_len, seed=cfg.seed, mode=self.mode,
                                batch_size=cfg.batch_size, **(state.get("data") or {}))
        self.per_step = cfg.batch_size * cfg.grad_accum
        self.total_steps = cfg.max_steps or max(1, math.ceil(self.stream.rows_per_epoch() / self.per_step))
        self.valid_batches = self._valid_batches()
        self.step, self.tokens = int(state.get("step", 0)), int(state.get("tokens", 0))
        self.curve: list[float] = list(state.get("loss_curve", []))
        self.evals: list[list[float]] = list(state.get("evals", []))
        self.elapsed_before = float(state.get("seconds", 0.0))
        self.h0: float | None = state.get("heldout_start")
        self.last_good = ckpt
        self._restore(ckpt, state)
        self.t_start = time.monotonic()

    def _valid_batches(self) -> list[dict[str, Any]]:
        bs = self.cfg.batch_size
        rows = epoch_rows(self.valid_ex, seq_len=self.cfg.seq_len, seed=0, epoch=0, mode=self.mode, batch_size=bs)
        return [collate(rows[i : i + bs], self.pad) for i in range(0, len(rows), bs)]

    def _restore(self, ckpt: Path | None, state: dict[str, Any]) -> None:
        """Continue from a checkpoint exactly (RNG included), or start and measure the base."""
        if ckpt:
            self.be.load_checkpoint(ckpt)
            self.be.set_rng_state(state["rng"]["backend"])
            random.setstate(_tuplify(state["rng"]["python"]))
            self.emit({"event": "resumed", "checkpoint": str(ckpt), "step": self.step})
        else:
            random.seed(self.cfg.seed)
            self.h0 = self.heldout()
            if self.h0 is not None:
                self.evals.append([0, self.h0])
        self.emit({"event": "start", "backend": self.p.backend, "reason": self.p.why, "method": self.info["method"],
                   "rank": self.info["rank"], "examples": len(self.train_ex), "valid_examples": len(self.valid_ex),
                   "total_steps": self.total_steps, "heldout_loss": self.h0, "step": self.step})

    def heldout(self) -> float | None:
        if not self.valid_batches:
            return None
        s, n = self.be.eval_loss(self.valid_batches)
        return s / max(n, 1)

    def seconds(self) -> float:
        return self.elapsed_before + time.monotonic() - self.t_start

    def save_checkpoint(self) -> Path:
        """Write the whole state atomically (temp dir, then rename); keep the two newest."""
        final = self.ckpt_dir / f"step-{self.step:06d}"
        tmp = self.ckpt_dir / f".tmp-step-{self.step:06d}"
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        self.be.save_checkpoint(tmp)
        st = {"step": self.step, "tokens": self.tokens, "loss_curve": self.curve, "evals": self.evals,
              "data": self.stream.position(), "seconds": self.seconds(), "heldout_start": self.h0,
              "warm_start": str(self.p.warm_start) if self.p.warm_start else None,
              "rng": {"backend": self.be.rng_state(), "python": random.getstate()}}
        (tmp / "state.json").write_text(json.dumps(st))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in sorted(self.ckpt_dir.glob("step-*"))[:-2]:
            shutil.rmtree(old, ignore_errors=True)
        self.last_good = final
        self.emit({"event": "checkpoint", "step": self.step, "path": str(final)})
        return final

    def _why_end(self) -> str | None:
        cfg = self.cfg
        if cfg.max_steps and self.step >= cfg.max_steps:
            return "max_steps"
        if cfg.max_minutes and self.seconds() >= cfg.max_minutes * 60:
            return "max_minutes"
        if cfg.max_tokens and self.tokens >= cfg.max_tokens:
            return "max_tokens"
        return "stopped" if self.stop.is_set() else None

    def loop(self) -> str:
        """Train until a budget runs out or a stop is asked for; returns why it ended."""
        run_tokens = 0
        while (reason := self._why_end()) is None:
            loss, n, lr, gnorm = self._one_step()
            run_tokens += n
            dt = time.monotonic() - self.t_start
            tps = run_tokens / dt if dt > 0 else 0.0
            eta = _eta(self.step, self.tokens, self.total_steps, self.cfg, tps, self.elapsed_before + dt)
            self.emit({"event": "step", "step": self.step, "total_steps": self.total_steps, "loss": round(loss, 5),
                       "lr": lr, "grad_norm": round(gnorm, 4), "tokens": self.tokens,
                       "tokens_per_s": round(tps, 1), "eta_s": None if eta is None else round(eta, 1),
                       "peak_mem": self.be.peak_memory(), "epoch": self.stream.epoch})
            if self.cfg.eval_every and self.step % self.cfg.eval_every == 0 and self.valid_batches:
                h = self.heldout()
                self.evals.append([self.step, h])
                self.emit({"event": "eval", "step": self.step, "heldout_loss": h})
            if self.step % self.cfg.checkpoint_every == 0:
                self.save_checkpoint()
        return reason

    def _one_step(self) -> tuple[float, int, float, float]:
        """One optimizer step: (loss, target tokens, learning rate, grad norm). A non-finite loss is
        not kept: the run ends naming the last good checkpoint."""
        bs = self.cfg.batch_size
        rows = self.stream.take(self.per_step)
        micro = [collate(rows[i : i + bs], self.pad) for i in range(0, self.per_step, bs)]
        lr = lr_at(self.step, self.total_steps, self.cfg)
        loss, n, gnorm = self.be.train_step(micro, lr)
        if not (math.isfinite(loss) and math.isfinite(gnorm)):
            last = self.last_good
            msg = (f"loss became {loss} at step {self.step + 1} (grad norm {gnorm}); stopped without saving it. "
                   f"Last good checkpoint: {last or 'none'} — lower train.learning_rate and retry")
            self.emit({"event": "error", "message": msg, "checkpoint": str(last) if last else None})
            raise TrainError(msg, last)
        self.step += 1
        self.tokens += n
        self.curve.append(loss)
        return loss, n, lr, gnorm

    def result(self, reason: str, heldout: float | None, adapter_dir: Path | None) -> TrainResult:
        return TrainResult(steps=self.step, tokens=self.tokens, stopped=reason == "stopped",
                           final_loss=_tail(self.curve), heldout_loss=heldout, heldout_loss_start=self.h0,
                           adapter_dir=adapter_dir, loss_curve=self.curve, evals=list(self.evals), peak_mem=self.be.peak_memory(),
                           seconds=self.seconds(), backend=self.p.backend, reason=reason)

    def finish(self, reason: str) -> TrainResult:
        """Save the final checkpoint and the publishable adapter (atomically)."""
        if self.step and (self.last_good is None or self.last_good.name != f"step-{self.step:06d}"):
            self.save_checkpoint()  # the finished state, so a crash while exporting need not retrain
        h = self.heldout()
        if h is not None and (not self.evals or self.evals[-1][0] != self.step):
            self.evals.append([self.step, h])
        adapter_dir = self.out_dir / "adapter"
        tmp = self.out_dir / ".adapter.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        fields = self.be.save_adapter(tmp)
        res = self.result(reason, h, adapter_dir)
        (tmp / "forged_meta.json").write_text(json.dumps(self._meta(fields, res), indent=2))
        shutil.rmtree(adapter_dir, ignore_errors=True)
        tmp.rename(adapter_dir)
        self.emit({"event": "done", **res.to_dict(), "loss_curve": None, "evals": self.evals})
        return res

    def _meta(self, fields: dict[str, Any], res: TrainResult) -> dict[str, Any]:
        base, warm = self.p.base, self.p.warm_start
        return {
            "backend": self.p.backend, "base_model": base.spec, "base_path": str(base.path),
            "base_sha256": base.sha256, "architecture": base.architecture, "method": self.info["method"], **fields,
            "dataset_manifest": self.p.ds.manifest,
            # the FIM format it was trained in (forged.common.fim.FimFormat.to_dict()): publish
            # renders the template's Suffix branch from it
            "fim_format": self.p.ds.manifest.get("fim_format"),
            "metrics": {"steps": res.steps, "tokens": res.tokens, "final_loss": res.final_loss,
                        "heldout_loss": res.heldout_loss, "heldout_loss_start": self.h0, "evals": self.evals,
                        "seconds": round(res.seconds, 2), "peak_mem": res.peak_mem,
                        "warm_start": str(warm) if warm else None, "examples": len(self.train_ex)},
        }


def train(dataset_dir: Path, out_dir: Path, cfg: TrainConfig, *, warm_start: Path | None = None,
          resume: bool = True, progress: Progress | None = None, stop: threading.Event | None = None,
          backend_name: str | None = None) -> TrainResult:
    """Train an adapter on ``dataset_dir``; see the module docstring for ``out_dir``."""
    from forged.worker.train.backend import open_backend

    emit = progress or (lambda _e: None)
    p = _prepare(dataset_dir, cfg, warm_start, backend_name, emit)
    emit({"event": "loading", "backend": p.backend, "reason": p.why, "base": p.base.spec})
    be = open_backend(cfg, p.base, name=p.backend)
    for note in be.notes:
        emit({"event": "warning", "message": note})
    run = _Run(be, cfg, p, Path(out_dir), resume, emit, stop or threading.Event())
    reason = run.loop()
    if reason == "stopped":
        run.save_checkpoint()
        emit({"event": "stopped", "step": run.step})
        return run.result(reason, None, None)
    return run.finish(reason)


def _tail(curve: list[float], n: int = 10) -> float | None:
    return sum(curve[-n:]) / len(curve[-n:]) if curve else None


def _eta(step: int, tokens: int, total: int, cfg: TrainConfig, tps: float, elapsed: float) -> float | None:
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
