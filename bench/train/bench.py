"""Training benchmarks (docs/benchmarks.md, "Training"). Keep runs short on shared machines.

    python bench/train/bench.py dataset SRC_DIR OUT_DIR        # top-level defs/classes → train/valid split by file
    python bench/train/bench.py torch-throughput DS [--steps N]  # forged (packed) vs plain HF Trainer (padded)
    python bench/train/bench.py mlx-throughput DS [--steps N]    # forged MLX (bucketed) vs mlx_lm's trainer
    python bench/train/bench.py pissa DS [--steps N]             # PiSSA vs LoRA held-out loss per step
    python bench/train/bench.py memory DS                        # predicted vs measured peak

Every mode prints one JSON line per result. Model: the bundled SmolLM2-135M; same
examples, batch size, max length, rank, targets and learning rate on both sides.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def make_dataset(src: Path, out: Path, valid_frac: float = 0.15, seed: int = 0) -> None:
    files = sorted(p for p in src.rglob("*.py") if p.stat().st_size < 200_000)
    random.Random(seed).shuffle(files)
    n_valid = max(1, int(len(files) * valid_frac))
    out.mkdir(parents=True, exist_ok=True)
    for split, part in (("valid", files[:n_valid]), ("train", files[n_valid:])):
        with open(out / f"{split}.jsonl", "w") as f:
            for p in part:
                text = p.read_text(errors="replace")
                try:
                    tree = ast.parse(text)
                except SyntaxError:
                    continue
                lines = text.splitlines(keepends=True)
                for node in tree.body:
                    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                        chunk = "".join(lines[node.lineno - 1 - len(node.decorator_list): node.end_lineno])
                        rec = {"text": chunk, "meta": {"kind": "continuation", "path": str(p.relative_to(src)),
                                                       "lang": "python", "changed": True}}
                        f.write(json.dumps(rec) + "\n")
    (out / "manifest.json").write_text(json.dumps({"source": str(src), "files": len(files)}))


def _cfg(**kw):
    from forged.config import TrainConfig

    c = dict(base_model="bundled:smollm2-135m", batch_size=4, seq_len=512, rank=16, alpha=16.0,
             learning_rate=2e-4, warmup_steps=2, max_minutes=0, checkpoint_every=10_000, seed=0)
    c.update(kw)
    return TrainConfig(**c)


def _forged_run(ds: Path, cfg, backend: str, tag: str) -> dict:
    from forged.train.run import train

    out = Path(f"/tmp/forged-bench-{tag}-{os.getpid()}")
    t = time.monotonic()
    steps: list[dict] = []
    res = train(ds, out, cfg, resume=False, backend_name=backend,
                progress=lambda e: steps.append(e) if e["event"] == "step" else None)
    # Rate after the first step (warm-up, allocation) to the last: each step event carries
    # cumulative tokens and tokens/s since the loop started, so its time is tokens / rate.
    first, last = steps[0], steps[-1]
    t_first, t_last = first["tokens"] / first["tokens_per_s"], last["tokens"] / last["tokens_per_s"]
    span = (last["tokens"] - first["tokens"]) / max(t_last - t_first, 1e-9)
    return {"useful_tokens": res.tokens, "steps": res.steps, "tokens_per_s_all_steps": steps[-1]["tokens_per_s"],
            "tokens_per_s_after_first": round(span, 1), "peak_mem": res.peak_mem, "wall_s": round(time.monotonic() - t, 1)}


def torch_throughput(ds: Path, steps: int) -> None:
    """forged's packed PyTorch loop vs a plain transformers Trainer + PEFT LoRA (dynamic padding, no packing)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from forged.train.data import load_dataset, tokenize
    from forged.train.models import load_tokenizer, resolve_base

    cfg = _cfg(backend="torch", method="lora", max_steps=steps)
    ours = _forged_run(ds, cfg, "torch", "torch")
    print(json.dumps({"bench": "torch-throughput", "side": "forged (packed)", **ours}), flush=True)

    base = resolve_base(cfg.base_model)
    tok = load_tokenizer(base)
    ex = tokenize(tok, load_dataset(ds).train, cfg.seq_len)
    rows = [{"input_ids": e.ids, "labels": [i if m else -100 for i, m in zip(e.ids, e.mask, strict=True)]} for e in ex]
    model = AutoModelForCausalLM.from_pretrained(str(base.path.parent), gguf_file=base.path.name, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, use_rslora=True,
                                             target_modules=list(cfg.target_modules), task_type="CAUSAL_LM"))
    pad = tok.pad_token_id

    def collate(batch):
        T = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), T), pad)
        lab = torch.full((len(batch), T), -100)
        att = torch.zeros((len(batch), T), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n], lab[i, :n], att[i, :n] = torch.tensor(b["input_ids"]), torch.tensor(b["labels"]), 1
        return {"input_ids": ids, "labels": lab, "attention_mask": att}

    useful = {"n": 0, "t0": None, "n0": 0}

    class Count(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if useful["t0"] is None:
                useful["t0"], useful["n0"] = time.monotonic(), useful["n"]

    class CountingTrainer(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            useful["n"] += int((inputs["labels"][:, 1:] != -100).sum())
            return super().training_step(model, inputs, num_items_in_batch)

    args = TrainingArguments(output_dir="/tmp/forged-bench-hf", per_device_train_batch_size=cfg.batch_size,
                             max_steps=steps, learning_rate=cfg.learning_rate, warmup_steps=2, logging_steps=1000,
                             save_strategy="no", report_to=[], seed=0, use_cpu=True, disable_tqdm=True,
                             dataloader_num_workers=0)
    t = time.monotonic()
    tr = CountingTrainer(model=model, args=args, train_dataset=rows, data_collator=collate, callbacks=[Count()])
    tr.train()
    dt = time.monotonic() - useful["t0"]
    print(json.dumps({"bench": "torch-throughput", "side": "HF Trainer + PEFT (padded, no packing)",
                      "useful_tokens": useful["n"], "steps": steps,
                      "tokens_per_s_after_first": round((useful["n"] - useful["n0"]) / dt, 1),
                      "wall_s": round(time.monotonic() - t, 1)}), flush=True)


def mlx_throughput(ds: Path, steps: int) -> None:
    """forged's MLX loop (bucketed by token length) vs mlx_lm.tuner.trainer.train (what mlx_lm.lora runs)."""
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm.tuner import trainer as mt
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from forged.train.data import load_dataset
    from forged.train.mlx_backend import load_gguf_model
    from forged.train.models import load_tokenizer, resolve_base

    cfg = _cfg(backend="mlx", method="lora", max_steps=steps, rslora=False, alpha=16.0 * 16)  # scale 16
    ours = _forged_run(ds, cfg, "mlx", "mlx")
    print(json.dumps({"bench": "mlx-throughput", "side": "forged (bucketed)", **ours}), flush=True)

    base = resolve_base(cfg.base_model)
    tok = load_tokenizer(base)
    model, _ = load_gguf_model(base.path, quantized=False)
    model.freeze()
    keys = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    linear_to_lora_layers(model, len(model.model.layers), {"rank": 16, "scale": 16.0, "dropout": 0.0, "keys": keys})

    from mlx_lm.tuner.datasets import CacheDataset, TextDataset

    # exactly mlx_lm.lora's path for {"text"} records (incl. its length sort by len(dict))
    data = CacheDataset(TextDataset([{"text": r.data["text"]} for r in load_dataset(ds).train], tok))
    useful = {"n": 0}
    orig_iter = mt.iterate_batches

    def counting_iter(*a, **k):
        for batch, lengths in orig_iter(*a, **k):
            useful["n"] += int(mx.sum(lengths[:, 1] - lengths[:, 0] - 1).item()) if lengths.ndim == 2 else 0
            yield batch, lengths

    mt.iterate_batches = counting_iter
    times: list[float] = []

    class CB:
        def on_train_loss_report(self, info):
            times.append(time.monotonic())

        def on_val_loss_report(self, info):
            pass

    args = mt.TrainingArgs(batch_size=cfg.batch_size, iters=steps, val_batches=0, steps_per_report=1,
                           steps_per_eval=10**9, steps_per_save=10**9, max_seq_length=cfg.seq_len,
                           adapter_file="/tmp/forged-bench-mlxlm.safetensors")
    t = time.monotonic()
    mt.train(model=model, optimizer=optim.Adam(learning_rate=cfg.learning_rate), train_dataset=data,
             val_dataset=data, args=args, training_callback=CB())
    per_step = useful["n"] / max(1, steps)
    rate = per_step * (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else None
    print(json.dumps({"bench": "mlx-throughput", "side": "mlx_lm trainer (mlx_lm.lora)", "useful_tokens": useful["n"],
                      "steps": steps, "tokens_per_s_after_first": rate and round(rate, 1),
                      "wall_s": round(time.monotonic() - t, 1)}), flush=True)


def pissa(ds: Path, steps: int, eval_every: int, lr: float) -> None:
    for method in ("lora", "pissa"):
        cfg = _cfg(backend="torch", method=method, max_steps=steps, eval_every=eval_every, seq_len=256,
                   learning_rate=lr)
        from forged.train.run import train

        res = train(ds, Path(f"/tmp/forged-bench-{method}-{os.getpid()}"), cfg, resume=False, backend_name="torch")
        meta = json.loads((res.adapter_dir / "forged_meta.json").read_text())
        print(json.dumps({"bench": "pissa", "method": method, "lr": lr, "evals": meta["metrics"]["evals"],
                          "seconds": round(res.seconds, 1)}), flush=True)


def memory(ds: Path, steps: int) -> None:
    from forged.train.memory import estimate_for
    from forged.train.models import resolve_base

    for backend, kw in (("torch", {}), ("torch", {"batch_size": 2, "seq_len": 256})):
        cfg = _cfg(backend=backend, method="pissa", max_steps=steps, **kw)
        pred = estimate_for(resolve_base(cfg.base_model), cfg, backend)
        ours = _forged_run(ds, cfg, backend, "mem")
        print(json.dumps({"bench": "memory", "backend": backend, "batch": cfg.batch_size, "seq_len": cfg.seq_len,
                          "predicted": pred, "measured": ours["peak_mem"],
                          "ratio": round(ours["peak_mem"] / pred, 3)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["dataset", "torch-throughput", "mlx-throughput", "pissa", "memory"])
    ap.add_argument("ds", type=Path)
    ap.add_argument("out", type=Path, nargs="?")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--eval-every", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-4)
    a = ap.parse_args()
    if a.mode == "dataset":
        make_dataset(a.ds, a.out)
    elif a.mode == "torch-throughput":
        torch_throughput(a.ds, a.steps)
    elif a.mode == "mlx-throughput":
        mlx_throughput(a.ds, a.steps)
    elif a.mode == "pissa":
        pissa(a.ds, a.steps, a.eval_every, a.lr)
    else:
        memory(a.ds, a.steps)


if __name__ == "__main__":
    main()
