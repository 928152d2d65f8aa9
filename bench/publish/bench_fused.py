"""Fused versions on the bundled base: what each precision keeps, costs on disk and in time.

    python bench/publish/bench_fused.py [--repo PATH] [--steps 40] [--adapter DIR --dataset DIR] [--rounds 5]

A real cycle's adapter: without ``--adapter``, ``--repo`` (default: this checkout) is mined
and trained the way ``forged demo`` does (PiSSA r=16 on the seven projections, 4×256
tokens a step, ``--steps`` steps) on the bundled SmolLM2-135M-Instruct Q4_1. Then:

- ``gain``: for the GGUF adapter on the Q4_1 base, and for the fused model quantized by
  llama.cpp to q4_K_M, q8_0 and f16, the held-out loss gain (nats/token) in llama.cpp
  against the trainer's on the judge's 8 held-out texts, its share kept, and the
  correlation of the logit change (``forged.worker.judge.fidelity.check_fidelity``);
- ``create_s``: upload + create of a fused q8_0 and q4_K_M version on the Ollama double
  at 0.34.1 (and of the adapter version at 0.33.5, for comparison);
- ``approve_served_s``: promote (load vN, copy to :latest) + the first completion from
  :latest, alternating between the two fused versions (each swap loads a whole model,
  as Ollama keys runners by model file), medians over ``--rounds``;
- ``disk_bytes``: what each version adds to Ollama's store (its own blobs).

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from ollama_double import OllamaDouble, bundled_base  # noqa: E402

from forged.common import config  # noqa: E402
from forged.daemon import publish  # noqa: E402


def train_adapter(repo: Path, tmp: Path, steps: int) -> tuple[Path, Path, config.TrainConfig, float]:
    """Mine ``repo`` and train the demo's adapter; (adapter dir, dataset dir, train cfg, seconds)."""
    from forged.worker.mine import mine_repo
    from forged.worker.train import train

    cfg = config.Config()
    tcfg = dataclasses.replace(cfg.train, max_steps=steps, max_minutes=30.0, seq_len=256, batch_size=4,
                               learning_rate=2e-4, warmup_steps=4, checkpoint_every=1000)
    mcfg = dataclasses.replace(cfg.mine, heldout_fraction=0.1, max_commits=100)
    t = time.perf_counter()
    mine_repo(repo, tmp / "ds", mcfg, tmp / "cache", context_tokens=tcfg.seq_len)
    train(tmp / "ds", tmp / "train", tcfg, resume=False)
    return tmp / "train" / "adapter", tmp / "ds", tcfg, time.perf_counter() - t


def synthetic_adapter(tmp: Path) -> Path:
    """``--synthetic``: a random rank-4 LoRA on layer 0's q and v (mlx layout): enough for
    the Ollama-side timings and sizes, which do not depend on what was trained."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    ad = tmp / "synthetic"
    ad.mkdir()
    save_file({f"model.layers.0.self_attn.{m}.{p}": rng.normal(0, 0.05, shape).astype(np.float32)
               for m, out in (("q_proj", 576), ("v_proj", 192))
               for p, shape in (("lora_a", (576, 4)), ("lora_b", (4, out)))}, str(ad / "adapters.safetensors"))
    (ad / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora",
                                                        "lora_parameters": {"rank": 4, "scale": 2.0}}))
    (ad / "forged_meta.json").write_text(json.dumps({"backend": "mlx", "layout": "gguf", "method": "lora"}))
    return ad


def heldout(ds: Path) -> list[str]:
    from forged.worker.judge.stage import _heldout_texts

    return _heldout_texts(ds / "valid.jsonl", limit=8)


def gains(adapter: Path, tcfg: config.TrainConfig, texts: list[str], tmp: Path) -> tuple[dict, dict[str, Path]]:
    from forged.worker.judge.export import export_adapter, export_fused
    from forged.worker.judge.fidelity import check_fidelity
    from forged.worker.judge.quantize import quantize_gguf

    base = bundled_base()

    def row(fid: object, **more: object) -> dict:
        f = fid.to_dict()  # type: ignore[attr-defined]
        g_l, g_t = f["loss_base_llama"] - f["loss_adapter_llama"], f["loss_base_trainer"] - f["loss_adapter_trainer"]
        return {"gain_llama": round(g_l, 4), "gain_trainer": round(g_t, 4), "kept": round(g_l / g_t, 3),
                "correlation": round(f["correlation"], 4), "passed_at_0.9": f["passed"], **more}

    out: dict[str, dict] = {}
    files: dict[str, Path] = {}
    files["adapter"] = export_adapter(adapter, base, tmp / "adapter.gguf").path
    out["adapter_on_q4_1"] = row(check_fidelity(adapter, files["adapter"], base, tcfg, texts, min_gain=0.9),
                                 bytes=files["adapter"].stat().st_size)
    merged = export_fused(adapter, base, tmp / "fused.gguf").path
    for q in ("q4_K_M", "q8_0", "f16"):
        t = time.perf_counter()
        files[q] = quantize_gguf(merged, tmp / f"model-{q}.gguf", q)
        secs = time.perf_counter() - t
        fid = check_fidelity(adapter, files[q], base, tcfg, texts, min_gain=0.9)
        out[f"fused_{q}"] = row(fid, bytes=files[q].stat().st_size, quantize_s=round(secs, 2))
    return out, files


def llama_gains(files: dict[str, Path], merged: Path, texts: list[str]) -> dict:
    """``--llama-only``: held-out loss gain over the Q4_1 base in llama.cpp alone (no
    trainer), for the adapter and each quantization, and its share of the unquantized
    fused model's gain (the merge before any quantization)."""
    from forged.worker.judge.agreement import mean_nll
    from forged.worker.judge.llama_engine import llama_logits, open_llama

    base = bundled_base()

    def loss(model: Path, lora: Path | None = None) -> float:
        llm = open_llama(model, lora, 1024)
        tot = n = 0.0
        for t in texts:
            ids = llm.tokenize(t[:1500].encode(), add_bos=False)[:1000]
            s, k = mean_nll(llama_logits(llm, ids), ids)
            tot, n = tot + s, n + k
        return tot / n

    ref = loss(base)
    unq = ref - loss(merged)
    out = {"base_loss": round(ref, 4), "fused_unquantized_gain": round(unq, 4)}
    for name, path in files.items():
        g = ref - (loss(base, path) if name == "adapter" else loss(path))
        out[name] = {"gain_llama": round(g, 4), "kept_of_unquantized": round(g / unq, 3), "bytes": path.stat().st_size}
    return out


