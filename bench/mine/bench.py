"""bench/mine: forged's chunker against peer chunkers, and the incremental re-mine.

  python bench/mine/bench.py --corpus DIR [--corpus go=DIR ...] [--budget 1152]
                             [--peers astchunk,chonkie,...] [--failures FILE] [--repeat N]
  python bench/mine/bench.py --remine 10000 [--no-shortcut]

Metrics at an equal budget of non-whitespace characters (peers that count all characters
get budget × 1.45, the whitespace ratio of the corpus, so chunk sizes match):
files/s (chunking only, one process), share of chunks that parse as complete units
(Python dedented; a JS/TS/Java/Rust chunk that fails alone is tried inside a class/impl
body; tree-sitter finds no ERROR/MISSING node) — of all chunks, and of the chunks that are
not necessarily partial (see :func:`evaluate`) — share of functions under the budget kept
whole in one chunk, and share of non-whitespace content not found in any chunk.
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


# Function-like nodes ("functions whole") and what a chunk of a class body is wrapped in
# before parsing (methods are complete units inside their class), per language.
FUNCS = {
    "python": {"function_definition"},
    "javascript": {"function_declaration", "method_definition", "generator_function_declaration"},
    "typescript": {"function_declaration", "method_definition", "generator_function_declaration"},
    "go": {"function_declaration", "method_declaration"},
    "rust": {"function_item"},
    "java": {"method_declaration", "constructor_declaration"},
}
WRAP = {"javascript": ("class _ {\n", "\n}"), "typescript": ("class _ {\n", "\n}"),
        "java": ("class _ {\n", "\n}"), "rust": ("impl _ {\n", "\n}")}
EXTS = {"python": (".py",), "javascript": (".js", ".mjs", ".cjs"), "typescript": (".ts",),
        "go": (".go",), "rust": (".rs",), "java": (".java",)}


def _is_token(node) -> bool:
    t = node.type
    return "string" in t or "comment" in t or t == "text_block"


def parses(parser, lang: str, chunk: str) -> bool:
    if lang == "python":
        return not parser.parse(textwrap.dedent(chunk).encode()).root_node.has_error
    if not parser.parse(chunk.encode()).root_node.has_error:
        return True
    pre, post = WRAP.get(lang, ("", ""))
    return bool(pre) and not parser.parse((pre + chunk + post).encode()).root_node.has_error


def evaluate(files: dict[str, str], chunks: dict[str, list[str]], budget: int,
             lang: str = "python", failures: list | None = None) -> dict:
    """Parse-complete share (all chunks, and without the necessarily partial ones), functions
    whole, content lost.

    Necessarily partial: a chunk overlapping one string or comment token larger than the
    budget. No chunk within the budget can hold that token, so every chunk touching it is a
    slice of it and cannot parse; the same rule is applied to every chunker.
    """
    from forged.worker.mine.chunker import parser_for

    parser = parser_for(lang)
    funcs_t = FUNCS[lang]
    n_chunks = parsed = partial = partial_parsed = 0
    total = lost = 0
    funcs = whole = 0
    for path, text in files.items():
        data = text.encode()
        cs = [c for c in chunks.get(path, []) if c.strip()]
        n_chunks += len(cs)
        tree = parser.parse(data)
        # Non-whitespace offsets: cum[i] = non-whitespace chars in text[:i] (chars, not bytes).
        flat = nws(text)
        cum, k = [], 0
        for ch in text:
            cum.append(k)
            k += not ch.isspace()
        cum.append(k)
        big: list[tuple[int, int]] = []
        fn_bodies: list[str] = []
        stack = [tree.root_node]
        while stack:
            n = stack.pop()
            if _is_token(n):
                s = len(data[:n.start_byte].decode("utf-8", "replace"))
                e = len(data[:n.end_byte].decode("utf-8", "replace"))
                if len(data[n.start_byte:n.end_byte].translate(None, b" \t\n\r\x0b\x0c")) > budget:
                    big.append((cum[s], cum[e]))
                continue
            if n.type in funcs_t:
                body = nws(data[n.start_byte:n.end_byte].decode("utf-8", "replace"))
                if len(body.encode()) <= budget:
                    fn_bodies.append(body)
            stack.extend(n.children)
        # Content lost: walk the file's non-whitespace text, claiming each chunk in order.
        covered = [False] * len(flat)
        cursor = 0
        for c in cs:
            cn = nws(c)
            ok = parses(parser, lang, c)
            parsed += ok
            i = flat.find(cn, cursor) if cn else -1
            if i < 0 and cn:
                i = flat.find(cn)
            if i >= 0:
                covered[i:i + len(cn)] = [True] * len(cn)
                cursor = i + len(cn)
                if any(i < be and bs < i + len(cn) for bs, be in big):
                    partial += 1
                    partial_parsed += ok
                    continue
            if not ok and failures is not None:
                failures.append((path, c))
        total += len(flat)
        lost += covered.count(False)
        flat_chunks = [nws(c) for c in cs]
        funcs += len(fn_bodies)
        whole += sum(any(b in c for c in flat_chunks) for b in fn_bodies)
    rest = n_chunks - partial
    return {"chunks": n_chunks, "parse_complete": parsed / max(1, n_chunks),
            "partial_chunks": partial,
            "parse_complete_rest": (parsed - partial_parsed) / max(1, rest),
            "functions_whole": whole / max(1, funcs), "content_lost": lost / max(1, total)}


class _Peer:
    """A peer chunker in its own venv, timed one pass at a time (see peers.py)."""

    def __init__(self, name: str, budget: int, listing: Path, lang: str) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            [str(PEERS_PY), str(Path(__file__).parent / "peers.py"), name, str(budget),
             str(listing), lang], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.error = json.loads(self.proc.stdout.readline() or '{"error": "died"}').get("error")

    def ask(self, what: str) -> dict:
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def timed_rounds(files: dict[str, str], budget: int, lang: str, peers: list[str],
                 listing: Path, repeat: int) -> tuple[dict[str, dict], dict[str, dict]]:
    """forged's chunker and every peer, one pass each per round, `repeat` rounds: the
    fastest pass of each (CPU and wall seconds), and each one's chunks.

    Interleaving matters on a shared box: neighbours come and go, and back-to-back runs
    of one chunker after another measured different machines (±30–50% swings)."""
    import numpy  # noqa: F401  one-time import outside the timing (the peers import theirs too)

    from forged.worker.mine.chunker import chunk_code, parser_for

    parser_for(lang)
    live = [_Peer(name, budget, listing, lang) for name in peers] if PEERS_PY.exists() else []
    times: dict[str, dict] = {"forged": {"seconds": float("inf"), "wall": float("inf")}}
    times.update({p.name: {"error": p.error} if p.error else
                  {"seconds": float("inf"), "wall": float("inf")} for p in live})
    live = [p for p in live if not p.error]
    ours: dict[str, list[str]] = {}
    try:
        for _ in range(repeat):
            t, w = time.process_time(), time.perf_counter()
            for p, text in files.items():
                ours[p] = [c.text for c in chunk_code(p, lang, text.encode(), budget)[0]]
            got = {"forged": {"seconds": time.process_time() - t, "wall": time.perf_counter() - w}}
            got.update({p.name: p.ask("pass") for p in live})
            for name, g in got.items():
                for k in ("seconds", "wall"):
                    times[name][k] = min(times[name][k], g[k])
        chunks = {"forged": ours, **{p.name: p.ask("chunks")["chunks"] for p in live}}
    finally:
        for p in live:
            p.close()
    return times, chunks


def corpus_files(root: Path, limit: int, lang: str = "python") -> dict[str, str]:
    out = {}
    exts = EXTS[lang]
    for p in sorted(root.rglob("*")):
        if p.suffix not in exts or "__pycache__" in p.parts or not p.is_file():
            continue
        if p.name.endswith((".d.ts", ".min.js")):
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


def commit_all(repo: Path) -> str:
    """Make ``repo`` a git repo with everything in it committed; the commit's sha."""
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "-c", "user.email=b@e", "-c", "user.name=b", "commit", "-qm", "corpus")
    return git(repo, "rev-parse", "HEAD")


