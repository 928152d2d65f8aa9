"""Where forged keeps its files.

``FORGED_HOME`` overrides everything (config, state, logs, socket) — tests and the
checkout's quick start use it. ``FORGED_CONFIG`` names a config file and wins over
``FORGED_HOME`` for the config. Otherwise the platform's own places are used.
"""

from __future__ import annotations

import errno
import os
import sys
from dataclasses import dataclass
from pathlib import Path

APP = "forged"
# sockaddr_un.sun_path is 104 bytes on macOS and 108 on Linux, including the NUL.
SOCKET_PATH_MAX = 103 if sys.platform == "darwin" else 107


@dataclass(frozen=True)
class Paths:
    """Every directory and file forged reads or writes."""

    config_file: Path
    state_dir: Path
    log_dir: Path
    run_dir: Path  # 0700 directory holding the socket and the lock file

    @property
    def db(self) -> Path:
        return self.state_dir / "forged.db"

    @property
    def socket(self) -> Path:
        return self.run_dir / "forged.sock"

    @property
    def lock(self) -> Path:
        return self.run_dir / "forged.lock"

    @property
    def log_file(self) -> Path:
        return self.log_dir / "forged.jsonl"

    @property
    def work_dir(self) -> Path:
        """Per-cycle datasets, checkpoints and exported adapters."""
        return self.state_dir / "work"

    @property
    def cache_dir(self) -> Path:
        """Caches that can be rebuilt (chunk cache by blob sha)."""
        return self.state_dir / "cache"

    def ensure(self) -> None:
        for d in (self.state_dir, self.log_dir, self.work_dir, self.cache_dir):
            d.mkdir(parents=True, exist_ok=True)
        old = os.umask(0o077)
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        finally:
            os.umask(old)
        # mkdir does not change the mode of an existing directory.
        os.chmod(self.run_dir, 0o700)


def checkout_root() -> Path | None:
    """The source checkout this package runs from, if it runs from one."""
    root = Path(__file__).resolve().parents[2]  # forged/common/paths.py → the checkout
    return root if (root / ".git").exists() and (root / "pyproject.toml").exists() else None


def resolve(env: dict[str, str] | None = None) -> Paths:
    env = dict(os.environ if env is None else env)
    home = env.get("FORGED_HOME")
    explicit_config = env.get("FORGED_CONFIG")
    if home:
        h = Path(home).expanduser().resolve()
        paths = Paths(
            config_file=h / "config.toml",
            state_dir=h / "state",
            log_dir=h / "logs",
            run_dir=h / "run",
        )
    elif sys.platform == "darwin":
        lib = Path.home() / "Library"
        support = lib / "Application Support" / APP
        paths = Paths(
            config_file=support / "config.toml",
            state_dir=support / "state",
            log_dir=lib / "Logs" / APP,
            run_dir=support / "run",
        )
    else:
        xdg_config = Path(env.get("XDG_CONFIG_HOME") or Path.home() / ".config")
        xdg_state = Path(env.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
        runtime = env.get("XDG_RUNTIME_DIR")
        paths = Paths(
            config_file=xdg_config / APP / "config.toml",
            state_dir=xdg_state / APP,
            log_dir=xdg_state / APP / "logs",
            run_dir=Path(runtime) / APP if runtime else xdg_state / APP / "run",
        )
    if explicit_config:
        paths = Paths(
            config_file=Path(explicit_config).expanduser().resolve(),
            state_dir=paths.state_dir,
            log_dir=paths.log_dir,
            run_dir=paths.run_dir,
        )
    return paths


def check_socket_path(path: Path) -> None:
    if len(os.fsencode(str(path))) > SOCKET_PATH_MAX:
        raise ValueError(
            f"socket path is {len(os.fsencode(str(path)))} bytes, over the "
            f"{SOCKET_PATH_MAX}-byte limit of this OS: {path} — set FORGED_HOME to a shorter directory"
        )


# A write that failed for want of space: a full disk, a quota, or a file-size limit.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def describe_failure(e: BaseException) -> str:
    """``Type: message`` for a failure report, saying what to do when the disk is full
    (SQLite reports that as "database or disk is full", not as an OSError)."""
    text = f"{type(e).__name__}: {e}"
    if (isinstance(e, OSError) and e.errno in _NO_SPACE) or "disk is full" in str(e):
        text += " — free some disk space: what earlier runs kept is intact and is reused next time"
    return text
