"""The cycle report renders whatever the stored JSON holds, escaped, without raising (issue 16 #7)."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest

from forged.common.judged import MetricLine
from forged.daemon.report import (
    CHAR_PX,
    TICK_ROOM,
    moving_average,
    svg_deltas,
    svg_loss,
    write_report,
)

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
    assert "could not be drawn" not in out.read_text()  # handled, not caught by the section guard


def test_odd_result_files_render_without_raising(tmp_path: Path) -> None:
    (tmp_path / "train.result.json").write_text("[1, 2, 3]")
    (tmp_path / "judge.result.json").write_text('{"judge": {"passed": "<b>", "reasons": null}, "fidelity": [1]}')
    (tmp_path / "dataset").mkdir()
    (tmp_path / "dataset" / "manifest.json").write_text('"just a string"')
    text = write_report(tmp_path, "r", {"id": 1, "metrics": "{}"}).read_text()
    assert "Passed: <b>&lt;b&gt;</b>" in text


# ---------------------------------------------------------------- a realistic cycle, drawn

DELTAS = {  # the demo's first cycle (docs/benchmarks.md): paired candidate − base
    "bpb": {"candidate": 1.1004, "reference": 1.2544, "diff": -0.1540, "lo": -0.1760, "hi": -0.1332, "n": 24,
            "target": 0.01, "n_for_target": 117},
    "fim_bpb": {"candidate": 1.5400, "reference": 1.8002, "diff": -0.2602, "lo": -0.2826, "hi": -0.2419, "n": 276},
    "fim_exact": {"candidate": 0.0, "reference": 0.015625, "diff": -0.015625, "lo": -0.046875, "hi": 0.0, "n": 64},
}
EXAMPLES = [{"path": "forged/x.py", "prefix": "def add(a, b):\n", "suffix": "\n\ndef sub(a, b):",
             "reference": "    return a + b", "base": "    pass", "candidate": "    return a + b"}] * 3
RETRIEVAL = {"n": 64, "k": 2, "max_chars": 1200, "bpb": {"base": 1.8, "base_rag": 1.7, "candidate": 1.54,
                                                        "candidate_rag": 1.5},
             "gains": {"retrieval": {"candidate": 1.7, "reference": 1.8, "diff": -0.1, "lo": -0.15, "hi": -0.05,
                                     "n": 64},
                       "fine_tuning": {"candidate": 1.54, "reference": 1.8, "diff": -0.26, "lo": -0.3, "hi": -0.2,
                                       "n": 64}},
             "note": "QA: RAFT questions carry their retrieved documents already."}


def realistic() -> dict:
    base = {"bpb": 1.2544, "fim_bpb": 1.8008, "fim_exact": 0.015625, "n_texts": 24, "n_fim_bpb": 276, "n_fim": 64}
    cand = {"bpb": 1.1004, "fim_bpb": 1.5406, "fim_exact": 0.0, "n_texts": 24, "n_fim_bpb": 276, "n_fim": 64}
    judge = {"reference": "base", "deltas": DELTAS, "base": base, "live": None, "candidate": cand,
             "passed": True, "reasons": [], "examples": EXAMPLES, "retrieval": RETRIEVAL}
    train = {"steps": 40, "loss_curve": [3.0 - i * 0.02 for i in range(40)], "evals": [[0, 2.954], [40, 2.257]]}
    dataset = {"by_kind": {"train": {"fim": 951, "raft": 2917, "continuation": 1155}, "valid": {"fim": 276}},
               "by_lang": {"train": {"python": 5300, "markdown": 196}, "valid": {"python": 441}}}
    return {"judge": judge, "train": train, "dataset": dataset}


def test_a_realistic_cycle_is_drawn_with_intervals_and_n(tmp_path: Path) -> None:
    text = write_report(tmp_path, "forged", {"id": 1, "stage": "judged", "metrics": json.dumps(realistic())}).read_text()
    assert "could not be drawn" not in text
    assert text.count("<svg") == 5  # changes, loss, retrieval, kinds, languages
    # the metric-delta chart: each metric's label with n, its interval in % (bpb) or points (rates)
    assert "FIM-middle bpb (n=276)" in text
    assert "-14.5% [-15.7, -13.4]" in text and "-1.6 pts [-4.7, +0.0]" in text
    assert "FIM-middle bpb 1.80→1.54 (−14.5%, 95% CI −15.7…−13.4%, n=276)" in text
    # the loss chart: the training line and both held-out evaluations as points
    assert "held-out loss (2 evaluations)" in text and "<title>step 40: 2.2570</title>" in text
    # dataset composition by kind and by language, training side and held-out side
    assert 'aria-label="examples by kind"' in text and 'aria-label="examples by language"' in text
    assert ">2,917<" in text and ">441<" in text
    # three completions side by side, retrieval against fine-tuning
    assert text.count("<td><pre>    return a + b</pre></td>") == 6 and "<pre>    pass</pre>" in text
    assert "retrieval alone (base+ctx − base) (n=64)" in text and "RAFT questions carry" in text
    assert "<h2>Sample sizes</h2>" in text and "<td>117</td>" in text and "<td>0.0214</td>" in text
    assert "<script" not in text and "http" not in text.replace("http://www.w3.org", "")  # nothing fetched


@pytest.mark.parametrize("breakage", [
    lambda m: m["judge"].update(deltas={"bpb": {"lo": "x", "hi": None, "n": "many"}, "fim_bpb": [1]}),
    lambda m: m["judge"].update(examples=[None, "text", {"prefix": 3}], retrieval={"gains": {"both": 7}}),
    lambda m: m["judge"].update(retrieval=[1], examples={"a": 1}),
    lambda m: m["train"].update(evals=[["a", 1], [None], 5, {"step": 1, "loss": "nan"}], loss_curve=[1.0]),
    lambda m: m["train"].update(evals="nope"),
    lambda m: m["dataset"].update(by_kind={"train": {"fim": "many", "raft": None}, "valid": []}, by_lang=3),
    lambda m: m["dataset"].update(by_kind={"train": {}, "valid": {"fim": 0}}),
    lambda m: m["judge"]["deltas"].update(bpb={"candidate": 1.0, "reference": 0.0, "diff": 1.0, "lo": 0.5,
                                               "hi": 1.5, "n": 3}),
])
def test_bad_stored_values_still_render(tmp_path: Path, breakage) -> None:
    m = realistic()
    breakage(m)
    text = write_report(tmp_path, "r", {"id": 1, "metrics": json.dumps(m)}).read_text()
    assert "could not be drawn" not in text and text.startswith("<!doctype html>")


def _texts(svg: str) -> list[tuple[float, str, str]]:
    """(x, text-anchor, text) of every text element in an SVG chart."""
    return [(float(x), a, t) for x, a, t in re.findall(r'<text x="([\d.]+)" y="[\d.]+" text-anchor="(\w+)"[^>]*>([^<]*)<', svg)]


def test_delta_chart_labels_fit_and_axis_numbers_do_not_overprint() -> None:
    long = "fine-tuning alone (candidate − base)"  # the retrieval chart's, clipped once
    lines = [MetricLine("a", long, "ratio", 1.6, 1.4, -0.16, -0.25, -0.12, 24),
             MetricLine("b", "bpb", "ratio", 1.3, 1.1, -0.17, -0.2, -0.15, 24)]
    texts = _texts(svg_deltas(lines))
    label = next((x, t) for x, a, t in texts if t.startswith(long))
    assert label[0] - CHAR_PX * len(label[1]) >= 0  # right-aligned at x: it starts inside the chart
    axis = sorted(x for x, _, t in texts if t == "0" or re.fullmatch(r"[+-]\d+\.\d", t))
    # every interval is below zero, so the right end is only padding: 0 and the left end are drawn, apart
    assert len(axis) == 2 and axis[1] - axis[0] >= TICK_ROOM


def test_delta_chart_gives_each_unit_its_own_axis() -> None:
    # The demo's shape: QA 0/3 → 3/3 (+100 points) beside bits/byte −14%: on one shared axis
    # the bits/byte interval would shrink to a few pixels.
    lines = [MetricLine("bpb", "bpb", "ratio", 1.30, 1.12, -0.18, -0.20, -0.16, 24),
             MetricLine("raft_acc_oracle", "QA", "share", 0.0, 1.0, 1.0, 1.0, 1.0, 3)]
    svg = svg_deltas(lines, width=760)
    bars = [(float(a), float(b)) for a, b in re.findall(
        r'<line x1="([\d.]+)" y1="[\d.]+" x2="([\d.]+)" y2="[\d.]+" stroke="#\w+" stroke-width="3"/>', svg)]
    assert len(bars) == 2
    bpb_bar, qa_bar = bars
    assert bpb_bar[1] - bpb_bar[0] > 40  # its own scale: the interval is drawn wide enough to read
    zeros = [x for x, _, t in _texts(svg) if t == "0"]
    assert len(zeros) == 2  # one zero line per axis
    captions = [t for _, _, t in _texts(svg) if "percentage points" in t or "% of the reference" in t]
    assert len(captions) == 2


def test_the_loss_chart_draws_a_moving_average_under_the_noise() -> None:
    noisy = [(float(i), 2.0 + (0.8 if i % 2 else -0.8) - i / 100) for i in range(1, 41)]
    trend = moving_average(noisy)
    assert [x for x, _ in trend] == [x for x, _ in noisy]
    def jumps(pts: list[tuple[float, float]]) -> float:
        return max(abs(b[1] - a[1]) for a, b in zip(pts[5:], pts[6:], strict=False))

    assert jumps(trend) < 0.25 * jumps(noisy)  # the step-to-step swing of ±0.8 is averaged out
    assert abs(trend[-1][1] - statistics.mean(y for _, y in noisy[-5:])) < 1e-9  # window: 40 // 8 steps
    assert "moving average</title>" in svg_loss(noisy, [(40.0, 1.5)])
