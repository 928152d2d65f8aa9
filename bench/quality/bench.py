"""Recipe vs plain baseline at equal compute (docs/benchmarks.md, "Quality").

    python bench/quality/bench.py prepare OUT [--repos forged,pytest,java-util]
    python bench/quality/bench.py base OUT REPO
    python bench/quality/bench.py run OUT REPO METHOD --seed S [--variant NAME --set sec.key=value ...]
    python bench/quality/bench.py rescore-texts OUT REPO
    python bench/quality/bench.py table OUT

``prepare`` makes each bench repo a git repository under OUT/repos (this checkout at
HEAD; pytest's ``_pytest`` from the venv's site-packages; java.util's top-level sources from the JDK's
src.zip), mines it with the default ``[mine]`` config (held-out share raised to
``HELDOUT`` so the intervals have files to stand on; the split is by file, so the
baseline's held-out files are the recipe's), and writes the fixed evaluation set:

* held-out bits/byte: the held-out *files*, the first ``TEXT_BYTES`` bytes after a leading
  license header (``after_license``);
* FIM-middle bits/byte: the held-out FIM records: NLL of the middle given the prompt;
* QA accuracy: the held-out RAFT questions with the oracle in context (greedy answer).

METHOD is ``recipe`` (the mined dataset, every kind, default ``[train]``) or ``baseline``
(a plain continuation fine-tune on the raw train-side files). Both use the same trainer,
PiSSA, rank, target modules, learning rate and budget (``STEPS`` × ``BATCH`` × ``SEQ``);
``--set`` changes a config key for one variant (``mine.*`` keys re-mine). Every run
writes per-example values; ``table`` pools seeds and gives 95% bootstrap intervals over
examples (paired: one resampling shared by base, recipe and baseline).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

STEPS, BATCH, BENCH_SEQ = 24, 4, 256
SEQ = BENCH_SEQ
HELDOUT = 0.2
TEXT_BYTES, MAX_TEXTS, MAX_FIM, MAX_QA = 2000, 16, 16, 8
SRC_ZIP = Path("/usr/lib/jvm/temurin-25-jdk-amd64/lib/src.zip")


# ---------------------------------------------------------------- repos and datasets

def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def _commit_tree(repo: Path) -> None:
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "import")


def make_repo(name: str, dest: Path) -> Path:
    if dest.exists():
        return dest
    if name == "forged":
        subprocess.run(["git", "clone", "-q", "--local", str(ROOT), str(dest)], check=True)
    elif name == "pytest":
        import _pytest

        shutil.copytree(Path(_pytest.__file__).parent, dest / "_pytest", ignore=shutil.ignore_patterns("__pycache__"))
        _commit_tree(dest)
    elif name == "java-util":
        with zipfile.ZipFile(SRC_ZIP) as z:
            for n in z.namelist():
                if n.startswith("java.base/java/util/") and n.count("/") == 3 and n.endswith(".java"):
                    out = dest / n.removeprefix("java.base/")
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(z.read(n))
        _commit_tree(dest)
    else:
        raise SystemExit(f"unknown bench repo {name!r} (forged, pytest, java-util)")
    return dest


def _config(overrides: list[str]):
    """The default Config with the bench budget and ``sec.key=value`` overrides applied."""
    from forged.common.config import Config

    cfg = Config()
    cfg.mine.heldout_fraction = HELDOUT
    cfg.train = dataclasses.replace(cfg.train, backend="torch", max_steps=STEPS, batch_size=BATCH, seq_len=SEQ,
                                    max_minutes=0, checkpoint_every=10_000)
    for item in overrides:
        key, _, raw = item.partition("=")
        *path, leaf = key.split(".")
        obj = cfg
        for p in path:
            obj = getattr(obj, p)
        old = getattr(obj, leaf)
        setattr(obj, leaf, type(old)(json.loads(raw)) if not isinstance(old, str) else raw)
    return cfg


def _mine_key(overrides: list[str]) -> str:
    """The mined dataset's cache key: its ``mine.*`` overrides, and the context it is sized to."""
    m = sorted(o for o in overrides if o.startswith("mine."))
    if SEQ != BENCH_SEQ:  # RAFT documents are cut to fit the training context
        m.append(f"context_tokens={SEQ}")
    return hashlib.sha256("\n".join(m).encode()).hexdigest()[:8] if m else "default"


