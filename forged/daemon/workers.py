"""The worker subprocess handle: start ``forged worker STAGE``, read its events, stop it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forged.common.protocol import ProgressEvent, WorkerEvent
from forged.daemon.store import State

STOP_DEADLINE = 35.0  # the worker checkpoints and exits within 30 s of SIGTERM; past this it is killed
PROGRESS_EVERY = 2.0  # seconds between recorded step events (milestones are always recorded)


def qos_prefix(platform: str = sys.platform, taskpolicy: str = "/usr/sbin/taskpolicy") -> list[str]:
    """On macOS, start the worker clamped to the *utility* QoS class.

    Utility work yields to anything the user is doing but may still run on the
    performance cores; *background* QoS (``taskpolicy -b``, or launchd's
    ProcessType=Background) would confine it to the efficiency cores and make a cycle
    several times slower. ``taskpolicy`` execs the command, so the pid stays the worker's.
    Elsewhere ``nice`` (``daemon.worker_nice``, applied by the worker itself) is the tool.
    """
    if platform == "darwin" and os.access(taskpolicy, os.X_OK):
        return [taskpolicy, "-c", "utility"]
    return []


@dataclass(frozen=True)
class WorkerJob:
    """What a worker run is for: a recorded job of one cycle of one repo."""

    repo: str
    cycle_id: int
    stage: str  # the worker stage: mine, train, judge
    cycle_dir: Path
    job_id: int
    forced: bool


def parse_event(raw: bytes) -> WorkerEvent | None:
    """One line of a worker's stdout as its event, or None if it is not one of ours."""
    try:
        msg = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # a library printed to stdout
    return msg if isinstance(msg, dict) and isinstance(msg.get("event"), str) else None


def _body(msg: WorkerEvent) -> dict[str, Any]:
    return {k: v for k, v in msg.items() if k != "event"}


class WorkerHandle:
    """One running ``forged worker`` subprocess and the thread reading its output.

    ``on_exit(handle, exit_code)`` is called from the reader thread once the process ended.
    """

    def __init__(self, job: WorkerJob, store: State, log: Any, on_exit: Callable[[WorkerHandle, int], None],
                 blas_preload: str | None = None) -> None:
        self.job = job
        self.cycle_id, self.repo, self.stage = job.cycle_id, job.repo, job.stage
        self.forced = job.forced
        self.store, self.log, self._on_exit = store, log, on_exit
        self.started = time.time()
        self.progress: dict[str, Any] = {}
        self.result: dict[str, Any] | None = None
        self.error: str | None = None
        self.warnings: list[dict[str, str]] = []  # what a stage said the user should know
        self.stop_reason: str | None = None
        env = dict(os.environ)
        if blas_preload:
            env["LD_PRELOAD"] = ":".join(filter(None, [blas_preload, env.get("LD_PRELOAD")]))
        self.stderr = open(job.cycle_dir / f"{job.stage}.stderr.log", "ab")  # noqa: SIM115 (closed on exit)
        self.proc = subprocess.Popen(
            [*qos_prefix(), sys.executable, "-m", "forged", "worker", job.stage, "--cycle-dir", str(job.cycle_dir)],
            stdout=subprocess.PIPE, stderr=self.stderr, stdin=subprocess.DEVNULL, env=env,
        )
        self.thread = threading.Thread(target=self._read, name=f"worker-{job.stage}", daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        last_write = 0.0
        for raw in self.proc.stdout:
            msg = parse_event(raw)
            if msg is None:
                continue
            if msg["event"] == "progress":
                if self._progress(msg, recorded_at=last_write):
                    last_write = time.time()
            elif msg["event"] == "result":
                self.result = _body(msg)
            elif msg["event"] == "error":
                self.error = msg.get("message", "worker failed")
        code = self.proc.wait()
        self.stderr.close()
        self._on_exit(self, code)

    def _progress(self, msg: ProgressEvent, recorded_at: float) -> bool:
        """Keep a progress event; True when it was recorded in the store."""
        if msg.get("kind") == "warning":
            self.warnings.append({"stage": self.stage, "message": str(msg.get("message", ""))})
            self.log.warning("worker_warning", repo=self.repo, cycle=self.cycle_id,
                             stage=self.stage, message=msg.get("message"))
        # steps come many a second: record them every PROGRESS_EVERY s; milestones always
        body = _body(msg)
        milestone = msg.get("kind") not in (None, "step", "progress")
        self.progress = {**self.progress, **body} if milestone else body
        if milestone or time.time() - recorded_at > PROGRESS_EVERY:
            self.store.job_progress(self.job.job_id, self.repo, self.cycle_id, self.stage, body)
            return True
        return False

    def request_stop(self, reason: str) -> None:
        if self.stop_reason is None and self.proc.poll() is None:
            self.stop_reason = reason
            self.proc.send_signal(signal.SIGTERM)
            threading.Timer(STOP_DEADLINE, self._kill_if_alive).start()

    def _kill_if_alive(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()

    def status(self) -> dict[str, Any]:
        return {"repo": self.repo, "cycle_id": self.cycle_id, "stage": self.stage, "pid": self.proc.pid,
                "running_s": round(time.time() - self.started, 1), "progress": self.progress,
                "stopping": self.stop_reason}
