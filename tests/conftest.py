from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon_proc import DaemonProc

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _no_leaked_daemons() -> Iterator[None]:
    """A failing test must not leave a real daemon (and its worker) running after the run."""
    yield
    from tests.daemon_proc import STARTED

    for proc in STARTED:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temp dir with a short path: Unix socket paths are limited to ~104 bytes."""
    with tempfile.TemporaryDirectory(prefix="fg", dir="/tmp") as d:
        yield Path(d)


# A daemon that polls its gates and settles file events quickly, for socket-level tests.
QUIET = """
[gates]
poll_seconds = 0.5
[watch]
settle_seconds = 0.2
"""


@pytest.fixture
def daemon(short_tmp: Path) -> Iterator[DaemonProc]:
    """A real daemon on a real socket in a short temp home, stopped after the test."""
    d = DaemonProc(short_tmp / "h", QUIET).start()
    yield d
    if d.proc and d.proc.poll() is None:
        d.stop()


def git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    return subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True).stdout


def make_repo(path: Path, files: dict[str, str], message: str = "init") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "-q", "-b", "main")
    for name, text in files.items():
        f = path / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", message)
    return path
