"""Training benchmarks (docs/benchmarks.md, "Training"). Keep runs short on shared machines.

    python bench/train/bench.py dataset SRC_DIR OUT_DIR          # top-level defs/classes → train/valid split by file
    python bench/train/bench.py torch-throughput DS [--steps N]  # forged (packed) vs plain HF Trainer (padded)
    python bench/train/bench.py mlx-throughput DS [--steps N]    # forged MLX (bucketed) vs mlx_lm's trainer
    python bench/train/bench.py pissa DS [--steps N]             # PiSSA vs LoRA held-out loss per step
    python bench/train/bench.py memory DS                        # predicted vs measured peak RSS

Common options: --rounds R (throughput: alternate forged/reference R times), --seq-len,
--threads (same CPU thread count on both sides), --layers N (keep the first N decoder
layers on both sides, to fit a loaded box), --max-valid (pissa: held-out records used).

Every mode prints one JSON line per result. Model: the bundled SmolLM2-135M; same
examples, batch size, max length, rank, targets and learning rate on both sides.
Throughput rates count useful (target) tokens after the first step, per wall second and
per process CPU second (the latter is less sensitive to other load on the machine).
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
    from forged.common.config import TrainConfig

    c = dict(base_model="bundled:smollm2-135m", batch_size=4, seq_len=512, rank=16, alpha=16.0,
             learning_rate=2e-4, warmup_steps=2, max_minutes=0, checkpoint_every=10_000, seed=0)
    c.update(kw)
    return TrainConfig(**c)


def _mark() -> tuple[float, float]:
    """(wall, process CPU) seconds: CPU time is the load-robust side of a shared box."""
    return time.monotonic(), time.process_time()


def _rate(marks: list[tuple[float, float, int]]) -> dict:
    """Useful tokens/s from per-step (wall, cpu, cumulative useful tokens) marks, after the first step."""
    (w0, c0, n0), (w1, c1, n1) = marks[0], marks[-1]
    return {"tokens_per_s": round((n1 - n0) / max(w1 - w0, 1e-9), 2),
            "tokens_per_cpu_s": round((n1 - n0) / max(c1 - c0, 1e-9), 2),
            "timed_steps": len(marks) - 1, "timed_tokens": n1 - n0, "timed_wall_s": round(w1 - w0, 1)}


def keep_layers(n: int, mlx: bool) -> None:
    """Truncate the model to its first ``n`` decoder layers on both sides (a time-saver on a
    loaded box: every per-token cost except the LM head shrinks alike; 0 = all layers)."""
    if not n:
        return

    def cut_torch(model):
        model.model.layers = model.model.layers[:n]
        model.config.num_hidden_layers = n
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = model.config.layer_types[:n]
        return model

    if not mlx:
        import forged.worker.train.torch_backend as ftb

        init = ftb.TorchBackend.__init__

        def torch_init(self, base, cfg):
            init(self, base, cfg)
            cut_torch(self.model)

        ftb.TorchBackend.__init__ = torch_init
        KEEP["torch"] = cut_torch
        return
    import forged.worker.train.mlx_backend as fmb

    load = fmb.load_gguf_model

    def mlx_load(path, quantized):
        model, info = load(path, quantized)
        model.model.layers = model.model.layers[:n]
        model.args.num_hidden_layers = n
        return model, {**info, "layers": n}

    fmb.load_gguf_model = mlx_load


KEEP: dict = {"torch": lambda m: m}


def _train_only(ds: Path) -> Path:
    """The dataset without its valid split: throughput runs need no held-out evals."""
    out = Path(f"/tmp/forged-bench-trainonly-{os.getpid()}")
    out.mkdir(exist_ok=True)
    (out / "train.jsonl").write_text((ds / "train.jsonl").read_text())
    return out


def _forged_run(ds: Path, cfg, backend: str, tag: str) -> dict:
    from forged.worker.train.run import train

    out = Path(f"/tmp/forged-bench-{tag}-{os.getpid()}")
    t = time.monotonic()
    marks: list[tuple[float, float, int]] = []
    load0 = os.getloadavg()[0]
    res = train(ds, out, cfg, resume=False, backend_name=backend,
                progress=lambda e: marks.append((*_mark(), e["tokens"])) if e["event"] == "step" else None)
    return {"useful_tokens": res.tokens, "steps": res.steps, **_rate(marks), "peak_mem": res.peak_mem,
            "wall_s": round(time.monotonic() - t, 1), "load": [load0, os.getloadavg()[0]]}


def _hf_run(ds: Path, cfg, steps: int) -> dict:
    """A plain transformers Trainer + PEFT LoRA: one example per row, dynamic padding, no packing."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from forged.common.models import resolve_base
    from forged.worker.train.data import load_dataset, tokenize
    from forged.worker.train.models import load_tokenizer

    t = time.monotonic()
    load0 = os.getloadavg()[0]
    base = resolve_base(cfg.base_model)
    tok = load_tokenizer(base)
    ex = tokenize(tok, load_dataset(ds).train, cfg.seq_len)  # the very examples forged trains on
    rows = [{"input_ids": e.ids, "labels": [i if m else -100 for i, m in zip(e.ids, e.mask, strict=True)]} for e in ex]
    model = AutoModelForCausalLM.from_pretrained(str(base.path.parent), gguf_file=base.path.name, dtype=torch.float32)
    model = KEEP["torch"](model)
    # transformers tags a GGUF-loaded model as "quantized" (GGUF) although it holds fp32 weights,
    # and Trainer refuses to train one: drop the tag (forged's own loop does not check it).
    model.hf_quantizer = None
    if "is_quantized" in vars(model):
        model.is_quantized = False
    model = get_peft_model(model, LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, use_rslora=cfg.rslora,
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

    useful = {"n": 0, "padded": 0}
    marks: list[tuple[float, float, int]] = []

    class Mark(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            marks.append((*_mark(), useful["n"]))

    class CountingTrainer(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            useful["n"] += int((inputs["labels"][:, 1:] != -100).sum())  # HF shifts labels by one
            useful["padded"] += int(inputs["labels"].numel())
            return super().training_step(model, inputs, num_items_in_batch)

    args = TrainingArguments(output_dir="/tmp/forged-bench-hf", per_device_train_batch_size=cfg.batch_size,
                             max_steps=steps, learning_rate=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
                             weight_decay=0.0, max_grad_norm=cfg.max_grad_norm, logging_steps=1000,
                             save_strategy="no", report_to=[], seed=cfg.seed, use_cpu=True, disable_tqdm=True,
                             dataloader_num_workers=0)
    CountingTrainer(model=model, args=args, train_dataset=rows, data_collator=collate, callbacks=[Mark()]).train()
    return {"useful_tokens": useful["n"], "padded_tokens": useful["padded"], "steps": steps, **_rate(marks),
            "wall_s": round(time.monotonic() - t, 1), "load": [load0, os.getloadavg()[0]]}


def _summary(bench: str, results: dict[str, list[dict]], ours: str, ref: str) -> None:
    """Pooled rate over all rounds per side (timed tokens / timed seconds) and the ratio."""
    out = {"bench": bench, "summary": True}
    for key, secs in (("tokens_per_s", "timed_wall_s"), ("tokens_per_cpu_s", None)):
        rates = {}
        for side in (ours, ref):
            rs = results[side]
            if secs:
                rates[side] = sum(r["timed_tokens"] for r in rs) / max(sum(r[secs] for r in rs), 1e-9)
            else:
                rates[side] = sum(r["timed_tokens"] for r in rs) / max(
                    sum(r["timed_tokens"] / r["tokens_per_cpu_s"] for r in rs), 1e-9)
        out[key] = {k: round(v, 2) for k, v in rates.items()}
        out[key + "_ratio"] = round(rates[ours] / rates[ref], 3)
        out[key + "_ratio_per_round"] = [round(a[key] / b[key], 3) for a, b in zip(results[ours], results[ref], strict=True)]
    print(json.dumps(out), flush=True)


def torch_throughput(ds: Path, steps: int, rounds: int, seq_len: int, threads: int) -> None:
    """forged's packed PyTorch loop vs a plain transformers Trainer + PEFT LoRA, alternating rounds."""
    from forged.common.memory import estimate_for
    from forged.common.models import resolve_base

    cfg = _cfg(backend="torch", method="lora", max_steps=steps, seq_len=seq_len, threads=threads)
    ds = _train_only(ds)
    ours, ref = "forged (packed)", "HF Trainer + PEFT (padded, no packing)"
    results: dict[str, list[dict]] = {ours: [], ref: []}
    for r in range(rounds):
        order = (ours, ref) if r % 2 == 0 else (ref, ours)  # alternate who goes first
        for side in order:
            res = _forged_run(ds, cfg, "torch", f"torch{r}") if side == ours else _hf_run(ds, cfg, steps)
            if side == ours and r == 0:  # peak RSS of a process that has run nothing else yet
                res["predicted_mem"] = estimate_for(resolve_base(cfg.base_model), cfg, "torch")
            results[side].append(res)
            print(json.dumps({"bench": "torch-throughput", "round": r, "side": side, "seq_len": seq_len,
                              "threads": threads, **res}), flush=True)
    _summary("torch-throughput", results, ours, ref)


def _mlxlm_run(ds: Path, cfg, steps: int) -> dict:
    """mlx_lm.tuner.trainer.train on the same model and data, the way mlx_lm.lora feeds it."""
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm.tuner import trainer as mt
    from mlx_lm.tuner.datasets import CacheDataset, TextDataset
    from mlx_lm.tuner.utils import linear_to_lora_layers

    import forged.worker.train.mlx_backend as fmb
    from forged.common.models import resolve_base
    from forged.worker.train.data import load_dataset
    from forged.worker.train.models import load_tokenizer

    t = time.monotonic()
    load0 = os.getloadavg()[0]
    base = resolve_base(cfg.base_model)
    tok = load_tokenizer(base)
    model, _ = fmb.load_gguf_model(base.path, quantized=False)  # keep_layers patches it
    model.freeze()
    keys = [f"{'self_attn' if k in ('q_proj', 'k_proj', 'v_proj', 'o_proj') else 'mlp'}.{k}" for k in cfg.target_modules]
    scale = cfg.alpha / (cfg.rank ** 0.5 if cfg.rslora else cfg.rank)
    linear_to_lora_layers(model, len(model.model.layers), {"rank": cfg.rank, "scale": scale, "dropout": 0.0, "keys": keys})
    # exactly mlx_lm.lora's path for {"text"} records (incl. its length sort by len(dict))
    data = CacheDataset(TextDataset([{"text": r.data["text"]} for r in load_dataset(ds).train], tok))
    per_batch: list[int] = []

    def counting_iter(*a, **k):
        # train() takes iterate_batches as a default argument: patching the module does not reach it
        for batch, lengths in mt.iterate_batches(*a, **k):
            # real next-token targets per row: length - offset - 1 (mlx_lm's own mask counts one
            # more, the first padding position after each row)
            per_batch.append(int(mx.sum(lengths[:, 1] - lengths[:, 0] - 1).item()))
            yield batch, lengths

    marks: list[tuple[float, float, int]] = []

    class CB:
        def on_train_loss_report(self, info):
            marks.append((*_mark(), sum(per_batch[: info["iteration"]])))

        def on_val_loss_report(self, info):
            pass

    args = mt.TrainingArgs(batch_size=cfg.batch_size, iters=steps, val_batches=0, steps_per_report=1,
                           steps_per_eval=10**9, steps_per_save=10**9, max_seq_length=cfg.seq_len,
                           adapter_file=f"/tmp/forged-bench-mlxlm-{os.getpid()}.safetensors")
    mt.train(model=model, optimizer=optim.Adam(learning_rate=cfg.learning_rate), train_dataset=data,
             val_dataset=None, args=args, training_callback=CB(), iterate_batches=counting_iter)
    return {"useful_tokens": sum(per_batch[:steps]), "steps": steps, **_rate(marks),
            "wall_s": round(time.monotonic() - t, 1), "load": [load0, os.getloadavg()[0]]}


def mlx_throughput(ds: Path, steps: int, rounds: int, seq_len: int) -> None:
    """forged's MLX loop (bucketed by token length) vs mlx_lm.tuner.trainer.train (what mlx_lm.lora runs)."""
    # mlx-lm's scale is absolute: alpha/r with alpha = 16·r gives scale 16 on both sides
    cfg = _cfg(backend="mlx", method="lora", max_steps=steps, seq_len=seq_len, rslora=False, alpha=16.0 * 16,
               max_grad_norm=0.0)  # mlx_lm clips nothing
    ds = _train_only(ds)
    ours, ref = "forged (bucketed)", "mlx_lm trainer (mlx_lm.lora)"
    results: dict[str, list[dict]] = {ours: [], ref: []}
    for r in range(rounds):
        order = (ours, ref) if r % 2 == 0 else (ref, ours)
        for side in order:
            res = _forged_run(ds, cfg, "mlx", f"mlx{r}") if side == ours else _mlxlm_run(ds, cfg, steps)
            results[side].append(res)
            print(json.dumps({"bench": "mlx-throughput", "round": r, "side": side, "seq_len": seq_len, **res}),
                  flush=True)
    _summary("mlx-throughput", results, ours, ref)


def pissa(ds: Path, steps: int, eval_every: int, lr: float, seq_len: int, threads: int, max_valid: int) -> None:
    """Held-out loss every ``eval_every`` steps, LoRA then PiSSA (same data order, lr, batch)."""
    from forged.worker.train.run import train

    if max_valid:
        small = Path(f"/tmp/forged-bench-pissa-ds-{os.getpid()}")
        small.mkdir(exist_ok=True)
        (small / "train.jsonl").write_text((ds / "train.jsonl").read_text())
        lines = (ds / "valid.jsonl").read_text().splitlines(keepends=True)
        (small / "valid.jsonl").write_text("".join(lines[:max_valid]))
        ds = small

    curves = {}
    for method in ("lora", "pissa"):
        cfg = _cfg(backend="torch", method=method, max_steps=steps, eval_every=eval_every, seq_len=seq_len,
                   learning_rate=lr, threads=threads)
        res = train(ds, Path(f"/tmp/forged-bench-{method}-{os.getpid()}"), cfg, resume=False, backend_name="torch")
        meta = json.loads((res.adapter_dir / "forged_meta.json").read_text())
        curves[method] = meta["metrics"]["evals"]
        print(json.dumps({"bench": "pissa", "method": method, "lr": lr, "seq_len": seq_len, "evals": curves[method],
                          "seconds": round(res.seconds, 1), "load": os.getloadavg()[0]}), flush=True)
    # For each evaluated LoRA step N: the first evaluated step at which PiSSA's loss is ≤ LoRA's at N.
    reach = []
    for n, lora_loss in curves["lora"][1:]:
        hit = next((m for m, p_loss in curves["pissa"] if p_loss <= lora_loss), None)
        reach.append({"lora_step": n, "lora_loss": round(lora_loss, 4), "pissa_step": hit,
                      "ratio": None if hit is None else round(hit / n, 3)})
    print(json.dumps({"bench": "pissa", "summary": True, "reach": reach}), flush=True)


MEMORY_CONFIGS = [{"batch_size": 4, "seq_len": 512}, {"batch_size": 2, "seq_len": 256},
                  {"batch_size": 4, "seq_len": 512, "grad_checkpoint": True}]


def memory(ds: Path, steps: int, only: int | None, threads: int) -> None:
    """Predicted vs measured peak RSS; each setting in its own process (ru_maxrss is per process)."""
    if only is None:
        import subprocess

        for i in range(len(MEMORY_CONFIGS)):
            subprocess.run([sys.executable, __file__, "memory", str(ds), "--steps", str(steps), "--only", str(i),
                            "--threads", str(threads)], check=True)
        return
    from forged.common.memory import estimate_for
    from forged.common.models import resolve_base

    kw = MEMORY_CONFIGS[only]
    cfg = _cfg(backend="torch", method="pissa", max_steps=steps, threads=threads, **kw)
    pred = estimate_for(resolve_base(cfg.base_model), cfg, "torch")
    ours = _forged_run(_train_only(ds), cfg, "torch", f"mem{only}")
    print(json.dumps({"bench": "memory", "backend": "torch", "method": "pissa", **kw, "predicted": pred,
                      "measured": ours["peak_mem"], "measured_over_predicted": round(ours["peak_mem"] / pred, 3),
                      "steps": steps}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["dataset", "torch-throughput", "mlx-throughput", "pissa", "memory"])
    ap.add_argument("ds", type=Path)
    ap.add_argument("out", type=Path, nargs="?")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2, help="alternating forged/reference rounds (throughput modes)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads on both sides (0: library default)")
    ap.add_argument("--layers", type=int, default=0, help="keep only the first N decoder layers, both sides (0: all)")
    ap.add_argument("--max-valid", type=int, default=0, help="pissa: held-out records used (0: all)")
    ap.add_argument("--eval-every", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--only", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.threads:  # before torch / MLX / OpenBLAS load: the same thread count on both sides
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(a.threads)
    keep_layers(a.layers, mlx=a.mode == "mlx-throughput")
    if a.mode == "dataset":
        make_dataset(a.ds, a.out)
    elif a.mode == "torch-throughput":
        torch_throughput(a.ds, a.steps, a.rounds, a.seq_len, a.threads)
    elif a.mode == "mlx-throughput":
        mlx_throughput(a.ds, a.steps, a.rounds, a.seq_len)
    elif a.mode == "pissa":
        pissa(a.ds, a.steps, a.eval_every, a.lr, a.seq_len, a.threads, a.max_valid)
    else:
        memory(a.ds, a.steps, a.only, a.threads)


if __name__ == "__main__":
    main()
