"""Judge: held-out metrics, the gate, and an end-to-end run on a tiny real model."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

from forged.common.config import JudgeConfig, TrainConfig
from forged.common.judged import judge_text
from forged.worker.judge.gate import summary_line
from forged.worker.judge.judge import (
    JudgeError,
    answer_matches,
    edit_similarity,
    extract_answer,
    fim_prediction,
    gate_decision,
    load_heldout,
)

# ---------------------------------------------------------------- gate (pure)


def scores(**kw: float | None) -> dict:
    d = {"bpb": 0.80, "fim_exact": 0.30, "fim_edit_sim": 0.60, "raft_acc_oracle": 0.50,
         "raft_acc_distractors": 0.20}
    d.update(kw)
    return d


CFG = JudgeConfig(min_bpb_gain=0.01, tolerance=0.02)


def test_gate_passes_a_clear_improvement() -> None:
    ok, reasons = gate_decision(scores(), None, scores(bpb=0.75, fim_exact=0.29), CFG)
    assert ok and reasons == []


def test_gate_needs_the_bpb_margin_against_live_not_base() -> None:
    base, live = scores(bpb=0.90), scores(bpb=0.76)
    ok, reasons = gate_decision(base, live, scores(bpb=0.755), CFG)
    assert not ok
    assert len(reasons) == 1 and "live" in reasons[0] and "bits/byte" in reasons[0]
    ok, _ = gate_decision(base, None, scores(bpb=0.755), CFG)
    assert ok  # against the base the same candidate is a big gain


def test_gate_rejects_regressions_beyond_tolerance_and_names_each() -> None:
    ok, reasons = gate_decision(scores(), None, scores(bpb=0.7, fim_exact=0.25, raft_acc_oracle=0.40), CFG)
    assert not ok
    assert [r.split()[0] for r in reasons] == ["fim_exact", "raft_acc_oracle"]


def test_gate_skips_metrics_without_examples_and_fails_without_bpb() -> None:
    ok, _ = gate_decision(scores(fim_exact=None), None, scores(bpb=0.7, fim_exact=0.0), CFG)
    assert ok
    ok, reasons = gate_decision(scores(), None, scores(bpb=None), CFG)
    assert not ok and "bits per byte" in reasons[0]


def test_gate_module_is_light() -> None:
    """The daemon imports the gate: it must not drag numpy/torch in."""
    import subprocess

    code = "import sys, forged.worker.judge.gate, forged.worker.judge.judge; print(sorted(m for m in ('numpy','torch','transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_summary_line() -> None:
    line = summary_line({"base": scores(), "live": None, "candidate": scores(bpb=0.7), "passed": True})
    assert line.startswith("judge passed (vs base)") and "bpb 0.800→0.700" in line


# ---------------------------------------------------------------- metric helpers


def test_edit_similarity_and_fim_truncation() -> None:
    assert edit_similarity("abc", "abc") == 1.0
    assert edit_similarity("", "") == 1.0
    assert edit_similarity("kitten", "sitting") == pytest.approx(1 - 3 / 7)
    assert fim_prediction("x = 1\ny = 2\nz = 3\n", "x = 1\ny = 2\n") == "x = 1\ny = 2"


def test_answer_extraction() -> None:
    gen = "##begin_quote##def f(): ...##end_quote##\nSo it is f.\n<ANSWER>: `src/app.py`\nmore"
    assert extract_answer(gen) == "src/app.py"
    assert answer_matches(gen, "src/app.py")
    assert not answer_matches("no tag here: src/app.py", "src/app.py")
    assert not answer_matches("<ANSWER>: src/app.pyc", "src/app.py")


# ---------------------------------------------------------------- held-out data

TEXTS = [
    "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n",
    "def mul(a, b):\n    return a * b\n\n\ndef div(a, b):\n    return a / b\n",
    "def neg(a):\n    return -a\n\n\ndef square(a):\n    return a * a\n",
]


def write_dataset(d: Path, n_fim: int = 2, n_raft: int = 2) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    recs = [{"text": t, "meta": {"kind": "continuation", "path": f"m{i}.py", "lang": "python"}}
            for i, t in enumerate(TEXTS)]
    for i in range(n_fim):
        recs.append({"prompt": "<fim_prefix>def add(a, b):\n<fim_suffix>\n\ndef sub(a, b):\n    return a - b\n<fim_middle>",
                     "completion": "    return a + b", "meta": {"kind": "fim", "path": f"f{i}.py"}})
    for i in range(n_raft):
        recs.append({"messages": [
            {"role": "system", "content": "Answer from the documents."},
            {"role": "user", "content": "Where is add defined?\n<DOCUMENT>math.py: def add(a, b)</DOCUMENT>"},
            {"role": "assistant", "content": "It is in math.py.\n<ANSWER>: math.py"}],
            "meta": {"kind": "raft", "answer": "math.py", "oracle": i % 2 == 0}})
    recs.append({"prompt": "Write docs", "completion": "Adds.", "meta": {"kind": "code_to_doc"}})
    (d / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return d


def test_load_heldout_sorts_records_and_subsamples(tmp_path: Path) -> None:
    h = load_heldout(write_dataset(tmp_path, n_fim=5, n_raft=10), max_examples=2, max_generate=4)
    assert len(h.texts) == 2 and len(h.fim) == 4 and len(h.raft) == 4
    assert h.skipped == 1
    assert {r.oracle for r in h.raft} == {True, False}  # the oracle/distractor mix is kept
    assert all(r.messages[-1]["role"] == "user" and r.reference for r in h.raft)
    again = load_heldout(tmp_path, max_examples=2, max_generate=4)
    assert again.texts == h.texts and [f.prompt for f in again.fim] == [f.prompt for f in h.fim]
    # RAFT prompts are ~5x the compute of a FIM example: they have their own cap.
    capped = load_heldout(tmp_path, max_examples=2, max_generate=4, max_raft=2)
    assert len(capped.fim) == 4 and len(capped.raft) == 2
    assert {r.oracle for r in capped.raft} == {True, False}
    assert len(h.fim_all) == 5  # FIM bits/byte: every held-out FIM example by default
    tf = load_heldout(tmp_path, max_examples=2, max_generate=4, max_fim_bpb=3)
    assert len(tf.fim_all) == 3 and len(tf.fim) == 3  # generated middles come from the scored ones
    tf = load_heldout(tmp_path, max_examples=2, max_fim=2, max_fim_bpb=4)
    assert len(tf.fim_all) == 4 and len(tf.fim) == 2 and all(any(f is g for g in tf.fim_all) for f in tf.fim)


@pytest.mark.parametrize("content, message", [
    (None, "held-out split not found"),
    ("{not json\n", "valid.jsonl:1: not JSON"),
    ('{"prompt": 1, "completion": "x", "meta": {"kind": "fim"}}\n', "FIM record needs"),
    ('{"messages": [], "meta": {"kind": "raft"}}\n', "meta.answer"),
    ('{"prompt": "a", "completion": "b"}\n', "no scorable held-out records"),
])
def test_load_heldout_errors_name_the_problem(tmp_path: Path, content: str | None, message: str) -> None:
    if content is not None:
        (tmp_path / "valid.jsonl").write_text(content)
    with pytest.raises(JudgeError, match=message):
        load_heldout(tmp_path)


# ---------------------------------------------------------------- end to end (tiny real model)


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("peft")
    from lora_fixtures import tiny_hf, train_lora

    root = tmp_path_factory.mktemp("judge")
    base = tiny_hf()  # the HF copy of the tiny GGUF: loads much faster in transformers
    ds = write_dataset(root / "ds")
    trained = train_lora(base, root / "trained", TEXTS, steps=30)
    # Trained on something else: better than the near-uniform random base, worse than `trained`.
    off_topic = train_lora(base, root / "off", ["zebra zebra zebra zebra zebra zebra zebra"], steps=30)
    return base, ds, trained, off_topic


def test_judge_end_to_end(tiny_setup) -> None:
    from forged.worker.judge.judge import judge

    base, ds, trained, off_topic = tiny_setup
    cfg_t = TrainConfig(backend="torch", base_model=str(base))
    events: list[dict] = []
    # Generation metrics of a random model are noise; this run checks bpb gating only.
    loose = JudgeConfig(min_bpb_gain=0.01, tolerance=1.0)
    res = judge(ds, cfg_t, loose, trained, progress=events.append)
    assert res.passed, res.reasons
    assert res.candidate.bpb < res.base.bpb - 0.01
    assert res.live is None
    assert res.candidate.n_texts == 3 and res.candidate.n_fim == 2
    assert res.candidate.n_raft_oracle == 1 and res.candidate.n_raft_distractors == 1
    for s in (res.base, res.candidate):
        for v in (s.fim_exact, s.fim_edit_sim, s.raft_acc_oracle, s.raft_acc_distractors):
            assert 0.0 <= v <= 1.0
    assert {e["model"] for e in events} == {"base", "candidate"}
    assert {e["metric"] for e in events} == {"bpb", "fim_bpb", "fim", "raft"}
    d = res.to_dict()
    assert json.loads(json.dumps(d))["candidate"]["bpb"] == pytest.approx(res.candidate.bpb)

    # A candidate worse than the live model is rejected, with the numbers vs live.
    bad = judge(ds, cfg_t, loose, off_topic, live_adapter=trained)
    assert not bad.passed
    assert bad.live is not None and bad.live.bpb == pytest.approx(res.candidate.bpb, rel=1e-5)
    assert bad.candidate.bpb > bad.live.bpb
    assert "bits/byte" in bad.reasons[0] and "vs live" in bad.reasons[0]


# ---------------------------------------------------------------- intervals (stats + gate)


def test_paired_interval_separates_a_shift_from_noise() -> None:
    import random

    from forged.worker.judge import stats

    rng = random.Random(1)
    ref = [rng.gauss(1.0, 0.3) for _ in range(60)]
    noise = [r + rng.gauss(0.0, 0.05) for r in ref]
    shifted = [r - 0.05 + rng.gauss(0.0, 0.05) for r in ref]
    n = stats.paired(noise, ref, seed=0)
    s = stats.paired(shifted, ref, seed=0)
    assert n.n == 60 and n.diff.lo < 0 < n.diff.hi
    assert s.diff.hi < 0 and s.diff.lo < s.diff.value < s.diff.hi
    assert stats.paired(shifted, ref, seed=0) == s  # seeded: the same interval every run
    # weights make a ratio of sums: bits/byte over texts of different lengths
    est = stats.mean_ci([1.0, 2.0], [3.0, 1.0])
    assert est.value == pytest.approx((1 * 3 + 2 * 1) / 4)
    with pytest.raises(ValueError, match="differ in length"):
        stats.paired([1.0], [1.0, 2.0])


def delta(diff: float, lo: float, hi: float, n: int = 40) -> dict:
    return {"diff": diff, "lo": lo, "hi": hi, "n": n}


def test_clustered_interval_is_wider_when_a_files_examples_agree() -> None:
    from forged.worker.judge import stats

    # 10 files of 20 examples each; every example of a file shares the file's value, so
    # there are 10 independent draws, not 200.
    rng = random.Random(0)
    per_file = [rng.choice([0.0, 1.0]) for _ in range(10)]
    values = [v for v in per_file for _ in range(20)]
    files = [f"f{i}.py" for i in range(10) for _ in range(20)]
    flat = stats.mean_ci(values)
    clustered = stats.clustered_mean_ci(values, files)
    assert clustered.value == pytest.approx(flat.value) and clustered.n == flat.n == 200
    assert clustered.hi - clustered.lo > 2 * (flat.hi - flat.lo)
    # Independent examples, one per group: the same interval as resampling examples.
    one_each = stats.clustered_mean_ci(values, [str(i) for i in range(200)])
    assert (one_each.lo, one_each.hi) == pytest.approx((flat.lo, flat.hi), abs=0.02)
    with pytest.raises(ValueError, match="one group per value"):
        stats.clustered_mean_ci(values, files[:-1])


def test_sample_size_for_a_target_interval_width() -> None:
    """A quarter of the half-width takes 16x the examples; no width says nothing."""
    from forged.worker.judge import stats
    from forged.worker.judge.judge import ModelScores, compare

    assert stats.n_for_half_width(-0.2, 0.2, 64, 0.05) == 1024
    assert stats.n_for_half_width(-0.2, 0.2, 64, 0.4) == 16
    assert stats.n_for_half_width(0.0, 0.0, 64, 0.1) is None
    rng = random.Random(0)
    ref, cand = ModelScores(), ModelScores()
    ref.samples["fim_bpb"] = [rng.gauss(1.5, 0.3) for _ in range(100)]
    cand.samples["fim_bpb"] = [x - 0.1 + rng.gauss(0, 0.1) for x in ref.samples["fim_bpb"]]
    d = compare(cand, ref)["fim_bpb"]
    assert d["target"] == 0.02
    # the bootstrap half-width of a mean of 100 diffs with sd ~0.1 is ~0.02: about 100 are needed
    assert 50 <= d["n_for_target"] <= 200


def test_gate_needs_the_bpb_gains_interval_to_exclude_zero() -> None:
    cand = scores(bpb=0.75)
    ok, reasons = gate_decision(scores(), None, cand, CFG, deltas={"bpb": delta(-0.05, -0.11, 0.01)})
    assert not ok and "within noise" in reasons[0] and "n=40" in reasons[0] and "[-0.1100, +0.0100]" in reasons[0]
    ok, reasons = gate_decision(scores(), None, cand, CFG, deltas={"bpb": delta(-0.05, -0.08, -0.02)})
    assert ok, reasons


def test_gate_counts_a_regression_only_when_its_interval_says_so() -> None:
    cand = scores(bpb=0.7, fim_exact=0.25)
    gain = delta(-0.1, -0.12, -0.08)
    ok, _ = gate_decision(scores(), None, cand, CFG, deltas={"bpb": gain, "fim_exact": delta(-0.05, -0.2, 0.1)})
    assert ok  # 0.30 → 0.25 on noisy examples: not a regression
    ok, reasons = gate_decision(scores(), None, cand, CFG,
                                deltas={"bpb": gain, "fim_exact": delta(-0.05, -0.08, -0.02)})
    assert not ok and reasons[0].startswith("fim_exact") and "95% CI" in reasons[0]


def test_summary_line_shows_intervals() -> None:
    line = summary_line({"base": scores(), "live": None, "candidate": scores(bpb=0.7), "passed": True,
                         "deltas": {"bpb": delta(-0.1, -0.12, -0.08, 17)}})
    assert "bpb 0.800→0.700 (Δ [-0.120, -0.080] n=17)" in line


# ---------------------------------------------------------------- noise vs gain (tiny real model)

HELDOUT = [f"def {a}_{b}(x, y):\n    return x {op} y\n\n\ndef {b}_{a}(x):\n    return -x\n"
           for a, b, op in [("add", "one", "+"), ("sub", "two", "-"), ("mul", "three", "*"), ("div", "four", "/"),
                            ("mod", "five", "%"), ("pow", "six", "**"), ("and", "seven", "&"), ("or", "eight", "|"),
                            ("xor", "nine", "^"), ("shl", "ten", "<<"), ("shr", "eleven", ">>"), ("lt", "twelve", "<")]]


@pytest.fixture(scope="module")
def noise_setup(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("peft")
    from lora_fixtures import make_peft_adapter, tiny_hf, train_lora

    root = tmp_path_factory.mktemp("judge-noise")
    base = tiny_hf()
    ds = root / "ds"
    ds.mkdir()
    (ds / "valid.jsonl").write_text("".join(json.dumps({"text": t, "meta": {"kind": "continuation"}}) + "\n"
                                            for t in HELDOUT))
    noise = make_peft_adapter(base, root / "noise", rank=4, alpha=4.0, std=0.01, seed=3)
    gain = train_lora(base, root / "gain", TEXTS, steps=30)
    return base, ds, noise, gain


def test_judge_rejects_noise_and_publishes_a_clear_gain(noise_setup) -> None:
    from forged.worker.judge.judge import judge

    base, ds, noise, gain = noise_setup
    cfg_t = TrainConfig(backend="torch", base_model=str(base))
    cfg = JudgeConfig()  # the shipped thresholds
    res = judge(ds, cfg_t, cfg, noise)
    d = res.deltas["bpb"]
    assert not res.passed and "bits/byte" in res.reasons[0] and "n=12" in res.reasons[0]
    assert d["n"] == 12 and d["lo"] <= d["diff"] <= d["hi"]
    assert abs(d["diff"]) < cfg.min_bpb_gain  # the noise adapter really is tiny

    # The same noise with no margin at all: only the interval keeps it out.
    res0 = judge(ds, cfg_t, JudgeConfig(min_bpb_gain=-1.0), noise)
    assert not res0.passed and "includes zero" in res0.reasons[0]

    good = judge(ds, cfg_t, cfg, gain)
    g = good.deltas["bpb"]
    assert good.passed, good.reasons
    assert g["hi"] < 0 and g["n"] == 12
    assert json.loads(json.dumps(good.to_dict()))["deltas"]["bpb"]["n"] == 12


def test_forgectl_status_shows_the_bpb_interval() -> None:
    from forged.ctl import render_repo

    judge = {"base": scores(), "candidate": scores(bpb=0.79), "deltas": {"bpb": delta(-0.01, -0.02, 0.001, 40)}}
    text = render_repo({"name": "x", "path": "/p", "stage": "watching", "progress": {},
                        "cycles": [{"id": 1, "stage": "rejected", "metrics": {"judge": judge}}]})
    # relative to the reference: −0.01 / 0.80 = −1.25%; the interval −0.02…+0.001 likewise
    assert "bpb 0.80→0.79 (−1.2%, 95% CI −2.5…+0.1%, n=40)" in text


def test_forgectl_status_shows_every_metric_with_n_and_interval() -> None:
    from forged.ctl import render_status

    judge = {"base": scores(), "candidate": scores(bpb=0.79, fim_exact=0.36, fim_bpb=1.5), "reference": "base",
             "deltas": {"bpb": delta(-0.01, -0.02, 0.001, 40), "fim_exact": delta(0.06, 0.01, 0.11, 64)}}
    judge["base"]["fim_bpb"] = 1.8
    judge["candidate"]["n_fim_bpb"] = 276
    repo = {"name": "x", "stage": "awaiting_approval", "progress": {}, "live_version": None,
            "pending_approval": {"version": 2, "judge": judge_text(judge)},
            "last_cycle": {"id": 7, "judge": ["ignored: the pending one is shown"]}}
    text = render_status({"daemon": {"version": "t", "pid": 1, "uptime": 0}, "repos": [repo]})
    assert "x: v2 awaiting approval:" in text and "ignored" not in text
    assert "FIM exact 30.0%→36.0% (+6.0 pts, 95% CI +1.0…+11.0 pts, n=64)" in text
    assert "FIM-middle bpb 1.80→1.50 (n=276, no interval stored)" in text


# ---------------------------------------------------------------- against retrieval

HELD = "held.py"  # the held-out file: its code must never be retrieved as context
SHARED = "def scale_vector(vector, factor):\n    return [x * factor for x in vector]\n"


def write_rag_dataset(d: Path, fmt) -> Path:
    """A dataset with a training side to retrieve from and FIM examples in the base's format."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "manifest.json").write_text(json.dumps({"fim_format": fmt.to_dict()}))
    stop = fmt.stop[0] if fmt.stop else ""
    train = [{"text": f"# path: m{i}.py\n{t}", "meta": {"kind": "continuation", "path": f"m{i}.py"}}
             for i, t in enumerate(TEXTS)]
    train.append({"text": f"# path: vec.py\n{SHARED}", "meta": {"kind": "continuation", "path": "vec.py"}})
    # A training record naming a held-out file (it cannot happen with forged's miner; the judge
    # must refuse it anyway): the best BM25 match for every query below.
    train.append({"text": f"# path: {HELD}\n{SHARED * 3}", "meta": {"kind": "continuation", "path": HELD}})
    valid = [{"text": TEXTS[0], "meta": {"kind": "continuation", "path": HELD}}]
    for i in range(6):
        prefix = f"# path: {HELD}\ndef scale_vector_{i}(vector, factor):\n"
        suffix = "\n\ndef norm(vector):\n    return sum(x * x for x in vector)\n"
        valid.append({"prompt": fmt.render(prefix, suffix), "completion": "    return [x * factor for x in vector]" + stop,
                      "meta": {"kind": "fim", "path": HELD, "fim": {"prefix_chars": len(prefix), "stop": stop,
                                                                     "mode": "line"}}})
    for name, recs in (("train.jsonl", train), ("valid.jsonl", valid)):
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in recs))
    return d


