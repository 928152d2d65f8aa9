"""The miner's cache: per-blob analyses, per-commit diffs and teacher answers (SQLite), and
the sticky split."""

from __future__ import annotations

import json
import sqlite3
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any


class MineCache:
    """Everything here can be rebuilt, except the sticky held-out set (which only grows);
    teacher answers only by asking the teacher again."""

    def __init__(self, cache_dir: Path) -> None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(cache_dir / "mine.sqlite", timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(
            """
            CREATE TABLE IF NOT EXISTS analysis (key TEXT PRIMARY KEY, data BLOB NOT NULL);
            CREATE TABLE IF NOT EXISTS commit_diff (key TEXT PRIMARY KEY, data BLOB NOT NULL);
            CREATE TABLE IF NOT EXISTS teacher (key TEXT PRIMARY KEY, data BLOB NOT NULL);
            CREATE TABLE IF NOT EXISTS heldout (repo TEXT NOT NULL, path TEXT NOT NULL,
                                                PRIMARY KEY (repo, path));
            """
        )

    def close(self) -> None:
        self.db.close()

    def _get(self, table: str, keys: Iterable[str]) -> dict[str, Any]:
        keys = list(keys)
        out: dict[str, Any] = {}
        for i in range(0, len(keys), 900):
            part = keys[i:i + 900]
            q = f"SELECT key, data FROM {table} WHERE key IN ({','.join('?' * len(part))})"
            for k, v in self.db.execute(q, part):
                out[k] = json.loads(zlib.decompress(v))
        return out

    def _put(self, table: str, items: dict[str, Any]) -> None:
        with self.db:
            self.db.executemany(
                f"INSERT OR REPLACE INTO {table} (key, data) VALUES (?, ?)",
                [(k, zlib.compress(json.dumps(v, separators=(",", ":")).encode(), 1))
                 for k, v in items.items()])

    def has_analyses(self, keys: Iterable[str]) -> set[str]:
        """The keys present, without reading (or decompressing) their values."""
        keys = list(keys)
        out: set[str] = set()
        for i in range(0, len(keys), 900):
            part = keys[i:i + 900]
            q = f"SELECT key FROM analysis WHERE key IN ({','.join('?' * len(part))})"
            out.update(k for (k,) in self.db.execute(q, part))
        return out

    def get_analyses(self, keys: Iterable[str]) -> dict[str, Any]:
        return self._get("analysis", keys)

    def put_analyses(self, items: dict[str, Any]) -> None:
        self._put("analysis", items)

    def get_commits(self, keys: Iterable[str]) -> dict[str, Any]:
        return self._get("commit_diff", keys)

    def put_commits(self, items: dict[str, Any]) -> None:
        self._put("commit_diff", items)

    def get_teacher(self, keys: Iterable[str]) -> dict[str, Any]:
        """Teacher answers by :func:`forged.worker.mine.teacher.cache_key` (redacted replies)."""
        return self._get("teacher", keys)

    def put_teacher(self, items: dict[str, Any]) -> None:
        self._put("teacher", items)

    def heldout(self, repo: str) -> set[str]:
        return {p for (p,) in self.db.execute("SELECT path FROM heldout WHERE repo=?", (repo,))}

    def add_heldout(self, repo: str, paths: Iterable[str]) -> None:
        with self.db:
            self.db.executemany("INSERT OR IGNORE INTO heldout (repo, path) VALUES (?, ?)",
                                [(repo, p) for p in paths])
