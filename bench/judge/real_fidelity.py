"""Real-model check: train a few steps on SmolLM2-135M (bundled Q4_1 GGUF), export, verify.

Writes a held-out-style dataset from this repository's own Python files, trains with
forged's trainer (default config: PiSSA, rsLoRA, r=16, all seven projections), exports
the adapter to GGUF and runs the llama.cpp fidelity check. Prints JSON with timings.

    python bench/judge/real_fidelity.py [--steps 8] [--method pissa|lora] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def code_texts(n: int, chars: int = 1200) -> list[str]:
    """Chunks of forged's own source: real code the base has never seen verbatim."""
    out: list[str] = []
    for f in sorted((ROOT / "forged").rglob("*.py")):
        text = f.read_text(encoding="utf-8")
        for i in range(0, len(text), chars):
            chunk = text[i : i + chars]
            if len(chunk) > 200:
                out.append(chunk)
    return out[:n]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--method", default="pissa", choices=["pissa", "lora"])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    from forged.common.config import TrainConfig
    from forged.common.models import resolve_base
    from forged.worker.judge.export import export_adapter
    from forged.worker.judge.fidelity import check_fidelity
    from forged.worker.train import train

    out = args.out or Path(tempfile.mkdtemp(prefix="forged-realfid-"))
    texts = code_texts(48)
    train_t, held = texts[:40], texts[40:]
    ds = out / "dataset"
    ds.mkdir(parents=True, exist_ok=True)
    (ds / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in train_t))
    (ds / "valid.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in held))
    cfg = TrainConfig(backend="torch", method=args.method, max_steps=args.steps, seq_len=256, batch_size=4,
                      learning_rate=2e-4, warmup_steps=1, checkpoint_every=1000)
    t0 = time.monotonic()
    res = train(ds, out / "train", cfg, progress=lambda d: print(json.dumps(d, default=str)[:200], file=sys.stderr, flush=True))
    t_train = time.monotonic() - t0
    base = resolve_base(cfg.base_model)
    t0 = time.monotonic()
    exp = export_adapter(out / "train" / "adapter", Path(base.path), out / "adapter.gguf")
    t_export = time.monotonic() - t0
    t0 = time.monotonic()
    fid = check_fidelity(out / "train" / "adapter", exp.path, Path(base.path), cfg, held[:4])
    t_fid = time.monotonic() - t0
    print(json.dumps({"train_s": round(t_train, 1), "steps": res.steps, "heldout_loss": [res.heldout_loss_start, res.heldout_loss],
                      "export_s": round(t_export, 2), "export": exp.to_dict(), "fidelity_s": round(t_fid, 1),
                      "fidelity": fid.to_dict(), "out": str(out)}, indent=1, default=str))
    return 0 if fid.passed else 1


if __name__ == "__main__":
    sys.exit(main())
