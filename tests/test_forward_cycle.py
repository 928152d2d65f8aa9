"""Two cycles through a real daemon: the second one measures the first version's forward gain.

Commit, cycle (auto-approved to live), commit more, cycle: before training, the second
cycle scores v1 and the base on the code committed since v1's commit. The gain, its n and
interval are kept with the cycle and with v1, and shown by ``forgectl status REPO`` and in
the report.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import git, make_repo
from tests.daemon_proc import DaemonProc
from tests.test_cycle import cycle_config, set_idle, source_files

pytest.importorskip("torch")
pytest.importorskip("tree_sitter")
pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.slow  # two whole cycles through a daemon and its workers


@pytest.fixture
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny import make_tiny_gguf

    return make_tiny_gguf(tmp_path_factory.mktemp("base"))


def _entry(st: dict) -> dict:
    return next(r for r in st["repos"] if r["name"] == "proj")


def _trained(st: dict, after: int) -> bool:
    """A cycle newer than ``after`` got past its training stage (its train result is kept)."""
    e = _entry(st)
    last = e.get("last_cycle") or {}
    if last.get("stage") == "failed":
        raise AssertionError(f"cycle {last.get('id')} failed: {last.get('reason')}")
    return (last.get("id") or 0) > after and last.get("stage") not in ("due", "mining", "training", "paused")


def test_the_next_cycle_records_the_live_models_forward_gain(short_tmp: Path, tiny_base: Path) -> None:
    from tests.ollama_double import OllamaDouble

    fixtures = short_tmp / "probe"
    set_idle(fixtures, 20 * 60)
    conf = cycle_config(tiny_base, "{url}", 'auto_approve = true\nexport = "adapter"\n')
    with OllamaDouble(short_tmp / "ollama") as od:
        d = DaemonProc(short_tmp / "h", conf.replace("{url}", od.url),
                       env={"FORGED_PROBE_FIXTURES": str(fixtures)}).start()
        try:
            repo = make_repo(short_tmp / "proj", source_files())
            live_commit = git(repo, "rev-parse", "HEAD").strip()
            assert d.ctl("repos", "add", str(repo)).returncode == 0
            st = d.wait_for(lambda st: _entry(st)["live_version"] == 1 and st, timeout=600)
            first = _entry(st)["last_cycle"]["id"]
            _, detail = d.request("GET", "/v1/repos/proj")
            assert "forward" not in detail["cycles"][0]["metrics"]  # nothing was live before v1
            assert detail["forward"] == []

            more = source_files(12)
            for i in range(4):
                (repo / f"pkg/next{i}.py").write_text(more[f"pkg/mod{8 + i}.py"])
            git(repo, "add", "-A")
            git(repo, "commit", "-qm", "what came next")
            head = git(repo, "rev-parse", "HEAD").strip()
            assert d.ctl("forge", "proj").returncode == 0
            d.wait_for(lambda st: _trained(st, first), timeout=600)

            _, detail = d.request("GET", "/v1/repos/proj")
            newest = detail["cycles"][0]
            assert "forward" in newest["metrics"], json.dumps({k: v for k, v in newest.items() if k != "metrics"})
            fwd = newest["metrics"]["forward"]
            assert fwd["version"] == 1 and fwd["since"] == live_commit and fwd["head"] == head
            assert fwd["n_files"] == 4 and fwd["n_bytes"] > 1000 and fwd["changed"] == 4
            assert fwd["lo"] <= fwd["gain"] <= fwd["hi"] and fwd["base_bpb"] > 0 and fwd["live_bpb"] > 0
            assert [t["version"] for t in detail["forward"]] == [1]
            assert detail["forward"][0]["gain"] == fwd["gain"]

            shown = d.ctl("status", "proj")
            assert shown.returncode == 0, shown.stderr
            assert "forward gain" in shown.stdout and f"n=4 files, {fwd['n_bytes']:,} bytes" in shown.stdout
            assert f"{100 * fwd['gain']:+.2f}% [{100 * fwd['lo']:+.2f}%, {100 * fwd['hi']:+.2f}%]" in shown.stdout
            plain = d.ctl("status")
            assert f"proj: forward gain v1  {100 * fwd['gain']:+.2f}%" in plain.stdout, plain.stdout
            rep = d.ctl("report", "proj")
            assert rep.returncode == 0, rep.stderr
            page = Path(rep.stdout.strip().split()[-1]).read_text()
            assert "<h2>Forward gain</h2>" in page and f"{100 * fwd['gain']:+.2f}%" in page
        finally:
            print(d.stop()[-20000:])  # the daemon's log, shown when the test fails
