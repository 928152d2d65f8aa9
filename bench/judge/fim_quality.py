"""FIM quality of a first cycle on the bundled base: mine → train → judge, in process.

The demo's budget (``forged demo``: 40 steps of 4×256 tokens, PiSSA r=16; judge 24 texts,
8 RAFT) with the judge's FIM defaults (all held-out FIM examples teacher-forced, 64
generated), on REPO at HEAD, in the base's own FIM format. Prints base and candidate FIM
metrics with n and 95% bootstrap intervals, and the judge's time per FIM example.

    FORGED_HOME=/tmp/fimq python bench/judge/fim_quality.py --repo . [--steps 40] [--fim 1.0]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

KEYS = ("fim_bpb", "fim_exact", "fim_exact_line", "fim_edit_sim", "bpb")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo", type=Path, default=Path("."))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--fim", type=float, default=1.0, help="[mine.kinds] fim weight")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)

    from forged.common import fim
    from forged.common.config import JudgeConfig, MineConfig, TrainConfig
    from forged.common.models import resolve_base
    from forged.worker.judge.judge import judge
    from forged.worker.mine import mine_repo
    from forged.worker.train import train

    out = a.out or Path(tempfile.mkdtemp(prefix="fimq-"))
    tcfg = TrainConfig(backend="torch", max_steps=a.steps, max_minutes=60.0, seq_len=256, batch_size=4,
                       learning_rate=a.lr, warmup_steps=4, checkpoint_every=1000)
    base = resolve_base(tcfg.base_model)
    fmt = fim.for_base(base.kind, base.path)
    mcfg = MineConfig(heldout_fraction=0.1, max_commits=100)
    mcfg.kinds.fim = a.fim
    t = time.monotonic()
    rep = mine_repo(a.repo, out / "dataset", mcfg, out / "cache", context_tokens=tcfg.seq_len, fim_format=fmt)
    times = {"mine": time.monotonic() - t}
    t = time.monotonic()
    res = train(out / "dataset", out / "train", tcfg)
    times["train"] = time.monotonic() - t
    t = time.monotonic()
    v = judge(out / "dataset", tcfg, JudgeConfig(max_examples=24, max_generate=8, max_raft=4), res.adapter_dir)
    times["judge"] = time.monotonic() - t
    rows = {}
    for name, s in (("base", v.base), ("candidate", v.candidate)):
        d = s.to_dict()
        rows[name] = {k: d[k] for k in KEYS} | {k + "_ci": d.get(k + "_ci") for k in KEYS[:4]} | {
            "n_fim_bpb": d["n_fim_bpb"], "n_fim": d["n_fim"], "n_fim_line": d["n_fim_line"],
            "fim_seconds_per_example": d["fim_seconds_per_example"], "seconds": d["seconds"]}
    print(json.dumps({"format": fmt.name, "examples": rep.by_kind, "steps": res.steps,
                      "times": times, "passed": v.passed, "reasons": v.reasons, **rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
