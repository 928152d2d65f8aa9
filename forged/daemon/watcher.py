"""Watch one repo and call back, debounced, when something that git would count changed.

One watchdog observer per repo root (inotify on Linux, FSEvents on macOS), recursive.
What counts:

- inside the git dir: ``HEAD``, ``refs/**``, ``packed-refs``, ``index``, ``rebase-merge/**``,
  ``rebase-apply/**``, ``MERGE_HEAD``, ``CHERRY_PICK_HEAD``, ``REVERT_HEAD`` — commits,
  checkouts, rebases. ``objects/``, ``logs/`` and every ``*.lock`` are noise.
- in the work tree: any path git does not ignore. git itself decides (``git check-ignore
  --stdin``, one process per batch), so ``.gitignore`` files at every level,
  ``.git/info/exclude`` and ``core.excludesFile`` all apply exactly as git applies them.

Events only stamp times; a single thread per watcher classifies them in batches and
fires ``on_settled`` once things have been quiet for ``settle`` seconds, or ``max_wait``
seconds after the first unsettled change, whichever comes first. While git is in the
middle of something (``index.lock``, a rebase, a merge) the call waits until it clears,
as Watchman does. Events can be lost (a full inotify queue, FSEvents' dropped-events
flag that watchdog ignores): the daemon also reconciles from git on a timer, so a lost
event only delays accounting.

Bound: in a storm that lasts T seconds, ``on_settled`` fires at most ``T / max_wait + 1``
times (plus one per return of a missing repo).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from forged.daemon.accounting import RepoError, check_work_tree, git_env, operation_in_progress

log = logging.getLogger(__name__)
# watchdog warns when a directory created and removed in a storm is re-added to its own
# bookkeeping; it recovers by itself and the message only fills the daemon's log.
warnings.filterwarnings("ignore", message=r"Callback with id .* already exists", category=RuntimeWarning)

# Create/delete/move everywhere; content changes as close-after-write on Linux (one
# event per save instead of one per write(2)); FSEvents reports no close, only modify.
# Opens and reads are left out of the inotify mask, so git reading the tree is silent.
_EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent, DirCreatedEvent, FileDeletedEvent, DirDeletedEvent,
    FileMovedEvent, DirMovedEvent, FileClosedEvent,
]
if sys.platform != "linux":
    _EVENTS.append(FileModifiedEvent)

_GIT_FILES = frozenset({"HEAD", "packed-refs", "index", "MERGE_HEAD", "CHERRY_PICK_HEAD", "REVERT_HEAD"})
_GIT_TREES = ("refs", "rebase-merge", "rebase-apply")

BATCH_SECONDS = 0.25  # classify pending work-tree paths at most this often
MAX_PENDING = 50_000  # beyond this, stop remembering paths: treat the batch as a change
PRESENCE_POLL = 5.0  # how often to check that the repo is still there


def git_path_matters(rel: str) -> bool:
    """Whether a path relative to a git dir records a commit, checkout or rebase."""
    parts = rel.split("/")
    if parts[-1].endswith(".lock"):
        return False
    if len(parts) == 1:
        return parts[0] in _GIT_FILES
    # A linked worktree's own HEAD/index live under worktrees/<name>/ of the common dir.
    if parts[0] == "worktrees" and len(parts) >= 3:
        return git_path_matters("/".join(parts[2:]))
    return parts[0] in _GIT_TREES


def check_ignored(root: Path, rels: list[str]) -> set[str] | None:
    """The subset of ``rels`` (repo-relative, '/'-separated; a trailing '/' marks a
    directory) that git ignores, or None when git could not say."""
    if not rels:
        return set()
    try:
        p = subprocess.run(
            ["git", "--no-optional-locks", "check-ignore", "--stdin", "-z"],
            cwd=root, env=git_env(), input="\0".join(rels).encode(errors="surrogateescape") + b"\0",
            capture_output=True, timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("git check-ignore failed in %s: %s", root, e)
        return None
    if p.returncode not in (0, 1):
        log.warning("git check-ignore failed in %s: %s", root, p.stderr.decode(errors="replace").strip())
        return None
    return {s for s in p.stdout.decode(errors="surrogateescape").split("\0") if s}


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: RepoWatcher) -> None:
        self.w = watcher

    def dispatch(self, event: FileSystemEvent) -> None:
        t = time.monotonic()
        self.w._raw(os.fsdecode(event.src_path), event.is_directory, t)
        dest = getattr(event, "dest_path", "")
        if dest:
            self.w._raw(os.fsdecode(dest), event.is_directory, t)


class RepoWatcher:
    """Watches one repo; calls ``on_settled()`` (from its own thread) after changes settle.

    ``on_presence(False)`` is called when the repo disappears (deleted, moved, its ``.git``
    gone): the file watch stops and the path is polled; ``on_presence(True)`` and one
    ``on_settled()`` follow when it returns. Nothing is ever deleted.
    """

    def __init__(
        self,
        repo: Path,
        on_settled: Callable[[], None],
        *,
        settle: float = 2.0,
        max_wait: float = 30.0,
        on_presence: Callable[[bool], None] | None = None,
        presence_poll: float = PRESENCE_POLL,
    ) -> None:
        self.root = Path(repo).resolve()
        self.on_settled = on_settled
        self.on_presence = on_presence
        self.settle = settle
        self.max_wait = max(max_wait, settle)
        self.presence_poll = presence_poll
        self.passes = 0  # how many times on_settled fired
        self.deferred: str | None = None  # what git is in the middle of, while a pass waits
        self.missing = False
        self.stats = {"events": 0, "git_events": 0, "checked": 0, "ignored": 0, "check_ignore_runs": 0}
        self.seen_until = 0.0  # monotonic time of the newest work-tree event classified so far

        self._lock = threading.Lock()
        self._pending: dict[str, float] = {}  # work-tree path → last event time
        self._overflow_at: float | None = None
        self._first: float | None = None  # first and last relevant change not yet passed on
        self._last: float | None = None
        self._ignored_dirs: set[str] = set()  # "node_modules/": nothing below can be re-included
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._observer: Observer | None = None  # type: ignore[valid-type]
        self._git_dirs: list[tuple[str, str]] = []  # (absolute prefix with '/', label), longest first
        self._root_prefix = str(self.root) + os.sep

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Start watching. RepoError if the path is not a git work tree."""
        check_work_tree(self.root)
        self._start_observer()
        self._thread = threading.Thread(target=self._loop, name=f"watch:{self.root.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        self._stop_observer()

    def _start_observer(self) -> None:
        gdirs = self._find_git_dirs()
        self._git_dirs = sorted(((str(d) + os.sep, str(d)) for d in gdirs), key=lambda x: -len(x[0]))
        obs = Observer()
        handler = _Handler(self)
        obs.schedule(handler, str(self.root), recursive=True, event_filter=_EVENTS)
        for d in gdirs:  # a linked worktree or submodule keeps its git dir elsewhere
            if not str(d).startswith(self._root_prefix):
                obs.schedule(handler, str(d), recursive=True, event_filter=_EVENTS)
        obs.daemon = True
        obs.start()
        self._observer = obs

    def _stop_observer(self) -> None:
        obs, self._observer = self._observer, None
        if obs is not None:
            try:
                obs.stop()
                obs.join(timeout=10)
            except Exception:  # a watch on a vanished directory may fail to unschedule
                log.debug("observer stop failed for %s", self.root, exc_info=True)

    def _find_git_dirs(self) -> list[Path]:
        def ask(flag: str) -> str:
            # One value per call, only its final newline cut: a path may hold a newline
            # (rev-parse has no -z), so its output is never split by line.
            out = subprocess.run(["git", "rev-parse", flag], cwd=self.root, env=git_env(),
                                 capture_output=True, text=True, timeout=30)
            if out.returncode != 0:
                raise RepoError(f"{self.root}: not a git repository")
            return out.stdout.removesuffix("\n")

        gdir, common = ask("--absolute-git-dir"), ask("--git-common-dir")
        dirs = {Path(gdir).resolve(), (self.root / common).resolve() if not os.path.isabs(common) else Path(common).resolve()}
        return sorted(dirs)

    # -- events (watchdog's thread: keep it cheap) ------------------------------------------

    def _raw(self, path: str, is_dir: bool, t: float) -> None:
        self.stats["events"] += 1
        for prefix, _ in self._git_dirs:
            if path.startswith(prefix):
                if git_path_matters(path[len(prefix):].replace(os.sep, "/")):
                    self.stats["git_events"] += 1
                    self._mark(t, t)
                return
        if path == str(self.root) or any(path + os.sep == p for p, _ in self._git_dirs):
            if is_dir and not os.path.isdir(path):
                self._wake.set()  # the root or the git dir itself went: check presence now
            return
        if not path.startswith(self._root_prefix):
            return
        rel = path[len(self._root_prefix):].replace(os.sep, "/")
        if ".git" in rel.split("/"):
            return  # a nested repository's internals
        if is_dir:
            rel += "/"
        with self._lock:
            if self._overflow_at is not None:
                self._overflow_at = t
                return
            first = not self._pending
            self._pending[rel] = t
            if len(self._pending) > MAX_PENDING:
                self._overflow_at = t
                self._pending.clear()
        if first and self._first is None:
            self._wake.set()

    def _mark(self, first: float, last: float) -> None:
        with self._lock:
            was_idle = self._first is None
            self._first = first if self._first is None else min(self._first, first)
            self._last = last if self._last is None else max(self._last, last)
        if was_idle:
            self._wake.set()

    # -- the watcher's own thread ------------------------------------------------------------

    def _loop(self) -> None:
        last_batch = 0.0
        next_presence = time.monotonic() + self.presence_poll
        while not self._stop.is_set():
            now = time.monotonic()
            timeout = next_presence - now
            with self._lock:
                if self._first is not None:
                    timeout = min(timeout, self._due_at() - now)
            self._wake.wait(max(timeout, 0.0))
            self._wake.clear()
            if self._stop.is_set():
                break
            # Let a burst gather before asking git about it.
            delay = last_batch + BATCH_SECONDS - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                break
            last_batch = time.monotonic()
            try:
                if time.monotonic() >= next_presence or not self.root.is_dir() or self.missing:
                    next_presence = time.monotonic() + self.presence_poll
                    if not self._check_presence():
                        continue
                self._classify()
                self._maybe_fire()
            except Exception:  # the watcher must outlive any single bad pass
                log.exception("watcher pass failed for %s", self.root)

    def _due_at(self) -> float:
        assert self._first is not None and self._last is not None
        return min(self._last + self.settle, self._first + self.max_wait)

    @property
    def idle(self) -> bool:
        """No change seen so far waits for a pass (there was none, or its pass has fired)."""
        with self._lock:
            return self._first is None

    def _classify(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
            overflow, self._overflow_at = self._overflow_at, None
        newest = max(pending.values(), default=overflow or 0.0)
        try:
            self._classify_batch(pending, overflow)
        finally:  # only now: a caller seeing seen_until also sees what the batch marked
            self.seen_until = max(self.seen_until, newest)

    def _classify_batch(self, pending: dict[str, float], overflow: float | None) -> None:
        if overflow is not None:
            # Too many paths to ask about: count it as a change (a pass is cheap and exact).
            self._mark(overflow, overflow)
        if not pending:
            return
        if any(p == ".gitignore" or p.endswith("/.gitignore") for p in pending):
            self._ignored_dirs.clear()  # rules changed
        with self._lock:
            dirty = self._first is not None
        # Only two times matter: the oldest relevant change (starts the max_wait clock,
        # when not already running) and the newest (moves the settle deadline). Scan from
        # each end in doubling chunks and stop at the first chunk holding a change, so a
        # storm of thousands of paths costs a few small `git check-ignore` calls.
        newest = sorted(pending, key=pending.__getitem__, reverse=True)
        last = self._scan(newest)
        if not last:
            return
        first = last if dirty else self._scan(newest[::-1])
        self._mark(min(pending[r] for r in first), max(pending[r] for r in last))

    def _scan(self, order: list[str]) -> list[str]:
        relevant: list[str] = []
        start, size = 0, 256
        while start < len(order) and not relevant:
            relevant = self._relevant(order[start:start + size])
            start, size = start + size, size * 2
        return relevant

    def _relevant(self, paths: list[str]) -> list[str]:
        """The paths that git does not ignore (asks git once, for the unknown ones)."""
        ask: set[str] = set()
        candidates: list[str] = []
        for rel in paths:
            anc = self._ancestors(rel)
            if any(a in self._ignored_dirs for a in anc):
                continue
            candidates.append(rel)
            ask.add(rel)
            ask.update(anc)
        self.stats["checked"] += len(paths)
        if not candidates:
            self.stats["ignored"] += len(paths)
            return []
        self.stats["check_ignore_runs"] += 1
        ignored = check_ignored(self.root, sorted(ask))
        if ignored is None:
            ignored = set()  # git could not say: treat as changes (a pass is harmless)
        self._ignored_dirs.update(p for p in ignored if p.endswith("/"))
        relevant = [
            rel for rel in candidates
            if rel not in ignored and not any(a in ignored for a in self._ancestors(rel))
        ]
        self.stats["ignored"] += len(paths) - len(relevant)
        return relevant

    @staticmethod
    def _ancestors(rel: str) -> list[str]:
        parts = rel.rstrip("/").split("/")[:-1]
        return ["/".join(parts[: i + 1]) + "/" for i in range(len(parts))]

    def _maybe_fire(self) -> None:
        with self._lock:
            if self._first is None or time.monotonic() < self._due_at():
                return
        ops = {operation_in_progress(Path(d)) for _, d in self._git_dirs} - {None}
        if ops:
            # git is mid-operation: look again shortly, fire once it is done.
            self.deferred = sorted(ops)[0]
            self._stop.wait(0.2)
            self._wake.set()
            return
        self.deferred = None
        with self._lock:  # together: ``idle`` never shows a pass done before it is counted
            self._first = self._last = None
            self.passes += 1
        try:
            self.on_settled()
        except Exception:
            log.exception("on_settled failed for %s", self.root)

    def _check_presence(self) -> bool:
        present = self.root.is_dir() and (self.root / ".git").exists()
        if present and self.missing:
            try:
                check_work_tree(self.root)
                self._start_observer()
            except (RepoError, OSError) as e:
                log.info("repo %s not back yet: %s", self.root, e)
                return False
            self.missing = False
            self._notify_presence(True)
            now = time.monotonic()
            self._mark(now - self.settle, now - self.settle)  # reconcile right away
            return True
        if not present and not self.missing:
            self.missing = True
            self._stop_observer()
            with self._lock:
                self._pending.clear()
                self._first = self._last = self._overflow_at = None
            self._ignored_dirs.clear()
            self._notify_presence(False)
        return present

    def _notify_presence(self, present: bool) -> None:
        if self.on_presence is None:
            return
        try:
            self.on_presence(present)
        except Exception:
            log.exception("on_presence failed for %s", self.root)