def mine(out: Path, repo: str, overrides: list[str]) -> Path:
    """The repo's mined dataset for these ``mine.*`` overrides (cached)."""
    from forged.worker.mine import mine_repo

    ds = out / repo / f"ds-{_mine_key(overrides)}"
    if (ds / "train.jsonl").exists():
        return ds
    cfg = _config(overrides)
    shutil.rmtree(out / repo / "cache", ignore_errors=True)  # the miner remembers held-out paths per cache
    mine_repo(out / "repos" / repo, ds, cfg.mine, out / repo / "cache", linked=False, context_tokens=SEQ)
    return ds


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_only(ds: Path, dest: Path) -> Path:
    """``ds``'s training split alone (no valid.jsonl: the trainer's own held-out loss is not needed)."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(ds / "train.jsonl", dest / "train.jsonl")
    return dest


def heldout_files(ds: Path) -> list[str]:
    """The files the miner held out (its split is by file: their code is never trained on)."""
    return sorted({r["meta"]["path"] for r in _records(ds / "valid.jsonl")
                   if r["meta"].get("kind") in ("continuation", "fim") and r["meta"].get("path")})


def baseline_dataset(out: Path, repo: str, ds: Path) -> Path:
    """The train-side files the miner read, as plain text records: the 30-line fine-tune's data."""
    dest = out / repo / "baseline-ds"
    if (dest / "train.jsonl").exists():
        return dest
    held = set(heldout_files(ds))
    paths = sorted({r["meta"].get("path") for r in _records(ds / "train.jsonl")} - held - {None})
    root = out / "repos" / repo
    dest.mkdir(parents=True, exist_ok=True)
    with open(dest / "train.jsonl", "w") as f:
        for p in paths:
            if (root / p).is_file():
                f.write(json.dumps({"text": (root / p).read_text(errors="replace"), "meta": {"path": p}}) + "\n")
    return dest


def eval_set(out: Path, repo: str, ds: Path) -> dict:
    """The fixed held-out evaluation set (held-out files, FIM middles, oracle RAFT questions)."""
    path = out / repo / "eval.json"
    if path.exists():
        return json.loads(path.read_text())
    valid = _records(ds / "valid.jsonl")
    files, texts = heldout_texts(out / "repos" / repo, ds)
    fim = [{"prompt": r["prompt"], "completion": r["completion"]} for r in valid
           if r["meta"].get("kind") == "fim" and r["completion"].strip()]
    qa = []
    for r in valid:
        if r["meta"].get("kind") == "raft" and r["meta"].get("oracle", True):
            msgs = r["messages"]
            ref = msgs[-1]["content"] if msgs[-1]["role"] == "assistant" else ""
            qa.append({"messages": msgs[:-1] if ref else msgs, "answer": str(r["meta"]["answer"]), "reference": ref})
    ev = {"files": files[:MAX_TEXTS], "texts": texts[:MAX_TEXTS], "fim": _spread(fim, MAX_FIM),
          "qa": _spread(qa, MAX_QA)}
    path.write_text(json.dumps(ev))
    return ev


_LEADING_COMMENT = re.compile(r"\s*(?:/\*.*?\*/|(?:(?://|#)[^\n]*\n\s*)+)", re.S)


def after_license(text: str) -> str:
    """``text`` without a leading comment that is a license or copyright header.

    Every file of a project tends to start with the same header; a fine-tune on the raw
    files learns it by heart, and the first 2 kB of a held-out file would then score
    license memorisation rather than code.
    """
    while (m := _LEADING_COMMENT.match(text)) and re.search(r"licen[cs]e|copyright", m.group(0), re.I):
        text = text[m.end():].lstrip("\n")
    return text


def heldout_texts(root: Path, ds: Path) -> tuple[list[str], list[str]]:
    """The held-out files with text left after their license header, and that text's first ``TEXT_BYTES``."""
    pairs = [(p, after_license((root / p).read_text(errors="replace"))[:TEXT_BYTES])
             for p in heldout_files(ds) if (root / p).is_file()]
    pairs = [(p, t) for p, t in pairs if t.strip()]
    return [p for p, _ in pairs], [t for _, t in pairs]


