"""The cycle report renders whatever the stored JSON holds, escaped, without raising (issue 16 #7)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from forged.daemon.report import write_report

EVIL = "<script>alert(1)</script>"


def cycle(metrics: object) -> dict:
    return {"id": 3, "stage": EVIL, "reason": EVIL, "head_commit": EVIL, "metrics": metrics}


def test_every_stored_value_is_escaped(tmp_path: Path) -> None:
    judge = {"passed": EVIL, "reasons": [EVIL, 7], "base": {"bpb": 1.0, EVIL: 2.0},
             "candidate": {"bpb": 0.9}}
    metrics = {"judge": judge, "warnings": [{"stage": EVIL, "message": EVIL}],
               "train": {"loss_curve": [3.0, 2.0], EVIL: EVIL}, "dataset": {EVIL: [EVIL]}}
    text = write_report(tmp_path, EVIL, cycle(json.dumps(metrics))).read_text()
    assert "<script>" not in text and text.count("&lt;script&gt;") >= 8
    assert "<svg" in text and "0.9000" in text


@pytest.mark.parametrize("metrics", [
    {"judge": {"passed": True, "reasons": "one string, not a list"}},
    {"judge": {"passed": False, "reasons": {"a": 1}}},
    {"judge": {"passed": None, "reasons": 5, "base": [1, 2], "candidate": "x"}},
    {"judge": "not an object"},
    {"train": {"loss_curve": ["nan?", None, {"step": "a"}, [1], {"x": 1}, "inf", 2.5, [3, 1.5]]}},
    {"train": {"loss_curve": "not a list"}},
    {"train": [1, 2]},
    {"warnings": ["a bare string", 3, None]},
    {"warnings": {"stage": "train"}},
    {"dataset": "text"},
    "{not json",
    "[1, 2]",
    None,
    7,
])
def test_odd_stored_json_renders_without_raising(tmp_path: Path, metrics: object) -> None:
    m = metrics if isinstance(metrics, str) or metrics is None else json.dumps(metrics)
    if isinstance(metrics, int):
        m = metrics
    out = write_report(tmp_path, "r", {"id": 1, "stage": "judged", "metrics": m})
    assert out.read_text().startswith("<!doctype html>")


def test_odd_result_files_render_without_raising(tmp_path: Path) -> None:
    (tmp_path / "train.result.json").write_text("[1, 2, 3]")
    (tmp_path / "judge.result.json").write_text('{"judge": {"passed": "<b>", "reasons": null}, "fidelity": [1]}')
    (tmp_path / "dataset").mkdir()
    (tmp_path / "dataset" / "manifest.json").write_text('"just a string"')
    text = write_report(tmp_path, "r", {"id": 1, "metrics": "{}"}).read_text()
    assert "Passed: <b>&lt;b&gt;</b>" in text
