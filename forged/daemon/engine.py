"""The forge cycle as a persisted state machine, driven by the daemon's scheduler.

Per repo: watching → due → mining → training → judging → publishing → awaiting_approval
→ promoting → live, plus paused / failed / rejected / ready_to_publish / superseded.

Every transition is written to SQLite before the work starts and after it ends, so a
restart after ``kill -9`` of the daemon or the worker re-runs (training: resumes) the
stage it was in; a heavy stage is only ever run by one worker at a time machine-wide.
The live model only changes in :meth:`Engine._promote`, after judge and approval.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from sqlite3 import Row
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from structlog.contextvars import bound_contextvars

from forged.common import config, log
from forged.daemon.server import ApiError

HEAVY = ("due", "mining", "training", "judging")  # run in a worker subprocess
STAGE_OF_WORKER = {"due": "mine", "mining": "mine", "training": "train", "judging": "judge"}
NEXT_STAGE = {"mine": "training", "train": "judging"}
WORKER_STAGE_NAME = {"mine": "mining", "train": "training", "judge": "judging"}
MAX_ATTEMPTS = 5
TERMINAL = ("live", "rejected", "superseded", "failed")


def backoff(attempts: int, base: float = 30.0) -> float:
    return min(3600.0, base * 2 ** max(0, attempts - 1))


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


class WorkerHandle:
    """One running ``forged worker`` subprocess and the thread reading its output."""

    def __init__(self, engine: Engine, cycle: Row, repo: Row, stage: str, cycle_dir: Path,
                 job_id: int, forced: bool) -> None:
        self.engine = engine
        self.cycle_id = int(cycle["id"])
        self.repo = str(repo["name"])
        self.stage = stage
        self.cycle_dir = cycle_dir
        self.job_id = job_id
        self.forced = forced
        self.started = time.time()
        self.progress: dict[str, Any] = {}
        self.result: dict[str, Any] | None = None
        self.error: str | None = None
        self.warnings: list[dict[str, str]] = []  # what a stage said the user should know
        self.stop_reason: str | None = None
        env = dict(os.environ)
        preload = engine.blas_preload()
        if preload:
            env["LD_PRELOAD"] = ":".join(filter(None, [preload, env.get("LD_PRELOAD")]))
        self.stderr = open(cycle_dir / f"{stage}.stderr.log", "ab")  # noqa: SIM115 (closed on exit)
        self.proc = subprocess.Popen(
            [*qos_prefix(), sys.executable, "-m", "forged", "worker", stage, "--cycle-dir", str(cycle_dir)],
            stdout=subprocess.PIPE, stderr=self.stderr, stdin=subprocess.DEVNULL, env=env,
        )
        self.thread = threading.Thread(target=self._read, name=f"worker-{stage}", daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        last_write = 0.0
        for raw in self.proc.stdout:
            try:
                msg = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue  # a library printed to stdout; not ours
            kind = msg.pop("event", "")
            if kind == "progress" and msg.get("kind") == "warning":
                self.warnings.append({"stage": self.stage, "message": str(msg.get("message", ""))})
                self.engine.log.warning("worker_warning", repo=self.repo, cycle=self.cycle_id,
                                        stage=self.stage, message=msg.get("message"))
            if kind == "progress":
                # steps come many a second: record them every 2 s; milestones always
                milestone = msg.get("kind") not in (None, "step", "progress")
                self.progress = {**self.progress, **msg} if milestone else msg
                if milestone or time.time() - last_write > 2.0:
                    last_write = time.time()
                    self.engine.state.query("UPDATE jobs SET progress=? WHERE id=?",
                                            (json.dumps(msg), self.job_id))
                    self.engine.state.event("progress", self.repo, self.cycle_id, {"stage": self.stage, **msg})
            elif kind == "result":
                self.result = msg
            elif kind == "error":
                self.error = msg.get("message", "worker failed")
        code = self.proc.wait()
        self.stderr.close()
        self.engine._worker_finished(self, code)

    def request_stop(self, reason: str) -> None:
        if self.stop_reason is None and self.proc.poll() is None:
            self.stop_reason = reason
            self.proc.send_signal(signal.SIGTERM)
            # the worker promises to checkpoint and exit within 30 s; past that, kill it.
            threading.Timer(35.0, self._kill_if_alive).start()

    def _kill_if_alive(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()

    def status(self) -> dict[str, Any]:
        return {"repo": self.repo, "cycle_id": self.cycle_id, "stage": self.stage, "pid": self.proc.pid,
                "running_s": round(time.time() - self.started, 1), "progress": self.progress,
                "stopping": self.stop_reason}


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
        self.worker: WorkerHandle | None = None
        self.watchers: dict[str, Any] = {}
        self._gates: dict[str, Any] = {}
        self._gates_open = False
        self._mem_need: int | None = None
        self._tick_error: str | None = None
        self._tick_error_at = 0.0
        self._last_tick = time.time()
        self._asking: set[int] = set()
        self._paused_flag = self.paths.state_dir / "paused"
        self.paused = self._paused_flag.exists()
        self.scheduler = BackgroundScheduler(timezone="UTC", job_defaults={"coalesce": True, "max_instances": 1})
        self.on_tick: list[Callable[[], None]] = []  # test hook: called after each tick

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        self._recover()
        for row in self.state.repos():
            self._start_watcher(row)
        now = time.time()
        from datetime import UTC, datetime, timedelta

        start_at = datetime.fromtimestamp(now, UTC)
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

        for job in self.state.query("SELECT * FROM jobs WHERE state='running'"):
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
            with self.state.tx() as db:
                db.execute("UPDATE jobs SET state='interrupted', finished_at=? WHERE id=?", (time.time(), job["id"]))
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
            return
        self.watchers[name] = w

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
        w = self.worker
        if w is not None and w.repo == row["name"]:
            w.request_stop("repo removed")

    def reconcile_all(self) -> None:
        for row in self.state.repos():
            try:
                self.account_repo(str(row["name"]))
            except Exception:
                self.log.exception("reconcile_failed", repo=row["name"])

    def account_repo(self, name: str) -> None:
        from forged.daemon.accounting import RepoError, account, check_work_tree

        row = self.state.repo(name)
        if row is None:
            return
        path = Path(row["path"])
        try:
            check_work_tree(path)
        except RepoError as e:
            if not row["missing"]:
                self.state.update_repo(name, missing=1)
                self.state.event("repo_missing", name, data={"reason": str(e)})
                self.log.warning("repo_missing", repo=name, reason=str(e))
            w = self.worker
            if w is not None and w.repo == name:
                w.request_stop("repo missing")
            return
        if row["missing"]:
            self.state.update_repo(name, missing=0)
            self.state.event("repo_back", name)
            self._start_watcher(row)  # no-op when its watcher is still polling for it
        try:
            acc = account(path, row["cursor_commit"], self.cfg.thresholds, cursor_at=row["cursor_at"],
                          branch=row["branch"] or "")
        except RepoError as e:  # e.g. the registered branch was deleted
            self.state.event("accounting_failed", name, data={"error": str(e)})
            self.log.warning("accounting_failed", repo=name, error=str(e))
            return
        old = json.loads(row["accounting"] or "{}")
        if acc.deferred:
            # git is mid-operation: keep the last numbers, only say why they wait
            self.state.update_repo(name, accounting={**old, "deferred": acc.deferred})
            return
        data = acc.to_dict()
        self.state.update_repo(name, accounting=data, accounted_at=time.time())
        if {k: old.get(k) for k in ("head", "lines_changed", "commits", "due", "deferred")} != {
            k: data.get(k) for k in ("head", "lines_changed", "commits", "due", "deferred")
        }:
            self.state.event("accounting", name, data={"progress": acc.progress, "due": acc.due})
        if acc.due and acc.head and self._open_cycle(row) is None:
            self._new_cycle(row, head=acc.head, forced=False, reason=", ".join(acc.due_reasons))

    # -- cycles -------------------------------------------------------------------------
    def _open_cycle(self, repo: Row, include_awaiting: bool = False) -> Row | None:
        """The repo's unfinished cycle. One awaiting approval does not block a newer one."""
        sql = "SELECT * FROM cycles WHERE repo_id=? AND finished_at IS NULL"
        if not include_awaiting:
            sql += " AND stage != 'awaiting_approval'"
        return self.state.one(sql + " ORDER BY id DESC LIMIT 1", (repo["id"],))

    def _new_cycle(self, repo: Row, head: str, forced: bool, reason: str) -> int:
        now = time.time()
        with self.state.tx() as db:
            cur = db.execute(
                "INSERT INTO cycles(repo_id, stage, forced, base_commit, head_commit, reason, created_at, updated_at)"
                " VALUES (?,?,?,?,?,?,?,?)",
                (repo["id"], "due", int(forced), repo["cursor_commit"], head, reason, now, now),
            )
            cid = int(cur.lastrowid or 0)
            self.state._event(db, "stage", repo["name"], cid, {"stage": "due", "reason": reason})
        self.log.info("cycle_due", repo=repo["name"], cycle=cid, reason=reason)
        return cid

    def _set_stage(self, cycle_id: int, stage: str, *, reason: str | None = None, finished: bool = False,
                   **fields: Any) -> None:
        now = time.time()
        sets = {"stage": stage, "updated_at": now, **fields}
        if reason is not None:
            sets["reason"] = reason
        if finished:
            sets["finished_at"] = now
        cols = ", ".join(f"{k}=?" for k in sets)
        with self.state.tx() as db:
            db.execute(f"UPDATE cycles SET {cols} WHERE id=?", (*sets.values(), cycle_id))
            repo = db.execute("SELECT r.name FROM cycles c JOIN repos r ON r.id=c.repo_id WHERE c.id=?",
                              (cycle_id,)).fetchone()
            self.state._event(db, "stage", repo["name"] if repo else None, cycle_id,
                              {"stage": stage, "reason": reason})
        self.log.info("stage", cycle=cycle_id, stage=stage, reason=reason)

    def cycle_dir(self, repo: str, cycle_id: int) -> Path:
        return self.paths.work_dir / repo / f"cycle-{cycle_id}"

    def forge_now(self, repo: Row, force: bool = False) -> dict[str, Any]:
        from forged.daemon.accounting import git_state

        if repo["missing"]:
            raise ApiError(409, f"repo {repo['name']!r} is missing from {repo['path']}")
        cyc = self._open_cycle(repo)
        if cyc is not None:
            fields: dict[str, Any] = {"retry_at": None}
            if force:
                fields["forced"] = 1
            stage = cyc["stage"]
            if stage == "failed":
                fields["attempts"] = 0
            self._set_stage(int(cyc["id"]), stage, **fields)
            return {"cycle_id": cyc["id"], "stage": stage, "forced": force, "existing": True}
        head = git_state(Path(repo["path"])).head
        if not head:
            raise ApiError(409, f"repo {repo['name']!r} has no commits yet")
        cid = self._new_cycle(repo, head=head, forced=force, reason="forge requested" + (" (forced)" if force else ""))
        return {"cycle_id": cid, "stage": "due", "forced": force, "existing": False}

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
        """MLX on Linux needs OpenBLAS preloaded into the worker to be usable (design.md)."""
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
            w = self.worker
            if w is not None:
                if self.paused:
                    w.request_stop("paused by user")
                elif not self._gates_open and not w.forced:
                    closed = [k for k, v in self._gates.items() if v["state"] in ("closed", "unknown")]
                    w.request_stop("gate closed: " + ", ".join(closed))
                return
        self._light_stages(now)
        if self.paused:
            return
        with self._lock:
            if self.worker is not None:
                return
            for cyc in self._runnable(now):
                if self._gates_open or cyc["forced"]:
                    self._run_heavy(cyc)
                    return

    def _runnable(self, now: float) -> list[Row]:
        """Heavy-stage cycles ready to run, oldest first (fair across repos)."""
        rows = self.state.query(
            "SELECT c.*, r.name AS repo_name, r.missing FROM cycles c JOIN repos r ON r.id=c.repo_id "
            "WHERE c.finished_at IS NULL ORDER BY c.created_at, c.id"
        )
        out = []
        for c in rows:
            if c["missing"]:
                continue
            stage = c["stage"]
            if stage in HEAVY or (stage in ("paused", "failed") and (c["resume_stage"] or "due") in HEAVY):
                if c["retry_at"] and c["retry_at"] > now:
                    continue
                out.append(c)
        return out

    def _run_heavy(self, cyc: Row) -> None:
        repo = self.state.one("SELECT * FROM repos WHERE id=?", (cyc["repo_id"],))
        assert repo is not None
        stage = cyc["stage"]
        if stage in ("paused", "failed"):
            stage = cyc["resume_stage"] or "due"
        wstage = STAGE_OF_WORKER[stage]
        cid = int(cyc["id"])
        cdir = self.cycle_dir(repo["name"], cid)
        cdir.mkdir(parents=True, exist_ok=True)
        live = self._live_version_row(repo)
        live_adapter = live["adapter_path"] if live is not None else None
        n_live = self.state.one("SELECT COUNT(*) AS n FROM model_versions WHERE repo_id=? AND state IN "
                                "('live','published','retired')", (repo["id"],))
        full = live_adapter is None or (n_live and n_live["n"] % self.cfg.train.full_retrain_every == 0)
        job = {
            "config": config.to_dict(self.cfg),
            "repo": repo["name"], "repo_path": repo["path"], "cycle_id": cid,
            "head_commit": cyc["head_commit"], "base_commit": cyc["base_commit"],
            "cache_dir": str(self.paths.cache_dir),
            "warm_start": None if full else live_adapter, "live_adapter": live_adapter,
            # the judge exports what this Ollama can take (None: unknown, export both)
            "ollama_adapters": self._adapters_hint() if wstage == "judge" else None,
        }
        (cdir / "job.json").write_text(json.dumps(job, indent=1))
        with self._snap:
            with self.state.tx() as db:
                db.execute("UPDATE cycles SET stage=?, resume_stage=?, reason=NULL, updated_at=? WHERE id=?",
                           (WORKER_STAGE_NAME[wstage], WORKER_STAGE_NAME[wstage], time.time(), cid))
                cur = db.execute("INSERT INTO jobs(cycle_id, stage, state, started_at) VALUES (?,?,?,?)",
                                 (cid, wstage, "running", time.time()))
                job_id = int(cur.lastrowid or 0)
                self.state._event(db, "stage", repo["name"], cid, {"stage": WORKER_STAGE_NAME[wstage]})
            with bound_contextvars(repo=repo["name"], cycle=cid):
                self.log.info("worker_start", stage=wstage)
            self.worker = WorkerHandle(self, cyc, repo, wstage, cdir, job_id, bool(cyc["forced"]))
        self.state.query("UPDATE jobs SET pid=? WHERE id=?", (self.worker.proc.pid, job_id))

    def _worker_finished(self, w: WorkerHandle, code: int) -> None:
        with self._lock, self._snap, bound_contextvars(repo=w.repo, cycle=w.cycle_id):
            self.worker = None
            result = w.result or {}
            jstate = {0: "done", 3: "stopped"}.get(code, "failed")
            with self.state.tx() as db:
                db.execute("UPDATE jobs SET state=?, exit_code=?, finished_at=?, progress=? WHERE id=?",
                           (jstate, code, time.time(), json.dumps(w.progress), w.job_id))
            cyc = self.state.one("SELECT * FROM cycles WHERE id=?", (w.cycle_id,))
            if cyc is None or cyc["finished_at"] is not None:
                return  # repo removed meanwhile
            self.log.info("worker_exit", stage=w.stage, code=code, stop=w.stop_reason)
            if w.warnings:  # kept with the cycle: status and the report show them
                old = json.loads(cyc["metrics"] or "{}").get("warnings") or []
                # once each: a stage resumed after a crash says the same again
                self._merge_metrics(w.cycle_id, {"warnings": old + [x for x in w.warnings if x not in old]})
            if code == 0 and w.stage in NEXT_STAGE:
                if w.stage == "mine":
                    self._merge_metrics(w.cycle_id, {"dataset": result.get("manifest", {})})
                else:
                    self._merge_metrics(w.cycle_id, {"train": result.get("train", {})})
                self._set_stage(w.cycle_id, NEXT_STAGE[w.stage], attempts=0, resume_stage=NEXT_STAGE[w.stage])
            elif code == 0 and w.stage == "judge":
                self._merge_metrics(w.cycle_id, {k: result.get(k) for k in ("judge", "export", "fidelity")})
                if result.get("passed"):
                    self._set_stage(w.cycle_id, "publishing", attempts=0, resume_stage="publishing")
                    threading.Thread(target=self._light_stages, args=(time.time(),), daemon=True).start()
                else:
                    why = "; ".join((result.get("judge") or {}).get("reasons", [])) or result.get(
                        "export_error") or (result.get("fidelity") or {}).get("reason") or "judge rejected"
                    self._set_stage(w.cycle_id, "rejected", reason=f"rejected by judge: {why}", finished=True)
            elif w.stop_reason is not None or code == 3:
                self._set_stage(w.cycle_id, "paused", reason=w.stop_reason or "stopped",
                                resume_stage=WORKER_STAGE_NAME[w.stage])
            else:
                attempts = int(cyc["attempts"]) + 1
                why = w.error or f"worker exited with code {code}"
                if attempts >= MAX_ATTEMPTS:
                    self._set_stage(w.cycle_id, "failed", reason=why, attempts=attempts, finished=True)
                else:
                    self._set_stage(w.cycle_id, "failed", reason=why, attempts=attempts,
                                    retry_at=time.time() + backoff(attempts, self.cfg.daemon.retry_seconds),
                                    resume_stage=WORKER_STAGE_NAME[w.stage])

    def _merge_metrics(self, cycle_id: int, data: dict[str, Any]) -> None:
        row = self.state.one("SELECT metrics FROM cycles WHERE id=?", (cycle_id,))
        metrics = json.loads(row["metrics"] or "{}") if row else {}
        metrics.update(data)
        self.state.query("UPDATE cycles SET metrics=? WHERE id=?", (json.dumps(metrics, default=str), cycle_id))

    # -- publishing, approval, promotion (light: in the daemon) --------------------------
    def _light_stages(self, now: float) -> None:
        rows = self.state.query(
            "SELECT * FROM cycles WHERE finished_at IS NULL AND stage IN ('publishing','ready_to_publish','promoting')"
            " AND (retry_at IS NULL OR retry_at <= ?) ORDER BY id", (now,))
        for cyc in rows:
            with self._lock:
                fresh = self.state.one("SELECT * FROM cycles WHERE id=?", (cyc["id"],))
                if fresh is None or fresh["finished_at"] is not None or fresh["stage"] != cyc["stage"]:
                    continue
                if cyc["stage"] == "promoting":
                    self._promote(fresh)
                else:
                    self._publish(fresh)

    def _publisher(self, timeout: float = 60.0) -> Any:
        from forged.daemon.publish import HostMemory, Publisher

        gates = self.cfg.gates
        return Publisher(self.cfg.publish.ollama_host, keep_alive=self.cfg.publish.keep_alive, timeout=timeout,
                         memory=HostMemory(self.paths.state_dir / "ollama_hosts.json"),
                         room_dirs=[self.paths.state_dir],
                         room_margin=int(gates.min_free_disk_gb * 1e9) if gates.disk else 0)

    def _adapters_hint(self) -> bool | None:
        """Whether the Ollama server creates adapter models (asked, or remembered when down)."""
        from forged.daemon.publish import OllamaUnavailable, PublishError

        pub = self._publisher(timeout=5.0)
        try:
            return pub.accepts_adapters()
        except (OllamaUnavailable, PublishError):
            return pub.memory.known(pub.host)
        finally:
            pub.close()

    def _publish(self, cyc: Row) -> None:
        from forged.daemon.publish import (
            AdaptersRefused,
            NoRoom,
            OllamaUnavailable,
            PublishError,
            manual_for,
            publish_candidate,
        )

        repo = self.state.one("SELECT * FROM repos WHERE id=?", (cyc["repo_id"],))
        assert repo is not None
        cid = int(cyc["id"])
        judged = json.loads((self.cycle_dir(repo["name"], cid) / "judge.result.json").read_text())
        version = cyc["version"]
        if version is None:
            row = self.state.one("SELECT MAX(version) AS v FROM model_versions WHERE repo_id=?", (repo["id"],))
            version = int(row["v"] or 0) + 1 if row else 1
            tag = f"forged/{repo['name']}:v{version}"
            with self.state.tx() as db:
                db.execute("UPDATE cycles SET version=? WHERE id=?", (version, cid))
                db.execute(
                    "INSERT INTO model_versions(repo_id, version, cycle_id, tag, adapter_path, train_commit, state,"
                    " metrics, created_at) VALUES (?,?,?,?,?,?,?,?,?)",
                    (repo["id"], version, cid, tag, str(self.cycle_dir(repo["name"], cid) / "train" / "adapter"),
                     cyc["head_commit"], "candidate", cyc["metrics"], time.time()))
        pub = self._publisher()
        try:
            made = publish_candidate(pub, repo["name"], version, judged, mode=self.cfg.publish.export,
                                     base_name=_base_name(self.cfg.train.base_model),
                                     temperature=self.cfg.publish.temperature)
        except AdaptersRefused as e:
            # nothing else of this candidate to publish (export = "adapter", or its fused
            # model failed the fidelity check): waiting will not change Ollama's answer
            self._set_stage(cid, "rejected", reason=f"not published: {e}; the candidate has no checked fused "
                            "model ([publish] export = \"auto\" makes one)", finished=True)
            self.state.query("UPDATE model_versions SET state='rejected' WHERE repo_id=? AND version=?",
                             (repo["id"], version))
            return
        except (OllamaUnavailable, PublishError, OSError) as e:
            attempts = int(cyc["attempts"]) + 1
            if isinstance(e, OllamaUnavailable) and not isinstance(e, NoRoom):
                # Stored before the stage changes: status shows it with that stage, and a
                # client polling between the two writes saw ready_to_publish without it.
                manual = manual_for(judged, repo["name"], version, mode=self.cfg.publish.export,
                                    adapters=pub.memory.known(pub.host), temperature=self.cfg.publish.temperature)
                self._merge_metrics(cid, {"manual_command": manual})
            else:  # Ollama answered (or the disk is full): its words, not "publish by hand"
                self._merge_metrics(cid, {"manual_command": None})
            self._set_stage(cid, "ready_to_publish", reason=f"Ollama: {e}", attempts=attempts,
                            retry_at=time.time() + backoff(attempts, self.cfg.daemon.retry_seconds))
            self.log.warning("publish_waiting", repo=repo["name"], version=version, error=str(e))
            return
        finally:
            pub.close()
        self._record_version(repo, version, made.to_dict())
        if made.note:
            self.log.warning("adapter_refused", repo=repo["name"], version=version, note=made.note)
            self._merge_metrics(cid, {"publish_note": made.note})
        self.state.query("UPDATE model_versions SET state='published' WHERE repo_id=? AND version=?",
                         (repo["id"], version))
        if self.cfg.publish.auto_approve:
            self._approve(cyc, repo, version, via="auto_approve")
            return
        # a newer candidate supersedes an unanswered one
        for old in self.state.query("SELECT * FROM cycles WHERE repo_id=? AND stage='awaiting_approval' "
                                    "AND finished_at IS NULL AND id != ?", (repo["id"], cid)):
            self._set_stage(int(old["id"]), "superseded", reason=f"superseded by v{version}", finished=True)
            self.state.query("UPDATE approvals SET state='superseded', answered_at=? WHERE cycle_id=? AND "
                             "state='pending'", (time.time(), old["id"]))
        with self.state.tx() as db:
            db.execute("INSERT INTO approvals(repo_id, cycle_id, version, state, requested_at) VALUES (?,?,?,?,?)",
                       (repo["id"], cid, version, "pending", time.time()))
        self._set_stage(cid, "awaiting_approval", attempts=0, retry_at=None)
        self._ask_async(repo, cyc, version)

    def _record_version(self, repo: Row, version: int, made: dict[str, Any]) -> None:
        """Keep what was created (kind, quantization, size) with the version's metrics."""
        row = self.state.one("SELECT metrics FROM model_versions WHERE repo_id=? AND version=?", (repo["id"], version))
        metrics = json.loads(row["metrics"] or "{}") if row else {}
        metrics["published"] = made
        self.state.query("UPDATE model_versions SET metrics=? WHERE repo_id=? AND version=?",
                         (json.dumps(metrics, default=str), repo["id"], version))

    def _ask_async(self, repo: Row, cyc: Row, version: int) -> None:
        from forged.daemon.approval import ApprovalRequest, ask

        if int(cyc["id"]) in self._asking:
            return
        self._asking.add(int(cyc["id"]))
        metrics = json.loads(cyc["metrics"] or "{}")
        judge = metrics.get("judge") or {}
        deltas: dict[str, float] = {}
        ref = judge.get("live") or judge.get("base") or {}
        for k, v in (judge.get("candidate") or {}).items():
            if isinstance(v, int | float) and isinstance(ref.get(k), int | float):
                deltas[k] = round(v - ref[k], 4)
        acc = json.loads(repo["accounting"] or "{}")
        req = ApprovalRequest(repo=repo["name"], version=version, commits=int(acc.get("commits") or 0),
                              metric_deltas=deltas, tag=f"forged/{repo['name']}:v{version}")

        def run() -> None:
            try:
                answer = ask(req, self.cfg.publish.approval_timeout_seconds)
                if answer in ("approve", "reject"):
                    self.answer(repo, answer, via="notification")
            except Exception:
                self.log.exception("approval_prompt_failed", repo=repo["name"])
            finally:
                self._asking.discard(int(cyc["id"]))

        threading.Thread(target=run, name="approval", daemon=True).start()

    def answer(self, repo: Row, answer: str, via: str) -> dict[str, Any]:
        with self._lock:
            cyc = self.state.one("SELECT * FROM cycles WHERE repo_id=? AND stage='awaiting_approval' AND "
                                 "finished_at IS NULL ORDER BY id DESC LIMIT 1", (repo["id"],))
            if cyc is None:
                raise ApiError(409, f"nothing is awaiting approval for {repo['name']!r}")
            version = int(cyc["version"])
            if answer == "approve":
                self._approve(cyc, repo, version, via=via)
                row = self.state.one("SELECT stage, reason FROM cycles WHERE id=?", (cyc["id"],))
                return {"approved": version, "stage": row["stage"] if row else None,
                        "reason": row["reason"] if row else None}
            with self.state.tx() as db:
                db.execute("UPDATE approvals SET state='rejected', via=?, answered_at=? WHERE cycle_id=? "
                           "AND state='pending'", (via, time.time(), cyc["id"]))
                db.execute("UPDATE model_versions SET state='rejected' WHERE repo_id=? AND version=?",
                           (repo["id"], version))
            self._set_stage(int(cyc["id"]), "rejected", reason=f"rejected by user ({via})", finished=True)
            return {"rejected": version}

    def _approve(self, cyc: Row, repo: Row, version: int, via: str) -> None:
        with self.state.tx() as db:
            db.execute("UPDATE approvals SET state='approved', via=?, answered_at=? WHERE cycle_id=? "
                       "AND state='pending'", (via, time.time(), cyc["id"]))
        self._set_stage(int(cyc["id"]), "promoting", reason=f"approved ({via})", retry_at=None, attempts=0)
        fresh = self.state.one("SELECT * FROM cycles WHERE id=?", (cyc["id"],))
        assert fresh is not None
        self._promote(fresh)

    def _promote(self, cyc: Row) -> None:
        from forged.daemon.publish import OllamaUnavailable, PublishError

        repo = self.state.one("SELECT * FROM repos WHERE id=?", (cyc["repo_id"],))
        assert repo is not None
        version = int(cyc["version"])
        previous = repo["live_version"]
        try:
            pub = self._publisher()
            pub.promote(repo["name"], version, previous=previous)
        except (OllamaUnavailable, PublishError, OSError) as e:
            attempts = int(cyc["attempts"]) + 1
            self._set_stage(int(cyc["id"]), "promoting", reason=f"Ollama: {e}", attempts=attempts,
                            retry_at=time.time() + backoff(attempts, self.cfg.daemon.retry_seconds))
            return
        now = time.time()
        with self.state.tx() as db:
            db.execute("UPDATE model_versions SET state='published' WHERE repo_id=? AND state='live'", (repo["id"],))
            db.execute("UPDATE model_versions SET state='live' WHERE repo_id=? AND version=?", (repo["id"], version))
            db.execute("UPDATE repos SET cursor_commit=?, cursor_at=?, live_version=? WHERE id=?",
                       (cyc["head_commit"], now, version, repo["id"]))
        self._set_stage(int(cyc["id"]), "live", reason=f"forged/{repo['name']}:latest = v{version}", finished=True)
        self._prune(repo)
        threading.Thread(target=self.account_repo, args=(repo["name"],), daemon=True).start()

    def _prune(self, repo: Row) -> None:
        from forged.daemon.publish import keep_list

        rows = self.state.query("SELECT version FROM model_versions WHERE repo_id=? AND state IN "
                                "('live','published') ORDER BY version DESC", (repo["id"],))
        versions = [int(r["version"]) for r in rows]
        live_row = self.state.one("SELECT live_version FROM repos WHERE id=?", (repo["id"],))
        live = live_row["live_version"] if live_row else None
        # the version `forgectl rollback` would restore stays too, however few are kept
        previous = next((v for v in versions if live is not None and v < live), None)
        keep = keep_list(versions, self.cfg.publish.keep_versions, live, previous)
        try:
            deleted = self._publisher().prune(repo["name"], keep)
        except Exception as e:  # noqa: BLE001 (pruning is best-effort; retried next promotion)
            self.log.warning("prune_failed", repo=repo["name"], error=str(e))
            return
        if deleted:
            gone = [int(t.rsplit(":v", 1)[1]) for t in deleted]
            sizes = [((json.loads(r["metrics"] or "{}") or {}).get("published") or {}).get("size") or 0
                     for r in self.state.query(f"SELECT metrics FROM model_versions WHERE repo_id=? AND version IN "
                                               f"({','.join('?' * len(gone))})", (repo["id"], *gone))]
            # a fused version is a whole model: say what pruning gave back
            self.log.info("pruned", repo=repo["name"], tags=deleted, freed_bytes=sum(int(x) for x in sizes))
            self.state.query(
                f"UPDATE model_versions SET state='deleted' WHERE repo_id=? AND state!='live' AND version NOT IN "
                f"({','.join('?' * len(keep))})", (repo["id"], *keep))

    def rollback(self, repo: Row, version: Any = None) -> dict[str, Any]:
        from forged.daemon.publish import OllamaUnavailable, PublishError

        live = repo["live_version"]
        if version is None:
            row = self.state.one("SELECT version FROM model_versions WHERE repo_id=? AND state='published' "
                                 "AND version < ? ORDER BY version DESC LIMIT 1", (repo["id"], live or 0))
            if row is None:
                raise ApiError(409, f"no earlier published version of {repo['name']!r} to roll back to")
            version = int(row["version"])
        try:
            version = int(str(version).lstrip("v"))
        except ValueError:
            raise ApiError(400, f"version: {version!r} is not a version number") from None
        target = self.state.one("SELECT * FROM model_versions WHERE repo_id=? AND version=?", (repo["id"], version))
        if target is None or target["state"] not in ("published", "live"):
            raise ApiError(409, f"v{version} of {repo['name']!r} is not a published version")
        try:
            self._publisher().rollback(repo["name"], version)
        except (OllamaUnavailable, PublishError) as e:
            raise ApiError(503, f"Ollama: {e}") from None
        with self.state.tx() as db:
            db.execute("UPDATE model_versions SET state='published' WHERE repo_id=? AND state='live'", (repo["id"],))
            db.execute("UPDATE model_versions SET state='live' WHERE id=?", (target["id"],))
            db.execute("UPDATE repos SET live_version=?, cursor_commit=?, cursor_at=? WHERE id=?",
                       (version, target["train_commit"], time.time(), repo["id"]))
            self.state._event(db, "rollback", repo["name"], None, {"version": version, "from": live})
        return {"live_version": version, "previous": live}

    # -- status -------------------------------------------------------------------------
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

    def _live_version_row(self, repo: Row) -> Row | None:
        return self.state.one("SELECT * FROM model_versions WHERE repo_id=? AND state='live'", (repo["id"],))

    def repo_statuses(self) -> list[dict[str, Any]]:
        return [self._repo_status(r) for r in self.state.repos()]

    def _repo_status(self, repo: Row) -> dict[str, Any]:
        acc = json.loads(repo["accounting"] or "{}")
        cyc = self._open_cycle(repo)
        awaiting = self.state.one("SELECT * FROM approvals WHERE repo_id=? AND state='pending' ORDER BY id DESC "
                                  "LIMIT 1", (repo["id"],))
        last = self.state.one("SELECT * FROM cycles WHERE repo_id=? ORDER BY id DESC LIMIT 1", (repo["id"],))
        if repo["missing"]:
            stage = "missing"
        elif cyc is not None:
            stage = cyc["stage"]
        elif awaiting is not None:
            stage = "awaiting_approval"
        else:
            stage = "watching"
        w = self.worker
        cycle_info = None
        if cyc is not None:
            metrics = json.loads(cyc["metrics"] or "{}")
            cycle_info = {
                "id": cyc["id"], "stage": cyc["stage"], "reason": cyc["reason"], "attempts": cyc["attempts"],
                "retry_at": cyc["retry_at"], "forced": bool(cyc["forced"]), "version": cyc["version"],
                "progress": w.progress if w is not None and w.cycle_id == cyc["id"] else None,
                "manual_command": metrics.get("manual_command") if cyc["stage"] == "ready_to_publish" else None,
                "warnings": metrics.get("warnings") or [],
            }
        live = repo["live_version"]
        watcher = self.watchers.get(str(repo["name"]))
        return {
            "name": repo["name"], "path": repo["path"], "branch": repo["branch"], "missing": bool(repo["missing"]),
            "watch": {"active": watcher is not None, "passes": getattr(watcher, "passes", 0),
                      "events": (getattr(watcher, "stats", None) or {}).get("events", 0),
                      "accounted_at": repo["accounted_at"]},
            "stage": stage,
            "progress": {
                "text": acc.get("progress"), "due": acc.get("due", False),
                "lines": acc.get("lines_changed"), "min_lines": self.cfg.thresholds.min_changed_lines,
                "commits": acc.get("commits"), "min_commits": self.cfg.thresholds.min_commits,
                "uncommitted_lines": acc.get("uncommitted_lines"), "diverged": acc.get("diverged", False),
                "deferred": acc.get("deferred"),
            },
            "live_version": live,
            "live_tag": f"forged/{repo['name']}:latest" if live else None,
            "pending_approval": {"version": awaiting["version"], "cycle_id": awaiting["cycle_id"],
                                 "tag": f"forged/{repo['name']}:v{awaiting['version']}"} if awaiting else None,
            "cycle": cycle_info,
            "last_cycle": {"id": last["id"], "stage": last["stage"], "reason": last["reason"],
                           "finished_at": last["finished_at"]} if last is not None else None,
        }

    def repo_detail(self, repo: Row) -> dict[str, Any]:
        out = self._repo_status(repo)
        cycles = self.state.query("SELECT * FROM cycles WHERE repo_id=? ORDER BY id DESC LIMIT 10", (repo["id"],))
        out["cycles"] = [{**dict(c), "metrics": json.loads(c["metrics"]) if c["metrics"] else None}
                         for c in cycles]
        out["versions"] = []
        for v in self.state.query("SELECT version, tag, state, train_commit, created_at, metrics FROM model_versions "
                                  "WHERE repo_id=? ORDER BY version DESC", (repo["id"],)):
            made = (json.loads(v["metrics"] or "{}") or {}).get("published") or {}
            out["versions"].append({**{k: v[k] for k in ("version", "tag", "state", "train_commit", "created_at")},
                                    "kind": made.get("kind"), "quantization": made.get("quantization"),
                                    "size": made.get("size")})
        return out

    def report(self, repo: Row) -> dict[str, Any]:
        from forged.daemon.report import write_report

        cyc = self.state.one("SELECT * FROM cycles WHERE repo_id=? ORDER BY id DESC LIMIT 1", (repo["id"],))
        if cyc is None:
            raise ApiError(404, f"{repo['name']!r} has no cycle yet")
        cdir = self.cycle_dir(repo["name"], int(cyc["id"]))
        cdir.mkdir(parents=True, exist_ok=True)
        path = write_report(cdir, repo["name"], dict(cyc))
        return {"path": str(path), "cycle_id": cyc["id"]}


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


def _base_name(spec: str) -> str:
    name = spec.split(":", 1)[-1].rstrip("/").split("/")[-1].lower()
    return config.default_repo_name(Path(name))