def _spread(xs: list, k: int) -> list:
    """``k`` items evenly spread over ``xs`` (deterministic, covers every held-out file)."""
    if len(xs) <= k:
        return xs
    return [xs[round(i * (len(xs) - 1) / (k - 1))] for i in range(k)]


# ---------------------------------------------------------------- scoring

def _text_scores(backend, texts: list[str]) -> dict:
    """Bits and bytes of each held-out text."""
    return {"text_bits": [n / math.log(2) for n in backend.nll(texts)],
            "text_bytes": [len(t.encode()) for t in texts]}


def score(backend, ev: dict) -> dict:
    """Per-example values: bits and bytes of each held-out file and FIM middle, QA hits."""
    from forged.worker.judge.judge import _answered, answer_matches

    ln2 = math.log(2)
    fim_bits = []
    for ex in ev["fim"]:
        whole, prompt = backend.nll([ex["prompt"] + ex["completion"], ex["prompt"]])
        fim_bits.append((whole - prompt) / ln2)
    hits = []
    for i in range(0, len(ev["qa"]), 8):
        part = ev["qa"][i : i + 8]
        gens = backend.generate_many([backend.chat_prompt(q["messages"]) for q in part],
                                     [min(len(backend.encode(q["reference"])) + 16, 128) for q in part],
                                     [_answered] * len(part))
        hits += [float(answer_matches(g, q["answer"])) for g, q in zip(gens, part, strict=True)]
    return {**_text_scores(backend, ev["texts"]), "fim_bits": fim_bits,
            "fim_bytes": [max(len(ex["completion"].encode()), 1) for ex in ev["fim"]], "qa_hits": hits}


def cmd_prepare(out: Path, repos: list[str]) -> None:
    for repo in repos:
        t = time.monotonic()
        make_repo(repo, out / "repos" / repo)
        ds = mine(out, repo, [])
        baseline_dataset(out, repo, ds)
        ev = eval_set(out, repo, ds)
        n_train = len((ds / "train.jsonl").read_text().splitlines())
        print(json.dumps({"prepare": repo, "train_records": n_train, "heldout_files": len(ev["files"]),
                          "fim": len(ev["fim"]), "qa": len(ev["qa"]), "seconds": round(time.monotonic() - t, 1)}),
              flush=True)


def cmd_base(out: Path, repo: str) -> None:
    from forged.worker.train import load_model

    ev = json.loads((out / repo / "eval.json").read_text())
    t = time.monotonic()
    res = score(load_model(_config([]).train), ev)
    (out / repo / "base.json").write_text(json.dumps(res))
    print(json.dumps({"base": repo, "seconds": round(time.monotonic() - t, 1)}), flush=True)


def cmd_run(out: Path, repo: str, method: str, seed: int, variant: str, overrides: list[str]) -> None:
    from forged.worker.train import load_model
    from forged.worker.train.run import train

    cfg = _config([*overrides, f"train.seed={seed}"])
    ds = mine(out, repo, overrides)
    tag = f"{method}-{variant}-s{seed}"
    work = out / repo / "runs" / tag
    data = train_only(ds, work / "data") if method == "recipe" else baseline_dataset(out, repo, mine(out, repo, []))
    t = time.monotonic()
    res = train(data, work / "adapter", cfg.train, resume=False, backend_name="torch")
    train_s = time.monotonic() - t
    ev = json.loads((out / repo / "eval.json").read_text())
    scores = score(load_model(cfg.train, res.adapter_dir), ev)
    rec = {"repo": repo, "method": method, "variant": variant, "seed": seed, "overrides": overrides,
           "steps": res.steps, "loss_tokens": res.tokens, "train_s": round(train_s, 1),
           "budget": f"{STEPS}x{BATCH}x{SEQ}", **scores}
    (work / "result.json").write_text(json.dumps(rec))
    print(json.dumps({k: v for k, v in rec.items() if not isinstance(v, list)}), flush=True)


