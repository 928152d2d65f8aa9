"""Idle daemon cost: RSS and CPU of `forged` with nothing to do (or N watched repos).

    python bench/daemon/idle.py [--seconds 60] [--repos 0]

Starts a real daemon in a temp FORGED_HOME, waits for it to settle, then samples its
RSS and CPU time over the window. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.conftest import make_repo  # noqa: E402
from tests.daemon_proc import DaemonProc  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--repos", type=int, default=0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fgb", dir="/tmp") as tmp:
        d = DaemonProc(Path(tmp) / "h").start()
        for i in range(args.repos):
            repo = make_repo(Path(tmp) / f"r{i}", {"a.py": "def f():\n    return 1\n"})
            assert d.ctl("repos", "add", str(repo)).returncode == 0
        time.sleep(5)  # let start-up work (first accounting, imports) finish
        proc = psutil.Process(d.proc.pid)
        c0, t0 = proc.cpu_times(), time.monotonic()
        peak = 0
        while time.monotonic() - t0 < args.seconds:
            peak = max(peak, proc.memory_info().rss)
            time.sleep(1)
        c1, t1 = proc.cpu_times(), time.monotonic()
        cpu = (c1.user + c1.system) - (c0.user + c0.system)
        d.stop()
        print(json.dumps({
            "seconds": round(t1 - t0, 1), "repos": args.repos, "cpu_s": round(cpu, 3),
            "cpu_pct": round(100 * cpu / (t1 - t0), 3), "peak_rss_mb": round(peak / 2**20, 1),
            "machine": f"{os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, load {os.getloadavg()[0]:.1f}",
        }))


if __name__ == "__main__":
    main()

