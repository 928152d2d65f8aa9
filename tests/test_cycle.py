"""Whole forge cycles through a real daemon, with a tiny model and the Ollama double.

The idle gate is driven the way a Mac reports it: recorded ``ioreg -c IOHIDSystem``
output with a HIDIdleTime the test changes (FORGED_PROBE_FIXTURES, the gates' seam).
"""

from __future__ import annotations

import json
import signal
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import git, make_repo
from tests.daemon_proc import DaemonProc

pytest.importorskip("torch")
pytest.importorskip("tree_sitter")
pytestmark = pytest.mark.slow  # whole cycles through a daemon and its workers: minutes each

IOREG = (Path(__file__).parent / "fixtures" / "gates" / "ioreg_IOHIDSystem.txt").read_text()


def set_idle(fixtures: Path, seconds: float) -> None:
    import re

    fixtures.mkdir(exist_ok=True)
    text = re.sub(r'"HIDIdleTime" = \d+', f'"HIDIdleTime" = {int(seconds * 1e9)}', IOREG)
    (fixtures / "ioreg.txt").write_text(text)


def source_files(n: int = 8) -> dict[str, str]:
    files = {}
    for i in range(n):
        files[f"pkg/mod{i}.py"] = textwrap.dedent(f'''\
            """Module {i} of the sample package."""


            def add_{i}(a, b):
                """Return the sum of a and b plus {i}."""
                total = a + b
                return total + {i}


            class Counter{i}:
                """Counts things, starting at {i}."""

                def __init__(self):
                    self.value = {i}

                def bump(self, step=1):
                    """Increase the counter by step and return it."""
                    self.value += step
                    return self.value
            ''')
    return files


def cycle_config(base: Path, ollama: str, extra: str = "") -> str:
    return textwrap.dedent(f"""\
        [daemon]
        retry_seconds = 1.0
        worker_nice = 0
        [watch]
        settle_seconds = 0.2
        [thresholds]
        min_changed_lines = 40
        min_commits = 100
        [gates]
        poll_seconds = 0.5
        min_idle_minutes = 5.0
        power = false
        memory = false
        thermal = false
        disk = false
        [mine]
        heldout_fraction = 0.3
        workers = 1
        [train]
        base_model = "{base}"
        method = "lora"
        rank = 4
        alpha = 8.0
        max_steps = 24
        batch_size = 2
        seq_len = 128
        checkpoint_every = 4
        learning_rate = 0.003
        warmup_steps = 0
        threads = 1
        [judge]
        max_examples = 6
        min_bpb_gain = 0.0
        tolerance = 1.0
        [publish]
        ollama_host = "{ollama}"
        """) + extra


@pytest.fixture
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny import make_tiny_gguf

    return make_tiny_gguf(tmp_path_factory.mktemp("base"))


def stage_of(st: dict, name: str) -> str:
    return next(r for r in st["repos"] if r["name"] == name)["stage"]