def cmd_rescore_texts(out: Path, repo: str) -> None:
    """Rebuild the eval set's held-out texts and re-score them for the base and every kept run.

    For a change to what the held-out texts are: the runs' adapters are kept, so no arm
    trains again, and the FIM and QA scores stay as they were.
    """
    from forged.worker.train import load_model

    ev_path = out / repo / "eval.json"
    ev = json.loads(ev_path.read_text())
    files, texts = heldout_texts(out / "repos" / repo, mine(out, repo, []))
    ev["files"], ev["texts"] = files[:MAX_TEXTS], texts[:MAX_TEXTS]
    ev_path.write_text(json.dumps(ev))
    targets = [(out / repo / "base.json", None)]
    targets += [(f, f.parent / "adapter" / "adapter") for f in sorted((out / repo / "runs").glob("*/result.json"))]
    for path, adapter in targets:
        rec = json.loads(path.read_text())
        backend = load_model(_config(rec.get("overrides", [])).train, adapter)
        rec.update(_text_scores(backend, ev["texts"]))
        path.write_text(json.dumps(rec))
        print(json.dumps({"rescored": str(path.relative_to(out)), "bits": round(sum(rec["text_bits"]))}), flush=True)


# ---------------------------------------------------------------- table

def _pool(runs: list[dict], key: str) -> list[float]:
    """Per-example mean over seeds (seeds share the examples)."""
    return [sum(vals) / len(vals) for vals in zip(*(r[key] for r in runs), strict=True)]


def summarize(base: dict, arms: dict[str, list[dict]]) -> dict:
    """Pooled metrics and gains per arm, all intervals from one shared resampling of examples."""
    from forged.worker.judge import stats

    out: dict = {"n_texts": len(base["text_bits"]), "n_fim": len(base["fim_bits"]), "n_qa": len(base["qa_hits"])}

    def bpb(bits: list[float], nbytes: list[float]) -> list[float]:
        return [b / n for b, n in zip(bits, nbytes, strict=True)]

    out["base"] = {"bpb": stats.mean_ci(bpb(base["text_bits"], base["text_bytes"]), base["text_bytes"]).to_dict(),
                   "fim_bpb": stats.mean_ci(bpb(base["fim_bits"], base["fim_bytes"]), base["fim_bytes"]).to_dict(),
                   "qa": stats.mean_ci(base["qa_hits"]).to_dict() if base["qa_hits"] else None}
    for arm, runs in arms.items():
        tb, fb = _pool(runs, "text_bits"), _pool(runs, "fim_bits")
        qa = _pool(runs, "qa_hits") if base["qa_hits"] else []
        out[arm] = {
            "seeds": sorted(r["seed"] for r in runs),
            "bpb": stats.mean_ci(bpb(tb, base["text_bytes"]), base["text_bytes"]).to_dict(),
            "bpb_gain": stats.relative_gain(bpb(tb, base["text_bytes"]), bpb(base["text_bits"], base["text_bytes"]),
                                            base["text_bytes"]).to_dict(),
            "bpb_gain_per_seed": [round(1 - sum(r["text_bits"]) / sum(base["text_bits"]), 4) for r in runs],
            "fim_bpb": stats.mean_ci(bpb(fb, base["fim_bytes"]), base["fim_bytes"]).to_dict(),
            "fim_gain": stats.relative_gain(bpb(fb, base["fim_bytes"]), bpb(base["fim_bits"], base["fim_bytes"]),
                                            base["fim_bytes"]).to_dict(),
            "qa": stats.mean_ci(qa).to_dict() if qa else None,
            "loss_tokens": [r["loss_tokens"] for r in runs],
        }
    return out


def gain_ratio(base: dict, a: list[dict], b: list[dict], n_boot: int = 2000, seed: int = 0) -> dict:
    """gain(a)/gain(b) on held-out bits/byte, with a paired bootstrap interval over held-out files."""
    import numpy as np

    from forged.worker.judge import stats

    r0 = np.asarray(base["text_bits"])
    ra, rb = np.asarray(_pool(a, "text_bits")), np.asarray(_pool(b, "text_bits"))
    idx = stats.resample_index(len(r0), n_boot, seed)
    boot = (1 - ra[idx].sum(1) / r0[idx].sum(1)) / (1 - rb[idx].sum(1) / r0[idx].sum(1))
    value = (1 - ra.sum() / r0.sum()) / (1 - rb.sum() / r0.sum())
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return {"value": round(float(value), 3), "lo": round(float(lo), 3), "hi": round(float(hi), 3), "n": len(r0)}


