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
from collections.abc import Iterator
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
        state TEXT NOT NULL,                          -- candidate, published, live, retired, deleted
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