def test_cycle_waits_for_gates_pauses_resumes_and_goes_live(short_tmp: Path, tiny_base: Path) -> None:
    pytest.importorskip("llama_cpp")
    from tests.ollama_double import OllamaDouble

    fixtures = short_tmp / "probe"
    set_idle(fixtures, 3)  # the user is typing
    with OllamaDouble(short_tmp / "ollama") as ollama:
        d = DaemonProc(short_tmp / "h", cycle_config(tiny_base, ollama.url),
                       env={"FORGED_PROBE_FIXTURES": str(fixtures)}).start()
        try:
            repo = make_repo(short_tmp / "proj", source_files())
            assert d.ctl("repos", "add", str(repo)).returncode == 0
            d.wait_for(lambda st: stage_of(st, "proj") == "due")
            time.sleep(2)  # gates closed: it waits
            st = d.request("GET", "/v1/status")[1]
            assert stage_of(st, "proj") == "due" and st["gates"]["idle"]["state"] == "closed"

            set_idle(fixtures, 20 * 60)  # user away: it runs
            d.wait_for(lambda st: (next(r for r in st["repos"] if r["name"] == "proj").get("cycle") or {})
                       .get("progress", {}) and st["worker"] and st["worker"]["stage"] == "train"
                       and (st["worker"]["progress"].get("step") or 0) >= 5, timeout=240)
            set_idle(fixtures, 1)  # user is back: pause within 30 s, checkpoint on disk
            t0 = time.monotonic()
            d.wait_for(lambda st: stage_of(st, "proj") == "paused", timeout=30)
            assert time.monotonic() - t0 < 30
            ckpts = list((d.home / "state" / "work" / "proj").glob("cycle-*/train/checkpoints/*"))
            assert ckpts, "a paused training run leaves a checkpoint"

            set_idle(fixtures, 20 * 60)
            d.wait_for(lambda st: stage_of(st, "proj") == "awaiting_approval", timeout=400)
            code, detail = d.request("GET", "/v1/repos/proj")
            assert code == 200, detail
            cyc = detail["cycles"][0]
            judge = cyc["metrics"]["judge"]
            assert judge["passed"] and judge["candidate"]["bpb"] < judge["base"]["bpb"]
            assert cyc["metrics"]["fidelity"]["passed"]
            import ollama as ollama_client

            client = ollama_client.Client(host=ollama.url)
            tags = {m.model for m in client.list().models}
            # published for approval, not live: nothing unapproved reaches :latest
            assert "forged/proj:v1" in tags and "forged/proj:latest" not in tags, tags
            r = d.ctl("approve", "proj")
            assert r.returncode == 0, r.stderr
            st = d.wait_for(lambda st: stage_of(st, "proj") == "watching" and st, timeout=30)
            entry = next(r for r in st["repos"] if r["name"] == "proj")
            assert entry["live_version"] == 1 and entry["live_tag"] == "forged/proj:latest"
            tags = {m.model for m in client.list().models}
            assert "forged/proj:latest" in tags and "forged/proj:v1" in tags
            # the training stage resumed from its checkpoint rather than starting over
            code, events = d.request("GET", "/v1/events?after=0&follow=0")
            lines = [json.loads(x) for x in events.decode().splitlines()]
            resumed = [e for e in lines if e.get("kind") == "progress" and e["data"].get("kind") == "resumed"]
            assert resumed and resumed[0]["data"]["step"] >= 4, "training resumed from its checkpoint, not from 0"
            report = d.ctl("report", "proj")
            assert report.returncode == 0 and Path(report.stdout.strip()).read_text().startswith("<!doctype html>")
        finally:
            d.stop()


def test_daemon_kill9_mid_training_recovers_and_never_runs_two_workers(short_tmp: Path, tiny_base: Path) -> None:
    fixtures = short_tmp / "probe"
    set_idle(fixtures, 20 * 60)
    d = DaemonProc(short_tmp / "h", cycle_config(tiny_base, "http://127.0.0.1:9", "[publish.x]\n")
                   .replace("[publish.x]\n", ""), env={"FORGED_PROBE_FIXTURES": str(fixtures)}).start()
    try:
        repo = make_repo(short_tmp / "proj", source_files())
        assert d.ctl("repos", "add", str(repo)).returncode == 0
        st = d.wait_for(lambda st: st["worker"] and st["worker"]["stage"] == "train"
                        and (st["worker"]["progress"].get("step") or 0) >= 4 and st, timeout=240)
        worker_pid = st["worker"]["pid"]
        d.stop(signal.SIGKILL)
        # the worker dies with its daemon (PR_SET_PDEATHSIG): no orphan keeps training
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and Path(f"/proc/{worker_pid}").exists():
            status = Path(f"/proc/{worker_pid}/status").read_text() if Path(f"/proc/{worker_pid}/status").exists() else ""
            if "State:\tZ" in status:
                break
            time.sleep(0.5)
        assert not Path(f"/proc/{worker_pid}").exists() or "State:\tZ" in Path(f"/proc/{worker_pid}/status").read_text()
        git(repo, "commit", "--allow-empty", "-q", "-m", "while the daemon was down")
        d.start()
        # Ollama is down (port 9): the cycle resumes training, is judged, and waits ready to publish.
        st = d.wait_for(lambda st: stage_of(st, "proj") in ("ready_to_publish", "rejected", "failed") and st, timeout=400)
        entry = next(r for r in st["repos"] if r["name"] == "proj")
        assert entry["stage"] == "ready_to_publish", entry
        manual = entry["cycle"]["manual_command"] or ""
        # never asked this Ollama: commands a current one takes (the fused model, no ADAPTER)
        assert "ollama create" in manual and "ADAPTER" not in manual and "model-" in manual, manual
        assert entry["live_version"] is None  # nothing unapproved went live
        code, detail = d.request("GET", "/v1/repos/proj")
        assert code == 200, detail
        train = detail["cycles"][0]["metrics"]["train"]
        assert train["steps"] == 24
        code, events = d.request("GET", "/v1/events?after=0&follow=0")
        lines = [__import__("json").loads(x) for x in events.decode().splitlines()] if isinstance(events, bytes) \
            else [events]
        resumed = [e for e in lines if e.get("kind") == "progress" and e["data"].get("kind") == "resumed"]
        assert resumed and resumed[0]["data"]["step"] >= 4, "training resumed from its checkpoint, not from 0"
    finally:
        if d.proc and d.proc.poll() is None:
            d.stop()


