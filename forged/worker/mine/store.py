"""The line store: each file's finished JSONL lines, kept between mines of a repo.

A re-mine after a small commit should cost what the commit changed, not the repo: the
lines of every unchanged file are referenced from here by the new dataset (hard links and
byte ranges, :mod:`forged.worker.mine.linked`) or copied in-kernel (``os.copy_file_range``),
never rebuilt or re-serialised.

Layout of ``cache_dir/lines/<repo+config hash>/``:

* ``meta.N.bin`` / ``mlx.N.bin`` — append-only, never rewritten in place (linked datasets
  hard-link them, see :mod:`forged.worker.mine.linked`): segments of JSONL lines (the ``train.jsonl``
  form with ``meta``, and the ``mlx/`` ``{"text"}`` form). A segment holds one file's
  lines (per-file kinds) or one file's RAFT lines, always with ``"changed": false``;
  the miner swaps in ``true`` for changed files.
* ``index.bin`` (+ ``index.log``: what later mines added) — segment key → :class:`Seg`
  (offsets, per-line hashes and stats), the per-path name checks, per-blob facts, and
  the previous mine's file list.
* ``last.bin`` — the previous mine's outcome (tree listing, file-part write plan, totals;
  see ``forged.worker.mine.remine``), valid only with the index state it names
  (``Index.stamp``): a re-mine from that commit patches it instead of walking the tree.
* ``symbols.sqlite`` — the repo's symbol table (RAFT's uniqueness checks), kept
  incrementally.

Only redacted text reaches the store (it is derived from redacted analyses). Everything
here can be rebuilt; a missing or unreadable store just makes the next mine cold.
"""

from __future__ import annotations

import fcntl
import marshal
import os
import shutil
import sqlite3
import struct
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, NamedTuple

from forged.worker.mine import KINDS

# 2: a seventh example kind (teacher) in the per-line stats; 3: Index.stamp, packed segments
STORE_VERSION = 3


class Seg(NamedTuple):
    meta_off: int
    meta_len: int
    mlx_off: int
    mlx_len: int
    n: int  # lines
    hashes: bytes  # array('Q') of per-line record hashes (dedup)
    stats: bytes  # array('I'): kind index, chars, non-whitespace bytes per line
    kinds: tuple[int, ...]  # lines per kind index
    chars: int
    nws: int


# A segment in the index: this header (offsets, lines, lines per kind, chars, non-ws bytes),
# then the per-line hashes and stats, as one bytes object. marshal loads 10,000 of these
# ~4× faster than the same as tuples of ints and bytes (the index load is on every mine).
_K = len(KINDS)
_SEG = struct.Struct(f"<4QI{_K}I2Q")


def _pack(s: Seg) -> bytes:
    return _SEG.pack(*s[:5], *s.kinds, s.chars, s.nws) + s.hashes + s.stats


def _unpack(b: bytes) -> Seg:
    h = _SEG.unpack_from(b)
    end = _SEG.size + 8 * h[4]
    # tuple.__new__: a NamedTuple's own __new__ costs ~3× as much (one call per file).
    return tuple.__new__(Seg, (h[0], h[1], h[2], h[3], h[4], b[_SEG.size:end], b[end:],
                               h[5:5 + _K], h[5 + _K], h[6 + _K]))


@dataclass
class Index:
    version: int = STORE_VERSION
    segs: dict[str, bytes] = field(default_factory=dict)  # key → Seg, packed (_pack)
    paths: dict[str, tuple[str | None, str, float, int]] = field(default_factory=dict)
    info: dict[str, tuple] = field(default_factory=dict)  # analysis key → facts
    files: dict[str, str] = field(default_factory=dict)  # path → analysis key in symbols.sqlite
    gen: int = 0  # data files generation (compaction writes the next one)
    stamp: str = ""  # new on every save: what ``last.bin`` must name to be current


