"""Watcher benchmarks: an event storm, and idle cost with several repos.

The watcher runs in a process of its own (mode ``child``) so its CPU time and peak RSS
are measured apart from the process making the storm:

    python bench/watch/storm.py storm [--files 25000] [--ignored]   # 2 x files create+delete events
    python bench/watch/storm.py idle [--repos 3] [--seconds 60]

Prints one JSON line per run. The child reports CPU seconds (its own, and its git
children's), peak RSS, the number of accounting passes, and the worst lateness of a
thread that wakes every 10 ms (how responsive the daemon's other threads stay).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

GIT_ENV = {
    **{k: v for k, v in os.environ.items() if not k.startswith("GIT_")},
    "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@example.com",
    "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@example.com",
}


def make_repo(path: Path) -> None:
    path.mkdir(parents=True)
    run = lambda *a: subprocess.run(["git", *a], cwd=path, env=GIT_ENV, check=True, capture_output=True)  # noqa: E731
    run("init", "-q", "-b", "main")
    (path / "src").mkdir()
    for i in range(20):
        (path / "src" / f"m{i}.py").write_text("".join(f"x{j} = {j}\n" for j in range(50)))
    (path / ".gitignore").write_text("node_modules/\n*.log\n")
    run("add", "-A")
    run("commit", "-q", "-m", "init")


def cpu_now() -> tuple[float, float]:
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


class Lateness(threading.Thread):
    """Wakes every 10 ms and records how late it woke: a stand-in for the control socket."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.worst = 0.0
        self.samples: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            t = time.perf_counter()
            time.sleep(0.01)
            late = time.perf_counter() - t - 0.01
            self.samples.append(late)
            self.worst = max(self.worst, late)

    def p99(self) -> float:
        s = sorted(self.samples)
        return s[int(len(s) * 0.99)] if s else 0.0


def child(repos: list[str], settle: float, max_wait: float, ticker: bool = True) -> None:
    """Watch the repos, account on each pass; 'stop' on stdin ends it and prints stats."""
    from forged.common.config import ThresholdConfig
    from forged.daemon.accounting import account
    from forged.daemon.watcher import RepoWatcher

    cfg = ThresholdConfig()
    pass_times: list[float] = []
    late = Lateness()
    if ticker:  # the idle run leaves it out: its 100 wake-ups a second would be the cost measured
        late.start()
    watchers = []
    for r in repos:
        def on_settled(r: str = r) -> None:
            account(Path(r), None, cfg)
            pass_times.append(time.monotonic())
        w = RepoWatcher(Path(r), on_settled, settle=settle, max_wait=max_wait)
        w.start()
        watchers.append(w)
    cpu0 = cpu_now()
    t0 = time.monotonic()
    print(json.dumps({"ready": True}), flush=True)
    sys.stdin.readline()
    cpu1 = cpu_now()
    for w in watchers:
        w.stop()
    late.stop.set()
    stats: dict[str, int] = {}
    for w in watchers:
        for k, v in w.stats.items():
            stats[k] = stats.get(k, 0) + v
    print(json.dumps({
        "cpu_s": round(cpu1[0] - cpu0[0], 3),
        "git_cpu_s": round(cpu1[1] - cpu0[1], 3),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "passes": sum(w.passes for w in watchers),
        "pass_at_s": [round(t - t0, 2) for t in pass_times],
        "worst_lateness_ms": round(late.worst * 1000, 1),
        "p99_lateness_ms": round(late.p99() * 1000, 2),
        "watcher_stats": stats,
        "threads": threading.active_count(),
    }), flush=True)


def start_child(repos: list[Path], settle: float, max_wait: float, ticker: bool = True) -> subprocess.Popen[str]:
    p = subprocess.Popen(
        [sys.executable, __file__, "child", "--settle", str(settle), "--max-wait", str(max_wait),
         *([] if ticker else ["--no-ticker"]), *map(str, repos)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert p.stdout is not None
    assert json.loads(p.stdout.readline())["ready"]
    return p


def finish_child(p: subprocess.Popen[str]) -> dict:
    assert p.stdin is not None and p.stdout is not None
    p.stdin.write("stop\n")
    p.stdin.flush()
    out = json.loads(p.stdout.readline())
    p.wait(timeout=30)
    return out


def storm(files: int, ignored: bool, settle: float, max_wait: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="forged-storm-") as tmp:
        repo = Path(tmp) / "repo"
        make_repo(repo)
        p = start_child([repo], settle, max_wait)
        target = repo / ("node_modules" if ignored else "gen")
        target.mkdir()
        t0 = time.monotonic()
        for i in range(files):  # 100 directories, like an unpacked dependency tree
            d = target / f"d{i % 100}"
            d.mkdir(exist_ok=True)
            (d / f"f{i}.py").write_text("x = 1\n")
        for i in range(files):
            (target / f"d{i % 100}" / f"f{i}.py").unlink()
        storm_s = time.monotonic() - t0
        time.sleep(settle + 2.0)  # let the last pass settle and run
        out = finish_child(p)
    bound = int(storm_s / max_wait) + 1 + (0 if not ignored else 0)
    return {
        "bench": "storm", "events_made": 2 * files, "where": "ignored dir" if ignored else "tracked area",
        "storm_s": round(storm_s, 2), "settle_s": settle, "max_wait_s": max_wait,
        "pass_bound": 0 if ignored else bound, **out,
    }


def idle(n: int, seconds: float, settle: float, max_wait: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="forged-idle-") as tmp:
        repos = [Path(tmp) / f"repo{i}" for i in range(n)]
        for r in repos:
            make_repo(r)
        p = start_child(repos, settle, max_wait, ticker=False)
        time.sleep(seconds)
        out = finish_child(p)
    return {"bench": "idle", "repos": n, "seconds": seconds, **out}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["storm", "idle", "child"])
    ap.add_argument("--no-ticker", action="store_true")
    ap.add_argument("--files", type=int, default=25_000)
    ap.add_argument("--ignored", action="store_true", help="storm inside an ignored directory")
    ap.add_argument("--repos", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--settle", type=float, default=2.0)
    ap.add_argument("--max-wait", type=float, default=30.0)
    ap.add_argument("paths", nargs="*")
    a = ap.parse_intermixed_args()
    if a.mode == "child":
        child(a.paths, a.settle, a.max_wait, ticker=not a.no_ticker)
    elif a.mode == "storm":
        print(json.dumps(storm(a.files, a.ignored, a.settle, a.max_wait)))
    elif a.mode == "idle":
        print(json.dumps(idle(a.repos, a.seconds, a.settle, a.max_wait)))
    else:
        ap.error("mode required")


if __name__ == "__main__":
    main()
