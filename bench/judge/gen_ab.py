"""Judge generation, before vs after, side by side in one process (CPU seconds, 1 thread).

*before*: one prompt at a time, each generating its whole token budget, the adapter
applied unmerged (PEFT's extra ops per projection) — the judge as it was.
*after*: ``score_model`` as it is: batched ``generate_many`` with per-row early stop,
the adapter merged into the weights.

CPU seconds of a single-threaded torch are what count on a shared box (wall time
measures the neighbours). Both must produce the same metric values.

    python bench/judge/gen_ab.py --dataset DIR --adapter DIR --kind fim --n 8 --order after,before,after,before
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", type=Path, required=True, help="a mined dataset (its valid.jsonl)")
    ap.add_argument("--adapter", type=Path, required=True, help="a trained adapter (forged train output)")
    ap.add_argument("--kind", choices=("fim", "raft"), default="fim")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--order", default="after,before,after,before")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from forged.common.config import TrainConfig
    from forged.worker.judge import judge
    from forged.worker.train import load_model

    h = judge.load_heldout(args.dataset, 24, args.n, max_raft=args.n)
    be = load_model(TrainConfig(backend="torch", threads=1), args.adapter)

    def before_generate_many(prompts: list[str], budgets: list[int], until: object = None) -> list[str]:
        return [after_generate_many([p], [n])[0] for p, n in zip(prompts, budgets, strict=True)]

    after_generate_many = be.generate_many
    for label in args.order.split(","):
        if label == "after":
            be.set_adapter_enabled(True)  # merged
            be.generate_many = after_generate_many
        else:
            be.set_adapter_enabled(False)
            be.peft.base_model.enable_adapter_layers()  # on, unmerged
            be.generate_many = before_generate_many
        part = judge.Heldout(**{args.kind: getattr(h, args.kind)})
        t, w = time.process_time(), time.monotonic()
        s = judge.score_model(be, part)
        print(json.dumps({"run": label, "kind": args.kind, "n": len(getattr(h, args.kind)),
                          "cpu_s": round(time.process_time() - t, 1), "wall_s": round(time.monotonic() - w, 1),
                          "metrics": {k: v for k, v in s.to_dict().items()
                                      if k.startswith(("fim_", "raft_acc")) and v is not None},
                          "load": round(os.getloadavg()[0], 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
