"""Publish benchmarks: approve → ``:latest`` served, and rollback, against the Ollama double.

    python bench/publish/bench_publish.py [--rounds 10] [--tokens 8]

forged talks to the double (tests/ollama_double.py: a real HTTP server, Ollama's store
layout, llama.cpp behind /api/generate) only through the ollama client, as it would to
Ollama. Timed, per round:

- ``approve``: ``Publisher.promote`` (load vN, copy to :latest, unload the old one),
- ``served``: approve plus the first completion from ``forged/<repo>:latest`` (``--tokens``
  tokens, temperature 0; skipped when llama-cpp-python is missing),
- ``rollback``: ``Publisher.rollback`` to the previous version.

The first load of each model (llama.cpp reading base + adapter) is done before timing,
as the target excludes it. Prints one JSON line with medians and p90s in seconds.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from ollama_double import OllamaDouble, bundled_base, make_lora_adapter  # noqa: E402

from forged.daemon import publish  # noqa: E402


def _stats(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {"median": round(statistics.median(xs), 4), "p90": round(xs[int(0.9 * (len(xs) - 1))], 4),
            "max": round(xs[-1], 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=8)
    args = ap.parse_args()
    has_llama = importlib.util.find_spec("llama_cpp") is not None

    with tempfile.TemporaryDirectory(prefix="bench-publish-") as tmp, OllamaDouble(Path(tmp) / "ollama") as od:
        pub = publish.Publisher(od.url)
        base = bundled_base()
        t = time.perf_counter()
        base_tag = pub.ensure_base(base, "smollm2-135m")
        ensure_base_s = time.perf_counter() - t
        serving = publish.serving_for_gguf(base)
        create_s = []
        for v in (1, 2):
            adapter = make_lora_adapter(Path(tmp) / f"a{v}.gguf", seed=v)
            t = time.perf_counter()
            pub.create_version("bench", v, base_tag, adapter, serving=serving,
                               system=publish.system_prompt("bench"), temperature=0.2)
            create_s.append(time.perf_counter() - t)

        client = publish.ollama.Client(od.url)
        opts = {"temperature": 0, "num_predict": args.tokens}

        def first_completion() -> None:
            client.generate(model="forged/bench:latest", prompt="def add(a, b):", options=opts)

        # First loads, excluded from the timings.
        for v in (1, 2):
            pub.promote("bench", v)
            if has_llama:
                first_completion()

        approve, served, rollback = [], [], []
        for _ in range(args.rounds):
            t = time.perf_counter()
            pub.promote("bench", 1, previous=2)
            approve.append(time.perf_counter() - t)
            if has_llama:
                first_completion()
                served.append(time.perf_counter() - t)
            t = time.perf_counter()
            pub.rollback("bench", 2)  # back and forth: each round is one approve + one rollback
            rollback.append(time.perf_counter() - t)
        assert pub.live_version("bench") == 2
        pub.close()

    print(json.dumps({
        "bench": "publish", "rounds": args.rounds, "llama_cpp": has_llama, "tokens": args.tokens,
        "ensure_base_first_s": round(ensure_base_s, 3), "create_version_s": [round(x, 3) for x in create_s],
        "approve_s": _stats(approve), "served_s": _stats(served) if served else None,
        "rollback_s": _stats(rollback),
    }))


if __name__ == "__main__":
    main()