class LineStore:
    """One repo+config's store; holds an exclusive lock while open."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self._lock = open(root / "lock", "w")  # noqa: SIM115 (held until close)
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        _drop_siblings(root)
        self.index = Index()
        # The index is a base (index.bin) plus a log of what later mines added (index.log):
        # a re-mine then writes kilobytes, not the whole index. marshal: plain dicts and
        # tuples load ~4× faster than pickle.
        self._base: tuple[str, int, int, int] | None = None
        # Index.files changes since the base (what index.log records), kept as they are made
        # (note_files): comparing the whole file list at every save cost O(files).
        self._files_delta: dict[str, str | None] = {}
        try:
            d = marshal.loads((root / "index.bin").read_bytes())
            token = d.pop("token")
            if d.get("version") == STORE_VERSION:
                self.index = Index(**d)
                self._base = (token, len(self.index.segs), len(self.index.paths),
                              len(self.index.info))
                self._apply_log(token)
        except (OSError, EOFError, ValueError, TypeError, AttributeError, KeyError):
            self.index, self._base, self._files_delta = Index(), None, {}
        if not self.index.segs:  # nothing to keep: start the data files afresh
            self.index, self._base, self._files_delta = Index(), None, {}
            for name in self._names(0):
                _fresh(root / name)
        self.meta, self.mlx = self._open(self.index.gen)
        self.dirty = False
        self._old: tuple[Any, Any, int] | None = None
        self._compacted = False
        self._sym: sqlite3.Connection | None = None
        # What close() saves as last.bin (None: remove it, no mine to patch next time).
        self.last: dict[str, Any] | None = None

    def previous(self) -> dict[str, Any] | None:
        """The last mine's ``last.bin``, when it was saved with the index now loaded."""
        try:
            d = marshal.loads((self.root / "last.bin").read_bytes())
        except (OSError, EOFError, ValueError, TypeError):
            return None
        ok = isinstance(d, dict) and self.index.stamp and d.get("stamp") == self.index.stamp
        return d if ok else None

    def _apply_log(self, token: str) -> None:
        try:
            log = marshal.loads((self.root / "index.log").read_bytes())
        except (OSError, EOFError, ValueError, TypeError):
            return
        if log.get("token") != token:
            return
        idx = self.index
        idx.stamp = log["stamp"]
        idx.segs.update(log["segs"])
        idx.paths.update(log["paths"])
        idx.info.update(log["info"])
        for p, a in log["files"].items():
            if a is None:
                idx.files.pop(p, None)
            else:
                idx.files[p] = a
        self._files_delta = dict(log["files"])

    def note_files(self, gone: Iterable[str], new: dict[str, str]) -> None:
        """``Index.files``: drop ``gone`` paths, set ``new`` ones (path → analysis key)."""
        files = self.index.files
        for p in gone:
            if files.pop(p, None) is not None:
                self._files_delta[p] = None
                self.dirty = True
        if new:
            files.update(new)
            self._files_delta.update(new)
            self.dirty = True

    def _save_index(self) -> None:
        idx, base = self.index, self._base
        idx.stamp = os.urandom(8).hex()
        if base is not None and not self._compacted:
            token, nseg, npath, ninfo = base
            delta = {
                "token": token,
                "stamp": idx.stamp,
                "segs": dict(islice(idx.segs.items(), nseg, None)),
                "paths": dict(islice(idx.paths.items(), npath, None)),
                "info": dict(islice(idx.info.items(), ninfo, None)),
                "files": self._files_delta,
            }
            if (len(delta["segs"]) + len(delta["paths"]) + len(delta["files"])
                    <= max(256, nseg // 8)):
                _write_atomic(self.root / "index.log", marshal.dumps(delta, 4))
                return
        _write_atomic(self.root / "index.bin",
                      marshal.dumps({**vars(idx), "token": os.urandom(8).hex()}, 4))
        (self.root / "index.log").unlink(missing_ok=True)

    # ------------------------------------------------------------ segments

    def add(self, key: str, meta: bytes, mlx: bytes, hashes: array, stats: array,
            kinds: tuple[int, ...], chars: int, nws: int) -> Seg:
        moff = self.meta.seek(0, os.SEEK_END)
        self.meta.write(meta)
        xoff = self.mlx.seek(0, os.SEEK_END)
        self.mlx.write(mlx)
        seg = Seg(moff, len(meta), xoff, len(mlx), len(hashes), hashes.tobytes(), stats.tobytes(),
                  kinds, chars, nws)
        self.index.segs[key] = _pack(seg)
        self.dirty = True
        return seg

    def seg(self, key: str) -> Seg | None:
        b = self.index.segs.get(key)
        return None if b is None else _unpack(b)

    def flush(self) -> None:
        self.meta.flush()
        self.mlx.flush()

    def read_meta(self, seg: Seg) -> bytes:
        return os.pread(self.meta.fileno(), seg.meta_len, seg.meta_off)

    def read_mlx(self, seg: Seg) -> bytes:
        return os.pread(self.mlx.fileno(), seg.mlx_len, seg.mlx_off)

    # -------------------------------------------------------------- symbols

    @property
    def sym(self) -> sqlite3.Connection:
        if self._sym is None:
            db = sqlite3.connect(self.root / "symbols.sqlite", timeout=30)
            db.executescript(
                """
                PRAGMA journal_mode=WAL;
                PRAGMA synchronous=NORMAL;
                CREATE TABLE IF NOT EXISTS q (path TEXT NOT NULL, q TEXT NOT NULL);
                CREATE TABLE IF NOT EXISTS n (path TEXT NOT NULL, n TEXT NOT NULL);
                CREATE TABLE IF NOT EXISTS c (path TEXT NOT NULL, callee TEXT NOT NULL,
                                              caller TEXT NOT NULL);
                CREATE TABLE IF NOT EXISTS spec (path TEXT PRIMARY KEY, data TEXT NOT NULL);
                CREATE TABLE IF NOT EXISTS qc (key TEXT PRIMARY KEY, k INTEGER NOT NULL);
                CREATE TABLE IF NOT EXISTS nc (key TEXT PRIMARY KEY, k INTEGER NOT NULL);
                CREATE TABLE IF NOT EXISTS cc (key TEXT PRIMARY KEY, k INTEGER NOT NULL);
                CREATE INDEX IF NOT EXISTS q_q ON q (q);
                CREATE INDEX IF NOT EXISTS q_path ON q (path);
                CREATE INDEX IF NOT EXISTS n_n ON n (n);
                CREATE INDEX IF NOT EXISTS n_path ON n (path);
                CREATE INDEX IF NOT EXISTS c_callee ON c (callee);
                CREATE INDEX IF NOT EXISTS c_path ON c (path);
                """)
            if not self.index.files:  # the index is new: the table must start empty too
                with db:
                    for t in ("q", "n", "c", "spec", "qc", "nc", "cc"):
                        db.execute(f"DELETE FROM {t}")
            self._sym = db
        return self._sym

    # ----------------------------------------------------------- lifecycle

    @staticmethod
    def _names(gen: int) -> tuple[str, str]:
        return f"meta.{gen}.bin", f"mlx.{gen}.bin"

    def _open(self, gen: int) -> tuple[Any, Any]:
        m, x = self._names(gen)
        return open(self.root / m, "a+b"), open(self.root / x, "a+b")  # noqa: SIM115

    def compact(self, live: list[str]) -> None:
        """Rewrite the data files with only ``live`` segments, in that order (contiguous).

        The new files are a new generation: the old ones stay valid until the index that
        names the new ones is saved.
        """
        self.flush()
        new: dict[str, bytes] = {}
        gen = self.index.gen + 1
        for name in self._names(gen):
            _fresh(self.root / name)
        meta, mlx = self._open(gen)
        moff = xoff = 0
        for key in live:
            if key in new:
                continue
            s = _unpack(self.index.segs[key])
            copy_range(self.meta.fileno(), s.meta_off, s.meta_len, meta.fileno())
            copy_range(self.mlx.fileno(), s.mlx_off, s.mlx_len, mlx.fileno())
            new[key] = _pack(s._replace(meta_off=moff, mlx_off=xoff))
            moff += s.meta_len
            xoff += s.mlx_len
        self._old = (self.meta, self.mlx, self.index.gen)
        self.meta, self.mlx = meta, mlx
        self.index.segs = new
        self.index.gen = gen
        self._compacted = True
        self.dirty = True

    def data_files(self) -> tuple[Path, Path]:
        """The current ``meta``/``mlx`` data files (what a linked dataset hard-links)."""
        m, x = self._names(self.index.gen)
        return self.root / m, self.root / x

    def size(self) -> int:
        self.flush()
        return os.fstat(self.meta.fileno()).st_size + os.fstat(self.mlx.fileno()).st_size

    def _save_last(self) -> None:
        path = self.root / "last.bin"
        if self.last is None or not self.index.stamp:
            path.unlink(missing_ok=True)
            return
        # No fsync: a torn or lost last.bin only makes the next re-mine take the full path
        # (it is checked against the fsynced index's stamp and read defensively).
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(marshal.dumps({**self.last, "stamp": self.index.stamp}, 4))
        os.replace(tmp, path)

    def close(self, save: bool = True) -> None:
        try:
            if save and self.dirty:
                self.flush()
                os.fsync(self.meta.fileno())
                os.fsync(self.mlx.fileno())
                self._save_index()
                if self._old is not None:  # the saved index names the new generation
                    for name in self._names(self._old[2]):
                        (self.root / name).unlink(missing_ok=True)
            if save:
                self._save_last()
        finally:
            # Every handle is closed and the lock released even when one close fails: a
            # full disk fails the flush inside close(). Unsaved appends are garbage either
            # way (no saved index names them), so that error is only raised when saving.
            files = [self.meta, self.mlx, *(self._old[:2] if self._old is not None else ())]
            errors: list[BaseException] = []
            for f in [*files, self._sym, self._lock]:
                try:
                    if f is not None:
                        f.close()
                except (OSError, sqlite3.Error) as e:
                    errors.append(e)
            if errors and save:
                raise errors[0]


def _drop_siblings(root: Path) -> None:
    """A store is ``<repo hash>-<config hash>``: drop this repo's stores for other configs
    (a config change would otherwise leave a dataset-sized store behind), unless in use."""
    repo = root.name.split("-", 1)[0] + "-"
    for other in root.parent.glob(repo + "*"):
        if other == root or not other.is_dir():
            continue
        try:
            with open(other / "lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(other, ignore_errors=True)
        except OSError:
            continue


def _fresh(path: Path) -> None:
    """An empty data file under a new inode: never truncate one in place, because linked
    datasets (``forged.worker.mine.linked``) may hold hard links to it."""
    path.unlink(missing_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def copy_range(src: int, off: int, n: int, dst: int) -> None:
    """Append ``n`` bytes of ``src`` from ``off`` to ``dst`` (in-kernel where possible)."""
    while n > 0:
        try:
            done = os.copy_file_range(src, dst, n, off)
        except OSError:
            done = 0
        if done <= 0:  # no copy_file_range here (or across filesystems): plain read/write
            data = os.pread(src, min(n, 1 << 24), off)
            if not data:
                raise OSError("line store truncated")
            done = os.write(dst, data)
        off += done
        n -= done