def _median(xs: list[float]) -> float:
    return round(statistics.median(xs), 3)


def ollama_side(files: dict[str, Path], tmp: Path, rounds: int) -> dict:
    import ollama

    base = bundled_base()
    kw = {"serving": publish.serving_for_gguf(base), "system": publish.system_prompt("bench"), "temperature": 0.2}
    out: dict = {"create_s": {}, "disk_bytes": {}}
    with OllamaDouble(tmp / "old", version="0.33.5") as od:
        pub = publish.Publisher(od.url)
        base_tag = pub.ensure_base(base, "smollm2-135m")
        t = time.perf_counter()
        pub.create_version("bench", 1, base_tag, files["adapter"], **kw)
        out["create_s"]["adapter@0.33.5"] = round(time.perf_counter() - t, 3)
        out["disk_bytes"]["adapter"] = files["adapter"].stat().st_size  # the base blob is shared
        pub.close()
    with OllamaDouble(tmp / "new", version="0.34.1") as od:
        pub = publish.Publisher(od.url)
        for v, q in ((1, "q8_0"), (2, "q4_K_M")):
            t = time.perf_counter()
            pub.create_version("bench", v, "", files[q], **kw)
            out["create_s"][f"fused_{q}@0.34.1"] = round(time.perf_counter() - t, 3)
            layers = od.read_manifest(f"forged/bench:v{v}")["layers"]
            out["disk_bytes"][f"fused_{q}"] = sum(x["size"] for x in layers)
        client = ollama.Client(od.url)
        opts = {"temperature": 0, "num_predict": 8}
        served: dict[str, list[float]] = {"q8_0": [], "q4_K_M": []}
        for _ in range(rounds):
            for v, q, prev in ((1, "q8_0", 2), (2, "q4_K_M", 1)):
                t = time.perf_counter()
                pub.promote("bench", v, previous=prev)
                client.generate(model="forged/bench:latest", prompt="def add(a, b):", options=opts)
                served[q].append(time.perf_counter() - t)
        out["approve_served_s"] = {q: _median(xs) for q, xs in served.items()}
        pub.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, default=ROOT)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--adapter", type=Path)
    ap.add_argument("--dataset", type=Path)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--synthetic", action="store_true",
                    help="Ollama-side timings and sizes only, with a random adapter (no training)")
    ap.add_argument("--llama-only", action="store_true",
                    help="gains in llama.cpp alone, against the unquantized merge (no trainer: minutes less)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-fused-") as d:
        tmp = Path(d)
        if args.synthetic:
            from forged.worker.judge.export import export_adapter, export_fused
            from forged.worker.judge.quantize import quantize_gguf

            ad = synthetic_adapter(tmp)
            files = {"adapter": export_adapter(ad, bundled_base(), tmp / "adapter.gguf").path}
            merged = export_fused(ad, bundled_base(), tmp / "fused.gguf").path
            for q in ("q4_K_M", "q8_0"):
                files[q] = quantize_gguf(merged, tmp / f"model-{q}.gguf", q)
            print(json.dumps({"bench": "publish_fused", "synthetic": True, **ollama_side(files, tmp, args.rounds)}))
            return
        if args.adapter:
            adapter, ds, tcfg, train_s = args.adapter, args.dataset, config.Config().train, 0.0
        else:
            adapter, ds, tcfg, train_s = train_adapter(args.repo, tmp, args.steps)
        texts = heldout(ds)
        if args.llama_only:
            from forged.worker.judge.export import export_adapter, export_fused
            from forged.worker.judge.quantize import quantize_gguf

            files = {"adapter": export_adapter(adapter, bundled_base(), tmp / "adapter.gguf").path}
            merged = export_fused(adapter, bundled_base(), tmp / "fused.gguf").path
            for q in ("q4_K_M", "q8_0", "f16"):
                files[q] = quantize_gguf(merged, tmp / f"model-{q}.gguf", q)
            table = llama_gains(files, merged, texts)
        else:
            table, files = gains(adapter, tcfg, texts, tmp)
        result = {"bench": "publish_fused", "steps": args.steps, "train_s": round(train_s, 1),
                  "n_texts": len(texts), "gain": table, **ollama_side(files, tmp, args.rounds)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