def cmd_table(out: Path) -> None:
    for base_file in sorted(out.glob("*/base.json")):
        repo = base_file.parent.name
        base = json.loads(base_file.read_text())
        arms: dict[str, list[dict]] = {}
        for f in sorted((out / repo / "runs").glob("*/result.json")):
            r = json.loads(f.read_text())
            arms.setdefault(f"{r['method']}:{r['variant']}", []).append(r)
        summ = summarize(base, arms)
        ref = next((k for k in arms if k.startswith("baseline:")), None)
        ratios = {k: gain_ratio(base, v, arms[ref]) for k, v in arms.items() if ref and k != ref}
        print(json.dumps({"repo": repo, **summ, "gain_ratio_vs_" + (ref or "none"): ratios}), flush=True)
        print(markdown(repo, summ, ratios), flush=True)


def _fmt(e: dict | None, pct: bool = False) -> str:
    if not e:
        return "–"
    k, f = (100, ".1f") if pct else (1, ".3f")
    return f"{e['value'] * k:{f}} [{e['lo'] * k:{f}}, {e['hi'] * k:{f}}]"


def markdown(repo: str, summ: dict, ratios: dict) -> str:
    """Table rows for docs/benchmarks.md: each metric with its 95% interval."""
    rows = [f"| {repo} | base | – | {_fmt(summ['base']['bpb'])} | – | {_fmt(summ['base']['fim_bpb'])} | – | "
            f"{_fmt(summ['base']['qa'])} | – |"]
    for arm, a in summ.items():
        if not isinstance(a, dict) or "seeds" not in a:
            continue
        r = ratios.get(arm)
        ratio = f"{r['value']:.2f} [{r['lo']:.2f}, {r['hi']:.2f}]" if r else "1 (ref)"
        rows.append(f"| {repo} | {arm} | {','.join(map(str, a['seeds']))} | {_fmt(a['bpb'])} | "
                    f"{_fmt(a['bpb_gain'], True)} | {_fmt(a['fim_bpb'])} | {_fmt(a['fim_gain'], True)} | "
                    f"{_fmt(a['qa'])} | {ratio} |")
    return "\n".join(rows)


def main() -> None:
    global STEPS, SEQ, MAX_TEXTS, MAX_FIM, MAX_QA
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["prepare", "base", "run", "rescore-texts", "table"])
    ap.add_argument("out", type=Path)
    ap.add_argument("repo", nargs="?")
    ap.add_argument("method", nargs="?", choices=["recipe", "baseline"])
    ap.add_argument("--repos", default="forged,pytest,java-util")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variant", default="default")
    ap.add_argument("--set", action="append", default=[], help="sec.key=value config override (this variant)")
    ap.add_argument("--steps", type=int, default=STEPS, help="training steps per run (the budget; same for all arms)")
    ap.add_argument("--seq", type=int, default=BENCH_SEQ,
                    help="training sequence length (the budget's third factor; the mine is sized to it)")
    ap.add_argument("--eval", default=f"{MAX_TEXTS},{MAX_FIM},{MAX_QA}",
                    help="prepare: held-out files, FIM middles, QA questions in the eval set")
    a = ap.parse_args()
    STEPS, SEQ = a.steps, a.seq
    MAX_TEXTS, MAX_FIM, MAX_QA = (int(x) for x in a.eval.split(","))
    a.out.mkdir(parents=True, exist_ok=True)
    if a.mode == "prepare":
        cmd_prepare(a.out, a.repos.split(","))
    elif a.mode == "base":
        cmd_base(a.out, a.repo)
    elif a.mode == "run":
        cmd_run(a.out, a.repo, a.method, a.seed, a.variant, a.set)
    elif a.mode == "rescore-texts":
        cmd_rescore_texts(a.out, a.repo)
    else:
        cmd_table(a.out)


if __name__ == "__main__":
    main()
