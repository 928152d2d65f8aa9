"""Whole cycles through a real daemon against both Ollamas (the double's ``version``).

An Ollama before 0.34.1 gets an adapter version; after it is upgraded, the next
candidate's adapter create is refused mid-publish and the same candidate goes live
fused and quantized, its completion differing from the base's; rollback restores the
adapter version, which still serves.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from tests.conftest import git, make_repo
from tests.daemon_proc import DaemonProc
from tests.test_cycle import cycle_config, set_idle, source_files

pytest.importorskip("torch")
pytest.importorskip("tree_sitter")
pytest.importorskip("llama_cpp")

@pytest.fixture
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny import make_tiny_gguf

    return make_tiny_gguf(tmp_path_factory.mktemp("base"))


def _config(base: Path, url: str, steps: int) -> str:
    text = cycle_config(base, url, 'auto_approve = true\nquantize = "q8_0"\n')
    return text.replace("max_steps = 24", f"max_steps = {steps}")


def _entry(st: dict, name: str = "proj") -> dict:
    return next(r for r in st["repos"] if r["name"] == name)


def _versions(home: Path) -> dict[int, tuple[str, str]]:
    import json

    db = sqlite3.connect(home / "state" / "forged.db")
    rows = db.execute("SELECT version, state, metrics FROM model_versions").fetchall()
    db.close()
    return {v: (state, (json.loads(m or "{}").get("published") or {}).get("kind")) for v, state, m in rows}


def _complete(url: str, model: str) -> str:
    import ollama

    raw = "def add(a, b):\n    "
    return ollama.Client(url).generate(model=model, prompt=raw, raw=True,
                                       options={"temperature": 0, "num_predict": 12}).response


def test_adapter_then_refused_adapter_goes_live_fused_and_rollback(short_tmp: Path, tiny_base: Path) -> None:
    from tests.ollama_double import MT_MODEL, OllamaDouble

    fixtures = short_tmp / "probe"
    set_idle(fixtures, 20 * 60)
    env = {"FORGED_PROBE_FIXTURES": str(fixtures)}
    with OllamaDouble(short_tmp / "ollama", version="0.33.5") as od:
        d = DaemonProc(short_tmp / "h", _config(tiny_base, od.url, 24), env=env).start()
        try:
            repo = make_repo(short_tmp / "proj", source_files())
            assert d.ctl("repos", "add", str(repo)).returncode == 0
            d.wait_for(lambda st: _entry(st)["live_version"] == 1, timeout=600)
            assert _versions(d.home) == {1: ("live", "adapter")}
            adapter_v1 = od.read_manifest("forged/proj:v1")
            assert any(x["mediaType"].endswith(".adapter") for x in adapter_v1["layers"])
        finally:
            d.stop()

        # Ollama is upgraded while the next candidate is being created: the judge was told
        # adapters work (0.33.5), the create of v2's adapter is refused by 0.34.1.
        for i in range(4):
            (repo / f"pkg/extra{i}.py").write_text(source_files(12)[f"pkg/mod{8 + i}.py"])
        git(repo, "add", "-A")
        git(repo, "commit", "-qm", "more")
        od.hold_create = "forged/proj:v2"
        d = DaemonProc(short_tmp / "h", _config(tiny_base, od.url, 48), env=env).start()
        try:
            assert d.ctl("forge", "proj", "--force").returncode == 0
            deadline = time.monotonic() + 600
            while od.held == 0 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert od.held == 1, "the candidate never reached Ollama"
            od.version = "0.34.1"
            od.release.set()
            st = d.wait_for(lambda st: _entry(st)["live_version"] == 2 and st, timeout=120)
            assert _entry(st)["stage"] == "watching"
            assert _versions(d.home) == {1: ("published", "adapter"), 2: ("live", "fused")}

            # what :latest serves: the fused model, quantized to q8_0, no adapter layer
            latest = od.read_manifest("forged/proj:latest")
            layers = {x["mediaType"]: x for x in latest["layers"]}
            assert not any(k.endswith(".adapter") for k in layers)
            assert od.kv(layers[MT_MODEL]["digest"])["general.file_type"] == 7  # Q8_0
            assert od.kv(layers[MT_MODEL]["digest"]).get("forged.export") == "fused"
            base_tag = next(m["name"] for m in od.tags()["models"] if m["name"].startswith("forged/base-"))
            assert _complete(od.url, "forged/proj:latest") != _complete(od.url, base_tag)

            detail = d.ctl("status", "proj")
            assert detail.returncode == 0, detail.stderr
            assert "v2  live       fused    q8_0" in detail.stdout and "v1  published  adapter" in detail.stdout
            _, repo_detail = d.request("GET", "/v1/repos/proj")
            note = repo_detail["cycles"][0]["metrics"].get("publish_note", "")
            assert "LoRA adapters are no longer supported" in note and "published fused" in note

            r = d.ctl("rollback", "proj")
            assert r.returncode == 0, r.stderr
            assert od.manifest_digest("forged/proj:latest") == od.manifest_digest("forged/proj:v1")
            assert _complete(od.url, "forged/proj:latest")  # the adapter version still serves
        finally:
            od.release.set()
            d.stop()
