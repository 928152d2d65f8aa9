"""How the worker is started: low priority without being confined to efficiency cores."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from forged.common.protocol import EXIT_STOPPED
from forged.daemon.workers import qos_prefix


def test_macos_worker_is_clamped_to_utility_qos_not_background(tmp_path: Path) -> None:
    tp = tmp_path / "taskpolicy"
    tp.write_text("#!/bin/sh\nexec \"$@\"\n")
    tp.chmod(tp.stat().st_mode | stat.S_IXUSR)
    prefix = qos_prefix("darwin", str(tp))
    assert prefix == [str(tp), "-c", "utility"]
    assert "-b" not in prefix  # background QoS would pin the worker to the E-cores
    assert qos_prefix("darwin", str(tmp_path / "missing")) == []  # no taskpolicy: plain nice only
    assert qos_prefix("linux", str(tp)) == []


def test_worker_lowers_its_own_priority(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    from forged.common import config

    cfg = config.to_dict(config.Config())
    cfg["daemon"]["worker_nice"] = 7
    (tmp_path / "job.json").write_text(json.dumps({"config": cfg, "repo_path": str(tmp_path / "nope"),
                                                   "head_commit": "HEAD", "cache_dir": str(tmp_path / "c")}))
    # The stage reports the niceness it runs at (the worker sets it before any stage runs).
    code = ("import os, sys, forged.worker.main as w\n"
            "w.run_stage = lambda *a: {'nice': os.nice(0)}\n"
            "sys.exit(w.main(['mine', '--cycle-dir', sys.argv[1]]))\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "mine.result.json").read_text())
    assert result["nice"] == min(os.nice(0) + 7, 19)  # niceness stops at 19 (a suite run under nice)


def test_worker_stops_under_a_burst_of_sigterms() -> None:
    # When the daemon is killed, the kernel sends PR_SET_PDEATHSIG once per daemon thread
    # the worker is re-parented from: a burst. A handler that took a lock (Event.set) could
    # be re-entered while holding it and deadlock the worker for good (seen in CI: a
    # trainer left running after a daemon kill -9).
    import signal
    import subprocess
    import sys

    code = ("import threading, time, forged.worker.main as w\n"
            "stop = threading.Event()\n"
            "w._stop_when_asked(stop, 'mine')\n"
            "print('ready', flush=True)\n"
            "while True:\n"
            "    time.sleep(0.001)\n")
    for _ in range(5):
        p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        try:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
            for _ in range(3000):
                try:
                    os.kill(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    break
            assert p.wait(timeout=20) == EXIT_STOPPED  # the stop went through
        finally:
            p.kill()
            p.wait()
