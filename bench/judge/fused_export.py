"""Real-model cost of the fused export: SmolLM2-135M (bundled Q4_1 GGUF) + a trained adapter.

Takes the run directory of ``bench/judge/real_fidelity.py --out DIR`` (a trained adapter
and its held-out texts), writes the fused GGUF, runs the llama.cpp fidelity check on
it and prints JSON: sizes, export and check seconds, fidelity numbers, and how far the
fused model's logits are from llama.cpp's base + GGUF adapter.

    python bench/judge/real_fidelity.py --out /tmp/rf      # train 8 steps, adapter export
    python bench/judge/fused_export.py /tmp/rf
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path, help="--out directory of bench/judge/real_fidelity.py")
    ap.add_argument("--method", default="pissa", choices=["pissa", "lora"], help="as trained")
    args = ap.parse_args()
    import numpy as np

    from forged.common.config import TrainConfig
    from forged.common.models import resolve_base
    from forged.worker.judge.export import export_adapter, export_fused
    from forged.worker.judge.fidelity import check_fidelity
    from forged.worker.judge.llama_engine import adapted_llama, llama_logits
    from forged.worker.train import load_model

    cfg = TrainConfig(backend="torch", method=args.method)
    base = Path(resolve_base(cfg.base_model).path)
    adapter = args.run / "train" / "adapter"
    held = [json.loads(line)["text"] for line in (args.run / "dataset" / "valid.jsonl").read_text().splitlines()]

    t0 = time.monotonic()
    fused = export_fused(adapter, base, args.run / "fused.gguf")
    t_export = time.monotonic() - t0
    t0 = time.monotonic()
    fid = check_fidelity(adapter, fused.path, base, cfg, held[:4])
    t_fid = time.monotonic() - t0

    # Fused vs llama.cpp's own base + adapter, on the same token ids.
    lora = export_adapter(adapter, base, args.run / "adapter.gguf")
    ids = list(load_model(cfg, adapter).input_ids(held[0][:1500]))
    n_ctx = len(ids) + 8
    z_lora = llama_logits(adapted_llama(lora.path, base, n_ctx), ids)
    z_fused = llama_logits(adapted_llama(fused.path, base, n_ctx), ids)
    print(json.dumps({
        "base_mb": round(base.stat().st_size / 2**20, 1),
        "fused_mb": round(fused.path.stat().st_size / 2**20, 1),
        "adapter_mb": round(lora.path.stat().st_size / 2**20, 2),
        "export_fused_s": round(t_export, 2),
        "fidelity_s": round(t_fid, 1),
        "fidelity": fid.to_dict(),
        "fused_vs_lora_max_abs_logit": float(np.abs(z_fused - z_lora).max()),
        "fused_vs_lora_top1_agree": float((z_fused.argmax(1) == z_lora.argmax(1)).mean()),
        "export": fused.to_dict(),
    }, indent=1, default=str))
    return 0 if fid.passed else 1


if __name__ == "__main__":
    sys.exit(main())
