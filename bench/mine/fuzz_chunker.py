"""bench/mine/fuzz_chunker.py: the chunker over broken files must raise nothing.

  python bench/mine/fuzz_chunker.py [--root /usr/lib/python3.11 ...] [--variants 3]
                                    [--max-edits 8] [--seconds 1200] [--seed 16]

Every file under the roots whose extension forged mines gets ``--variants`` copies with
random byte edits and three truncations (a quarter, half, three quarters of its bytes);
the built-in samples of all seven languages are cut at every byte and edited 1,000 times
each. Prints the number of inputs, seconds and every failure; exits 1 on any.
"""

from __future__ import annotations

import argparse
import glob
import random
import sys
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import chunker_fuzz as fz  # noqa: E402

from forged.common.filters import language_of  # noqa: E402


def corpus(roots: list[str]) -> Iterable[tuple[str, str, bytes]]:
    for root in roots:
        for p in sorted(Path(root).rglob("*")):
            lang = language_of(p.name)
            if lang and p.is_file() and not p.is_symlink():
                yield str(p), lang, p.read_bytes()


def truncated(files: Iterable[tuple[str, str, bytes]]) -> Iterable[tuple[str, str, bytes]]:
    for path, lang, data in files:
        for q in (1, 2, 3):
            yield f"{path}[:{q}/4]", lang, data[:len(data) * q // 4]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", action="append", default=None)
    ap.add_argument("--variants", type=int, default=3)
    ap.add_argument("--max-edits", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=1200)
    ap.add_argument("--seed", type=int, default=16)
    a = ap.parse_args()
    roots = a.root or sorted(glob.glob("/usr/lib/python3*"))
    rng = random.Random(a.seed)
    samples = [(p, lang, s.encode()) for lang, (p, s) in fz.SAMPLES.items()]
    runs = {
        "samples cut at every byte": fz.run(fz.truncations(1), a.seconds),
        "samples edited": fz.run(fz.edited(samples, rng, 1000, a.max_edits), a.seconds),
        "corpus truncated": fz.run(truncated(corpus(roots)), a.seconds),
        "corpus edited": fz.run(fz.edited(corpus(roots), rng, a.variants, a.max_edits), a.seconds),
    }
    bad = 0
    for name, r in runs.items():
        print(f"{name}: {r.inputs} inputs, {r.seconds:.0f} s, {len(r.failures)} raised")
        for f in r.failures:
            print("  ", f)
        bad += len(r.failures)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
