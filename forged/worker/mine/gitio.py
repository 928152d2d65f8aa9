"""Reading a repository at a commit through git plumbing (never the working tree)."""

from __future__ import annotations

import re
import subprocess
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple


class GitError(RuntimeError):
    """A git command failed; the message names the command and git's own complaint."""


def git(repo: Path, *args: str, input: bytes | None = None) -> bytes:
    try:
        p = subprocess.run(["git", "-C", str(repo), *args], input=input, capture_output=True,
                           check=False)
    except FileNotFoundError:
        raise GitError("git is not installed or not on PATH") from None
    if p.returncode != 0:
        err = p.stderr.decode("utf-8", "replace").strip().splitlines()
        raise GitError(f"git {' '.join(args[:3])} failed in {repo}: {err[-1] if err else p.returncode}")
    return p.stdout


def resolve(repo: Path, rev: str) -> str:
    """Full sha of a commit-ish; a clear error when it is not a git repo or no such commit."""
    if not Path(repo).is_dir():
        raise GitError(f"{repo}: not a directory")
    try:
        return git(repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}").decode().strip()
    except GitError:
        git(repo, "rev-parse", "--git-dir")  # raises "not a git repository" when so
        raise GitError(f"{repo}: no commit {rev!r}") from None


class Entry(NamedTuple):
    # A NamedTuple, not a dataclass: a 10,000-file tree makes 10,000 of these per mine,
    # and a frozen dataclass costs twice as much to build.
    path: str
    blob: str
    size: int


# One `ls-tree -r -l -z` record: mode, type, object, padded size ("-" for a submodule), path.
_LS_ENTRY = re.compile(rb"(\d+) (\w+) ([0-9a-f]+) +(\d+|-)\t([^\0]*)\0")
# Tracked entries that are not regular files, by mode: never read, counted under these names.
SPECIAL_MODES = {b"120000": "symlink", b"160000": "submodule"}


def ls_tree(repo: Path, sha: str, specials: Counter[str] | None = None) -> list[Entry]:
    """Tracked regular files at a commit; symlinks and submodules are left out, and counted
    into ``specials`` by kind when it is given."""
    out = git(repo, "ls-tree", "-r", "-l", "-z", "--full-tree", sha)
    entries = []
    for mode, kind, obj, size, path in _LS_ENTRY.findall(out):
        if kind == b"blob" and mode not in SPECIAL_MODES:
            entries.append(Entry(path.decode("utf-8", "surrogateescape"), obj.decode(), int(size)))
        elif specials is not None and mode in SPECIAL_MODES:
            specials[SPECIAL_MODES[mode]] += 1
    return entries


def cat_blobs(repo: Path, shas: Iterable[str]) -> Iterator[tuple[str, bytes]]:
    """Blob contents through one `git cat-file --batch` process."""
    shas = list(shas)
    if not shas:
        return
    p = subprocess.Popen(["git", "-C", str(repo), "cat-file", "--batch"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert p.stdin is not None and p.stdout is not None

    def feed() -> None:  # a thread, so a full stdout pipe cannot deadlock us
        try:
            p.stdin.write("".join(s + "\n" for s in shas).encode())
            p.stdin.close()
        except BrokenPipeError:
            pass

    t = threading.Thread(target=feed, daemon=True)
    t.start()
    try:
        for sha in shas:
            header = p.stdout.readline().split()
            if len(header) < 3:
                raise GitError(f"git cat-file: object {sha} missing")
            size = int(header[2])
            data = p.stdout.read(size)
            p.stdout.read(1)
            yield sha, data
    finally:
        p.stdout.close()
        # A process forked meanwhile (a pool worker) may hold our stdin's write end, so
        # git would never see EOF: stop it rather than wait for it.
        try:
            p.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        t.join(timeout=1)


def changes(repo: Path, since: str, sha: str, specials: Counter[str] | None = None
            ) -> dict[str, str | None]:
    """Paths changed since..sha → the new blob, or None where the path holds no regular
    file any more (deleted, or now a symlink or submodule: :func:`ls_tree` lists neither).

    ``specials``, when given, gets the change in the count of symlinks and submodules."""
    out = git(repo, "diff-tree", "-r", "-z", "--raw", "--no-renames", "--no-abbrev", since, sha)
    # -z records: ":<old mode> <new mode> <old sha> <new sha> <status>\0<path>\0"
    fields = out.split(b"\0")
    got: dict[str, str | None] = {}
    for head, path in zip(fields[0::2], fields[1::2], strict=False):
        if not head.startswith(b":"):
            continue
        old_mode, mode, _old, new, _status = head[1:].split(b" ")
        if specials is not None:
            for m, sign in ((old_mode, -1), (mode, 1)):
                if m in SPECIAL_MODES:
                    specials[SPECIAL_MODES[m]] += sign
        got[path.decode("utf-8", "surrogateescape")] = (
            new.decode() if mode.startswith(b"10") and mode != b"120000" else None)
    return got


def blob_sizes(repo: Path, blobs: Iterable[str]) -> dict[str, int]:
    """Sizes of blobs (one `git cat-file --batch-check`)."""
    blobs = list(dict.fromkeys(blobs))
    if not blobs:
        return {}
    out = git(repo, "cat-file", "--batch-check", input="".join(b + "\n" for b in blobs).encode())
    sizes: dict[str, int] = {}
    for line in out.decode().splitlines():
        obj, kind, *size = line.split(" ")
        if kind != "blob" or len(size) != 1:
            raise GitError(f"git cat-file: {obj} is not a blob ({kind})")
        sizes[obj] = int(size[0])
    return sizes


def rev_list(repo: Path, sha: str, n: int, since: str | None = None) -> list[str]:
    """Non-merge commits reachable from sha, newest first (only since..sha when given)."""
    if n <= 0:
        return []
    rng = f"{since}..{sha}" if since else sha
    out = git(repo, "rev-list", "--no-merges", f"--max-count={n}", rng)
    return out.decode().split()


def commit_patches(repo: Path, shas: list[str]) -> Iterator[tuple[str, str, list[tuple[str, str]]]]:
    """(sha, message, [(path, diff text of that file)]) for each commit, in one git call."""
    if not shas:
        return
    out = git(repo, "show", "--no-color", "--no-ext-diff", "--no-renames", "--unified=3",
              "--format=%x00%x01%H%x00%B%x00", *shas)
    for block in out.split(b"\0\x01")[1:]:
        sha, msg, patch = block.split(b"\0", 2)
        files: list[tuple[str, str]] = []
        for part in patch.split(b"\ndiff --git ")[0:]:
            part = part.lstrip(b"\n")
            if not part:
                continue
            if not part.startswith(b"diff --git "):
                part = b"diff --git " + part
            head = part.split(b"\n", 1)[0]
            # "diff --git a/x b/x": take the b/ side.
            path = head.rsplit(b" b/", 1)[-1].decode("utf-8", "surrogateescape")
            files.append((path, part.decode("utf-8", "replace").rstrip("\n") + "\n"))
        yield sha.decode(), msg.decode("utf-8", "replace"), files