def test_retrieval_context_comes_from_training_files_only(tmp_path: Path) -> None:
    from forged.common.fim import FORGED_TEXT
    from forged.worker.judge import retrieval

    ds = write_rag_dataset(tmp_path / "ds", FORGED_TEXT)
    data = load_heldout(ds, fim_format=FORGED_TEXT)
    rag = retrieval.build(ds, data, max_examples=4)
    assert rag is not None and len(rag.examples) == 4 and rag.excluded == 1 and rag.corpus == 4
    for r in rag.examples:
        ex = data.fim_all[r.index]
        assert HELD in ex.path and HELD not in r.paths and r.paths[0] == "vec.py"  # best match outside held-out files
        assert len(r.paths) == retrieval.RAG_K
        # the context sits inside the FIM prefix, before the example's own prefix
        parts = FORGED_TEXT.split(r.prompt, len(r.prompt) - len(ex.prompt) + len(ex.prefix))
        assert parts is not None and parts[1] == ex.suffix
        assert parts[0].startswith("# path: vec.py\n") and parts[0].endswith(ex.prefix)
        assert f"# path: vec.py\n{SHARED}" in r.prompt and len(r.prompt) - len(ex.prompt) <= retrieval.RAG_MAX_CHARS + 4
    assert retrieval.build(ds, data, max_examples=0) is None


