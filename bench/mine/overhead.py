"""forged's chunking work beyond tree-sitter's parse, per language.

  python bench/mine/overhead.py LANG=DIR [LANG=DIR ...] [--limit 200] [--budget 1152]
         [--baseline OLD_CHUNKER.py] [--rounds 15]

Parses every file once, then times `chunk_code` with the parser answering from those
trees, so what is timed is the chunker's own work (tables, split/merge, chunks) without
the parse, which is 70–85% of a cold chunking pass and the same in every tree-sitter
chunker. `--baseline` loads another version of `forged/mine/chunker.py` (e.g.
`git show REV:forged/mine/chunker.py > old.py`) and times it in the same rounds,
interleaved. CPU seconds, fastest round.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from bench import corpus_files  # noqa: E402
from forged.worker.mine import chunker  # noqa: E402


class _Parsed:
    """Stands in for a tree-sitter parser: returns trees parsed once, up front."""

    def __init__(self, parser: Any, datas: list[bytes]) -> None:
        self.language = parser.language
        self.trees = {d: parser.parse(d) for d in datas}

    def parse(self, data: bytes) -> Any:
        return self.trees[data]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("corpus", nargs="+", help="LANG=DIR")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--budget", type=int, default=1152)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--baseline", type=Path)
    args = ap.parse_args()
    import numpy  # noqa: F401  imported outside the timing

    versions = {"forged": chunker}
    if args.baseline:
        spec = importlib.util.spec_from_file_location("chunker_baseline", args.baseline)
        old = importlib.util.module_from_spec(spec)
        sys.modules["chunker_baseline"] = old
        spec.loader.exec_module(old)
        versions = {"baseline": old, **versions}
    for item in args.corpus:
        lang, _, root = item.partition("=")
        datas = [t.encode() for t in corpus_files(Path(root), args.limit, lang).values()]
        parser = chunker.parser_for(lang)
        parse = float("inf")
        for _ in range(5):
            t = time.process_time()
            for d in datas:
                parser.parse(d)
            parse = min(parse, time.process_time() - t)
        parsed = _Parsed(parser, datas)
        for m in versions.values():
            m._parsers[lang] = parsed
        best = dict.fromkeys(versions, float("inf"))
        for _ in range(args.rounds):
            for name, m in versions.items():
                t = time.process_time()
                for d in datas:
                    m.chunk_code("x", lang, d, args.budget)
                best[name] = min(best[name], time.process_time() - t)
        for m in versions.values():
            m._parsers.pop(lang, None)
        print(f"{lang:10s} {len(datas)} files  parse {parse:.3f} s  " + "  ".join(
            f"{name} +{v:.3f} s ({v / parse:.0%} of the parse)" for name, v in best.items()))


if __name__ == "__main__":
    main()
