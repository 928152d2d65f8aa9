"""The one state store: SQLite in WAL mode.

Every write that must survive ``kill -9`` is one transaction. The schema is versioned
with ``PRAGMA user_version``; each entry of :data:`MIGRATIONS` moves it one step.
One connection is shared by the daemon's threads behind a lock: SQLite serialises
writers anyway and the daemon's write rate is tiny.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MIGRATIONS: list[str] = [
    # 1: the first tables
    """
    CREATE TABLE repos (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        path TEXT NOT NULL,
        branch TEXT NOT NULL DEFAULT '',
        source TEXT NOT NULL DEFAULT 'cli',          -- 'cli' (forgectl) or 'config'
        added_at REAL NOT NULL,
        missing INTEGER NOT NULL DEFAULT 0,
        cursor_commit TEXT,                           -- commit the live model was trained on
        cursor_at REAL,                               -- when that model went live
        live_version INTEGER,
        accounting TEXT,                              -- JSON of the last accounting pass
        accounted_at REAL
    );
    CREATE TABLE cycles (
        id INTEGER PRIMARY KEY,
        repo_id INTEGER NOT NULL REFERENCES repos(id) ON DELETE CASCADE,
        stage TEXT NOT NULL,                          -- due, mining, training, judging, ...
        resume_stage TEXT,                            -- the stage a paused/failed cycle goes back to
        forced INTEGER NOT NULL DEFAULT 0,
        base_commit TEXT,
        head_commit TEXT,
        version INTEGER,
        reason TEXT,
        metrics TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        retry_at REAL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        finished_at REAL
    );
    CREATE INDEX cycles_repo ON cycles(repo_id, id);
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY,
        cycle_id INTEGER NOT NULL REFERENCES cycles(id) ON DELETE CASCADE,
        stage TEXT NOT NULL,
        pid INTEGER,
        state TEXT NOT NULL,                          -- running, done, failed, stopped
        progress TEXT,
        exit_code INTEGER,
        started_at REAL NOT NULL,
        finished_at REAL
    );
    CREATE TABLE model_versions (
        id INTEGER PRIMARY KEY,
        repo_id INTEGER NOT NULL REFERENCES repos(id) ON DELETE CASCADE,
        version INTEGER NOT NULL,
        cycle_id INTEGER REFERENCES cycles(id) ON DELETE SET NULL,
        tag TEXT NOT NULL,
        adapter_path TEXT,
        train_commit TEXT,
        state TEXT NOT NULL,                          -- candidate, published, live, rejected, deleted
        metrics TEXT,
        created_at REAL NOT NULL,
        UNIQUE (repo_id, version)
    );
    CREATE TABLE approvals (
        id INTEGER PRIMARY KEY,
        repo_id INTEGER NOT NULL REFERENCES repos(id) ON DELETE CASCADE,
        cycle_id INTEGER NOT NULL REFERENCES cycles(id) ON DELETE CASCADE,
        version INTEGER NOT NULL,
        state TEXT NOT NULL,                          -- pending, approved, rejected, superseded
        via TEXT,
        requested_at REAL NOT NULL,
        answered_at REAL
    );
    CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        ts REAL NOT NULL,
        repo TEXT,
        cycle_id INTEGER,
        kind TEXT NOT NULL,
        data TEXT
    );
    """,
]


class State:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self.migrate()

    # -- plumbing -------------------------------------------------------------
    @property
    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def migrate(self) -> None:
        with self._lock:
            current = self.schema_version
            if current > len(MIGRATIONS):
                raise RuntimeError(
                    f"{self.path}: schema version {current} is newer than this forged "
                    f"understands ({len(MIGRATIONS)}); upgrade forged"
                )
            for version in range(current, len(MIGRATIONS)):
                # executescript commits first; the version bump rides in the same script
                # so a crash never leaves tables without their version.
                self._db.executescript(
                    "BEGIN;\n" + MIGRATIONS[version] + f"\nPRAGMA user_version={version + 1};\nCOMMIT;"
                )

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE … COMMIT)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            else:
                self._db.execute("COMMIT")

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def one(self, sql: str, args: tuple[Any, ...] = ()) -> sqlite3.Row | None:
        rows = self.query(sql, args)
        return rows[0] if rows else None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- repos ----------------------------------------------------------------
    def add_repo(self, name: str, path: str, branch: str = "", source: str = "cli") -> int:
        with self.tx() as db:
            cur = db.execute(
                "INSERT INTO repos(name, path, branch, source, added_at) VALUES (?,?,?,?,?)",
                (name, path, branch, source, time.time()),
            )
            self._event(db, "repo_added", repo=name, data={"path": path})
            return int(cur.lastrowid or 0)

    def remove_repo(self, name: str) -> bool:
        with self.tx() as db:
            cur = db.execute("DELETE FROM repos WHERE name=?", (name,))
            if cur.rowcount:
                self._event(db, "repo_removed", repo=name)
            return cur.rowcount > 0

    def repos(self) -> list[sqlite3.Row]:
        return self.query("SELECT * FROM repos ORDER BY name")

    def repo(self, name: str) -> sqlite3.Row | None:
        return self.one("SELECT * FROM repos WHERE name=?", (name,))

    def update_repo(self, name: str, **fields: Any) -> None:
        if not fields:
            return
        cols = ", ".join(f"{k}=?" for k in fields)
        vals = [json.dumps(v) if isinstance(v, dict | list) else v for v in fields.values()]
        with self.tx() as db:
            db.execute(f"UPDATE repos SET {cols} WHERE name=?", (*vals, name))

    def repo_by_id(self, repo_id: int) -> sqlite3.Row | None:
        return self.one("SELECT * FROM repos WHERE id=?", (repo_id,))

    # -- cycles ---------------------------------------------------------------
    def cycle(self, cycle_id: int) -> sqlite3.Row | None:
        return self.one("SELECT * FROM cycles WHERE id=?", (cycle_id,))

    def open_cycle(self, repo_id: int, include_awaiting: bool = False) -> sqlite3.Row | None:
        """The repo's unfinished cycle. One awaiting approval does not block a newer one."""
        sql = "SELECT * FROM cycles WHERE repo_id=? AND finished_at IS NULL"
        if not include_awaiting:
            sql += " AND stage != 'awaiting_approval'"
        return self.one(sql + " ORDER BY id DESC LIMIT 1", (repo_id,))

    def awaiting_cycle(self, repo_id: int) -> sqlite3.Row | None:
        return self.one("SELECT * FROM cycles WHERE repo_id=? AND stage='awaiting_approval' AND "
                        "finished_at IS NULL ORDER BY id DESC LIMIT 1", (repo_id,))

    def other_awaiting_cycles(self, repo_id: int, cycle_id: int) -> list[sqlite3.Row]:
        return self.query("SELECT * FROM cycles WHERE repo_id=? AND stage='awaiting_approval' "
                          "AND finished_at IS NULL AND id != ?", (repo_id, cycle_id))

    def last_cycle(self, repo_id: int) -> sqlite3.Row | None:
        return self.one("SELECT * FROM cycles WHERE repo_id=? ORDER BY id DESC LIMIT 1", (repo_id,))

    def recent_cycles(self, repo_id: int, limit: int = 10) -> list[sqlite3.Row]:
        return self.query("SELECT * FROM cycles WHERE repo_id=? ORDER BY id DESC LIMIT ?", (repo_id, limit))

    def unfinished_cycles(self) -> list[sqlite3.Row]:
        """Every unfinished cycle with its repo's name and missing flag, oldest first."""
        return self.query(
            "SELECT c.*, r.name AS repo_name, r.missing FROM cycles c JOIN repos r ON r.id=c.repo_id "
            "WHERE c.finished_at IS NULL ORDER BY c.created_at, c.id")

    def cycles_in(self, stages: tuple[str, ...], due_by: float) -> list[sqlite3.Row]:
        """Unfinished cycles in one of ``stages`` whose retry time (if any) has come."""
        marks = ",".join("?" * len(stages))
        return self.query(f"SELECT * FROM cycles WHERE finished_at IS NULL AND stage IN ({marks})"
                          " AND (retry_at IS NULL OR retry_at <= ?) ORDER BY id", (*stages, due_by))

    def new_cycle(self, repo: sqlite3.Row, stage: str, head: str, forced: bool, reason: str) -> int:
        now = time.time()
        with self.tx() as db:
            cur = db.execute(
                "INSERT INTO cycles(repo_id, stage, forced, base_commit, head_commit, reason, created_at, updated_at)"
                " VALUES (?,?,?,?,?,?,?,?)",
                (repo["id"], stage, int(forced), repo["cursor_commit"], head, reason, now, now),
            )
            cid = int(cur.lastrowid or 0)
            self._event(db, "stage", repo["name"], cid, {"stage": stage, "reason": reason})
        return cid

    def set_stage(self, cycle_id: int, stage: str, *, reason: str | None = None, finished: bool = False,
                  **fields: Any) -> None:
        """Move a cycle to ``stage`` (other columns in ``fields``) and record the event."""
        now = time.time()
        sets = {"stage": stage, "updated_at": now, **fields}
        if reason is not None:
            sets["reason"] = reason
        if finished:
            sets["finished_at"] = now
        cols = ", ".join(f"{k}=?" for k in sets)
        with self.tx() as db:
            db.execute(f"UPDATE cycles SET {cols} WHERE id=?", (*sets.values(), cycle_id))
            repo = db.execute("SELECT r.name FROM cycles c JOIN repos r ON r.id=c.repo_id WHERE c.id=?",
                              (cycle_id,)).fetchone()
            self._event(db, "stage", repo["name"] if repo else None, cycle_id, {"stage": stage, "reason": reason})

    def merge_metrics(self, cycle_id: int, data: dict[str, Any]) -> None:
        with self.tx() as db:
            row = db.execute("SELECT metrics FROM cycles WHERE id=?", (cycle_id,)).fetchone()
            metrics = json.loads(row["metrics"] or "{}") if row else {}
            metrics.update(data)
            db.execute("UPDATE cycles SET metrics=? WHERE id=?", (json.dumps(metrics, default=str), cycle_id))

    # -- jobs (one worker run each) ---------------------------------------------
    def running_jobs(self) -> list[sqlite3.Row]:
        return self.query("SELECT * FROM jobs WHERE state='running'")

    def interrupt_job(self, job_id: int) -> None:
        self.query("UPDATE jobs SET state='interrupted', finished_at=? WHERE id=?", (time.time(), job_id))

    def start_job(self, repo: str, cycle_id: int, worker_stage: str, stage: str) -> int:
        """Record a worker starting: its cycle enters ``stage`` (resumed there after a crash)."""
        now = time.time()
        with self.tx() as db:
            db.execute("UPDATE cycles SET stage=?, resume_stage=?, reason=NULL, updated_at=? WHERE id=?",
                       (stage, stage, now, cycle_id))
            cur = db.execute("INSERT INTO jobs(cycle_id, stage, state, started_at) VALUES (?,?,?,?)",
                             (cycle_id, worker_stage, "running", now))
            self._event(db, "stage", repo, cycle_id, {"stage": stage})
            return int(cur.lastrowid or 0)

    def set_job_pid(self, job_id: int, pid: int) -> None:
        self.query("UPDATE jobs SET pid=? WHERE id=?", (pid, job_id))

    def job_progress(self, job_id: int, repo: str, cycle_id: int, stage: str, msg: dict[str, Any]) -> None:
        with self.tx() as db:
            db.execute("UPDATE jobs SET progress=? WHERE id=?", (json.dumps(msg), job_id))
            self._event(db, "progress", repo, cycle_id, {"stage": stage, **msg})

    def finish_job(self, job_id: int, state: str, exit_code: int, progress: dict[str, Any]) -> None:
        self.query("UPDATE jobs SET state=?, exit_code=?, finished_at=?, progress=? WHERE id=?",
                   (state, exit_code, time.time(), json.dumps(progress), job_id))

    # -- model versions and approvals ---------------------------------------------
    def live_version(self, repo_id: int) -> sqlite3.Row | None:
        return self.one("SELECT * FROM model_versions WHERE repo_id=? AND state='live'", (repo_id,))

    def model_version(self, repo_id: int, version: int) -> sqlite3.Row | None:
        return self.one("SELECT * FROM model_versions WHERE repo_id=? AND version=?", (repo_id, version))

    def versions(self, repo_id: int) -> list[dict[str, Any]]:
        """Every version, newest first, with what was created in Ollama (kind, quantization, size)
        and its forward gain, once a later cycle measured it."""
        out = []
        for v in self.query("SELECT version, tag, state, train_commit, created_at, metrics FROM model_versions "
                            "WHERE repo_id=? ORDER BY version DESC", (repo_id,)):
            metrics = json.loads(v["metrics"] or "{}") or {}
            made = metrics.get("published") or {}
            out.append({**{k: v[k] for k in ("version", "tag", "state", "train_commit", "created_at")},
                        "kind": made.get("kind"), "quantization": made.get("quantization"),
                        "size": made.get("size"), "forward": metrics.get("forward_gain")})
        return out

    def record_published(self, repo_id: int, version: int, made: dict[str, Any]) -> None:
        """Keep what was created (kind, quantization, size) with the version's metrics."""
        with self.tx() as db:
            self._merge_version_metrics(db, repo_id, version, "published", made)

    def record_forward(self, cycle_id: int, version: int, forward: dict[str, Any]) -> None:
        """Keep a version's forward gain, measured by a later cycle of its repo, with its metrics."""
        with self.tx() as db:
            row = db.execute("SELECT repo_id FROM cycles WHERE id=?", (cycle_id,)).fetchone()
            if row is not None:
                # not "forward": a version's metrics start as a copy of its cycle's, whose
                # "forward" is the gain of the version live before it
                self._merge_version_metrics(db, int(row["repo_id"]), version, "forward_gain",
                                            {**forward, "cycle_id": cycle_id})

    @staticmethod
    def _merge_version_metrics(db: sqlite3.Connection, repo_id: int, version: int, key: str,
                               value: dict[str, Any]) -> None:
        row = db.execute("SELECT metrics FROM model_versions WHERE repo_id=? AND version=?",
                         (repo_id, version)).fetchone()
        metrics = json.loads(row["metrics"] or "{}") if row else {}
        metrics[key] = value
        db.execute("UPDATE model_versions SET metrics=? WHERE repo_id=? AND version=?",
                   (json.dumps(metrics, default=str), repo_id, version))

    def published_size(self, repo_id: int, versions: list[int]) -> int:
        """Bytes the given versions took in Ollama, as recorded when they were created."""
        return sum(int(v["size"] or 0) for v in self.versions(repo_id) if v["version"] in versions)

    def count_published(self, repo_id: int) -> int:
        """Versions that reached Ollama and are still there (live or published)."""
        row = self.one("SELECT COUNT(*) AS n FROM model_versions WHERE repo_id=? AND state IN "
                       "('live','published')", (repo_id,))
        return int(row["n"]) if row else 0

    def published_versions(self, repo_id: int) -> list[int]:
        """Live and published versions, newest first."""
        rows = self.query("SELECT version FROM model_versions WHERE repo_id=? AND state IN "
                          "('live','published') ORDER BY version DESC", (repo_id,))
        return [int(r["version"]) for r in rows]

    def previous_published(self, repo_id: int, below: int) -> int | None:
        row = self.one("SELECT version FROM model_versions WHERE repo_id=? AND state='published' "
                       "AND version < ? ORDER BY version DESC LIMIT 1", (repo_id, below))
        return int(row["version"]) if row else None

    def add_candidate(self, cycle: sqlite3.Row, tag: Callable[[int], str], adapter_path: str) -> int:
        """Number the cycle's model (one more than the repo's newest) and record it."""
        with self.tx() as db:
            row = db.execute("SELECT MAX(version) AS v FROM model_versions WHERE repo_id=?",
                             (cycle["repo_id"],)).fetchone()
            version = int(row["v"] or 0) + 1 if row else 1
            db.execute("UPDATE cycles SET version=? WHERE id=?", (version, cycle["id"]))
            db.execute(
                "INSERT INTO model_versions(repo_id, version, cycle_id, tag, adapter_path, train_commit, state,"
                " metrics, created_at) VALUES (?,?,?,?,?,?,?,?,?)",
                (cycle["repo_id"], version, cycle["id"], tag(version), adapter_path,
                 cycle["head_commit"], "candidate", cycle["metrics"], time.time()))
        return version

    def set_version_state(self, repo_id: int, version: int, state: str) -> None:
        self.query("UPDATE model_versions SET state=? WHERE repo_id=? AND version=?", (state, repo_id, version))

    def mark_deleted(self, repo_id: int, keep: list[int]) -> None:
        """Every version but the live one and ``keep`` is gone from Ollama."""
        self.query(f"UPDATE model_versions SET state='deleted' WHERE repo_id=? AND state!='live' AND version "
                   f"NOT IN ({','.join('?' * len(keep))})", (repo_id, *keep))

    def _swap_live(self, db: sqlite3.Connection, repo_id: int, version: int, cursor_commit: str | None) -> None:
        """The one live-version swap: the old live version goes back to published."""
        db.execute("UPDATE model_versions SET state='published' WHERE repo_id=? AND state='live'", (repo_id,))
        db.execute("UPDATE model_versions SET state='live' WHERE repo_id=? AND version=?", (repo_id, version))
        db.execute("UPDATE repos SET live_version=?, cursor_commit=?, cursor_at=? WHERE id=?",
                   (version, cursor_commit, time.time(), repo_id))

    def promote(self, repo_id: int, version: int, cursor_commit: str | None) -> None:
        """``version`` is live; the cursor moves to the commit it was trained on."""
        with self.tx() as db:
            self._swap_live(db, repo_id, version, cursor_commit)

    def rollback(self, repo: sqlite3.Row, target: sqlite3.Row) -> None:
        """An earlier published version is live again, and the cursor back at its commit."""
        version = int(target["version"])
        with self.tx() as db:
            self._swap_live(db, int(repo["id"]), version, target["train_commit"])
            self._event(db, "rollback", repo["name"], None, {"version": version, "from": repo["live_version"]})

    def pending_approval(self, repo_id: int) -> sqlite3.Row | None:
        return self.one("SELECT * FROM approvals WHERE repo_id=? AND state='pending' ORDER BY id DESC LIMIT 1",
                        (repo_id,))

    def request_approval(self, repo_id: int, cycle_id: int, version: int) -> None:
        self.query("INSERT INTO approvals(repo_id, cycle_id, version, state, requested_at) VALUES (?,?,?,?,?)",
                   (repo_id, cycle_id, version, "pending", time.time()))

    def answer_approval(self, cycle_id: int, state: str, via: str | None = None) -> None:
        """The cycle's pending approval is answered: approved, rejected or superseded."""
        self.query("UPDATE approvals SET state=?, via=?, answered_at=? WHERE cycle_id=? AND state='pending'",
                   (state, via, time.time(), cycle_id))

    def reject(self, cycle: sqlite3.Row, via: str) -> None:
        with self.tx() as db:
            db.execute("UPDATE approvals SET state='rejected', via=?, answered_at=? WHERE cycle_id=? "
                       "AND state='pending'", (via, time.time(), cycle["id"]))
            db.execute("UPDATE model_versions SET state='rejected' WHERE repo_id=? AND version=?",
                       (cycle["repo_id"], cycle["version"]))

    # -- events ---------------------------------------------------------------
    def _event(
        self, db: sqlite3.Connection, kind: str, repo: str | None = None,
        cycle_id: int | None = None, data: dict[str, Any] | None = None,
    ) -> None:
        db.execute(
            "INSERT INTO events(ts, repo, cycle_id, kind, data) VALUES (?,?,?,?,?)",
            (time.time(), repo, cycle_id, kind, json.dumps(data or {})),
        )

    def event(self, kind: str, repo: str | None = None, cycle_id: int | None = None,
              data: dict[str, Any] | None = None) -> None:
        with self.tx() as db:
            self._event(db, kind, repo, cycle_id, data)

    def events_after(self, after_id: int, limit: int = 500) -> list[dict[str, Any]]:
        rows = self.query("SELECT * FROM events WHERE id>? ORDER BY id LIMIT ?", (after_id, limit))
        return [
            {"id": r["id"], "ts": r["ts"], "repo": r["repo"], "cycle_id": r["cycle_id"],
             "kind": r["kind"], "data": json.loads(r["data"] or "{}")}
            for r in rows
        ]

    def last_event_id(self) -> int:
        row = self.one("SELECT MAX(id) AS m FROM events")
        return int(row["m"] or 0) if row else 0
