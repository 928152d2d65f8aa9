"""Autocomplete through Ollama: the published template's Suffix branch, raw FIM prompts,
inherited ``ollama:NAME`` templates, and the requests editors send (against the double)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import httpx
import ollama
import pytest
from gotemplate import GoTemplate, TemplateError
from ollama_double import CHATML_GOTMPL, OllamaDouble, make_lora_adapter

from forged.common import fim
from forged.common.models import resolve_base
from forged.daemon import publish
from forged.daemon.publish import Publisher, PublishError

needs_llama = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                 reason="llama-cpp-python is not installed")

FORMATS = [fim.FORGED_TEXT, fim.QWEN, fim.STARCODER, fim.CODELLAMA, fim.DEEPSEEK, fim.CODEGEMMA,
           fim.FimFormat("braces", "{{PRE}}", "{{ .Suffix }}", "}}MID{{", ("<eot>",))]
# Code an editor really sends: newlines, trailing spaces, Go template syntax, Unicode.
CASES = [("def add(a, b):\n    ", "\n    return c\n"),
         ("x = {{ .Prompt }}  ", "  {{- end }}\n"),
         ("s = '«héllo» ", "'\n\n\n"),
         ("a", "b")]
PREFIX, SUFFIX = "def add(a, b):\n    c = ", "\n    return c\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny import make_tiny_gguf

    return make_tiny_gguf(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The tiny llama: 2 layers, hidden 64, 2 kv heads of 16.
    return make_lora_adapter(tmp_path_factory.mktemp("ad") / "a.gguf", layers=2, dim=64, kv_dim=32, std=0.5)


@pytest.fixture(scope="module")
def double(tmp_path_factory: pytest.TempPathFactory):
    with OllamaDouble(tmp_path_factory.mktemp("ollama")) as od:
        yield od


@pytest.fixture(scope="module")
def pub(double: OllamaDouble):
    p = Publisher(double.url, timeout=60)
    yield p
    p.close()


@pytest.fixture(scope="module")
def live(pub: Publisher, tiny: Path, adapter: Path) -> str:
    """forged/fim:latest = the tiny base + an adapter, published as the daemon does."""
    serving = pub.serving("tiny.gguf", tiny)
    base_tag = pub.ensure_base(tiny, "tiny-fim", serving)
    pub.create_version("fim", 1, base_tag, adapter, serving=serving, system="sys", temperature=0.2)
    pub.promote("fim", 1)
    return "forged/fim:latest"


# -- the template ---------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_suffix_branch_renders_exactly_the_trained_format(fmt: fim.FimFormat) -> None:
    for chat in (CHATML_GOTMPL, None):
        t = GoTemplate(publish.with_fim(chat, fmt))
        assert "suffix" in t.vars()  # what gives the model Ollama's "insert" capability
        for prefix, suffix in CASES:
            got = t.execute({"Prompt": prefix, "Suffix": suffix, "Response": ""})
            assert got.encode() == fmt.render(prefix, suffix).encode()
    # The chat branch is today's chat template, byte for byte.
    msgs = {"Messages": [type("M", (), {"Role": "user", "Content": "hi"})()]}
    assert GoTemplate(publish.with_fim(CHATML_GOTMPL, fmt)).execute(msgs) == GoTemplate(CHATML_GOTMPL).execute(msgs)


def test_a_template_with_its_own_suffix_is_kept_and_subtemplates_are_refused() -> None:
    own = "{{- if .Suffix }}<|fim_prefix|>{{ .Prompt }}<|fim_suffix|>{{ .Suffix }}<|fim_middle|>{{- else }}{{ .Prompt }}{{- end }}"
    assert publish.with_fim(own, fim.STARCODER) == own
    with pytest.raises(PublishError, match="sub-templates"):
        publish.with_fim('{{ define "x" }}a{{ end }}{{ template "x" }}', fim.STARCODER)


def test_bundled_base_serving_is_chatml_behind_a_forged_text_branch(tiny: Path) -> None:
    s = publish.serving_for_gguf(tiny)  # the tiny llama carries SmolLM2's tokenizer
    assert s.template == publish.with_fim(CHATML_GOTMPL, fim.FORGED_TEXT)
    assert {"<|im_start|>", "<|im_end|>"} <= set(s.stop)
    text = publish.modelfile("base.gguf", "a.gguf", serving=s, system="sys", temperature=0.2)
    assert "{{ if .Suffix }}<fim_prefix><fim_suffix>{{ .Suffix }}<fim_middle>{{ .Prompt }}{{ else }}" in text
    assert 'PARAMETER stop "<|im_end|>"' in text and "PARAMETER temperature 0.2" in text


def test_the_format_recorded_with_the_adapter_wins(tiny: Path, tmp_path: Path) -> None:
    assert publish.recorded_fim(tmp_path) is None  # no forged_meta.json: found from the base
    (tmp_path / "forged_meta.json").write_text(json.dumps({"backend": "torch", "fim_format": fim.QWEN.to_dict()}))
    assert publish.recorded_fim(tmp_path) == fim.QWEN
    s = publish.serving_for_gguf(tiny, publish.recorded_fim(tmp_path))
    assert s.template == publish.with_fim(CHATML_GOTMPL, fim.QWEN) and set(fim.QWEN.stop) <= set(s.stop)


def test_go_template_subset_follows_go() -> None:
    class M:
        def __init__(self, role: str, content: str) -> None:
            self.Role, self.Content = role, content

    t = GoTemplate("{{- range $i, $m := .Messages }}{{ if eq $m.Role \"user\" }}U{{ $i }}:{{ .Content }}"
                   "{{ else if eq .Role \"assistant\" }}A:{{ .Content }}{{ else }}?{{ end }}\n{{- end }} "
                   "{{ .System }}|{{ .Nope }}|{{ len .Messages }}|{{ and .System \"x\" }}|{{ or \"\" 0 }}")
    msgs = [M("user", "a"), M("assistant", "b"), M("tool", "c")]
    assert t.execute({"Messages": msgs, "System": ""}) == "U0:aA:b? |<no value>|3||0"
    legacy = GoTemplate("{{ if .System }}<<{{ .System }}>>{{ end }}[INST]{{ .Prompt }}[/INST]{{ .Response }}</s>")
    assert legacy.execute({"System": "s", "Prompt": "p", "Response": ""}, cut_at="Response") == "<<s>>[INST]p[/INST]"
    with pytest.raises(TemplateError, match="can't evaluate field Nope"):
        GoTemplate("{{ range .Messages }}{{ .Nope }}{{ end }}").execute({"Messages": msgs})
    for bad in ("{{ if .A }}", "{{ printf \"%d\" 1 }}", "{{ template \"x\" }}"):
        with pytest.raises(TemplateError):
            GoTemplate(bad).execute({})


# -- Ollama's behaviour in the double --------------------------------------------------

def test_suffix_needs_a_suffix_branch(pub: Publisher, double: OllamaDouble, tiny: Path) -> None:
    client = ollama.Client(double.url)
    digest = pub.upload(tiny)
    client.create(model="forged/chatonly:v1", files={tiny.name: digest}, template=CHATML_GOTMPL)
    assert client.show("forged/chatonly:v1").capabilities == ["completion"]
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="forged/chatonly:v1", prompt="a", suffix="b")
    assert e.value.status_code == 400
    assert e.value.error == "registry.ollama.ai/forged/chatonly:v1 does not support insert"
    client.create(model="forged/both:v1", files={tiny.name: digest},
                  template=publish.with_fim(CHATML_GOTMPL, fim.FORGED_TEXT))
    assert client.show("forged/both:v1").capabilities == ["completion", "insert"]
    double.chat_reply = lambda req: "ok"
    try:
        assert client.generate(model="forged/both:v1", prompt=PREFIX, suffix=SUFFIX).response == "ok"
        assert double.prompts[-1] == fim.FORGED_TEXT.render(PREFIX, SUFFIX)
        client.generate(model="forged/both:v1", prompt="hi", system="be brief")  # no suffix: the chat branch
        assert double.prompts[-1] == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    finally:
        double.chat_reply = None


def test_ollama_base_keeps_its_template_and_parameters(
    pub: Publisher, double: OllamaDouble, tiny: Path, adapter: Path, monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    client = ollama.Client(double.url)
    digest = pub.upload(tiny)
    qwen_tmpl = ("{{- if .Suffix }}<|fim_prefix|>{{ .Prompt }}<|fim_suffix|>{{ .Suffix }}<|fim_middle|>"
                 "{{- else }}{{ .Prompt }}{{- end }}")
    client.create(model="qwen2.5-coder:1.5b-base", files={tiny.name: digest}, template=qwen_tmpl,
                  parameters={"num_ctx": 4096, "stop": ["<|endoftext|>", "<|fim_pad|>"]})
    client.create(model="mycoder", files={tiny.name: digest}, template="{{ .System }} {{ .Prompt }}",
                  parameters={"num_ctx": 2048, "repeat_penalty": 1.1, "stop": ["\n\n\n", 'say "hi"']})
    monkeypatch.setenv("OLLAMA_HOST", double.url)  # how resolve_base finds the user's blob
    monkeypatch.setenv("FORGED_HOME", str(tmp_path))  # its hash cache
    base = resolve_base("ollama:mycoder")
    assert base.path == double.blob_path(digest)

    own = pub.serving("ollama:qwen2.5-coder:1.5b-base", base.path)
    assert own.template == qwen_tmpl and own.stop == ("<|endoftext|>", "<|fim_pad|>")
    assert own.parameters == {"num_ctx": 4096}

    added = pub.serving("ollama:mycoder", base.path, fim.QWEN)
    assert added.template == publish.with_fim("{{ .System }} {{ .Prompt }}", fim.QWEN)
    assert added.stop == ("\n\n\n", 'say "hi"', *fim.QWEN.stop)
    assert added.parameters == {"num_ctx": 2048, "repeat_penalty": 1.1}

    base_tag = pub.ensure_base(base.path, "mycoder", added)
    pub.create_version("inherit", 1, base_tag, adapter, serving=added, system="sys", temperature=0.3)
    shown = client.show("forged/inherit:v1")
    assert shown.template == added.template and "insert" in (shown.capabilities or [])
    assert publish.parse_show_parameters(shown.parameters) == {
        "num_ctx": 2048, "repeat_penalty": 1.1, "stop": list(added.stop), "temperature": 0.3}
    double.chat_reply = lambda req: "ok"
    try:
        client.generate(model="forged/inherit:v1", prompt=PREFIX, suffix=SUFFIX)
        assert double.prompts[-1] == fim.QWEN.render(PREFIX, SUFFIX)
        client.generate(model="forged/inherit:v1", prompt="hello")  # the user's own template
        assert double.prompts[-1] == "sys hello"
    finally:
        double.chat_reply = None


# -- the tuned model answers, both ways editors ask ------------------------------------

def _direct(gguf: Path, lora: Path | None, prompt: str, stop: list[str], n: int) -> str:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), lora_path=str(lora) if lora else None, n_ctx=512, n_threads=1,
                n_batch=128, seed=0, verbose=False)
    out = llm.create_completion(prompt, max_tokens=n, temperature=0.0, top_k=40, top_p=0.9, seed=0, stop=stop)
    return out["choices"][0]["text"]


@needs_llama
def test_suffix_and_raw_fim_prompt_answer_with_the_tuned_model(
    live: str, double: OllamaDouble, tiny: Path, adapter: Path
) -> None:
    client = ollama.Client(double.url)
    fmt = publish.base_fim_format(tiny)
    opts = {"temperature": 0, "num_predict": 12}
    via_suffix = client.generate(model=live, prompt=PREFIX, suffix=SUFFIX, options=opts).response
    assert double.prompts[-1].encode() == fmt.render(PREFIX, SUFFIX).encode()
    via_raw = client.generate(model=live, prompt=fmt.render(PREFIX, SUFFIX), raw=True, options=opts).response
    stop = list(publish.serving_for_gguf(tiny).stop)
    tuned = _direct(tiny, adapter, fmt.render(PREFIX, SUFFIX), stop, 12)
    untuned = _direct(tiny, None, fmt.render(PREFIX, SUFFIX), stop, 12)
    assert via_suffix == via_raw == tuned != untuned
    base = client.generate(model="forged/base-tiny-fim:latest", prompt=PREFIX, suffix=SUFFIX, options=opts).response
    assert base == untuned


def _tiny_fused(tmp: Path, base: Path) -> Path:
    """The tiny base with an mlx-layout LoRA on q and v merged in by forged's fused export."""
    import numpy as np
    from safetensors.numpy import save_file

    from forged.worker.judge.export import export_fused

    rng = np.random.default_rng(1)
    ad = tmp / "adapter"
    ad.mkdir()
    save_file({f"model.layers.{i}.self_attn.{m}.{p}": rng.normal(0, 0.5, shape).astype(np.float32)
               for i in range(2) for m, out in (("q_proj", 64), ("v_proj", 32))
               for p, shape in (("lora_a", (64, 4)), ("lora_b", (4, out)))}, str(ad / "adapters.safetensors"))
    (ad / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "lora_parameters": {"rank": 4, "scale": 2.0}}))
    (ad / "forged_meta.json").write_text(json.dumps({"backend": "mlx", "layout": "gguf", "method": "lora"}))
    return export_fused(ad, base, tmp / "fused.gguf").path


