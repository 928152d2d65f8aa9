"""Broken configs: one line naming the key and its file:line, the same for `forgectl config
check` and the daemon, and a daemon that fails at start leaves no socket (issue 16 #4)."""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from pathlib import Path

import pytest

from forged.common import config, paths
from tests.daemon_proc import DaemonProc

HEAD = "# my forged config\n\n"  # so a key's line is never just 'line 2'

# (file text after HEAD, key the error must name, 1-based line of that key in the text)
BROKEN: list[tuple[str, str, int]] = [
    ("[gates]\npoll_seconds = inf\n", "gates.poll_seconds", 2),
    ("[gates]\npoll_seconds = nan\n", "gates.poll_seconds", 2),
    ("[daemon]\nretry_seconds = -inf\n", "daemon.retry_seconds", 2),
    ("[watch]\nsettle_seconds = 1\nreconcile_interval_minutes = 1e308\n", "watch.reconcile_interval_minutes", 3),
    ("[train]\nseq_len = 1\n", "train.seq_len", 2),
    ("[train]\ntarget_modules = []\n", "train.target_modules", 2),
    ("[train]\ntarget_modules = ['q proj']\n", "train.target_modules", 2),
    ("[train]\nbase_model = '/nonexistent/model.gguf'\n", "train.base_model", 2),
    ("[train]\nbase_model = 'bundled:gpt5'\n", "train.base_model", 2),
    ("[train]\nbatch_size = 1e8\n", "train.batch_size", 2),
    ("[train]\nrank = 8\nbatch_size = 100000000\n", "train.batch_size", 3),
    ("[train]\nlearning_rate = 0\n", "train.learning_rate", 2),
    ("[train]\nrank = 'sixteen'\n", "train.rank", 2),
    ("[train]\nbackend = 'tpu'\n", "train.backend", 2),
    ("[mine]\nheldout_fraction = 1.5\n", "mine.heldout_fraction", 2),
    ("[mine]\nchunk_tokens = 9223372036854775807\n", "mine.chunk_tokens", 2),
    ("[mine.kinds]\nfim = -1\n", "mine.kinds.fim", 2),
    ("[daemon]\nworker_nice = 40\n", "daemon.worker_nice", 2),
    ("[daemon]\nmax_request_bytes = 1e3\n", "daemon.max_request_bytes", 2),
    ("[publish]\nkeep_versions = 0\n", "publish.keep_versions", 2),
    ("[publish]\nollama_host = 'localhost:11434'\n", "publish.ollama_host", 2),
    ("[publish]\nkeep_alive = 'forever'\n", "publish.keep_alive", 2),
    ("[gates]\nquiet_hours = ['25:00-01:00']\n", "gates.quiet_hours", 2),
    ("[trian]\nrank = 4\n", "trian", 1),
    ("[[repos]]\npath = '/nonexistent/x'\n", "repos[0].path", 2),
]


@pytest.mark.parametrize(("text", "key", "line"), BROKEN, ids=[b[1] + f"-{i}" for i, b in enumerate(BROKEN)])
def test_a_broken_config_is_one_line_naming_the_key_and_its_line(tmp_path: Path, text: str, key: str,
                                                                  line: int) -> None:
    f = tmp_path / "config.toml"
    f.write_text(HEAD + text)
    with pytest.raises(config.ConfigError) as e:
        config.load(f)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{f}:{line + 2}: {key}:"), msg


def test_every_numeric_key_has_a_finite_range() -> None:
    unbounded = []

    def walk(cls: type, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            t = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(t):
                walk(t, f"{prefix}{f.name}.")
            elif t in (int, float):
                lo, hi = f.metadata.get("range", (-math.inf, math.inf))
                if not (math.isfinite(lo) and math.isfinite(hi)) or not lo <= f.default <= hi:
                    unbounded.append(prefix + f.name)

    walk(config.Config, "")
    assert unbounded == []


def test_bundled_bases_match_the_models_module() -> None:
    from forged.common.models import BUNDLED

    assert set(config.BUNDLED_BASES) == set(BUNDLED)


def test_config_check_and_the_daemon_reject_the_same_file_in_one_line(short_tmp: Path) -> None:
    d = DaemonProc(short_tmp / "h", "[gates]\npoll_seconds = inf\n")
    d.start(wait=False)
    assert d.proc is not None and d.proc.wait(timeout=30) == 1
    out = d.proc.stdout.read().decode() if d.proc.stdout else ""
    assert re.search(r"config\.toml:2: gates\.poll_seconds: must be a finite number", out), out
    assert "Traceback" not in out and not d.socket.exists()
    r = d.ctl("config", "check")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "config.toml:2: gates.poll_seconds: must be a finite number" in r.stderr


def test_a_daemon_that_fails_at_start_leaves_no_socket(short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past validation (set here directly), a start that fails after the socket is bound."""
    from forged.daemon.main import Daemon

    monkeypatch.setenv("FORGED_HOME", str(short_tmp / "h"))
    p = paths.resolve()
    cfg = config.Config()
    cfg.gates.poll_seconds = math.inf
    d = Daemon(p, cfg)
    with pytest.raises(OverflowError):
        d.start()
    assert not p.socket.exists()
    d2 = Daemon(p, config.Config())  # the lock was released too
    d2.start()
    try:
        assert p.socket.exists()
    finally:
        d2.stop()
    assert not p.socket.exists()