def test_judge_scores_fim_with_retrieved_context(tmp_path: Path, tiny_setup) -> None:
    from forged.common import fim
    from forged.worker.judge.judge import judge

    base, _, trained, _ = tiny_setup
    fmt = fim.for_base("hf", base)
    ds = write_rag_dataset(tmp_path / "ds", fmt)
    cfg = JudgeConfig(min_bpb_gain=0.0, tolerance=1.0, max_rag=4)
    events: list[dict] = []
    res = judge(ds, TrainConfig(backend="torch", base_model=str(base)), cfg, trained, progress=events.append)
    for s in (res.base, res.candidate):
        assert s.n_fim_rag == 4 and s.fim_bpb_rag is not None and s.fim_bpb_rag > 0
        lo, hi = s.fim_bpb_rag_ci
        assert lo <= s.fim_bpb_rag <= hi
    assert res.deltas["fim_bpb_rag"]["n"] == 4  # fine-tuning on top of retrieval, paired
    r = json.loads(json.dumps(res.to_dict()))["retrieval"]
    assert r["n"] == 4 and r["excluded_chunks"] == 1 and "RAFT" in r["note"]
    for key in ("retrieval", "fine_tuning", "both", "fine_tuning_over_retrieval"):
        g = r["gains"][key]
        assert g["n"] == 4 and g["lo"] <= g["diff"] <= g["hi"]
    assert r["gains"]["retrieval"]["reference"] == pytest.approx(r["bpb"]["base"])
    assert {e["metric"] for e in events} >= {"fim_bpb", "fim_bpb_rag"}
    # informational: the gate decides as it would without it
    no_rag = judge(ds, TrainConfig(backend="torch", base_model=str(base)), JudgeConfig(
        min_bpb_gain=0.0, tolerance=1.0, max_rag=0), trained)
    assert (no_rag.passed, no_rag.reasons) == (res.passed, res.reasons)
    assert no_rag.candidate.fim_bpb_rag is None and "fim_bpb_rag" not in no_rag.deltas
    assert len(res.examples) == 3 and res.examples[0]["path"] == HELD  # shown side by side in the report