def test_worker_kill9_at_each_stage_is_retried_and_cycle_finishes(short_tmp: Path, tiny_base: Path) -> None:
    import os

    fixtures = short_tmp / "probe"
    set_idle(fixtures, 20 * 60)
    d = DaemonProc(short_tmp / "h", cycle_config(tiny_base, "http://127.0.0.1:9"),
                   env={"FORGED_PROBE_FIXTURES": str(fixtures)}).start()
    try:
        repo = make_repo(short_tmp / "proj", source_files())
        assert d.ctl("repos", "add", str(repo)).returncode == 0
        killed: list[str] = []
        for stage in ("mine", "train", "judge"):
            st = d.wait_for(lambda st, stage=stage: st["worker"] and st["worker"]["stage"] == stage and st,
                            timeout=300, interval=0.05)
            killed_pid = st["worker"]["pid"]
            os.kill(killed_pid, signal.SIGKILL)
            killed.append(stage)
            # the crash is recorded as a failure with a retry (the retry may already be running)
            st = d.wait_for(lambda st: stage_of(st, "proj") == "failed" and st, timeout=60, interval=0.05)
            entry = next(r for r in st["repos"] if r["name"] == "proj")
            assert entry["cycle"]["attempts"] >= 1
            assert st["worker"] is None or st["worker"]["pid"] != killed_pid
        st = d.wait_for(lambda st: stage_of(st, "proj") in ("ready_to_publish", "rejected") and st, timeout=400)
        entry = next(r for r in st["repos"] if r["name"] == "proj")
        assert entry["stage"] == "ready_to_publish", entry
        assert killed == ["mine", "train", "judge"] and entry["live_version"] is None
    finally:
        if d.proc and d.proc.poll() is None:
            d.stop()


