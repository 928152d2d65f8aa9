"""Change accounting: how much a repo changed since the commit the live model saw.

Everything here is a pure function of git's state plus the stored cursor (the commit
the live model was trained on), so a missed file-system event only delays a pass and a
daemon that was down simply catches up on the next one.

git is run as a subprocess (``git --no-optional-locks``, a clean environment) rather than
through GitPython's ``Repo``: its README warns that it leaks resources in long-running
processes (persistent ``cat-file`` children, ``__del__``-based cleanup), and the daemon is
exactly that. ``--no-optional-locks`` matters too: a plain ``git diff`` refreshes and
rewrites ``.git/index``, which the watcher would see as a change — a feedback loop.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from forged.common.config import ThresholdConfig
from forged.common.filters import LANGUAGES, miner_reads

# The first pass on a repo with no cursor walks its whole history; a cap keeps a pass
# on a huge repo bounded. Any cap above min_commits gives the same verdict.
MAX_COMMITS_SCANNED = 20_000
# Untracked files are read to count their lines; cap how many and how big.
MAX_UNTRACKED_FILES = 2_000
MAX_UNTRACKED_BYTES = 1_000_000
GIT_TIMEOUT = 120.0

# Environment variables that would point git at some other repository than the one
# asked about (set, e.g., when the daemon is started from inside a git hook).
_GIT_REDIRECTS = (
    "GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY", "GIT_COMMON_DIR",
    "GIT_NAMESPACE", "GIT_ALTERNATE_OBJECT_DIRECTORIES", "GIT_CEILING_DIRECTORIES",
    "GIT_DISCOVERY_ACROSS_FILESYSTEM", "GIT_PREFIX",
)
# Only the files the miner could read: lets git skip diffing lock files, images, etc.
_PATHSPEC = [f":(glob,icase)**/*{ext}" for ext in sorted(LANGUAGES)]


class RepoError(ValueError):
    """A problem with a repository, phrased for the user in one line."""


def git_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _GIT_REDIRECTS}
    env.update(GIT_OPTIONAL_LOCKS="0", LC_ALL="C", GIT_TERMINAL_PROMPT="0")
    return env


def _git(repo: Path, *args: str, ok: tuple[int, ...] = (0,), input: bytes | None = None) -> tuple[int, bytes]:
    """Run git in ``repo``; return (returncode, stdout). RepoError on an unexpected code."""
    try:
        p = subprocess.run(
            ["git", "--no-optional-locks", "-c", "core.quotePath=false", *args],
            cwd=repo, env=git_env(), input=input, capture_output=True, timeout=GIT_TIMEOUT,
        )
    except FileNotFoundError as e:
        if not Path(repo).is_dir():
            raise RepoError(f"{repo}: no such directory") from None
        raise RepoError(f"git not found on PATH ({e})") from None
    except subprocess.TimeoutExpired:
        raise RepoError(f"{repo}: git {args[0]} took over {GIT_TIMEOUT:.0f} s") from None
    if p.returncode not in ok:
        msg = p.stderr.decode(errors="replace").strip().splitlines()
        detail = msg[-1] if msg else f"exit {p.returncode}"
        raise RepoError(f"{repo}: git {args[0]} failed: {detail.removeprefix('fatal: ')}")
    return p.returncode, p.stdout


def _out(repo: Path, *args: str) -> str:
    return _git(repo, *args)[1].decode(errors="surrogateescape").strip()


_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def check_branch(repo: Path, branch: str) -> None:
    """RepoError unless ``branch`` is a local branch of ``repo`` with a commit."""
    _resolve_branch(repo, branch)


def check_work_tree(path: str | Path) -> Path:
    """The top level of the git work tree at or above ``path``.

    RepoError for a missing path, a file, a non-repo, a bare repo and a path inside a
    ``.git`` directory.
    """
    if _CONTROL_CHARS.search(str(path)):
        raise RepoError(f"{str(path)!r}: a path with a newline or other control character cannot be "
                        "watched (git's output is read line by line); rename the directory")
    p = Path(path).expanduser()
    if not p.exists():
        raise RepoError(f"{p}: no such directory")
    if not p.is_dir():
        raise RepoError(f"{p}: not a directory")
    p = p.resolve()
    try:
        _, out = _git(p, "rev-parse", "--is-bare-repository", "--is-inside-git-dir")
    except RepoError as e:
        if "not a git repository" in str(e):
            raise RepoError(f"{p}: not a git repository (or any of its parents)") from None
        raise  # e.g. "detected dubious ownership in repository": git's own words are clearer
    bare, inside_git_dir = out.decode().split()[:2]
    if bare == "true":
        raise RepoError(f"{p}: is a bare repository; register a work tree (a clone with files)")
    if inside_git_dir == "true":
        raise RepoError(f"{p}: is inside a .git directory; register the work tree above it")
    top = _git(p, "rev-parse", "--show-toplevel")[1].decode(errors="surrogateescape").removesuffix("\n")
    if _CONTROL_CHARS.search(top):
        raise RepoError(f"{top!r}: a path with a newline or other control character cannot be watched")
    return Path(top)


@dataclass
class GitState:
    head: str | None  # None: no commit yet
    branch: str  # "" when HEAD is detached
    operation: str | None  # "rebase" | "merge" | "cherry-pick" | "revert" | "index.lock" | None
    git_dir: Path


def git_dir(repo: Path) -> Path:
    return Path(_out(repo, "rev-parse", "--absolute-git-dir"))


def operation_in_progress(gdir: Path) -> str | None:
    """What git is in the middle of, judged from marker files in the git dir (cheap: stats only)."""
    if (gdir / "rebase-merge").exists() or (gdir / "rebase-apply").exists():
        return "rebase"
    for name, op in (("MERGE_HEAD", "merge"), ("CHERRY_PICK_HEAD", "cherry-pick"), ("REVERT_HEAD", "revert")):
        if (gdir / name).exists():
            return op
    if (gdir / "index.lock").exists():
        return "index.lock"
    return None


def git_state(repo: Path) -> GitState:
    gdir = git_dir(repo)
    code, out = _git(repo, "rev-parse", "--verify", "-q", "HEAD^{commit}", ok=(0, 1))
    head = out.decode().strip() if code == 0 else None
    code, out = _git(repo, "symbolic-ref", "-q", "--short", "HEAD", ok=(0, 1))
    branch = out.decode().strip() if code == 0 else ""
    return GitState(head=head, branch=branch, operation=operation_in_progress(gdir), git_dir=gdir)


@dataclass
class Accounting:
    head: str | None  # the commit accounted up to
    base: str | None  # the commit diffed against (None: the whole history)
    diverged: bool  # the cursor is not an ancestor of head (rebase, amend, branch switch)
    commits: int  # non-merge commits base..head touching files the miner reads
    files_changed: int
    lines_changed: int  # added + removed, net diff base..head
    uncommitted_files: int
    uncommitted_lines: int
    last_commit_at: float | None  # committer time of head
    due: bool
    due_reasons: list[str] = field(default_factory=list)
    progress: str = ""
    deferred: str | None = None  # why accounting waits (a rebase in progress, ...)
    note: str | None = None  # anything else the status should say
    branch: str = ""
    commits_capped: bool = False  # the walk stopped at MAX_COMMITS_SCANNED

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _parse_numstat(raw: bytes) -> list[tuple[str, int]]:
    """``git diff --numstat -z`` → [(path, lines added+removed)]; binary files count 0."""
    out: list[tuple[str, int]] = []
    parts = raw.split(b"\0")
    i = 0
    while i < len(parts):
        rec = parts[i]
        i += 1
        if not rec:
            continue
        added, removed, path = rec.split(b"\t", 2)
        if not path:  # a rename: "a\tr\t\0old\0new\0"
            path = parts[i + 1]
            i += 2
        n = 0 if added == b"-" else int(added) + int(removed)
        out.append((path.decode(errors="surrogateescape"), n))
    return out


@dataclass(frozen=True)
class _Committed:
    commits: int
    files: int
    lines: int
    capped: bool
    last_commit_at: float | None


# Committed counts depend only on (repo, base, head): memoise them so the reconcile
# every few minutes costs a few rev-parses when nothing moved.
_CACHE: OrderedDict[tuple[str, str | None, str], _Committed] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 64


def _committed(repo: Path, base: str | None, head: str) -> _Committed:
    key = (str(repo), base, head)
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    # Commits: non-merge, every one that touches a miner-read path (--full-history:
    # no pruning of merged side branches).
    revs = [head] if base is None else [head, f"^{base}"]
    _, raw = _git(
        repo, "log", "--no-merges", "--full-history", "--no-renames", "--format=%x1e%H %ct",
        "--name-only", "-z", f"--max-count={MAX_COMMITS_SCANNED}", *revs, "--", *_PATHSPEC,
    )
    commits = 0
    for rec in raw.split(b"\x1e")[1:]:
        _header, _, names = rec.partition(b"\0")
        if any(miner_reads(n.strip(b"\n").decode(errors="surrogateescape")) for n in names.split(b"\0") if n.strip()):
            commits += 1
    capped = raw.count(b"\x1e") >= MAX_COMMITS_SCANNED
    # Lines and files: the net diff. No base: against the empty tree, i.e. all content.
    base_tree = base or _empty_tree(repo)
    _, raw = _git(repo, "diff", "--numstat", "-z", "-M", "--no-ext-diff", "--no-textconv", base_tree, head, "--", *_PATHSPEC)
    stats = [(p, n) for p, n in _parse_numstat(raw) if miner_reads(p)]
    ct = _out(repo, "log", "-1", "--format=%ct", head)
    result = _Committed(commits, len(stats), sum(n for _, n in stats), capped, float(ct) if ct else None)
    with _CACHE_LOCK:
        _CACHE[key] = result
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return result


def _empty_tree(repo: Path) -> str:
    # The empty tree's id depends on the hash algorithm (sha1 / sha256).
    return _out(repo, "hash-object", "-t", "tree", "/dev/null")


def _uncommitted(repo: Path) -> tuple[int, int]:
    """(files, lines) of staged + unstaged + untracked changes to miner-read files."""
    # diff-index, not `git diff HEAD`: the porcelain refreshes and rewrites .git/index even
    # under --no-optional-locks (git 2.39), which the watcher would see as a change.
    _, raw = _git(repo, "diff-index", "--numstat", "-z", "-M", "HEAD", "--", *_PATHSPEC)
    stats = [(p, n) for p, n in _parse_numstat(raw) if miner_reads(p)]
    files, lines = len(stats), sum(n for _, n in stats)
    _, raw = _git(repo, "ls-files", "--others", "--exclude-standard", "-z", "--", *_PATHSPEC)
    untracked = [p for p in raw.decode(errors="surrogateescape").split("\0") if p and miner_reads(p)]
    for rel in untracked[:MAX_UNTRACKED_FILES]:
        try:
            with open(repo / rel, "rb") as f:
                data = f.read(MAX_UNTRACKED_BYTES)
        except OSError:
            continue
        if b"\0" in data[:8192]:
            continue  # binary
        lines += data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)
    return files + len(untracked), lines


def _resolve_branch(repo: Path, branch: str) -> str | None:
    code, out = _git(repo, "rev-parse", "--verify", "-q", f"refs/heads/{branch}^{{commit}}", ok=(0, 1))
    if code != 0:
        raise RepoError(f"{repo}: branch {branch!r} does not exist")
    return out.decode().strip()


def _commit_exists(repo: Path, sha: str) -> bool:
    return _git(repo, "cat-file", "-e", f"{sha}^{{commit}}", ok=(0, 1, 128))[0] == 0


def _count_from(repo: Path, cursor: str | None, head: str, acc: Accounting) -> str | None:
    """The commit to count from: the cursor, or where the branch left it (``acc`` says why)."""
    if cursor is None:
        return None
    if not _commit_exists(repo, cursor):
        # The cursor was rewritten away and garbage-collected: nothing to diff against.
        acc.diverged = True
        acc.note = f"cursor {cursor[:10]} no longer exists; counting the whole history"
        return None
    if _git(repo, "merge-base", "--is-ancestor", cursor, head, ok=(0, 1))[0] != 1:
        return cursor
    acc.diverged = True
    code, out = _git(repo, "merge-base", cursor, head, ok=(0, 1))
    base = out.decode().strip() if code == 0 else None
    acc.note = (
        f"cursor {cursor[:10]} is not an ancestor of {acc.branch or 'HEAD'}; "
        + (f"counting from merge base {base[:10]}" if base else "no common history, counting all of it")
    )
    return base


def _due_reasons(acc: Accounting, cfg: ThresholdConfig, cursor_at: float | None, now: float) -> list[str]:
    """Each threshold the counted changes cross."""
    reasons = []
    lines = acc.lines_changed + (acc.uncommitted_lines if cfg.count_uncommitted else 0)
    if lines >= cfg.min_changed_lines:
        reasons.append(f"{lines} changed lines >= {cfg.min_changed_lines}")
    if acc.commits >= cfg.min_commits:
        reasons.append(f"{acc.commits} commits >= {cfg.min_commits}")
    if cursor_at is not None and (acc.commits > 0 or lines > 0):
        age_days = (now - cursor_at) / 86400
        if age_days >= cfg.max_age_days:
            reasons.append(f"live model {age_days:.1f} days old >= {cfg.max_age_days:g}")
    return reasons


def account(
    repo: Path,
    cursor: str | None,
    cfg: ThresholdConfig,
    *,
    cursor_at: float | None = None,
    branch: str = "",
    now: float | None = None,
) -> Accounting:
    """Account the changes from ``cursor`` to the tip of ``branch`` (or HEAD).

    ``cursor`` is the commit the live model was trained on (None: no model yet, the whole
    history is new); ``cursor_at`` when that model went live (for ``max_age_days``).
    While git is mid-operation (rebase, merge, index.lock) nothing is counted and
    ``deferred`` says why: the caller keeps the previous accounting and asks again.
    Raises RepoError when the repo is gone or the branch does not exist.
    """
    repo = Path(repo)
    now = time.time() if now is None else now
    st = git_state(repo)
    acc = Accounting(
        head=st.head, base=cursor, diverged=False, commits=0, files_changed=0, lines_changed=0,
        uncommitted_files=0, uncommitted_lines=0, last_commit_at=None, due=False,
        branch=branch or st.branch,
    )
    if st.operation is not None:
        acc.deferred = f"{st.operation} in progress" if st.operation != "index.lock" else "index.lock present"
        acc.progress = f"waiting: {acc.deferred}"
        return acc
    head = _resolve_branch(repo, branch) if branch else st.head
    acc.head = head
    if head is None:
        acc.progress = _progress(acc, cfg, cursor_at, now)
        acc.note = "no commits yet"
        return acc

    base = _count_from(repo, cursor, head, acc)
    acc.base = base

    c = _committed(repo, base, head)
    acc.commits, acc.files_changed, acc.lines_changed = c.commits, c.files, c.lines
    acc.commits_capped, acc.last_commit_at = c.capped, c.last_commit_at
    # Uncommitted work belongs to the checked-out branch only.
    if not branch or branch == st.branch:
        acc.uncommitted_files, acc.uncommitted_lines = _uncommitted(repo)

    acc.due_reasons = _due_reasons(acc, cfg, cursor_at, now)
    acc.due = bool(acc.due_reasons)
    acc.progress = _progress(acc, cfg, cursor_at, now)
    return acc


def _progress(acc: Accounting, cfg: ThresholdConfig, cursor_at: float | None, now: float) -> str:
    lines = acc.lines_changed + (acc.uncommitted_lines if cfg.count_uncommitted else 0)
    commits = f"{acc.commits}+" if acc.commits_capped else str(acc.commits)
    text = f"{lines} / {cfg.min_changed_lines} lines, {commits} / {cfg.min_commits} commits"
    if cursor_at is not None:
        text += f", {(now - cursor_at) / 86400:.1f} / {cfg.max_age_days:g} days"
    if acc.uncommitted_files and not cfg.count_uncommitted:
        text += f" (+{acc.uncommitted_lines} uncommitted lines not counted)"
    return text