@needs_llama
def test_a_fused_version_inserts_too(pub: Publisher, double: OllamaDouble, tiny: Path, tmp_path: Path) -> None:
    fused = _tiny_fused(tmp_path, tiny)
    pub.create_version("fimfused", 1, "", fused, serving=pub.serving("tiny.gguf", tiny), system="s", temperature=0.2)
    opts = {"temperature": 0, "num_predict": 12}
    got = ollama.Client(double.url).generate(model="forged/fimfused:v1", prompt=PREFIX, suffix=SUFFIX,
                                             options=opts).response
    fmt = publish.base_fim_format(tiny)
    assert double.prompts[-1] == fmt.render(PREFIX, SUFFIX)
    stop = list(publish.serving_for_gguf(tiny).stop)
    assert got == _direct(fused, None, fmt.render(PREFIX, SUFFIX), stop, 12) != _direct(
        tiny, None, fmt.render(PREFIX, SUFFIX), stop, 12)


# -- editors' requests, as they send them -----------------------------------------------

def _documented_template(base: str) -> str:
    """The FIM prompt (Continue's template syntax) docs/using-the-model.md gives for ``base``."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "using-the-model.md").read_text()
    rows = dict(re.findall(r"^\| ([^|`]+?) \| `(.+?)`", text, re.M))
    return next(v.replace("\\|", "|") for k, v in rows.items() if k.startswith(base))


@pytest.mark.parametrize(("base", "fmt"), [("bundled", fim.FORGED_TEXT), ("StarCoder2", fim.STARCODER),
                                           ("Qwen2.5-Coder", fim.QWEN), ("CodeLlama", fim.CODELLAMA)])
def test_documented_raw_prompts_are_the_formats(base: str, fmt: fim.FimFormat) -> None:
    assert _documented_template(base) == fmt.render("{{{prefix}}}", "{{{suffix}}}")


def _stream(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return "".join(json.loads(line).get("response", "") for line in r.text.splitlines() if line.strip())


@needs_llama
def test_continue_autocomplete_requests(live: str, double: OllamaDouble, tiny: Path) -> None:
    # core/llm/llms/Ollama.ts: /api/show decides FIM support and the stop words...
    show = httpx.post(f"{double.url}/api/show", json={"name": live}).json()
    assert ".Suffix" in show["template"]
    stops = []
    for line in show["parameters"].split("\n"):
        m = re.match(r'^(\S+)\s+((?:".*")|\S+)$', line)
        if m and m.group(1) == "stop":
            stops.append(json.loads(m.group(2)))
    assert stops == list(publish.serving_for_gguf(tiny).stop)
    # ...then autocomplete goes through `suffix` (_streamFim; JSON.stringify drops raw: undefined).
    options = {"temperature": 0.01, "num_predict": 12, "stop": stops, "num_ctx": 8192}
    body = {"model": live, "prompt": PREFIX, "suffix": SUFFIX, "options": options, "keep_alive": 1800, "stream": True}
    fim_answer = _stream(httpx.post(f"{double.url}/api/generate", json=body, timeout=120))
    assert double.prompts[-1] == publish.base_fim_format(tiny).render(PREFIX, SUFFIX)
    # A template without .Suffix makes Continue send its own raw prompt instead: the
    # promptTemplates.autocomplete docs/using-the-model.md gives for this base gets the same bytes.
    raw_prompt = _documented_template("bundled").replace(
        "{{{prefix}}}", PREFIX).replace("{{{suffix}}}", SUFFIX)
    body = {"model": live, "prompt": raw_prompt, "raw": True, "options": options, "keep_alive": 1800, "stream": True}
    assert _stream(httpx.post(f"{double.url}/api/generate", json=body, timeout=120)) == fim_answer
    assert double.prompts[-1] == raw_prompt


def test_twinny_fim_request_is_wrapped_in_the_chat_template(live: str, double: OllamaDouble) -> None:
    # twinny src/extension/provider-options.ts: no `raw`, no `suffix`, so Ollama applies the
    # template's chat branch to Twinny's own FIM prompt (fim-templates.ts, "starcoder").
    prompt = f"<fim_prefix>\n{PREFIX}<fim_suffix>{SUFFIX}<fim_middle>"
    body = {"model": live, "prompt": prompt, "stream": True, "keep_alive": "5m",
            "options": {"temperature": 0.2, "num_predict": 4}}
    double.chat_reply = lambda req: "x"
    try:
        assert _stream(httpx.post(f"{double.url}/api/generate", json=body, timeout=60)) == "x"
    finally:
        double.chat_reply = None
    assert double.prompts[-1] == f"<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


def test_a_base_without_a_chat_format_is_trained_and_served_in_chatml(tmp_path: Path) -> None:
    """StarCoder2-like bases ship no chat template: the trainer's chats and the published
    template's rendering of the same messages are the same bytes."""
    from tiny import make_tiny_family_gguf

    from forged.common.gguf import read_gguf_metadata
    from forged.worker.train.models import load_tokenizer

    gguf = make_tiny_family_gguf(tmp_path, "starcoder2")
    assert not read_gguf_metadata(gguf).get("tokenizer.chat_template")
    msgs = [{"role": "system", "content": "Answer from the code."}, {"role": "user", "content": "What is add?"}]
    trained = load_tokenizer(resolve_base(str(gguf))).apply_chat_template(msgs, tokenize=False,
                                                                          add_generation_prompt=True)

    class M:
        def __init__(self, m: dict[str, str]) -> None:
            self.Role, self.Content = m["role"], m["content"]

    s = publish.serving_for_gguf(gguf)
    served = GoTemplate(s.template).execute({"Messages": [M(m) for m in msgs], "Suffix": "", "Prompt": "",
                                             "System": ""})
    assert served == trained and "<|im_end|>" in s.stop
