"""PyTorch back end on a tiny random llama: adapters, PiSSA, packing, resume, bad input."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from forged.common.config import TrainConfig  # noqa: E402
from forged.common.models import ModelError, resolve_base  # noqa: E402
from forged.worker.train import load_model, train  # noqa: E402
from forged.worker.train.data import DatasetError, load_dataset, tokenize  # noqa: E402
from forged.worker.train.packing import collate, pack, single  # noqa: E402
from forged.worker.train.run import TrainError  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from tiny import make_tiny_llama, write_code_dataset  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FORGED_HOME", str(tmp_path_factory.getbasetemp() / "home"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_code_dataset(tmp_path_factory.mktemp("ds"))


def cfg_for(tiny: Path, **kw) -> TrainConfig:
    base = dict(backend="torch", base_model=str(tiny), seq_len=128, batch_size=2, max_steps=6, warmup_steps=1,
                checkpoint_every=2, rank=4, alpha=8.0, learning_rate=2e-3, max_minutes=0)
    base.update(kw)
    return TrainConfig(**base)


def open_torch(cfg: TrainConfig):
    from forged.worker.train.backend import open_backend

    return open_backend(cfg, name="torch")


def test_pissa_keeps_initial_function_and_residual(tiny, tmp_path):
    cfg = cfg_for(tiny, method="pissa", pissa_niter=0)
    be = open_torch(cfg)
    w0 = {n: m.weight.detach().clone() for n, m in be.model.named_modules() if n.endswith("q_proj")}
    text = "def add(a, b):\n    return a + b\n"
    before = be.logits(text)
    info = be.attach_adapter(cfg, warm_start=None, init_dir=tmp_path / "init")
    after = be.logits(text)
    assert abs(before - after).max() < 1e-4  # base + adapter == original function
    s = info["scale"]
    assert math.isclose(s, 8.0 / math.sqrt(4))  # rsLoRA default: alpha / sqrt(r)
    for name, mod in be.peft.named_modules():
        if name.endswith("q_proj") and hasattr(mod, "base_layer"):
            a, b = mod.lora_A["default"].weight, mod.lora_B["default"].weight
            w_res = mod.base_layer.weight
            orig = w0[name.replace("base_model.model.", "", 1)]
            # residual + principal part == original weight
            assert torch.allclose(w_res + s * b @ a, orig, atol=1e-5)
            # the principal part is the best rank-r approximation: residual's norm equals the tail singular values
            sv = torch.linalg.svdvals(orig)
            assert math.isclose(float(w_res.norm()), float(sv[4:].norm()), rel_tol=1e-3)
            assert (tmp_path / "init" / "pissa_init.safetensors").exists()


def test_packing_gives_same_loss_as_unpacked(tiny, dataset):
    cfg = cfg_for(tiny, method="lora")
    be = open_torch(cfg)
    be.attach_adapter(cfg, warm_start=None, init_dir=Path("/nonexistent"))
    ex = tokenize(be.tok, load_dataset(dataset).train[:24], 128)
    pad = be.tok.pad_token_id
    packed = pack(ex, 128)
    assert len(packed) < len(ex)  # several examples share a row
    s1, n1 = be.eval_loss([collate(packed[i : i + 4], pad) for i in range(0, len(packed), 4)])
    rows = single(ex)
    s2, n2 = be.eval_loss([collate(rows[i : i + 4], pad) for i in range(0, len(rows), 4)])
    assert n1 == n2 == sum(e.n_targets for e in ex) - 0  # same targets (masks respected)
    assert math.isclose(s1, s2, rel_tol=1e-5)


def test_train_lora_changes_outputs_and_saved_adapter_reproduces_it(tiny, dataset, tmp_path):
    cfg = cfg_for(tiny, method="pissa", max_steps=8, learning_rate=5e-3, seq_len=256)  # valid texts unsplit
    events: list[dict] = []
    res = train(dataset, tmp_path / "out", cfg, progress=events.append)
    assert res.steps == 8 and not res.stopped and res.tokens > 0
    assert res.heldout_loss < res.heldout_loss_start
    steps = [e for e in events if e["event"] == "step"]
    assert {"loss", "lr", "tokens_per_s", "eta_s", "peak_mem"} <= steps[-1].keys()
    meta = json.loads((res.adapter_dir / "forged_meta.json").read_text())
    assert meta["method"] == "pissa" and meta["rank"] == 8 and meta["layout"] == "hf"  # PiSSA → plain LoRA 2r
    assert math.isclose(meta["scale"], 8.0 / math.sqrt(4))
    assert meta["base_sha256"] == resolve_base(str(tiny)).sha256
    pc = json.loads((res.adapter_dir / "adapter_config.json").read_text())
    assert pc["r"] == 8 and pc["init_lora_weights"] is True
    # The saved plain LoRA on the ORIGINAL base reproduces the trained held-out loss.
    be = load_model(cfg, res.adapter_dir)
    ds = load_dataset(dataset)
    valid = [r.data["text"] for r in ds.valid]
    nll_on = sum(be.nll(valid))
    n_tok = sum(len(be.encode(t)) for t in valid)
    assert math.isclose(nll_on / n_tok, res.heldout_loss, rel_tol=1e-4)
    be.set_adapter_enabled(False)
    nll_off = sum(be.nll(valid))
    assert math.isclose(nll_off / n_tok, res.heldout_loss_start, rel_tol=1e-4)
    assert nll_on < nll_off
    be.set_adapter_enabled(True)
    assert be.logits("def f").shape == (len(be.input_ids("def f")), 49152)
    # completion_nll projects only the completion's positions: the same loss as all logits
    import torch

    from forged.worker.train.data import completion_ids

    p, c = completion_ids(be.tok, "def f0(x0):", " return x0 + 1")
    x = torch.tensor([[be.start_id, *p, *c]])
    with torch.no_grad():
        every = be._core()(input_ids=x).logits[0].float()
    want = float(torch.nn.functional.cross_entropy(every[len(p):-1], x[0, 1 + len(p):], reduction="sum"))
    assert math.isclose(be.completion_nll(["def f0(x0):"], [" return x0 + 1"])[0], want, rel_tol=1e-5)
    assert isinstance(be.generate("def f0(x0):", max_new_tokens=4), str)
    assert be.chat_prompt([{"role": "user", "content": "hi"}]).endswith("<|im_start|>assistant\n")


def test_dora_and_plain_scaling_wire_through(tiny, dataset, tmp_path):
    cfg = cfg_for(tiny, method="lora", dora=True, rslora=False, max_steps=2)
    res = train(dataset, tmp_path / "out", cfg)
    meta = json.loads((res.adapter_dir / "forged_meta.json").read_text())
    assert meta["dora"] is True and meta["rslora"] is False and math.isclose(meta["scale"], 8.0 / 4)
    pc = json.loads((res.adapter_dir / "adapter_config.json").read_text())
    assert pc["use_dora"] is True and pc["use_rslora"] is False and pc["r"] == 4
    be = load_model(cfg, res.adapter_dir)
    assert any("lora_magnitude_vector" in n for n, _ in be.peft.named_parameters())
    with pytest.raises(Exception, match="dora"):
        train(dataset, tmp_path / "o2", replace(cfg, method="pissa"))


def test_stop_then_resume_reproduces_uninterrupted_curve(tiny, dataset, tmp_path):
    cfg = cfg_for(tiny, method="pissa", pissa_niter=2, max_steps=6, checkpoint_every=100, dropout=0.1)
    full = train(dataset, tmp_path / "full", cfg)
    stop = threading.Event()

    def progress(e: dict) -> None:
        if e["event"] == "step" and e["step"] == 3:
            stop.set()  # what the worker does on SIGTERM

    part = train(dataset, tmp_path / "part", cfg, progress=progress, stop=stop)
    assert part.stopped and part.steps == 3 and part.adapter_dir is None
    rest = train(dataset, tmp_path / "part", cfg)
    assert rest.steps == 6
    assert rest.loss_curve == pytest.approx(full.loss_curve, rel=1e-5, abs=1e-6)
    assert rest.heldout_loss == pytest.approx(full.heldout_loss, rel=1e-5)


def test_kill9_mid_run_then_resume(tiny, dataset, tmp_path):
    cfg_file = tmp_path / "config.toml"
    cfg_file.write_text(
        f'[train]\nbackend = "torch"\nbase_model = "{tiny}"\nseq_len = 128\nbatch_size = 2\nmax_steps = 6\n'
        'warmup_steps = 1\ncheckpoint_every = 2\nrank = 4\nalpha = 8.0\nlearning_rate = 2e-3\nmax_minutes = 0\n'
        "threads = 1\n"
    )
    cmd = [sys.executable, "-m", "forged.worker.train.cli", str(dataset), "--out", str(tmp_path / "run"),
           "--config", str(cfg_file)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    for line in p.stdout:
        e = json.loads(line)
        if e["event"] == "checkpoint" and e["step"] == 4:
            p.send_signal(signal.SIGKILL)
            break
    p.wait()
    assert p.returncode == -signal.SIGKILL
    events: list[dict] = []
    resumed = train(dataset, tmp_path / "run", cfg_for(tiny, threads=1), progress=events.append)
    assert any(e["event"] == "resumed" and e["step"] == 4 for e in events)
    full = train(dataset, tmp_path / "full", cfg_for(tiny, threads=1))
    assert resumed.loss_curve == pytest.approx(full.loss_curve, rel=1e-5, abs=1e-6)


def test_warm_start_continues_live_adapter_with_replay(tiny, dataset, tmp_path):
    cfg = cfg_for(tiny, method="pissa", max_steps=3, replay_ratio=0.25)
    first = train(dataset, tmp_path / "c1", cfg)
    events: list[dict] = []
    second = train(dataset, tmp_path / "c2", cfg, warm_start=first.adapter_dir, progress=events.append)
    start = next(e for e in events if e["event"] == "start")
    assert start["method"] == "lora" and start["rank"] == 8  # continues the live plain LoRA
    assert start["examples"] < next(e for e in [json.loads((first.adapter_dir / "forged_meta.json").read_text())])["metrics"]["examples"]
    # Training starts from the live adapter's quality, not from the base.
    assert second.heldout_loss_start == pytest.approx(first.heldout_loss, rel=1e-4)


def test_bad_inputs_fail_before_training(tiny, dataset, tmp_path):
    cfg = cfg_for(tiny)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "train.jsonl").write_text("\n")
    with pytest.raises(DatasetError, match="no examples"):
        train(empty, tmp_path / "o", cfg)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.jsonl").write_text('{"text": "ok"}\n{"foo": 1}\n')
    with pytest.raises(DatasetError, match=r"train.jsonl:2"):
        train(bad, tmp_path / "o", cfg)
    with pytest.raises(DatasetError, match="does not exist"):
        train(tmp_path / "missing", tmp_path / "o", cfg)
    with pytest.raises(ModelError, match="not found"):
        train(dataset, tmp_path / "o", replace(cfg, base_model=str(tmp_path / "nope")))
    with pytest.raises(ModelError, match="config.json"):
        train(dataset, tmp_path / "o", replace(cfg, base_model=str(empty)))
    with pytest.raises(MemoryError, match="GiB"):
        train(dataset, tmp_path / "o", replace(cfg, batch_size=10_000, seq_len=100_000))
    with pytest.raises(Exception, match="target_modules"):
        train(dataset, tmp_path / "o", replace(cfg, target_modules=["nonexistent_proj"]))


def test_nan_loss_stops_and_reports_last_good_checkpoint(tiny, dataset, tmp_path, monkeypatch):
    from forged.worker.train import torch_backend

    real = torch_backend.TorchBackend.train_step
    calls = {"n": 0}

    def flaky(self, micro, lr):
        calls["n"] += 1
        loss, n, g = real(self, micro, lr)
        return (float("nan") if calls["n"] == 3 else loss), n, g

    monkeypatch.setattr(torch_backend.TorchBackend, "train_step", flaky)
    with pytest.raises(TrainError, match="step 3") as ei:
        train(dataset, tmp_path / "o", cfg_for(tiny))
    assert ei.value.checkpoint is not None and ei.value.checkpoint.name == "step-000002"
    assert not (tmp_path / "o" / "adapter").exists()
