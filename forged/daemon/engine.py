"""The forge cycle's engine: the daemon's scheduler, watchers and the heavy stages.

Per repo a cycle moves through the stages of :class:`~forged.common.protocol.Stage`
(transitions: :mod:`forged.daemon.cycles`). Every transition is written to SQLite
(:mod:`forged.daemon.store`) before the work starts and after it ends, so a restart
after ``kill -9`` of the daemon or the worker re-runs (training: resumes) the stage it
was in; a heavy stage is only ever run by one worker at a time machine-wide. What
follows the judge — publish, approval, promotion — is :mod:`forged.daemon.releases`;
what status shows is :mod:`forged.daemon.status`.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from sqlite3 import Row
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from structlog.contextvars import bound_contextvars

from forged.common import config, log
from forged.common.protocol import EXIT_OK, EXIT_STOPPED, Stage
from forged.daemon import status
from forged.daemon.cycles import MAX_ATTEMPTS, STEP_OF_WORKER, HeavyStep, heavy_step, retry_later
from forged.daemon.errors import Conflict
from forged.daemon.releases import Releases
from forged.daemon.workers import WorkerHandle, WorkerJob

JOB_STATE = {EXIT_OK: "done", EXIT_STOPPED: "stopped"}  # any other exit code: failed


class Engine:
    def __init__(self, daemon: Any) -> None:
        self.d = daemon
        self.cfg: config.Config = daemon.cfg
        self.state = daemon.state
        self.paths = daemon.paths
        self.log = log.get("forged.daemon.engine")
        self._lock = threading.RLock()
        # Held only while a worker starts or ends together with its stage change (short,
        # no I/O beyond SQLite), so status gets a consistent (worker, stages) snapshot
        # without waiting for _lock, which publishing holds across Ollama calls.
        self._snap = threading.Lock()
        self.releases = Releases(self.cfg, self.state, self.cycle_dir, self.account_repo, self._lock,
                                 state_dir=self.paths.state_dir)
        self.worker: WorkerHandle | None = None
        self.watchers: dict[str, Any] = {}
        # repo name → why its watcher or accounting fails (status shows it as failing)
        self.failures: dict[str, str] = {}
        self._gates: dict[str, Any] = {}
        self._gates_open = False
        self._mem_need: int | None = None
        self._tick_error: str | None = None
        self._tick_error_at = 0.0
        self._last_tick = time.time()
        self._paused_flag = self.paths.state_dir / "paused"
        self.paused = self._paused_flag.exists()
        self.scheduler = BackgroundScheduler(timezone="UTC", job_defaults={"coalesce": True, "max_instances": 1})
        self.on_tick: list[Callable[[], None]] = []  # test hook: called after each tick

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        self._recover()
        for row in self.state.repos():
            self._start_watcher(row)
        start_at = datetime.fromtimestamp(time.time(), UTC)
        self.scheduler.add_job(self.reconcile_all, "interval",
                               minutes=self.cfg.watch.reconcile_interval_minutes,
                               next_run_time=start_at, id="reconcile")
        self.scheduler.add_job(self.tick, "interval", seconds=self.cfg.gates.poll_seconds,
                               next_run_time=start_at + timedelta(seconds=0.5), id="tick")
        self.scheduler.start()

    def stop(self) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        w = self.worker
        if w is not None:
            w.request_stop("daemon stopping")
            w.thread.join(timeout=40)
        for watcher in list(self.watchers.values()):
            watcher.stop()
        self.watchers.clear()

    def _recover(self) -> None:
        """After a crash: no worker of ours may still run; running jobs become interrupted."""
        import psutil

        for job in self.state.running_jobs():
            pid = job["pid"]
            if pid:
                try:
                    proc = psutil.Process(pid)
                    cmd = " ".join(proc.cmdline())
                    if "forged" in cmd and " worker " in cmd:
                        proc.terminate()
                        try:
                            proc.wait(35)
                        except psutil.TimeoutExpired:
                            proc.kill()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            self.state.interrupt_job(int(job["id"]))
            self.log.warning("job_interrupted", job=job["id"], stage=job["stage"], cycle=job["cycle_id"])

    # -- repos and accounting -------------------------------------------------------------
    def _start_watcher(self, row: Row) -> None:
        from forged.daemon.watcher import RepoWatcher

        name = str(row["name"])
        if name in self.watchers or not Path(row["path"]).is_dir():
            return
        # on_presence: the watcher notices a vanished/returned work tree itself (it polls
        # while the repo is missing), so missing → back needs no reconcile to be seen.
        w = RepoWatcher(Path(row["path"]), lambda: self.account_repo(name),
                        settle=self.cfg.watch.settle_seconds, max_wait=self.cfg.watch.max_wait_seconds,
                        on_presence=lambda present: self.account_repo(name))
        try:
            w.start()
        except (OSError, ValueError) as e:  # inotify watch limit; RepoError (a ValueError) if it vanished
            self.log.warning("watcher_failed", repo=name, error=str(e))
            self.failures[name] = f"cannot watch: {e}"
            return
        self.watchers[name] = w
        self.failures.pop(name, None)

    def _stop_watcher(self, name: str) -> None:
        w = self.watchers.pop(name, None)
        if w is not None:
            w.stop()

    def repo_added(self, name: str) -> None:
        row = self.state.repo(name)
        if row is not None:
            self._start_watcher(row)
            threading.Thread(target=self.account_repo, args=(name,), daemon=True).start()

    def repo_removing(self, row: Row) -> None:
        self._stop_watcher(str(row["name"]))
        self._stop_worker_of(str(row["name"]), "repo removed")

    def _stop_worker_of(self, repo: str, reason: str) -> None:
        w = self.worker
        if w is not None and w.repo == repo:
            w.request_stop(reason)

    def reconcile_all(self) -> None:
        for row in self.state.repos():
            try:
                self.account_repo(str(row["name"]))
            except Exception:
                self.log.exception("reconcile_failed", repo=row["name"])

    def account_repo(self, name: str) -> None:
        """Count what changed in a repo since its live model; open a cycle when it is due."""
        from forged.daemon.accounting import RepoError, account

        row = self.state.repo(name)
        if row is None or not self._present(row):
            return
        try:
            acc = account(Path(row["path"]), row["cursor_commit"], self.cfg.thresholds, cursor_at=row["cursor_at"],
                          branch=row["branch"] or "")
        except RepoError as e:  # e.g. the registered branch was deleted
            self.state.event("accounting_failed", name, data={"error": str(e)})
            self.log.warning("accounting_failed", repo=name, error=str(e))
            self.failures[name] = f"cannot account changes: {e}"
            return
        if self.failures.get(name, "").startswith("cannot account"):
            del self.failures[name]
        old = json.loads(row["accounting"] or "{}")
        if acc.deferred:
            # git is mid-operation: keep the last numbers, only say why they wait
            self.state.update_repo(name, accounting={**old, "deferred": acc.deferred})
            return
        data = acc.to_dict()
        self.state.update_repo(name, accounting=data, accounted_at=time.time())
        shown = ("head", "lines_changed", "commits", "due", "deferred")
        if {k: old.get(k) for k in shown} != {k: data.get(k) for k in shown}:
            self.state.event("accounting", name, data={"progress": acc.progress, "due": acc.due})
        if acc.due and acc.head and self.state.open_cycle(int(row["id"])) is None:
            self._new_cycle(row, head=acc.head, forced=False, reason=", ".join(acc.due_reasons))

    def _present(self, row: Row) -> bool:
        """Whether the repo's work tree is there; records it going missing or coming back."""
        from forged.daemon.accounting import RepoError, check_work_tree

        name = str(row["name"])
        try:
            check_work_tree(Path(row["path"]))
        except RepoError as e:
            if not row["missing"]:
                self.state.update_repo(name, missing=1)
                self.state.event("repo_missing", name, data={"reason": str(e)})
                self.log.warning("repo_missing", repo=name, reason=str(e))
            self._stop_worker_of(name, "repo missing")
            return False
        if row["missing"]:
            self.state.update_repo(name, missing=0)
            self.state.event("repo_back", name)
            self._start_watcher(row)  # no-op when its watcher is still polling for it
        return True

    # -- cycles -------------------------------------------------------------------------
    def _new_cycle(self, repo: Row, head: str, forced: bool, reason: str) -> int:
        cid = self.state.new_cycle(repo, Stage.DUE, head=head, forced=forced, reason=reason)
        self.log.info("cycle_due", repo=repo["name"], cycle=cid, reason=reason)
        return cid

    def _set_stage(self, cycle_id: int, stage: str, *, reason: str | None = None, finished: bool = False,
                   **fields: Any) -> None:
        self.state.set_stage(cycle_id, stage, reason=reason, finished=finished, **fields)
        self.log.info("stage", cycle=cycle_id, stage=stage, reason=reason)

    def cycle_dir(self, repo: str, cycle_id: int) -> Path:
        return self.paths.work_dir / repo / f"cycle-{cycle_id}"

    def forge_now(self, repo: Row, force: bool = False) -> dict[str, Any]:
        from forged.daemon.accounting import git_state

        if repo["missing"]:
            raise Conflict(f"repo {repo['name']!r} is missing from {repo['path']}")
        cyc = self.state.open_cycle(int(repo["id"]))
        if cyc is not None:
            fields: dict[str, Any] = {"retry_at": None}
            if force:
                fields["forced"] = 1
            stage = cyc["stage"]
            if stage == Stage.FAILED:
                fields["attempts"] = 0
            self._set_stage(int(cyc["id"]), stage, **fields)
            return {"cycle_id": cyc["id"], "stage": stage, "forced": force, "existing": True}
        head = git_state(Path(repo["path"])).head
        if not head:
            raise Conflict(f"repo {repo['name']!r} has no commits yet")
        cid = self._new_cycle(repo, head=head, forced=force, reason="forge requested" + (" (forced)" if force else ""))
        return {"cycle_id": cid, "stage": Stage.DUE.value, "forced": force, "existing": False}

    def set_paused(self, paused: bool) -> dict[str, Any]:
        self.paused = paused
        if paused:
            self._paused_flag.touch()
            w = self.worker
            if w is not None:
                w.request_stop("paused by user")
        else:
            self._paused_flag.unlink(missing_ok=True)
        self.state.event("paused" if paused else "resumed")
        return {"paused": paused}

    # -- the tick ---------------------------------------------------------------------
    def tick(self) -> None:
        try:
            self._tick()
            self._tick_error = None
        except Exception as e:
            # a persistent fault (disk gone, DB locked) fails every tick: log its traceback
            # once, then one line a minute, not a traceback every few seconds.
            key = f"{type(e).__name__}: {e}"
            if key != self._tick_error:
                self._tick_error, self._tick_error_at = key, time.monotonic()
                self.log.exception("tick_failed")
            elif time.monotonic() - self._tick_error_at > 60:
                self._tick_error_at = time.monotonic()
                self.log.error("tick_still_failing", error=key)
        for hook in list(self.on_tick):
            hook()

    def _read_gates(self) -> None:
        from forged.daemon.gates import all_open, read_gates

        need = self._memory_needed()
        readings = read_gates(self.cfg.gates, need_memory_bytes=need, disk_path=self.paths.state_dir,
                              probe=_probe_from_env())
        self._gates = {k: v.to_dict() for k, v in readings.items()}
        was = self._gates_open
        self._gates_open = all_open(readings)
        if was != self._gates_open:
            self.state.event("gates", data={"open": self._gates_open, "gates": self._gates})

    def blas_preload(self) -> str | None:
        """MLX on Linux needs OpenBLAS preloaded into the worker to be usable (docs/training.md)."""
        from forged.common.backends import BackendError, choose_backend, openblas_preload

        try:
            backend, _ = choose_backend(self.cfg.train)
        except BackendError:
            return None
        return openblas_preload() if backend == "mlx" else None

    def _memory_needed(self) -> int:
        """The trainer's peak-memory estimate for this config (pure Python, computed once)."""
        if self._mem_need is None:
            try:
                from forged.common.backends import choose_backend
                from forged.common.memory import estimate_for
                from forged.common.models import resolve_base

                backend, _ = choose_backend(self.cfg.train)
                self._mem_need = int(estimate_for(resolve_base(self.cfg.train.base_model), self.cfg.train, backend))
            except Exception as e:  # noqa: BLE001 (no estimate ⇒ only the headroom counts)
                self.log.warning("memory_estimate_failed", error=str(e))
                self._mem_need = 0
        return self._mem_need

    def _tick(self) -> None:
        now = time.time()
        if now - self._last_tick > max(120.0, 4 * self.cfg.gates.poll_seconds):
            # the clock jumped: the machine slept. Events may have been missed.
            self.log.info("wake_detected", gap_s=round(now - self._last_tick))
            self.reconcile_all()
        self._last_tick = now
        self._read_gates()
        with self._lock:
            if self.worker is not None:
                self._check_worker(self.worker)
                return
        self.releases.run_due(now)
        if self.paused:
            return
        with self._lock:
            nxt = self._next_heavy(now) if self.worker is None else None
        if nxt is None:
            return
        # Asking Ollama is an HTTP call (up to 5 s): never under the lock the control
        # socket's requests wait on. The choice is checked again once the lock is back.
        adapters = self.releases.adapters_hint() if nxt[1].worker == "judge" else None
        with self._lock:
            again = self._next_heavy(now) if self.worker is None and not self.paused else None
            if again is not None and again[0]["id"] == nxt[0]["id"] and again[1] is nxt[1]:
                self._run_heavy(*again, adapters)

    def _next_heavy(self, now: float) -> tuple[Row, HeavyStep] | None:
        """The heavy step to start now, if any (a forced cycle runs with its gates closed)."""
        return next(((c, s) for c, s in self._runnable(now) if self._gates_open or c["forced"]), None)

    def _check_worker(self, w: WorkerHandle) -> None:
        """Stop the running worker when the user paused or a gate closed (unless forced)."""
        if self.paused:
            w.request_stop("paused by user")
        elif not self._gates_open and not w.forced:
            closed = [k for k, v in self._gates.items() if v["state"] in ("closed", "unknown")]
            w.request_stop("gate closed: " + ", ".join(closed))

    def _runnable(self, now: float) -> list[tuple[Row, HeavyStep]]:
        """Heavy-stage cycles ready to run, oldest first (fair across repos)."""
        out = []
        for c in self.state.unfinished_cycles():
            step = heavy_step(c["stage"], c["resume_stage"])
            if c["missing"] or step is None or (c["retry_at"] and c["retry_at"] > now):
                continue
            out.append((c, step))
        return out

    # -- heavy stages: one worker at a time ------------------------------------------------
    def _job(self, repo: Row, cyc: Row, step: HeavyStep, adapters: bool | None) -> dict[str, Any]:
        """What the worker reads from ``job.json``. A warm start continues the live adapter,
        except every ``full_retrain_every``-th published version, which starts afresh.
        ``adapters``: whether Ollama takes adapter models (the judge's export plan)."""
        live = self.state.live_version(int(repo["id"]))
        live_adapter = live["adapter_path"] if live is not None else None
        n_published = self.state.count_published(int(repo["id"]))
        full = live_adapter is None or n_published % self.cfg.train.full_retrain_every == 0
        return {
            "config": config.to_dict(self.cfg),
            "repo": repo["name"], "repo_path": repo["path"], "cycle_id": int(cyc["id"]),
            "head_commit": cyc["head_commit"], "base_commit": cyc["base_commit"],
            "cache_dir": str(self.paths.cache_dir),
            "warm_start": None if full else live_adapter, "live_adapter": live_adapter,
            # the training stage first scores the live version on the code committed since it
            "live_version": live["version"] if live is not None else None,
            "live_commit": live["train_commit"] if live is not None else None,
            # the judge exports what this Ollama can take (None: unknown, fused only)
            "ollama_adapters": adapters,
        }

    def _run_heavy(self, cyc: Row, step: HeavyStep, adapters: bool | None = None) -> None:
        repo = self.state.repo_by_id(int(cyc["repo_id"]))
        assert repo is not None
        cid = int(cyc["id"])
        cdir = self.cycle_dir(repo["name"], cid)
        cdir.mkdir(parents=True, exist_ok=True)
        (cdir / "job.json").write_text(json.dumps(self._job(repo, cyc, step, adapters), indent=1))
        with self._snap:
            job_id = self.state.start_job(repo["name"], cid, step.worker, step.running)
            with bound_contextvars(repo=repo["name"], cycle=cid):
                self.log.info("worker_start", stage=step.worker)
            job = WorkerJob(str(repo["name"]), cid, step.worker, cdir, job_id, bool(cyc["forced"]))
            self.worker = WorkerHandle(job, self.state, self.log, self._worker_finished, self.blas_preload())
        self.state.set_job_pid(job_id, self.worker.proc.pid)

    def _worker_finished(self, w: WorkerHandle, code: int) -> None:
        with self._lock, self._snap, bound_contextvars(repo=w.repo, cycle=w.cycle_id):
            self.worker = None
            self.state.finish_job(w.job.job_id, JOB_STATE.get(code, "failed"), code, w.progress)
            cyc = self.state.cycle(w.cycle_id)
            if cyc is None or cyc["finished_at"] is not None:
                return  # repo removed meanwhile
            self.log.info("worker_exit", stage=w.stage, code=code, stop=w.stop_reason)
            if w.warnings:  # kept with the cycle: status and the report show them
                old = json.loads(cyc["metrics"] or "{}").get("warnings") or []
                # once each: a stage resumed after a crash says the same again
                self.state.merge_metrics(w.cycle_id, {"warnings": old + [x for x in w.warnings if x not in old]})
            step = STEP_OF_WORKER[w.stage]
            if code == EXIT_OK:
                self._succeeded(w.cycle_id, step, w.result or {})
            elif w.stop_reason is not None or code == EXIT_STOPPED:
                self._set_stage(w.cycle_id, Stage.PAUSED, reason=w.stop_reason or "stopped", resume_stage=step.running)
            else:
                self._failed(cyc, step, w.error or f"worker exited with code {code}")

    def _succeeded(self, cycle_id: int, step: HeavyStep, result: dict[str, Any]) -> None:
        self.state.merge_metrics(cycle_id, step.keep(result))
        forward = result.get("forward")
        if forward and forward.get("version") is not None:  # the trend across versions reads it there
            self.state.record_forward(cycle_id, int(forward["version"]), forward)
        if step.then != Stage.PUBLISHING:
            self._set_stage(cycle_id, step.then, attempts=0, resume_stage=step.then)
        elif result.get("passed"):
            self._set_stage(cycle_id, step.then, attempts=0, resume_stage=step.then)
            threading.Thread(target=self.releases.run_due, args=(time.time(),), daemon=True).start()
        else:
            why = "; ".join((result.get("judge") or {}).get("reasons", [])) or result.get(
                "export_error") or (result.get("fidelity") or {}).get("reason") or "judge rejected"
            self._set_stage(cycle_id, Stage.REJECTED, reason=f"rejected by judge: {why}", finished=True)

    def _failed(self, cyc: Row, step: HeavyStep, why: str) -> None:
        """A worker failed: retried after a backoff, until MAX_ATTEMPTS failures end the cycle."""
        attempts = int(cyc["attempts"]) + 1
        if attempts >= MAX_ATTEMPTS:
            self._set_stage(int(cyc["id"]), Stage.FAILED, reason=why, attempts=attempts, finished=True)
        else:
            self._set_stage(int(cyc["id"]), Stage.FAILED, reason=why, resume_stage=step.running,
                            **retry_later(attempts, self.cfg.daemon.retry_seconds))

    # -- what the API asks for ------------------------------------------------------------
    def answer(self, repo: Row, answer: str, via: str) -> dict[str, Any]:
        return self.releases.answer(repo, answer, via)

    def rollback(self, repo: Row, version: Any = None) -> dict[str, Any]:
        return self.releases.rollback(repo, version)

    def gate_status(self) -> dict[str, Any]:
        return {"open": self._gates_open, **self._gates}

    def worker_status(self) -> dict[str, Any] | None:
        w = self.worker
        return w.status() if w is not None else None

    def worker_and_repos(self) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        """The worker and every repo's stage as of one moment (never a finished worker
        next to the stage its exit produced)."""
        with self._snap:
            return self.worker_status(), self.repo_statuses()

    def repo_statuses(self) -> list[dict[str, Any]]:
        return [status.repo_status(self.state, self.cfg, r, self.worker, self.watchers.get(str(r["name"])),
                                   failure=self.failures.get(str(r["name"])))
                for r in self.state.repos()]

    def repo_detail(self, repo: Row) -> dict[str, Any]:
        return status.repo_detail(self.state, self.cfg, repo, self.worker, self.watchers.get(str(repo["name"])),
                                  failure=self.failures.get(str(repo["name"])))

    def report(self, repo: Row) -> dict[str, Any]:
        return status.report(self.state, repo, self.cycle_dir)


def _probe_from_env() -> Any:
    """The gates' one seam, pointed at recorded command outputs when testing.

    ``FORGED_PROBE_FIXTURES=DIR`` makes every probe command ``cmd`` read ``DIR/cmd.txt``
    (e.g. a real ``ioreg -c IOHIDSystem`` capture) as a macOS machine would print it:
    the whole daemon can then be driven through gate changes on Linux.
    """
    from forged.daemon.gates import Probe

    fixtures = os.environ.get("FORGED_PROBE_FIXTURES")
    if not fixtures:
        return None

    def run(cmd: list[str]) -> str:
        return (Path(fixtures) / f"{Path(cmd[0]).name}.txt").read_text()

    return Probe(run=run, read=lambda path: (Path(fixtures) / Path(path).name).read_text(), platform="darwin")