def wait_dead(pid: int, timeout: float = 40) -> bool:
    """True once ``pid`` is gone (or a zombie: dead, waiting to be reaped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if "State:\tZ" in Path(f"/proc/{pid}/status").read_text():
                return True
        except OSError:
            return True
        time.sleep(0.2)
    return False


def test_daemon_kill9_while_mining_judging_and_publishing_recovers(short_tmp: Path, tiny_base: Path) -> None:
    """kill -9 of the daemon in each remaining stage (training has its own test above):
    every restart finishes the interrupted stage, no two workers ever overlap, and
    nothing reaches ``:latest`` until the cycle is approved."""
    import sqlite3

    pytest.importorskip("llama_cpp")
    import ollama as ollama_client

    from tests.ollama_double import OllamaDouble

    fixtures = short_tmp / "probe"
    set_idle(fixtures, 20 * 60)
    with OllamaDouble(short_tmp / "ollama") as ollama:
        ollama.hold_create = "forged/proj:v"  # the candidate's create hangs until released
        d = DaemonProc(short_tmp / "h", cycle_config(tiny_base, ollama.url),
                       env={"FORGED_PROBE_FIXTURES": str(fixtures)}).start()
        try:
            repo = make_repo(short_tmp / "proj", source_files())
            assert d.ctl("repos", "add", str(repo)).returncode == 0
            for stage in ("mine", "judge"):
                st = d.wait_for(lambda st, stage=stage: st["worker"] and st["worker"]["stage"] == stage and st,
                                timeout=400, interval=0.05)
                worker_pid = st["worker"]["pid"]
                d.stop(signal.SIGKILL)
                assert wait_dead(worker_pid), f"the {stage} worker outlived its daemon"
                d.start()

            # Publishing runs in the daemon: kill it while the candidate's create is in flight.
            deadline = time.monotonic() + 400
            while ollama.held == 0 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert ollama.held == 1, "the candidate was never sent to Ollama"
            d.stop(signal.SIGKILL)
            ollama.release.set()  # Ollama finishes the orphaned create on its own
            tags = {m.model for m in ollama_client.Client(host=ollama.url).list().models}
            assert "forged/proj:latest" not in tags
            d.start()
            st = d.wait_for(lambda st: stage_of(st, "proj") in ("awaiting_approval", "failed", "rejected") and st,
                            timeout=120)
            entry = next(r for r in st["repos"] if r["name"] == "proj")
            assert entry["stage"] == "awaiting_approval", entry
            assert entry["live_version"] is None
            tags = {m.model for m in ollama_client.Client(host=ollama.url).list().models}
            assert "forged/proj:v1" in tags and "forged/proj:latest" not in tags

            assert d.ctl("approve", "proj").returncode == 0
            st = d.wait_for(lambda st: stage_of(st, "proj") == "watching" and st, timeout=60)
            entry = next(r for r in st["repos"] if r["name"] == "proj")
            assert entry["live_version"] == 1
            tags = {m.model for m in ollama_client.Client(host=ollama.url).list().models}
            assert "forged/proj:latest" in tags

            # One cycle, one version; the interrupted jobs never overlapped the next one.
            db = sqlite3.connect(d.home / "state" / "forged.db")
            jobs = db.execute("SELECT stage, state, started_at, finished_at FROM jobs ORDER BY started_at").fetchall()
            versions = db.execute("SELECT version, state FROM model_versions").fetchall()
            db.close()
            assert [j[:2] for j in jobs if j[1] == "interrupted"] == [("mine", "interrupted"), ("judge", "interrupted")]
            assert [j[0] for j in jobs if j[1] == "done"] == ["mine", "train", "judge"]
            for a, b in zip(jobs, jobs[1:], strict=False):
                assert a[3] is not None and a[3] <= b[2], f"jobs overlap: {a} and {b}"
            assert versions == [(1, "live")]
        finally:
            ollama.release.set()
            if d.proc and d.proc.poll() is None:
                d.stop()


def test_a_stage_warning_reaches_status_log_and_report(short_tmp: Path, tiny_base: Path) -> None:
    """The trainer skips examples a tiny seq_len leaves nothing to learn in, and says so: the
    warning is kept with the cycle (status, `forgectl status`, the HTML report) and logged."""
    fixtures = short_tmp / "probe"
    set_idle(fixtures, 20 * 60)
    conf = cycle_config(tiny_base, "http://127.0.0.1:9").replace("seq_len = 128", "seq_len = 12")
    d = DaemonProc(short_tmp / "h", conf, env={"FORGED_PROBE_FIXTURES": str(fixtures)}).start()
    try:
        repo = make_repo(short_tmp / "proj", source_files())
        assert d.ctl("repos", "add", str(repo)).returncode == 0
        st = d.wait_for(lambda st: stage_of(st, "proj") in ("judging", "ready_to_publish", "rejected", "failed")
                        and st, timeout=300)
        entry = next(r for r in st["repos"] if r["name"] == "proj")
        warnings = entry["cycle"]["warnings"]
        assert [w["stage"] for w in warnings] == ["train"], entry
        assert "left nothing to learn once cut to seq_len 12" in warnings[0]["message"]
        out = d.ctl("status").stdout
        assert "proj: warning (train):" in out and "seq_len 12" in out
        rep = d.ctl("report", "proj")
        assert rep.returncode == 0, rep.stderr
        html_path = Path(rep.stdout.strip().split()[-1])
        assert "<h2>Warnings</h2>" in html_path.read_text() and "seq_len 12" in html_path.read_text()
        log = (short_tmp / "h" / "logs" / "forged.jsonl").read_text()
        assert '"event": "worker_warning"' in log
    finally:
        if d.proc and d.proc.poll() is None:
            d.stop()
