"""Serve one peer chunker over files to bench.py: one timed pass per request.

Runs inside bench/out/peers-venv (peers never go into forged's venv). Usage:
  peers-venv/bin/python bench/mine/peers.py NAME BUDGET_NWS FILE_LIST [LANG]
then on stdin: "pass" (prints {seconds, wall} of one pass over all files), repeated, and
"chunks" (prints {chunks: {path: [text...]}} of the last pass and exits).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

LANGCHAIN = {"python": "PYTHON", "javascript": "JS", "typescript": "TS", "go": "GO",
             "rust": "RUST", "java": "JAVA"}


def make(name: str, budget: int, lang: str):
    if name == "astchunk":
        from astchunk import ASTChunkBuilder

        if lang not in ("python", "java", "typescript"):
            raise SystemExit(f"astchunk has no {lang}")
        b = ASTChunkBuilder(max_chunk_size=budget, language=lang, metadata_template="default")
        return lambda text: [c["content"] if isinstance(c, dict) else str(c)
                             for c in b.chunkify(text)]
    if name == "llama-index":
        from llama_index.core.node_parser import CodeSplitter

        # max_chars counts all characters; the ratio below makes budgets comparable.
        s = CodeSplitter(language=lang, max_chars=int(budget * 1.45), chunk_lines=10**6)
        return s.split_text
    if name == "chonkie":
        from chonkie import CodeChunker

        c = CodeChunker(language=lang, tokenizer="character", chunk_size=int(budget * 1.45))
        return lambda text: [x.text for x in c.chunk(text)]
    if name == "langchain":
        from langchain_text_splitters import Language, RecursiveCharacterTextSplitter

        s = RecursiveCharacterTextSplitter.from_language(Language[LANGCHAIN[lang]],
                                                         chunk_size=int(budget * 1.45), chunk_overlap=0)
        return s.split_text
    raise SystemExit(f"unknown peer {name}")


def main() -> None:
    name, budget, listing = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    lang = sys.argv[4] if len(sys.argv) > 4 else "python"
    files = [ln for ln in Path(listing).read_text().splitlines() if ln]
    texts = {f: Path(f).read_text(encoding="utf-8") for f in files}
    try:
        chunk = make(name, budget, lang)
    except BaseException as e:  # noqa: BLE001 - reported to the bench, which goes on
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
        return
    print(json.dumps({"ready": True}), flush=True)
    out: dict[str, list[str]] = {}
    # One timed pass per "pass" line on stdin, so the bench can interleave the chunkers
    # round by round (the box is shared: back-to-back runs see different neighbours).
    for line in sys.stdin:
        if line.strip() == "pass":
            t, w = time.process_time(), time.perf_counter()
            for f, text in texts.items():
                out[f] = list(chunk(text))
            print(json.dumps({"seconds": time.process_time() - t,
                              "wall": time.perf_counter() - w}), flush=True)
        elif line.strip() == "chunks":
            print(json.dumps({"chunks": out}), flush=True)
            return


if __name__ == "__main__":
    main()
