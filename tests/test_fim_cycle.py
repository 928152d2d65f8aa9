"""Autocomplete from a whole cycle, per base family (issue 14's acceptance).

For a tiny random-weight GGUF of each family (llama with SmolLM2's vocabulary, qwen2 with
the ``tokenizer.ggml.fim_*`` keys, starcoder2 with its FIM tokens in the vocabulary), a
real daemon mines, trains, judges, exports and publishes to the Ollama double as today's
Ollama (0.34.1: fused versions). Then both ways an editor asks for a middle are answered
by the tuned model through the ``ollama`` client: ``generate(prompt=prefix, suffix=suffix)``
rendered by the published template in the base's own FIM format, and the same prompt
sent raw.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import make_repo
from tests.daemon_proc import DaemonProc
from tests.test_cycle import cycle_config, set_idle, source_files

pytest.importorskip("torch")
pytest.importorskip("tree_sitter")
pytest.importorskip("llama_cpp")

import ollama  # noqa: E402

from forged.daemon import publish  # noqa: E402

PREFIX, SUFFIX = "def add_3(a, b):\n    \"\"\"Return the sum of a and b plus 3.\"\"\"\n    total = ", \
    "\n    return total + 3\n"
FAMILY_TOKENS = {"llama": "<fim_prefix>", "qwen2": "<|fim_prefix|>", "starcoder2": "<fim_prefix>"}


def _direct(gguf: Path, prompt: str, stop: list[str], n: int) -> str:
    """What llama.cpp answers on ``gguf`` with the double's sampling settings."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=512, n_threads=1, n_batch=128, seed=0, verbose=False)
    out = llm.create_completion(prompt, max_tokens=n, temperature=0.0, top_k=40, top_p=0.9, seed=0, stop=stop)
    return out["choices"][0]["text"]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen2", "starcoder2"])
def test_cycle_publishes_a_model_that_fills_the_middle(family: str, short_tmp: Path) -> None:
    from tests.ollama_double import MT_MODEL, OllamaDouble
    from tests.tiny import make_tiny_family_gguf

    base = make_tiny_family_gguf(short_tmp / "base", family)
    fixtures = short_tmp / "probe"
    set_idle(fixtures, 20 * 60)
    extra = 'auto_approve = true\nquantize = "q8_0"\n[mine.kinds]\nfim = 3.0\nraft = 0.0\n'
    with OllamaDouble(short_tmp / "ollama", version="0.34.1") as od:
        d = DaemonProc(short_tmp / "h", cycle_config(base, od.url, extra),
                       env={"FORGED_PROBE_FIXTURES": str(fixtures)}).start()
        try:
            repo = make_repo(short_tmp / "proj", source_files(12))
            assert d.ctl("repos", "add", str(repo)).returncode == 0
            d.wait_for(lambda st: next(r for r in st["repos"] if r["name"] == "proj")["live_version"] == 1,
                       timeout=900)
        finally:
            d.stop()

        fmt = publish.base_fim_format(base)
        rendered = fmt.render(PREFIX, SUFFIX)
        assert rendered.startswith(FAMILY_TOKENS[family])
        client, opts = ollama.Client(od.url), {"temperature": 0, "num_predict": 12}
        model = "forged/proj:latest"
        via_suffix = client.generate(model=model, prompt=PREFIX, suffix=SUFFIX, options=opts).response
        assert od.prompts[-1].encode() == rendered.encode()  # the template renders the trained format
        via_raw = client.generate(model=model, prompt=rendered, raw=True, options=opts).response
        assert od.prompts[-1] == rendered

        layers = {x["mediaType"]: x for x in od.read_manifest(model)["layers"]}
        served = od.blob_path(layers[MT_MODEL]["digest"])
        assert od.kv(layers[MT_MODEL]["digest"]).get("forged.export") == "fused"
        stop = list(publish.serving_for_gguf(base).stop)
        tuned, untuned = _direct(served, rendered, stop, 12), _direct(base, rendered, stop, 12)
        assert via_suffix == via_raw == tuned != untuned, (via_suffix, via_raw, tuned, untuned)
