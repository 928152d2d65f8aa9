"""bench/mine: forged's chunker against peer chunkers, and the incremental re-mine.

  python bench/mine/bench.py --corpus DIR [--budget 1152] [--peers astchunk,chonkie,...]
  python bench/mine/bench.py --remine 10000

Metrics at an equal budget of non-whitespace characters (peers that count all characters
get budget × 1.45, the whitespace ratio of the corpus, so chunk sizes match):
files/s (chunking only, one process), share of chunks that parse as complete units
(dedented, tree-sitter finds no ERROR/MISSING node), share of functions under the budget
kept whole in one chunk, and share of non-whitespace content not found in any chunk.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
PEERS_PY = ROOT / "bench/out/peers-venv/bin/python"


def nws(s: str) -> str:
    return re.sub(r"\s+", "", s)


def evaluate(files: dict[str, str], chunks: dict[str, list[str]], budget: int) -> dict:
    from forged.mine.chunker import parser_for

    parser = parser_for("python")
    n_chunks = parsed = 0
    total = lost = 0
    funcs = whole = 0
    for path, text in files.items():
        cs = [c for c in chunks.get(path, []) if c.strip()]
        n_chunks += len(cs)
        for c in cs:
            tree = parser.parse(textwrap.dedent(c).encode())
            parsed += not tree.root_node.has_error
        # Content lost: walk the file's non-whitespace text, claiming each chunk in order.
        flat = nws(text)
        covered = [False] * len(flat)
        cursor = 0
        for c in cs:
            cn = nws(c)
            if not cn:
                continue
            i = flat.find(cn, cursor)
            if i < 0:
                i = flat.find(cn)
            if i >= 0:
                covered[i:i + len(cn)] = [True] * len(cn)
                cursor = i + len(cn)
        total += len(flat)
        lost += covered.count(False)
        # Functions under the budget that appear whole inside one chunk.
        tree = parser.parse(text.encode())
        stack = [tree.root_node]
        while stack:
            n = stack.pop()
            for ch in n.children:
                if ch.type == "function_definition":
                    body = nws(text.encode()[ch.start_byte:ch.end_byte].decode("utf-8", "replace"))
                    if len(body.encode()) <= budget:
                        funcs += 1
                        whole += any(body in nws(c) for c in cs)
                if ch.type in ("class_definition", "block", "decorated_definition", "module",
                               "function_definition", "if_statement"):
                    stack.append(ch)
    return {"chunks": n_chunks, "parse_complete": parsed / max(1, n_chunks),
            "functions_whole": whole / max(1, funcs), "content_lost": lost / max(1, total)}


def ours(files: dict[str, str], budget: int) -> tuple[float, dict[str, list[str]]]:
    from forged.mine.chunker import chunk_code, parser_for

    parser_for("python")
    out = {}
    t = time.process_time()  # CPU seconds: wall time on a shared box measures the neighbours
    for p, text in files.items():
        out[p] = [c.text for c in chunk_code(p, "python", text.encode(), budget)[0]]
    return time.process_time() - t, out


def corpus_files(root: Path, limit: int) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*.py")):
        if "__pycache__" in p.parts or not p.is_file():
            continue
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip() and len(text) < 1_000_000:
            out[str(p)] = text
        if len(out) >= limit:
            break
    return out


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def full_mine(root: Path) -> dict:
    """Cold mine_repo over the corpus as a git repo (everything: redaction, examples, write)."""
    from forged.config import MineConfig
    from forged.mine import mine_repo

    with tempfile.TemporaryDirectory() as d:
        repo = Path(d) / "repo"
        shutil.copytree(root, repo, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        git(repo, "init", "-q")
        git(repo, "add", "-A")
        git(repo, "-c", "user.email=b@e", "-c", "user.name=b", "commit", "-qm", "corpus")
        rep = mine_repo(repo, Path(d) / "out", MineConfig(), Path(d) / "cache")
        return {"files": rep.files_mined, "durations": rep.durations,
                "examples": rep.examples}


def remine(n_files: int, rounds: int = 3) -> dict:
    """A synthetic n-file repo: cold mine, then `rounds` one-file commits, each re-mined.

    Wall and CPU seconds per mine (the box is shared: wall time includes the neighbours),
    the files whose examples were re-derived (counted, not timed), and the dataset size.
    """
    from forged.config import MineConfig
    from forged.mine import examples, mine_repo

    derived: list[str] = []
    cont = examples.continuation
    examples.continuation = lambda f, *a: (derived.append(f.path), cont(f, *a))[1]
    src = [p.read_text() for p in sorted(Path(textwrap.__file__).parent.glob("*.py"))
           if 2000 < p.stat().st_size < 6000][:50]
    with tempfile.TemporaryDirectory() as d:
        repo = Path(d) / "repo"
        for i in range(n_files):
            p = repo / f"pkg{i // 100}" / f"m{i}.py"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(f"# module {i}\n" + src[i % len(src)])
        git(repo, "init", "-q")
        git(repo, "add", "-A")
        git(repo, "-c", "user.email=b@e", "-c", "user.name=b", "commit", "-qm", "corpus")
        cfg = MineConfig()
        cache = Path(d) / "cache"
        t, c = time.perf_counter(), time.process_time()
        cold = mine_repo(repo, Path(d) / "o0", cfg, cache)
        out = {"files": n_files, "cold_s": round(time.perf_counter() - t, 2),
               "cold_cpu_s": round(time.process_time() - c, 2), "cold_parsed": cold.files_parsed,
               "dataset_mb": round(sum(f.stat().st_size for f in (Path(d) / "o0").rglob("*.jsonl"))
                                   / 1e6, 1), "remines": []}
        for k in range(1, rounds + 1):
            base = git(repo, "rev-parse", "HEAD")
            (repo / "pkg0" / "m0.py").write_text(f"# changed {k}\n" + src[k])
            git(repo, "-c", "user.email=b@e", "-c", "user.name=b", "commit", "-qam", "one file")
            derived.clear()
            t, c = time.perf_counter(), time.process_time()
            warm = mine_repo(repo, Path(d) / f"o{k}", cfg, cache, changed_since=base)
            out["remines"].append({"s": round(time.perf_counter() - t, 3),
                                   "cpu_s": round(time.process_time() - c, 3),
                                   "parsed": warm.files_parsed, "derived_files": len(derived),
                                   "durations": warm.durations})
            shutil.rmtree(Path(d) / f"o{k - 1}")
        return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", type=Path, action="append", default=[])
    ap.add_argument("--budget", type=int, default=1152, help="non-whitespace chars per chunk")
    ap.add_argument("--limit", type=int, default=400)
    ap.add_argument("--peers", default="astchunk,llama-index,chonkie,langchain")
    ap.add_argument("--remine", type=int, default=0)
    ap.add_argument("--full", action="store_true", help="also time a cold mine_repo of the corpus")
    args = ap.parse_args()
    results = []
    for root in args.corpus:
        files = corpus_files(root, args.limit)
        listing = Path(tempfile.mkstemp(suffix=".txt")[1])
        listing.write_text("\n".join(files))
        size = sum(len(t.encode()) for t in files.values())
        secs, chunks = ours(files, args.budget)
        row = {"corpus": str(root), "files": len(files), "mb": round(size / 1e6, 2)}
        results.append({**row, "chunker": "forged", "files_per_s": round(len(files) / secs),
                        **evaluate(files, chunks, args.budget)})
        for peer in [p for p in args.peers.split(",") if p]:
            if not PEERS_PY.exists():
                break
            p = subprocess.run([str(PEERS_PY), str(Path(__file__).parent / "peers.py"), peer,
                                str(args.budget), str(listing)], capture_output=True, text=True)
            if p.returncode != 0:
                results.append({**row, "chunker": peer, "error": p.stderr.strip().splitlines()[-1:]})
                continue
            got = json.loads(p.stdout)
            results.append({**row, "chunker": peer, "files_per_s": round(len(files) / got["seconds"]),
                            **evaluate(files, got["chunks"], args.budget)})
        if args.full:
            results.append({**row, "chunker": "forged mine_repo (cold, everything)",
                            **full_mine(root)})
    if args.remine:
        results.append({"remine": remine(args.remine)})
        results.append({"load_average": Path("/proc/loadavg").read_text().split()[:3]
                        if Path("/proc/loadavg").exists() else None})
    for r in results:
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}))


if __name__ == "__main__":
    main()
