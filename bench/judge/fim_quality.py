"""FIM quality of a first cycle on the bundled base: mine → train → judge, in process.

The demo's budget (``forged demo``: 40 steps of 4×256 tokens, PiSSA r=16; judge 24 texts,
8 RAFT) with the judge's FIM defaults (all held-out FIM examples teacher-forced, 64
generated), on REPO at HEAD, in the base's own FIM format. Prints base and candidate FIM
metrics with n and 95% bootstrap intervals, and the judge's time per FIM example.

    FORGED_HOME=/tmp/fimq python bench/judge/fim_quality.py --repo . [--steps 40] [--fim 1.0]

``--fim-only OUT``: score FIM alone (no texts, no RAFT) for the base and the adapter an
earlier run left in OUT, on ``--n-tf`` teacher-forced and ``--n-gen`` generated examples
(the same seeded subset for both models) — for a box too loaded for the whole judge.

``--starts OUT``: generate every held-out single-line middle (the judge's budget and stop
strings) with the base and the adapter in OUT, and count those that begin with a line
break: an editor's single-line completion of such a middle is empty. Unlike the judge,
generation runs on past a leading line break, to show what the model meant to write.
Also prints single-line exact match with 95% intervals, per model and paired (by example,
and by held-out file: a file's middles are not independent); with ``--max-fim`` above the
held-out count that is every held-out single-line middle.
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
    ap.add_argument("--seq-len", type=int, default=256, help="[train] seq_len (the default config's is 512)")
    ap.add_argument("--fim-loss", default=None, choices=["middle", "all"], help="[train] fim_loss (default: the config's)")
    ap.add_argument("--kinds", default="", help="[mine.kinds] weights, e.g. raft=0.25,continuation=2")
    ap.add_argument("--max-fim", type=int, default=64, help="[judge] max_fim: generated middles per model")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--fim-only", type=Path, default=None)
    ap.add_argument("--n-tf", type=int, default=64)
    ap.add_argument("--n-gen", type=int, default=32)
    ap.add_argument("--starts", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.fim_only:
        return fim_only(a.fim_only, a.n_tf, a.n_gen)
    if a.starts:
        return starts(a.starts, a.max_fim)

    from forged.common import fim
    from forged.common.config import JudgeConfig, MineConfig, TrainConfig
    from forged.common.models import resolve_base
    from forged.worker.judge.judge import judge
    from forged.worker.mine import mine_repo
    from forged.worker.train import train

    out = a.out or Path(tempfile.mkdtemp(prefix="fimq-"))
    tcfg = TrainConfig(backend="torch", max_steps=a.steps, max_minutes=120.0, seq_len=a.seq_len, batch_size=4,
                       learning_rate=a.lr, warmup_steps=4, checkpoint_every=1000,
                       fim_loss=a.fim_loss or TrainConfig().fim_loss)
    base = resolve_base(tcfg.base_model)
    fmt = fim.for_base(base.kind, base.path)
    mcfg = MineConfig(heldout_fraction=0.1, max_commits=100)
    mcfg.kinds.fim = a.fim
    for item in filter(None, a.kinds.split(",")):
        kind, _, weight = item.partition("=")
        setattr(mcfg.kinds, kind, float(weight))
    t = time.monotonic()
    rep = mine_repo(a.repo, out / "dataset", mcfg, out / "cache", context_tokens=tcfg.seq_len, fim_format=fmt)
    times = {"mine": time.monotonic() - t}
    t = time.monotonic()
    res = train(out / "dataset", out / "train", tcfg)
    times["train"] = time.monotonic() - t
    t = time.monotonic()
    v = judge(out / "dataset", tcfg, JudgeConfig(max_examples=24, max_generate=8, max_raft=4, max_fim=a.max_fim), res.adapter_dir)
    times["judge"] = time.monotonic() - t
    rows = {}
    for name, s in (("base", v.base), ("candidate", v.candidate)):
        d = s.to_dict()
        rows[name] = {k: d[k] for k in KEYS} | {k + "_ci": d.get(k + "_ci") for k in KEYS[:4]} | {
            "n_fim_bpb": d["n_fim_bpb"], "n_fim": d["n_fim"], "n_fim_line": d["n_fim_line"],
            "fim_seconds_per_example": d["fim_seconds_per_example"], "seconds": d["seconds"]}
    deltas = {k: v.deltas[k] for k in KEYS if k in v.deltas}  # paired: candidate − base, 95% CI
    print(json.dumps({"format": fmt.name, "examples": rep.by_kind, "steps": res.steps, "times": times,
                      "passed": v.passed, "reasons": v.reasons, **rows, "deltas": deltas}, indent=1, default=str))
    return 0


def fim_only(out: Path, n_tf: int, n_gen: int) -> int:
    import random

    from forged.common.config import TrainConfig
    from forged.worker.judge.judge import compare, load_heldout, score_model
    from forged.worker.train import load_model

    h = load_heldout(out / "dataset", max_fim=n_gen)
    rng = random.Random(0)
    h.fim_all = sorted(rng.sample(h.fim_all, min(n_tf, len(h.fim_all))), key=lambda e: e.prompt)
    h.fim = h.fim_all[:n_gen]
    h.texts, h.raft = [], []
    be = load_model(TrainConfig(backend="torch"), out / "train" / "adapter")
    rows, scores = {}, {}
    for name, on in (("base", False), ("candidate", True)):
        be.set_adapter_enabled(on)
        scores[name] = score_model(be, h, name)
        d = scores[name].to_dict()
        rows[name] = {k: v for k, v in d.items() if k.startswith(("fim", "n_fim")) or k == "seconds"}
    rows["deltas"] = compare(scores["candidate"], scores["base"])  # paired: candidate − base, 95% CI
    print(json.dumps(rows, indent=1))
    return 0


def starts(out: Path, max_fim: int) -> int:
    from forged.common.config import TrainConfig
    from forged.worker.judge.judge import cut_at_stop, fim_budget, fim_prediction, load_heldout
    from forged.worker.judge.stats import clustered_mean_ci, mean_ci, paired
    from forged.worker.train import load_model

    h = load_heldout(out / "dataset", max_fim=max_fim)
    xs = [ex for ex in h.fim if ex.single_line]
    stops = list(h.fim_format.stop) if h.fim_format else []
    be = load_model(TrainConfig(backend="torch"), out / "train" / "adapter")
    budgets = [fim_budget(be, ex) for ex in xs]
    rows, exact = {}, {}
    for name, on in (("base", False), ("candidate", True)):
        be.set_adapter_enabled(on)
        gens = [cut_at_stop(g, stops) for g in be.generate_many(
            [ex.prompt for ex in xs], budgets, [lambda s: "\n" in s.lstrip("\n")] * len(xs), stop_tokens=stops)]
        preds = [fim_prediction(g, ex.completion) for g, ex in zip(gens, xs, strict=True)]
        exact[name] = [float(p.rstrip() == ex.completion.rstrip()) for p, ex in zip(preds, xs, strict=True)]
        ci = mean_ci(exact[name])
        rows[name] = {"n": len(xs), "starts_with_line_break": sum(g.startswith("\n") for g in gens),
                      "exact": int(sum(exact[name])), "exact_rate_ci": [round(ci.lo, 4), round(ci.hi, 4)],
                      "examples": [{"reference": ex.completion, "generated": g[:80]} for ex, g in zip(xs[:6], gens[:6], strict=True)]}
    d = paired(exact["candidate"], exact["base"]).diff  # the same middles for both: paired
    diffs = [c - b for c, b in zip(exact["candidate"], exact["base"], strict=True)]
    by_file = clustered_mean_ci(diffs, [ex.path for ex in xs])  # a file's middles are not independent
    rows["exact_delta"] = {"value": round(d.value, 4), "ci": [round(d.lo, 4), round(d.hi, 4)], "n": d.n,
                           "ci_by_file": [round(by_file.lo, 4), round(by_file.hi, 4)],
                           "files": len({ex.path for ex in xs})}
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
