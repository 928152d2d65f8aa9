"""``forged worker STAGE --cycle-dir DIR``: one heavy stage in a subprocess.

The daemon starts it, reads its JSON lines from stdout (``{"event": "progress", …}``,
one ``{"event": "result", …}`` at the end) and can stop it with SIGTERM, which sets a
stop event: training checkpoints and exits (``EXIT_STOPPED``), mining and judging exit
at once (``EXIT_STOPPED``; they rerun from the start). The events and exit codes are
:mod:`forged.common.protocol`. The worker dies with the daemon
(``PR_SET_PDEATHSIG`` on Linux, a parent watch everywhere) so a ``kill -9`` of the
daemon never leaves two workers behind.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, cast

from forged.common import config, paths
from forged.common.protocol import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_STOPPED,
    WORKER_STAGES,
    EventName,
    WorkerEvent,
)

STOP_GRACE = 30.0  # seconds a stopping trainer gets to checkpoint before the process ends


def emit(event: EventName, data: dict[str, Any] | None = None, **more: Any) -> WorkerEvent:
    """Write one event of :mod:`forged.common.protocol` to stdout, the daemon's pipe."""
    # the protocol's "event" wins; a stage's own event name ("step", "resumed",
    # "checkpoint") travels as "kind"
    body = {**(data or {}), **more}
    if "event" in body:
        body["kind"] = body.pop("event")
    msg = cast(WorkerEvent, {**body, "event": event, "ts": time.time()})
    sys.stdout.write(json.dumps(msg, default=str) + "\n")
    sys.stdout.flush()
    return msg


def _stop_when_asked(stop: threading.Event, stage: str, poll: float = 0.1) -> None:
    """Wire the ways a worker is told to stop to ``stop``, and make stopping finish.

    * SIGTERM/SIGINT from the daemon (a gate closed, or the daemon shuts down);
    * the daemon dying, so a ``kill -9`` of it never leaves a worker behind: on Linux
      the kernel sends SIGTERM (``PR_SET_PDEATHSIG``); everywhere (macOS has no such
      call) a thread notices the re-parenting to launchd/init.
    Training checkpoints and returns on its own; ``STOP_GRACE`` seconds later the
    process ends regardless. Mining and judging keep nothing worth saving half-way
    (they rerun from the start), so they end at once.

    The signal handlers only raise a flag; the watch thread turns it into ``stop``. A
    handler must not take a lock (``Event.set`` does): a daemon killed with ``kill -9``
    sends the parent-death signal once per thread it loses, and a handler re-entered
    while holding the Event's lock deadlocked the worker for good.
    """
    asked: list[bool] = []  # non-empty once a stop signal arrived (a list append takes no lock)
    signal.signal(signal.SIGTERM, lambda *_: asked.append(True))
    signal.signal(signal.SIGINT, lambda *_: asked.append(True))
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            PR_SET_PDEATHSIG = 1  # noqa: N806 (name from <sys/prctl.h>)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        except OSError:
            pass

    def watch() -> None:
        while not asked and os.getppid() == parent:
            time.sleep(poll)
        stop.set()

    def end_when_stopped() -> None:
        stop.wait()
        time.sleep(STOP_GRACE if stage == "train" else 0.0)
        sys.stdout.flush()
        os._exit(EXIT_STOPPED)

    threading.Thread(target=watch, name="stop-watch", daemon=True).start()
    threading.Thread(target=end_when_stopped, name="stopper", daemon=True).start()


def run_stage(stage: str, cycle_dir: Path, job: dict[str, Any], stop: threading.Event) -> dict[str, Any]:
    cfg = config.from_dict(job["config"])
    progress = lambda d: emit("progress", d)  # noqa: E731
    if stage == "mine":
        from forged.common import fim
        from forged.common.models import resolve_base
        from forged.worker.mine import mine_repo

        base = resolve_base(cfg.train.base_model)  # its FIM format, from the header: no model load

        report = mine_repo(
            Path(job["repo_path"]), cycle_dir / "dataset", cfg.mine, Path(job["cache_dir"]),
            commit=job["head_commit"], changed_since=job.get("base_commit"), progress=progress,
            ollama_host=cfg.publish.ollama_host,  # only for [mine] teacher
            context_tokens=cfg.train.seq_len,  # RAFT examples must fit the trainer's rows
            fim_format=fim.for_base(base.kind, base.path),
        )
        return {"manifest": report.to_dict()}
    if stage == "train":
        from forged.worker.judge.forward import run_forward
        from forged.worker.train import train

        # before training: the live version on the code written since it (new to both models)
        forward = run_forward(cycle_dir, job, cfg, progress, stop)
        warm = Path(job["warm_start"]) if job.get("warm_start") else None
        result = train(cycle_dir / "dataset", cycle_dir / "train", cfg.train, warm_start=warm,
                       resume=True, progress=progress, stop=stop)
        return {"train": result.to_dict(), "stopped": bool(result.stopped), "forward": forward}
    if stage == "judge":
        from forged.worker.judge.stage import run_judge

        return run_judge(cycle_dir, job, cfg, progress)
    raise ValueError(f"unknown stage {stage!r} (stages: {', '.join(WORKER_STAGES)})")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="forged worker")
    ap.add_argument("stage", choices=WORKER_STAGES)
    ap.add_argument("--cycle-dir", required=True, type=Path)
    args = ap.parse_args(argv)
    stop = threading.Event()
    _stop_when_asked(stop, args.stage)
    job = json.loads((args.cycle_dir / "job.json").read_text())
    with contextlib.suppress(OSError):
        # background work: the user's foreground apps come first
        os.nice(int(job["config"]["daemon"].get("worker_nice", 10)))
    emit("started", stage=args.stage, pid=os.getpid())
    try:
        result = run_stage(args.stage, args.cycle_dir, job, stop)
    except Exception as e:
        emit("error", message=paths.describe_failure(e), traceback=traceback.format_exc(limit=8))
        return EXIT_FAILED
    (args.cycle_dir / f"{args.stage}.result.json").write_text(json.dumps(result, indent=1, default=str))
    emit("result", result)
    return EXIT_STOPPED if result.get("stopped") else EXIT_OK
