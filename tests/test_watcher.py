"""The watcher against real repos and real inotify (watchdog), with short timings."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from forged.common.config import ThresholdConfig
from forged.daemon.accounting import account
from forged.daemon.watcher import RepoWatcher, git_path_matters
from tests.gitrepo import GitRepo

SETTLE = 0.2


@pytest.fixture(autouse=True)
def _fast_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("forged.daemon.watcher.BATCH_SECONDS", 0.05)


def wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def caught_up(w: RepoWatcher, marker: Path, timeout: float = 10.0) -> bool:
    """Wait until ``w`` has classified every event so far: an ignored ``marker`` written now
    is the last of them (inotify keeps order), and its batch has been classified."""
    t = time.monotonic()
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(t))
    return wait_until(lambda: w.seen_until >= t, timeout)


def settled(w: RepoWatcher, marker: Path) -> bool:
    """Caught up, and every change seen has had its pass: nothing more will fire."""
    return caught_up(w, marker) and wait_until(lambda: w.idle)


def no_pass_pending(w: RepoWatcher, marker: Path, timeout: float = 10.0) -> bool:
    """Caught up, and nothing seen waits for a pass (the watcher judged it all irrelevant)."""
    return caught_up(w, marker, timeout) and w.idle


@pytest.fixture
def repo(tmp_path: Path) -> GitRepo:
    r = GitRepo(tmp_path / "r")
    r.lines("src/app.py", 20)
    r.write(".gitignore", "*.log\nout/\nnode_modules/\n")
    r.commit("initial")
    return r


class Watched:
    def __init__(self, repo: GitRepo, **kw: float) -> None:
        self.marker = repo.root / "marker.log"  # ignored (*.log) by the fixture's .gitignore
        self.fired: list[float] = []
        self.presence: list[bool] = []
        self.w = RepoWatcher(
            repo.root, lambda: self.fired.append(time.monotonic()), settle=kw.get("settle", SETTLE),
            max_wait=kw.get("max_wait", 5.0), on_presence=self.presence.append,
            presence_poll=kw.get("presence_poll", 0.3),
        )


@pytest.fixture
def watched(repo: GitRepo) -> Iterator[Watched]:
    w = Watched(repo)
    w.w.start()
    yield w
    w.w.stop()


def test_git_path_rules() -> None:
    for rel in ("HEAD", "index", "packed-refs", "refs/heads/main", "refs/remotes/o/x",
                "MERGE_HEAD", "rebase-merge/done", "rebase-apply/next", "worktrees/wt/HEAD"):
        assert git_path_matters(rel), rel
    for rel in ("objects/ab/cdef", "objects/pack/p.pack", "logs/HEAD", "logs/refs/heads/main",
                "index.lock", "refs/heads/main.lock", "HEAD.lock", "config", "hooks/pre-commit",
                "COMMIT_EDITMSG", "FETCH_HEAD", "ORIG_HEAD", "worktrees/wt/index.lock"):
        assert not git_path_matters(rel), rel


def test_edits_coalesce_into_one_pass(repo: GitRepo, watched: Watched) -> None:
    for i in range(5):
        repo.lines("src/app.py", 20 + i)
        time.sleep(0.02)
    assert wait_until(lambda: watched.w.passes == 1)
    assert settled(watched.w, watched.marker)
    assert watched.w.passes == 1


def test_ignored_files_and_git_internals_trigger_nothing(repo: GitRepo, watched: Watched) -> None:
    repo.write("debug.log", "x")
    for i in range(50):
        repo.write(f"out/gen_{i}.py", "x = 1\n")
        repo.write(f"node_modules/pkg{i % 5}/index.js", "x")
    (repo.root / "out" / "gen_0.py").unlink()
    shutil.rmtree(repo.root / "node_modules")
    # .git churn that is not a commit: objects, logs, lock files.
    (repo.root / "blob.txt").write_text("loose object")
    repo.git("hash-object", "-w", "blob.txt")
    (repo.root / "blob.txt").unlink()
    assert settled(watched.w, watched.marker)  # the blob.txt create/delete is a real (untracked) change
    base = watched.w.passes
    repo.git("hash-object", "-w", "src/app.py")
    (repo.root / ".git" / "objects" / "pack" / "junk.tmp").write_text("x")
    (repo.root / ".git" / "logs" / "HEAD").write_text("x\n")
    (repo.root / ".git" / "refs" / "heads" / "main.lock").write_text("x")
    (repo.root / ".git" / "refs" / "heads" / "main.lock").unlink()
    (repo.root / ".git" / "index.lock").write_text("")
    (repo.root / ".git" / "index.lock").unlink()
    repo.write("more.log", "x")
    assert no_pass_pending(watched.w, watched.marker)
    assert watched.w.passes == base
    assert watched.w.stats["ignored"] > 0


def test_ignore_rules_come_from_git(repo: GitRepo, watched: Watched, tmp_path: Path) -> None:
    """info/exclude, core.excludesFile and nested .gitignore all apply; tracked files never ignored."""
    (repo.root / ".git" / "info").mkdir(exist_ok=True)
    (repo.root / ".git" / "info" / "exclude").write_text("scratch/\n")
    excludes = tmp_path / "global-ignore"
    excludes.write_text("*.swp\n")
    repo.git("config", "core.excludesFile", str(excludes))
    repo.write("sub/.gitignore", "local_*\n")
    repo.git("add", "sub/.gitignore")
    repo.git("commit", "-q", "-m", "nested ignore")
    assert wait_until(lambda: watched.w.passes >= 1)
    assert settled(watched.w, watched.marker)
    base = watched.w.passes
    repo.write("scratch/a.py", "x")
    repo.write("src/.app.py.swp", "x")
    repo.write("sub/local_x.py", "x")
    assert no_pass_pending(watched.w, watched.marker)
    assert watched.w.passes == base
    repo.write("sub/kept.py", "x")  # not ignored by the nested rule
    assert wait_until(lambda: watched.w.passes == base + 1)


def test_tracked_file_matching_an_ignore_pattern_counts(repo: GitRepo, watched: Watched) -> None:
    repo.write("keep.log", "x")
    repo.git("add", "-f", "keep.log")
    repo.git("commit", "-q", "-m", "forced")
    assert wait_until(lambda: watched.w.passes >= 1)
    assert settled(watched.w, watched.marker)
    base = watched.w.passes
    repo.write("keep.log", "changed")
    assert wait_until(lambda: watched.w.passes == base + 1)


def test_commit_is_one_pass_and_accounting_sees_it(repo: GitRepo, watched: Watched) -> None:
    cursor = repo.head()
    repo.lines("src/new.py", 400)
    repo.commit("big")
    assert wait_until(lambda: watched.w.passes >= 1)
    assert settled(watched.w, watched.marker)
    assert watched.w.passes == 1
    assert account(repo.root, cursor, ThresholdConfig()).due


def test_checkout_triggers_a_pass(repo: GitRepo, watched: Watched) -> None:
    repo.git("branch", "other")
    assert wait_until(lambda: watched.w.passes == 1)  # a new ref
    assert settled(watched.w, watched.marker)
    repo.git("checkout", "-q", "other")  # HEAD only: no work-tree change
    assert wait_until(lambda: watched.w.passes == 2)


def test_index_lock_defers_the_pass(repo: GitRepo, watched: Watched) -> None:
    lock = repo.root / ".git" / "index.lock"
    lock.write_text("")
    repo.lines("src/app.py", 30)
    assert wait_until(lambda: watched.w.deferred == "index.lock")
    assert watched.w.passes == 0
    lock.unlink()
    assert wait_until(lambda: watched.w.passes == 1)
    assert watched.w.deferred is None


def test_max_wait_bounds_the_delay_under_constant_churn(repo: GitRepo) -> None:
    w = Watched(repo, settle=0.5, max_wait=0.8)
    w.w.start()
    try:
        start = time.monotonic()
        i = 0
        while time.monotonic() - start < 2.5:  # an edit every 0.1 s: never settles
            repo.lines("src/app.py", 5 + i % 7)
            i += 1
            time.sleep(0.1)
        duration = time.monotonic() - start
        assert wait_until(lambda: len(w.fired) >= 1)
        during = [t for t in w.fired if t <= start + duration]
        assert len(during) >= 2, "max_wait must force passes while churn goes on"
        assert settled(w.w, w.marker)
        assert len(w.fired) <= duration / 0.8 + 2
    finally:
        w.w.stop()


def test_callback_errors_do_not_kill_the_watcher(repo: GitRepo) -> None:
    calls: list[int] = []

    def boom() -> None:
        calls.append(1)
        raise RuntimeError("boom")

    w = RepoWatcher(repo.root, boom, settle=SETTLE)
    w.start()
    try:
        repo.write("src/a.py", "1")
        assert wait_until(lambda: len(calls) == 1)
        assert settled(w, repo.root / "marker.log")
        repo.write("src/a.py", "2")
        assert wait_until(lambda: len(calls) == 2)
    finally:
        w.stop()


def test_repo_deleted_and_restored(repo: GitRepo, watched: Watched, tmp_path: Path) -> None:
    aside = tmp_path / "aside"
    os.rename(repo.root, aside)  # moved away: like a delete, but we can bring it back
    assert wait_until(lambda: watched.presence == [False])
    assert watched.w.missing
    passes = watched.w.passes
    os.rename(aside, repo.root)
    assert wait_until(lambda: watched.presence == [False, True])
    assert wait_until(lambda: watched.w.passes >= passes + 1), "a reconcile pass on return"
    assert settled(watched.w, watched.marker)  # the marker's event also shows the new watch works
    assert watched.w.passes == passes + 1, "one pass on return, none while missing"
    repo.write("src/after.py", "x")
    assert wait_until(lambda: watched.w.passes == passes + 2)


def test_repo_rm_rf_and_recreated(repo: GitRepo, watched: Watched) -> None:
    backup = repo.root.parent / "backup"
    shutil.copytree(repo.root, backup)
    shutil.rmtree(repo.root)
    assert wait_until(lambda: watched.presence == [False])
    shutil.copytree(backup, repo.root)
    assert wait_until(lambda: watched.presence == [False, True])
    assert not watched.w.missing


def test_start_rejects_a_non_repo(tmp_path: Path) -> None:
    from forged.daemon.accounting import RepoError

    with pytest.raises(RepoError, match="not a git repository"):
        RepoWatcher(tmp_path, lambda: None).start()


def test_stop_is_prompt(repo: GitRepo) -> None:
    w = RepoWatcher(repo.root, lambda: None)
    w.start()
    t = time.monotonic()
    w.stop()
    assert time.monotonic() - t < 2.0
    assert not any(th.name.startswith("watch:") and th.is_alive() for th in threading.enumerate()
                   if th.name == f"watch:{repo.root.name}")


def _storm_root(tmp_path: Path) -> Path:
    # tmpfs when there is one: creating 25,000 files on this VM's ext4 takes ~10 s alone.
    # inotify behaves the same on both; only the test's own write speed differs.
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        import tempfile

        return Path(tempfile.mkdtemp(prefix="forged-storm-", dir=shm))
    return tmp_path


def test_event_storm_is_bounded_and_responsive(tmp_path: Path) -> None:
    """50,000 creations/deletions: passes <= T / max_wait + 1, other threads keep running."""
    root = _storm_root(tmp_path)
    try:
        repo = GitRepo(root / "r")
        repo.lines("src/app.py", 20)
        repo.write(".gitignore", "node_modules/\n")
        repo.commit("init")
        max_wait = 2.0
        w = Watched(repo, settle=1.0, max_wait=max_wait)  # no quiet gap >= settle mid-storm
        worst = [0.0]
        stop = threading.Event()

        def ticker() -> None:  # stands in for the control socket thread
            while not stop.is_set():
                t = time.perf_counter()
                time.sleep(0.01)
                worst[0] = max(worst[0], time.perf_counter() - t - 0.01)

        threading.Thread(target=ticker, daemon=True).start()
        w.w.start()
        t0 = time.monotonic()
        gen = repo.root / "gen"
        gen.mkdir()
        for d in range(100):
            os.mkdir(gen / f"d{d}")
        for i in range(25_000):
            os.close(os.open(gen / f"d{i % 100}" / f"f{i}.py", os.O_CREAT | os.O_WRONLY))
        for i in range(25_000):
            os.unlink(gen / f"d{i % 100}" / f"f{i}.py")
        # T: until the watcher has taken in the last event (an ignored marker after them all).
        assert caught_up(w.w, repo.root / "node_modules" / "marker", timeout=60)
        storm = time.monotonic() - t0
        seen = w.w.stats["events"]
        assert wait_until(lambda: len(w.fired) >= 1 and w.fired[-1] >= t0 + storm - 0.5, timeout=5)
        assert settled(w.w, repo.root / "node_modules" / "marker")
        stop.set()
        w.w.stop()
        assert seen >= 50_000
        assert 1 <= w.w.passes <= int(storm / max_wait) + 1, (w.w.passes, storm)
        assert worst[0] < 1.0, f"a 10 ms ticker was {worst[0] * 1000:.0f} ms late"
        # The ignored-directory cache keeps git out of an ignored storm.
        w2 = Watched(repo, settle=0.3)
        w2.w.start()
        nm = repo.root / "node_modules" / "pkg"
        nm.mkdir(parents=True)
        for i in range(5_000):
            os.close(os.open(nm / f"f{i}.js", os.O_CREAT | os.O_WRONLY))
        assert no_pass_pending(w2.w, nm / "marker", timeout=30)
        w2.w.stop()
        assert w2.w.passes == 0 and w2.w.stats["check_ignore_runs"] <= 3
    finally:
        if root != tmp_path:
            shutil.rmtree(root, ignore_errors=True)


def test_edits_below_threshold_pass_but_are_not_due(repo: GitRepo) -> None:
    cursor = repo.head()
    results = []
    w = RepoWatcher(repo.root, lambda: results.append(account(repo.root, cursor, ThresholdConfig())), settle=SETTLE)
    w.start()
    try:
        repo.lines("src/app.py", 40, tag="y")  # 20 lines out, 40 in
        assert wait_until(lambda: len(results) == 1)
        assert not results[0].due and results[0].uncommitted_lines == 60
        repo.commit("small")
        assert wait_until(lambda: len(results) == 2)
        assert not results[1].due and results[1].lines_changed == 60
    finally:
        w.stop()
