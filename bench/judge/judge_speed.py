"""Judge runtime on the real base (SmolLM2-135M Q4_1 via the trainer's back end).

Builds a held-out split from forged's own source — code chunks (bits/byte), FIM spans
(a function body's middle lines hidden) and RAFT questions ("which file defines X?",
half with the oracle file in context) — and times ``score_model`` per kind for one
model. Prints seconds per example of each kind and the judge time for 1,000 held-out
examples (base + candidate; + live doubles the candidate's share).

    python bench/judge/judge_speed.py --adapter DIR [--n-text 40 --n-fim 12 --n-raft 8]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def build(n_text: int, n_fim: int, n_raft: int, seed: int = 0):
    from forged.common.fim import FORGED_TEXT
    from forged.worker.judge.judge import FimExample, Heldout, RaftExample

    rng = random.Random(seed)
    files = sorted((ROOT / "forged").rglob("*.py"))
    h = Heldout()
    for f in files:
        text = f.read_text(encoding="utf-8")
        h.texts += [text[i : i + 1200] for i in range(0, len(text), 1200) if len(text[i : i + 1200]) > 200]
        for m in re.finditer(r"\ndef \w+\(.*?\n(?=\S)", text, re.S):
            lines = m.group(0).strip("\n").split("\n")
            if len(lines) < 6:
                continue
            a = rng.randrange(1, len(lines) - 2)
            pre = text[: m.start() + 1] + "\n".join(lines[:a]) + "\n"
            mid = "\n".join(lines[a : a + 2])
            suf = "\n" + "\n".join(lines[a + 2 :]) + text[m.end() - 1 : m.end() + 400]
            h.fim.append(FimExample(FORGED_TEXT.render(pre[-1500:], suf), mid))
    defs = [(f.relative_to(ROOT).as_posix(), n) for f in files for n in re.findall(r"^def (\w+)", f.read_text(), re.M)]
    for i in range(n_raft):
        path, name = rng.choice(defs)
        oracle = i % 2 == 0
        docs = [p for p, _ in rng.sample(defs, 3) if p != path]
        if oracle:
            docs.insert(rng.randrange(len(docs) + 1), path)
        ctx = "\n".join(f"<DOCUMENT>{p}: ...</DOCUMENT>" for p in docs)
        msgs = [{"role": "user", "content": f"{ctx}\nWhich file defines `{name}`? End with <ANSWER>: path"}]
        h.raft.append(RaftExample(msgs, path, oracle, f"It is defined in {path}.\n<ANSWER>: {path}"))
    rng.shuffle(h.texts)
    rng.shuffle(h.fim)
    h.texts, h.fim = h.texts[:n_text], h.fim[:n_fim]
    return h


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter", type=Path, required=True)
    ap.add_argument("--n-text", type=int, default=40)
    ap.add_argument("--n-fim", type=int, default=12)
    ap.add_argument("--n-raft", type=int, default=8)
    args = ap.parse_args()
    from forged.common.config import TrainConfig
    from forged.worker.judge.judge import Heldout, score_model
    from forged.worker.train import load_model

    data = build(args.n_text, args.n_fim, args.n_raft)
    t0 = time.monotonic()
    be = load_model(TrainConfig(backend="torch"), args.adapter)
    t_load = time.monotonic() - t0
    per = {}
    for kind in ("texts", "fim", "raft"):
        part = Heldout(**{kind: getattr(data, kind)})
        t0 = time.monotonic()
        s = score_model(be, part, "candidate")
        per[kind] = (time.monotonic() - t0) / max(len(getattr(data, kind)), 1)
        print(kind, json.dumps({k: v for k, v in s.to_dict().items() if v}), file=sys.stderr)
    # 1,000 held-out examples in the miner's default mix is mostly code; report each kind
    # and the judge's real cost under the default caps (200 texts, 64 FIM, 64 RAFT).
    caps = {"texts": 200, "fim": 64, "raft": 64}
    capped = sum(per[k] * caps[k] for k in caps)
    print(json.dumps({
        "load_s": round(t_load, 1),
        "s_per_example": {k: round(v, 3) for k, v in per.items()},
        "s_per_1000_examples_one_model": {k: round(1000 * v, 0) for k, v in per.items()},
        "judge_s_default_caps_base_plus_candidate": round(2 * capped + t_load, 0),
        "n": {"texts": len(data.texts), "fim": len(data.fim), "raft": len(data.raft)},
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
