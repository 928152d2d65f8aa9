"""What the judge's retrieval baseline costs and shows, on a real cycle's dataset and adapter.

Scores FIM-middle bits/byte for base and candidate without context (every held-out FIM
example, as the judge does) and with BM25-retrieved training-side context
(``[judge] max_rag`` examples), timing each, and prints the fine-tuning vs retrieval gains
with their paired 95% intervals.

    python bench/judge/rag_cost.py CYCLE_DIR [--base bundled:smollm2-135m] [--max-rag 64]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("cycle_dir", type=Path)
    ap.add_argument("--base", default="bundled:smollm2-135m")
    ap.add_argument("--max-rag", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (1 on a busy box: 2 threads on 1 free core stall)")
    ap.add_argument("--plain-all", action="store_true", help="time FIM bits/byte over every held-out example")
    a = ap.parse_args(argv)
    from forged.common.config import TrainConfig
    from forged.worker.judge import judge as J
    from forged.worker.judge import retrieval
    from forged.worker.train import load_model

    ds = a.cycle_dir / "dataset"
    data = J.load_heldout(ds, max_fim=1, fim_format=J.dataset_fim_format(ds))
    t = time.monotonic()
    data.rag = retrieval.build(ds, data, a.max_rag)
    print(f"retrieval built in {time.monotonic() - t:.1f}s: {len(data.rag.examples)} examples, "
          f"{data.rag.corpus} chunks ({data.rag.excluded} held-out-file chunks left out)")
    data.texts, data.fim, data.raft = [], [], []  # FIM bits/byte only
    if not a.plain_all:  # the no-context pass on the same subset only: its per-example cost is what matters
        keep = [r.index for r in data.rag.examples]
        data.fim_all = [data.fim_all[i] for i in keep]
        for j, r in enumerate(data.rag.examples):
            r.index = j
    t = time.monotonic()
    cfg = TrainConfig(backend="torch", base_model=a.base, threads=a.threads)
    be = load_model(cfg, a.cycle_dir / "train" / "adapter")
    print(f"model loaded in {time.monotonic() - t:.1f}s", flush=True)
    scores = {}
    for name, on in (("base", False), ("candidate", True)):
        be.set_adapter_enabled(on)
        s = J.ModelScores()
        t = time.monotonic()
        J._score_fim_bpb(be, data, s, name, lambda d: None)
        plain = time.monotonic() - t
        retrieval.score(be, data, s, name, lambda d: None)
        print(f"{name}: fim_bpb {s.fim_bpb:.4f} over {s.n_fim_bpb} in {plain:.1f}s; fim_bpb_rag {s.fim_bpb_rag:.4f} "
              f"over {s.n_fim_rag} in {s.fim_rag_seconds:.1f}s", flush=True)
        scores[name] = s
    summary = retrieval.summarize(data.rag, scores["base"], scores["candidate"])
    print(json.dumps({k: v for k, v in summary.items() if k != "note"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