# ---------------------------------------------------------------- the live model, in its own format


def test_served_as_renders_every_fim_prompt_in_the_live_models_format(tmp_path: Path) -> None:
    from dataclasses import replace

    from forged.common.fim import FORGED_TEXT
    from forged.worker.judge import retrieval
    from forged.worker.judge.judge import served_as

    psm = replace(FORGED_TEXT, spm=False)  # the order forged-text had before
    ds = write_rag_dataset(tmp_path / "ds", FORGED_TEXT)
    data = load_heldout(ds, fim_format=FORGED_TEXT, max_generate=3)
    data.rag = retrieval.build(ds, data, max_examples=4)
    assert served_as(data, FORGED_TEXT) is data and served_as(data, None) is data
    old = served_as(data, psm)
    assert old.fim_format == psm and data.fim_format == FORGED_TEXT  # the split itself is untouched
    for got, ex in zip(old.fim_all + old.fim, data.fim_all + data.fim, strict=True):
        assert got.prompt == psm.render(ex.prefix, ex.suffix) != ex.prompt
        assert (got.completion, got.stop, got.mode) == (ex.completion, ex.stop, ex.mode)  # same middles: paired
    assert old.rag is not None and data.rag is not None
    for got, r in zip(old.rag.examples, data.rag.examples, strict=True):
        ex = data.fim_all[r.index]
        assert got.prompt == psm.render(r.context + ex.prefix, ex.suffix) and r.context.startswith("# path: vec.py")
        assert (got.index, got.paths) == (r.index, r.paths)


