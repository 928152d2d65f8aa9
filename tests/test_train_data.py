"""Data, packing, model resolution, backend choice and the memory estimate (no training)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from forged.common.config import TrainConfig
from forged.common.fim import FORGED_TEXT
from forged.common.gguf import read_gguf_metadata
from forged.common.models import ModelError, model_dims, resolve_base
from forged.worker.train.data import LossPolicy, Record, load_dataset, select_replay, tokenize
from forged.worker.train.packing import IGNORE, RowStream, collate, epoch_rows, pack

sys.path.insert(0, str(Path(__file__).parent))
from tiny import tokenizer_dir, write_code_dataset  # noqa: E402


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("FORGED_HOME", str(tmp_path / "home"))


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir()))


def test_daemon_side_imports_stay_light():
    code = ("import sys, forged.worker.train, forged.common.memory as m; from forged.common.config import TrainConfig;"
            "from forged.common.backends import choose_backend; from forged.common.models import resolve_base;"
            "print(choose_backend(TrainConfig()));"
            "b = resolve_base('bundled:smollm2-135m');"
            "print(m.estimate_for(b, TrainConfig(), 'torch'));"
            "heavy = [x for x in ('torch', 'transformers', 'peft', 'mlx', 'gguf', 'numpy') if x in sys.modules];"
            "assert not heavy, heavy")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_choose_backend_explains(monkeypatch):
    from forged.common import backends as backend

    name, why = backend.choose_backend(TrainConfig(backend="auto"))
    assert name in ("torch", "mlx") and why
    monkeypatch.setattr(backend, "torch_available", lambda: False)
    monkeypatch.setattr(backend, "mlx_available", lambda: False)
    with pytest.raises(backend.BackendError, match="pip install"):
        backend.choose_backend(TrainConfig(backend="auto"))
    with pytest.raises(backend.BackendError, match="torch"):
        backend.choose_backend(TrainConfig(backend="torch"))


def test_resolve_bundled_and_dims():
    b = resolve_base("bundled:smollm2-135m")
    assert b.kind == "gguf" and b.architecture == "llama" and len(b.sha256) == 64
    d = model_dims(b)
    assert (d["layers"], d["hidden"], d["heads"], d["kv_heads"], d["vocab"]) == (30, 576, 9, 3, 49152)
    from forged.common.memory import estimate_peak_memory, n_params

    assert 130e6 < n_params(d) < 140e6  # SmolLM2-135M
    small = estimate_peak_memory(d, seq_len=256, batch_size=2)
    big = estimate_peak_memory(d, seq_len=512, batch_size=4)
    ckpt = estimate_peak_memory(d, seq_len=512, batch_size=4, grad_checkpoint=True)
    assert small < big and ckpt < big


def test_memory_estimate_covers_measured_peaks():
    """Peak RSS measured with bench/train/bench.py memory (forged's PyTorch trainer, PiSSA,
    SmolLM2-135M from the GGUF; docs/benchmarks.md): the estimate is slightly conservative."""
    from forged.common.memory import estimate_peak_memory

    d = {"layers": 30, "hidden": 576, "intermediate": 1536, "vocab": 49152, "heads": 9, "kv_heads": 3}
    measured = [({"batch_size": 4, "seq_len": 512}, 7_735_140_352),
                ({"batch_size": 2, "seq_len": 256}, 3_030_122_496),
                ({"batch_size": 4, "seq_len": 512, "grad_checkpoint": True}, 4_564_967_424)]
    for kw, peak in measured:
        ratio = estimate_peak_memory(d, method="pissa", **kw) / peak
        assert 1.0 <= ratio <= 1.3, (kw, ratio)


def test_resolve_errors_and_ollama_store(tmp_path, monkeypatch):
    with pytest.raises(ModelError, match="not found"):
        resolve_base(str(tmp_path / "nothing"))
    with pytest.raises(ModelError, match="unknown bundled"):
        resolve_base("bundled:gpt-9")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 20)
    with pytest.raises(ModelError, match="not a GGUF"):
        resolve_base(str(bad))
    # an Ollama store on disk, no server
    monkeypatch.setenv("OLLAMA_HOST", "127.0.0.1:9")
    store = tmp_path / "ollama"
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    with pytest.raises(ModelError, match="ollama pull"):
        resolve_base("ollama:smol")
    src = resolve_base("bundled:smollm2-135m").path
    digest = "sha256:" + "ab" * 32
    (store / "blobs").mkdir(parents=True)
    (store / "blobs" / digest.replace(":", "-")).symlink_to(src)
    man = store / "manifests/registry.ollama.ai/library/smol"
    man.mkdir(parents=True)
    (man / "latest").write_text(json.dumps({"layers": [{"mediaType": "application/vnd.ollama.image.model",
                                                        "digest": digest}]}))
    b = resolve_base("ollama:smol")
    assert b.kind == "gguf" and b.architecture == "llama"
    assert read_gguf_metadata(b.path)["llama.block_count"] == 30


def test_masks_for_each_record_kind(tok):
    from forged.worker.train.data import start_id, tokenize_record

    s = start_id(tok)
    assert tok.convert_ids_to_tokens(s) == "<|endoftext|>"
    ex = tokenize_record(tok, Record("prompt", {"prompt": "<fim_prefix>a<fim_suffix>c<fim_middle>", "completion": "b"}), s)
    targets = [i for i, m in zip(ex.ids, ex.mask, strict=True) if m]
    assert tok.decode(targets) == "b" + tok.eos_token
    fim = Record("prompt", {"prompt": "<fim_prefix>x = 1<fim_suffix>y = 2<fim_middle>", "completion": "z"},
                 {"kind": "fim"})
    ex = tokenize_record(tok, fim, s, loss=LossPolicy(fim="all", fim_markers=FORGED_TEXT.markers()))
    # StarCoder-style: the prefix and suffix code are learned too, the markers are not (a model
    # taught to predict plain-text markers writes them back as its middle)
    learned = tok.decode([i for i, m in zip(ex.ids, ex.mask, strict=True) if m])
    assert learned == "x = 1y = 2z" + tok.eos_token
    assert not ex.mask[0] and ex.mask[-1]
    doc = Record("prompt", {"prompt": "Write docs for f", "completion": "b"}, {"kind": "code_to_doc"})
    ex = tokenize_record(tok, doc, s, loss=LossPolicy(fim="all"))  # fim_loss: FIM prompts only
    assert tok.decode([i for i, m in zip(ex.ids, ex.mask, strict=True) if m]) == "b" + tok.eos_token
    ex = tokenize_record(tok, doc, s, loss=LossPolicy(prompts="all"))
    assert tok.decode([i for i, m in zip(ex.ids, ex.mask, strict=True) if m]) == "Write docs for fb" + tok.eos_token
    ex = tokenize_record(tok, fim, s, loss=LossPolicy(prompts="all"))  # prompt_loss leaves FIM to fim_loss
    assert tok.decode([i for i, m in zip(ex.ids, ex.mask, strict=True) if m]) == "z" + tok.eos_token
    msgs = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
            {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]
    ex = tokenize_record(tok, Record("messages", {"messages": msgs}), s)
    learned = tok.decode([i for i, m in zip(ex.ids, ex.mask, strict=True) if m])
    assert "A1" in learned and "A2" in learned and "Q1" not in learned and "Q2" not in learned
    # prompt_loss = "all": the questions' content is learned too, the turn markup is not
    ex = tokenize_record(tok, Record("messages", {"messages": msgs}), s, loss=LossPolicy(prompts="all"))
    learned = tok.decode([i for i, m in zip(ex.ids, ex.mask, strict=True) if m])
    assert learned.startswith("Q1") and "Q2" in learned and "A2" in learned
    assert "<|im_start|>user" not in learned and "<|im_start|>assistant" not in learned
    ex = tokenize_record(tok, Record("text", {"text": "def f(): pass"}), s)
    assert ex.ids[0] == s and not ex.mask[0] and all(ex.mask[1:])


def test_packing_rows_positions_and_labels(tok, tmp_path):
    ds = load_dataset(write_code_dataset(tmp_path / "ds"))
    ex = tokenize(tok, ds.train, 64)
    assert all(len(e) <= 64 for e in ex)
    rows = pack(ex, 64)
    assert sum(r.n_targets for r in rows) == sum(e.n_targets for e in ex)
    fill = sum(len(r) for r in rows) / (64 * len(rows))
    assert fill > 0.85  # little padding left
    b = collate(rows[:3], pad_id=2)
    for ids, labels, pos, seg in zip(b["input_ids"], b["labels"], b["position_ids"], b["segment_ids"], strict=True):
        for t in range(len(ids) - 1):
            if labels[t] != IGNORE:  # a label is the next token of the same example
                assert labels[t] == ids[t + 1] and seg[t] == seg[t + 1] and pos[t + 1] == pos[t] + 1
            if seg[t] and seg[t + 1] == seg[t] + 1:
                assert pos[t + 1] == 0 and labels[t] == IGNORE  # positions restart, no cross-example label
    # the stream is resumable: same rows from a saved position
    s1 = RowStream(ex, seq_len=64, seed=3, mode="pack", batch_size=2)
    s1.take(5)
    pos = s1.position()
    nxt = [r.ids for r in s1.take(7)]
    s2 = RowStream(ex, seq_len=64, seed=3, mode="pack", batch_size=2, **pos)
    assert [r.ids for r in s2.take(7)] == nxt
    # bucketing groups similar lengths
    def padding(rows):
        return sum(4 * max(map(len, rows[i:i + 4])) - sum(map(len, rows[i:i + 4])) for i in range(0, len(rows), 4))

    bucketed = padding(epoch_rows(ex, seq_len=64, seed=0, epoch=0, mode="bucket", batch_size=4))
    shuffled = padding(epoch_rows(ex, seq_len=64, seed=0, epoch=0, mode="none", batch_size=4))
    assert bucketed < shuffled / 3


def test_replay_selection():
    recs = [Record("text", {"text": str(i)}, {"changed": i < 10}) for i in range(100)]
    sel = select_replay(recs, 0.5, seed=0)
    assert sum(r.changed for r in sel) == 10 and len(sel) == 20
    assert len(select_replay(recs, 0.0, seed=0)) == 10
    assert len(select_replay([r for r in recs if not r.changed], 0.3, seed=0)) == 90  # nothing changed → all


def _service(i: int) -> str:
    methods = "\n".join(f'''
    def step_{i}_{j}(self, items: list[int]) -> int:
        """Fold step {j} of service {i} over the items."""
        total = 0
        for item in items:
            if item < 0:
                raise ValueError("negative item")
            total += item * {j} + self.offset_{i}
        return total
''' for j in range(4))
    return f'''"""Service {i}."""


class Service{i}:
    """Runs the {i}th service."""

    offset_{i} = {i}
{methods}

def run_service_{i}(items: list[int]) -> int:
    """Run service {i}."""
    return Service{i}().step_{i}_1(items)
'''


def test_mined_raft_examples_fit_the_training_context(tok, tmp_path):
    """RAFT examples (question, oracle and distractor documents, quoted answer) are cut to
    the trainer's seq_len when mined: the trainer keeps the head of a longer example, which
    holds no answer, so before they were all dropped at the default seq_len."""
    from collections import Counter

    from conftest import make_repo

    from forged.common.config import MineConfig
    from forged.worker.mine import linked, mine_repo

    # ... and one documented function too long to fit seq_len beside its documentation
    steps = "\n".join(f"    table[{k}] = table.get({k}, 0) + weight_{k % 7} * len(rows)" for k in range(60))
    long = (f'def build_table(rows: list[str]) -> dict[int, int]:\n    """Build the weight table."""\n'
            f"    table: dict[int, int] = {{}}\n{steps}\n    return table\n")
    repo = make_repo(tmp_path / "svc", {**{f"svc/s{i}.py": _service(i) for i in range(12)},
                                        "svc/table.py": long})
    seq_len = TrainConfig().seq_len
    for context, out in ((seq_len, tmp_path / "fit"), (4096, tmp_path / "roomy")):
        mine_repo(repo, out, MineConfig(workers=1), tmp_path / "cache", context_tokens=context)
        linked.materialize(out)
    raft = {}
    for out in ("fit", "roomy"):
        recs = [r for r in load_dataset(tmp_path / out).train if r.meta.get("kind") == "raft"]
        raft[out] = recs
    assert len(raft["fit"]) == len(raft["roomy"]) >= 20
    dropped: Counter[str] = Counter()
    kept = tokenize(tok, raft["fit"], seq_len, dropped)
    assert not dropped and len(kept) == len(raft["fit"])
    every = load_dataset(tmp_path / "fit").train  # code→doc too: none left without its answer
    assert "code_to_doc" in {r.meta.get("kind") for r in every}
    tokenize(tok, every, seq_len, dropped)
    assert not dropped, dropped
    # With room to spare the documents are whole chunks: too long for seq_len, and the
    # trainer is left with nothing to learn from most of them (it says how many).
    from forged.worker.train.data import start_id, tokenize_record

    long = sum(len(tokenize_record(tok, r, start_id(tok))) > seq_len for r in raft["roomy"])
    assert long > len(raft["roomy"]) / 2
    dropped.clear()
    tokenize(tok, raft["roomy"], seq_len, dropped)
    assert dropped["raft"] > len(raft["roomy"]) / 2
    for rec in raft["fit"]:  # cut documents still quote the oracle verbatim
        user, answer = rec.data["messages"][1]["content"], rec.data["messages"][2]["content"]
        quote = answer.split("##begin_quote##")[1].split("##end_quote##")[0]
        assert (quote in user) == rec.meta["oracle"]


def test_trainer_heldout_loss_uses_a_bounded_spread_of_the_valid_set() -> None:
    from forged.worker.train.run import EVAL_MAX_EXAMPLES, spread

    small = list(range(10))
    assert spread(small, EVAL_MAX_EXAMPLES) == small
    big = list(range(443))  # the demo's held-out set: FIM cursors first, then other kinds
    got = spread(big, EVAL_MAX_EXAMPLES)
    assert len(got) == EVAL_MAX_EXAMPLES == len(set(got))
    assert got[0] == 0 and got[-1] > 0.95 * len(big)  # the tail's kinds are in it, not just the head