def full_mine(root: Path) -> dict:
    """Cold mine_repo over the corpus as a git repo (everything: redaction, examples, write)."""
    from forged.common.config import MineConfig
    from forged.worker.mine import mine_repo

    with tempfile.TemporaryDirectory() as d:
        repo = Path(d) / "repo"
        shutil.copytree(root, repo, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        commit_all(repo)
        rep = mine_repo(repo, Path(d) / "out", MineConfig(), Path(d) / "cache")
        return {"files": rep.files_mined, "durations": rep.durations,
                "examples": rep.examples}


_COLD_PASS = """
import json, sys, time
from pathlib import Path
from forged.common import filters
from forged.worker.mine import dataset, gitio
repo, sha, budget, workers = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
missing = {e.path: (e, filters.language_of(e.path) or "") for e in gitio.ls_tree(repo, sha)}
t = time.perf_counter()
got = dataset._parse(repo, missing, budget, workers, 0, len(missing), lambda _: None)
print(json.dumps({"wall": time.perf_counter() - t, "files": len(got)}))
"""


def cold_parse(files: dict[str, str], budget: int, repeat: int) -> dict:
    """forged's cold-mine parse stage as `mine_repo` runs it on cache misses: blobs read
    from git, secret scan, chunks and symbols, in a process pool of one worker per core,
    and in one process. Each pass is a fresh interpreter (what a cold mine pays: the
    workers' imports of tree-sitter, numpy and detect-secrets included), wall seconds
    around the stage only, the fastest of `repeat` passes, interleaved."""
    import os

    with tempfile.TemporaryDirectory() as d:
        repo = Path(d) / "repo"
        common = Path(os.path.commonpath(list(files)))
        for p, text in files.items():
            dst = repo / Path(p).relative_to(common if common.is_dir() else common.parent)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(text, encoding="utf-8")
        sha = commit_all(repo)
        runs = {"pool": os.cpu_count() or 1, "one_process": 1}
        best = dict.fromkeys(runs, float("inf"))
        for _ in range(repeat):
            for name, workers in runs.items():
                p = subprocess.run([sys.executable, "-c", _COLD_PASS, str(repo), sha, str(budget),
                                    str(workers)], capture_output=True, text=True, check=True,
                                   cwd=ROOT)
                got = json.loads(p.stdout)
                assert got["files"] == len(files), got
                best[name] = min(best[name], got["wall"])
        return {"workers": runs["pool"],
                **{f"{k}_files_per_s": round(len(files) / v) for k, v in best.items()}}


def remine(n_files: int, rounds: int = 3) -> dict:
    """A synthetic n-file repo: cold mine, then `rounds` one-file commits, each re-mined.

    Wall and CPU seconds per mine (the box is shared: wall time includes the neighbours),
    the files whose examples were re-derived (counted, not timed), and the dataset size.
    """
    from forged.common.config import MineConfig
    from forged.worker.mine import examples, mine_repo

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
        commit_all(repo)
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
    ap.add_argument("--corpus", type=Path, action="append", default=[],
                    help="a source tree; LANG=DIR for another language than Python")
    ap.add_argument("--budget", type=int, default=1152, help="non-whitespace chars per chunk")
    ap.add_argument("--limit", type=int, default=400)
    ap.add_argument("--peers", default="astchunk,llama-index,chonkie,langchain")
    ap.add_argument("--failures", type=Path, help="write forged's non-parsing chunks here")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds: one pass of every chunker per round, the fastest kept")
    ap.add_argument("--remine", type=int, default=0)
    ap.add_argument("--no-shortcut", action="store_true",
                    help="with --remine: the line store alone (the re-mine shortcut always falls back)")
    ap.add_argument("--full", action="store_true", help="also time a cold mine_repo of the corpus")
    ap.add_argument("--cold", action="store_true",
                    help="also time forged's cold-mine parse stage (git, redaction, chunks, "
                         "symbols; a process per core) against the peers' wall time")
    args = ap.parse_args()
    results = []
    fails: list = []
    for spec in args.corpus:
        lang, _, root = str(spec).rpartition("=")
        lang, root = lang or "python", Path(root)
        files = corpus_files(root, args.limit, lang)
        listing = Path(tempfile.mkstemp(suffix=".txt")[1])
        listing.write_text("\n".join(files))
        size = sum(len(t.encode()) for t in files.values())
        peers = [p for p in args.peers.split(",") if p]
        times, chunks = timed_rounds(files, args.budget, lang, peers, listing, args.repeat)
        row = {"corpus": str(root), "lang": lang, "files": len(files), "mb": round(size / 1e6, 2)}
        for name in ["forged", *peers]:
            t = times.get(name)
            if t is None:  # no peers venv
                continue
            if "error" in t:
                results.append({**row, "chunker": name, "error": t["error"]})
                continue
            results.append({**row, "chunker": name, "files_per_s": round(len(files) / t["seconds"]),
                            "wall_files_per_s": round(len(files) / t["wall"]),
                            **evaluate(files, chunks[name], args.budget, lang,
                                       fails if name == "forged" else None)})
        if args.cold:
            results.append({**row, "chunker": "forged cold-mine parse stage (wall)",
                            **cold_parse(files, args.budget, args.repeat)})
        if args.full:
            results.append({**row, "chunker": "forged mine_repo (cold, everything)",
                            **full_mine(root)})
    if args.failures:
        args.failures.write_text("".join(f"=== {p}\n{c}\n" for p, c in fails))
    if args.remine:
        if args.no_shortcut:
            from forged.worker.mine import remine as shortcut

            def fall_back(*_a: object, **_k: object) -> None:
                raise shortcut.Fallback

            shortcut.remine = fall_back
        results.append({"remine": remine(args.remine)})
    results.append({"load_average": Path("/proc/loadavg").read_text().split()[:3]
                    if Path("/proc/loadavg").exists() else None})
    for r in results:
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}))


if __name__ == "__main__":
    main()
