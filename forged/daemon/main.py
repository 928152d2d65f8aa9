"""The daemon: ``forged`` with no arguments runs it in the foreground.

It stays small — watchers, scheduler, state, control socket, notifications — and never
imports ML libraries: heavy stages run in ``forged worker`` subprocesses
(:mod:`forged.daemon.engine`). The ``forged`` command line is :mod:`forged.cli`.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from forged import __version__
from forged.common import config, log, paths
from forged.daemon import fields
from forged.daemon.server import ApiError, ControlServer, Router
from forged.daemon.store import State


class LockHeld(RuntimeError):
    pass


class PidLock:
    """An flock'ed pid file: two daemons never run against one FORGED_HOME."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            raise LockHeld(f"another forged daemon (pid {other or '?'}) holds {self.path}") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd

    def intact(self) -> bool:
        """Whether the lock file we hold is still the one at our path (the home was not deleted)."""
        if self.fd is None:
            return False
        try:
            return os.stat(self.path).st_ino == os.fstat(self.fd).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class Daemon:
    def __init__(self, p: paths.Paths, cfg: config.Config) -> None:
        self.paths = p
        self.cfg = cfg
        self.log = log.get("forged.daemon")
        self.started_at = time.time()
        self.stopping = threading.Event()
        self.lock = PidLock(p.lock)
        self.state: State | None = None
        self.server: ControlServer | None = None
        self.engine: Any = None  # forged.daemon.engine.Engine, set in start()

    # -- lifecycle --------------------------------------------------------------
    def start(self) -> None:
        from forged.daemon.engine import Engine

        self.paths.ensure()
        self.lock.acquire()
        try:
            self.state = State(self.paths.db)
            self._register_config_repos()
            self.engine = Engine(self)
            self.server = ControlServer(self.paths.socket, self._router(), self.cfg.daemon.max_request_bytes)
            threading.Thread(target=self.server.serve_forever, name="control", daemon=True).start()
            self.engine.start()
        except BaseException:
            self._undo_start()
            raise
        self.state.event("daemon_started", data={"pid": os.getpid(), "version": __version__})
        self.log.info("daemon_started", pid=os.getpid(), socket=str(self.paths.socket),
                      config=str(self.cfg.source or "(defaults)"), home=str(self.paths.state_dir))

    def _undo_start(self) -> None:
        """A start that failed half way leaves nothing behind: no socket file, no lock."""
        steps = [self.engine.stop if self.engine is not None else None,
                 self.server.close if self.server is not None else None,
                 self.state.close if self.state is not None else None]
        for step in filter(None, steps):
            try:
                step()
            except Exception as e:  # noqa: BLE001 - the failure that brought us here matters more
                self.log.warning("start_cleanup_failed", error=f"{type(e).__name__}: {e}")
        self.engine = self.server = self.state = None
        self.lock.release()

    def stop(self) -> None:
        self.stopping.set()
        if self.engine is not None:
            self.engine.stop()
        if self.server is not None:
            self.server.close()
        if self.state is not None:
            self.state.event("daemon_stopped", data={"pid": os.getpid()})
            self.state.close()
        self.lock.release()
        self.log.info("daemon_stopped")

    def run_forever(self) -> None:
        def on_signal(signum: int, _frame: Any) -> None:
            self.log.info("signal", signal=signal.Signals(signum).name)
            self.stopping.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.start()
        try:
            self.wait()
        finally:
            self.stop()

    def wait(self) -> None:
        """Run until told to stop, or until our state directory is deleted under us.

        A daemon whose home was removed would otherwise keep running on unlinked files
        while a new one starts beside it: two daemons for one home.
        """
        while not self.stopping.wait(1.0):
            if not self.lock.intact():
                self.log.error("home_removed", lock=str(self.lock.path))
                self.stopping.set()

    def _register_config_repos(self) -> None:
        assert self.state is not None
        for rc in self.cfg.repos:
            existing = self.state.repo(rc.name)
            path = str(Path(rc.path).expanduser().resolve())
            if existing is None:
                self.state.add_repo(rc.name, path, rc.branch, source="config")
            elif existing["path"] != path or existing["branch"] != rc.branch:
                self.state.update_repo(rc.name, path=path, branch=rc.branch)

    # -- API --------------------------------------------------------------------
    def _router(self) -> Router:
        r = Router()

        def route(method: str, pattern: str, takes: tuple[str, ...], fn: Any) -> None:
            """A handler whose body may hold only ``takes`` (each then type-checked by fn)."""
            def handler(p: dict[str, str], b: dict[str, Any], q: dict[str, list[str]]) -> Any:
                fields.only(b, *takes)
                return fn(p, b, q)
            r.add(method, pattern, handler)

        repo = self._repo
        route("GET", "/status", (), lambda p, b, q: self.status())
        route("GET", "/repos", (), lambda p, b, q: {"repos": self.engine.repo_statuses()})
        route("POST", "/repos", ("path", "name", "branch"), lambda p, b, q: self.add_repo(b))
        route("DELETE", "/repos", ("name",), lambda p, b, q: self.remove_repo(fields.string(b, "name")))
        route("GET", "/repos/{name}", (), lambda p, b, q: self.engine.repo_detail(repo(p["name"])))
        route("DELETE", "/repos/{name}", (), lambda p, b, q: self.remove_repo(p["name"]))
        route("POST", "/repos/{name}/forge", ("force",),
              lambda p, b, q: self.engine.forge_now(repo(p["name"]), force=fields.boolean(b, "force")))
        route("POST", "/repos/{name}/approve", (),
              lambda p, b, q: self.engine.answer(repo(p["name"]), "approve", via="api"))
        route("POST", "/repos/{name}/reject", (),
              lambda p, b, q: self.engine.answer(repo(p["name"]), "reject", via="api"))
        route("POST", "/repos/{name}/rollback", ("version",),
              lambda p, b, q: self.engine.rollback(repo(p["name"]), fields.version(b)))
        route("GET", "/repos/{name}/report", (), lambda p, b, q: self.engine.report(repo(p["name"])))
        route("POST", "/pause", (), lambda p, b, q: self.engine.set_paused(True))
        route("POST", "/resume", (), lambda p, b, q: self.engine.set_paused(False))
        route("GET", "/events", (), lambda p, b, q: self.events(q))
        return r

    def _repo(self, name: str) -> Any:
        assert self.state is not None
        row = self.state.repo(name)
        if row is None:
            raise ApiError(404, f"no repo named {name!r} (see: forgectl repos list)")
        return row

    def status(self) -> dict[str, Any]:
        worker, repos = self.engine.worker_and_repos()
        return {
            "daemon": {
                "pid": os.getpid(),
                "version": __version__,
                "uptime": round(time.time() - self.started_at, 1),
                "started_at": self.started_at,
                "paused": self.engine.paused,
                "home": str(self.paths.state_dir),
                "config": str(self.cfg.source) if self.cfg.source else None,
                "socket": str(self.paths.socket),
            },
            "gates": self.engine.gate_status(),
            "worker": worker,
            "repos": repos,
        }

    def add_repo(self, body: dict[str, Any]) -> dict[str, Any]:
        from forged.daemon.accounting import RepoError, check_branch, check_work_tree

        assert self.state is not None
        raw = fields.string(body, "path")
        if not raw:
            raise ApiError(400, "path: required (a git work tree)")
        try:
            top = check_work_tree(raw)
        except RepoError as e:
            raise ApiError(400, str(e)) from None
        name = fields.string(body, "name") or config.default_repo_name(top)
        if not config.TAG_SAFE.match(name):
            raise ApiError(400, f"name: {name!r} is not usable in an Ollama tag "
                                "(lowercase letters, digits, '.', '_', '-'; at most 64)")
        branch = fields.string(body, "branch")
        if branch:
            try:
                check_branch(top, branch)
            except RepoError as e:
                raise ApiError(400, f"branch: {e}") from None
        if self.state.repo(name) is not None:
            raise ApiError(409, f"a repo named {name!r} is already registered (use --name)")
        for row in self.state.repos():
            if row["path"] == str(top):
                raise ApiError(409, f"{top} is already registered as {row['name']!r}")
        self.state.add_repo(name, str(top), branch)
        self.engine.repo_added(name)
        return {"added": name, "path": str(top), "branch": branch}

    def remove_repo(self, name: str) -> dict[str, Any]:
        assert self.state is not None
        row = self._repo(name)
        self.engine.repo_removing(row)
        self.state.remove_repo(name)
        return {"removed": name}

    def events(self, query: dict[str, list[str]]) -> Iterator[dict[str, Any]]:
        assert self.state is not None
        state = self.state
        after = fields.query_int(query, "after", -1, -1, fields.MAX_INT)
        follow = fields.query_bool(query, "follow", True)
        if after < 0:
            after = state.last_event_id()

        def gen() -> Iterator[dict[str, Any]]:
            nonlocal after
            yield {"kind": "hello", "status": self.status()}
            last_beat = time.monotonic()
            while not self.stopping.is_set():
                batch = state.events_after(after)
                for ev in batch:
                    after = ev["id"]
                    yield ev
                if not follow:
                    return
                if not batch:
                    if time.monotonic() - last_beat > 5:
                        # keeps clients' progress views fresh and detects gone clients
                        last_beat = time.monotonic()
                        yield {"kind": "status", "status": self.status()}
                    time.sleep(0.5)

        return gen()