def test_judge_scores_the_live_model_in_the_format_it_was_trained_in(tmp_path: Path, tiny_setup) -> None:
    import shutil
    from dataclasses import replace

    from forged.common import fim
    from forged.worker.judge.judge import judge

    base, _, trained, _ = tiny_setup
    fmt = fim.for_base("hf", base)
    assert not fmt.special  # the tiny llama has no FIM tokens: forged's text format
    ds = write_rag_dataset(tmp_path / "ds", fmt)
    cfg_t = TrainConfig(backend="torch", base_model=str(base))
    cfg = JudgeConfig(min_bpb_gain=0.0, tolerance=1.0, max_rag=2)
    lives = {}
    for name, live_fmt in (("same", fmt), ("other", replace(fmt, spm=not fmt.spm))):
        live = tmp_path / name
        shutil.copytree(trained, live)
        meta = json.loads((live / "forged_meta.json").read_text())
        meta["fim_format"] = live_fmt.to_dict()
        (live / "forged_meta.json").write_text(json.dumps(meta))
        lives[name] = judge(ds, cfg_t, cfg, trained, live_adapter=live)
    same, other = lives["same"], lives["other"]
    # The live adapter is the candidate's weights: in the same format it scores the same.
    assert same.live.fim_bpb == pytest.approx(same.candidate.fim_bpb, rel=1e-5)
    assert same.live.fim_bpb_rag == pytest.approx(same.candidate.fim_bpb_rag, rel=1e-5)
    # In the other order the same weights are asked other prompts, on the same middles.
    assert other.live.fim_bpb != pytest.approx(other.candidate.fim_bpb, rel=1e-5)
    assert other.live.fim_bpb_rag != pytest.approx(other.candidate.fim_bpb_rag, rel=1e-5)
    assert other.live.n_fim_bpb == other.candidate.n_fim_bpb and other.deltas["fim_bpb"]["n"] == other.live.n_fim_bpb
    assert other.candidate.fim_bpb == pytest.approx(same.candidate.fim_bpb, rel=1e-5)
    assert other.live.bpb == pytest.approx(same.live.bpb, rel=1e-5)  # plain text: no format to differ in