# -- command line -------------------------------------------------------------------


def load_config(p: paths.Paths) -> config.Config:
    return config.load(p.config_file)


def default_home() -> None:
    """Run from a source checkout with no FORGED_HOME, keep everything in its state/ dir.

    The daemon and forgectl both call this, so they agree on where the socket is.
    """
    root = paths.checkout_root()
    if "FORGED_HOME" not in os.environ and root is not None:
        os.environ["FORGED_HOME"] = str(root / "state")


def configured_daemon(p: paths.Paths, prog: str = "forged") -> Daemon | None:
    """Load the config (a one-line error and None if it is bad), set up logging, build the daemon."""
    try:
        cfg = load_config(p)
    except config.ConfigError as e:
        print(f"{prog}: config error: {e}", file=sys.stderr)
        return None
    log.setup(p.log_file, cfg.daemon.log_level)
    return Daemon(p, cfg)


def run_daemon(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="forged", description="Run the forged daemon in the foreground.")
    ap.parse_args(argv)
    d = configured_daemon(paths.resolve())
    if d is None:
        return 1
    try:
        d.run_forever()
    except (LockHeld, RuntimeError, ValueError, OSError) as e:
        print(f"forged: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - one line, not a traceback; the log has the rest
        log.get("forged.daemon").exception("start_failed")
        print(f"forged: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0
