"""Publishing to Ollama (a real HTTP double on disk) through the real ollama client."""

from __future__ import annotations

import importlib.util
import json
import re
from datetime import datetime
from pathlib import Path

import ollama
import pytest
from ollama_double import OllamaDouble, bundled_base, make_lora_adapter

from forged.daemon import publish
from forged.daemon.publish import (
    AdaptersRefused,
    HostMemory,
    NoRoom,
    OllamaUnavailable,
    Publisher,
    PublishError,
)

HAS_LLAMA = importlib.util.find_spec("llama_cpp") is not None
needs_llama = pytest.mark.skipif(not HAS_LLAMA, reason="llama-cpp-python is not installed")


@pytest.fixture(scope="module")
def double(tmp_path_factory: pytest.TempPathFactory):
    with OllamaDouble(tmp_path_factory.mktemp("ollama")) as od:
        yield od


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    d = tmp_path_factory.mktemp("adapters")
    return [make_lora_adapter(d / f"adapter-{i}.gguf", seed=i) for i in range(3)]


@pytest.fixture(scope="module")
def pub(double: OllamaDouble) -> Publisher:
    p = Publisher(double.url, timeout=30)
    yield p
    p.close()


@pytest.fixture(scope="module")
def base_tag(pub: Publisher) -> str:
    return pub.ensure_base(bundled_base(), "smollm2-135m")


@pytest.fixture
def double_ok(double: OllamaDouble):
    """Each test leaves the double's switches as it found them."""
    yield double
    double.down = False
    double.fail_create = double.corrupt_uploads = double.fail_load = 0


def _create(pub: Publisher, repo: str, version: int, base_tag: str, adapter: Path) -> publish.Published:
    return pub.create_version(
        repo, version, base_tag, adapter,
        serving=publish.serving_for_gguf(bundled_base()), system=publish.system_prompt(repo),
        temperature=0.2,
    )


def _digest(double: OllamaDouble, name: str) -> str | None:
    return next((m["digest"] for m in double.tags()["models"] if m["name"] == name), None)


def _blob_posts(double: OllamaDouble) -> int:
    return sum(1 for m, p in double.requests if m == "POST" and p.startswith("/api/blobs/"))


def test_base_is_published_once_in_ollama_layout(pub: Publisher, double: OllamaDouble, base_tag: str) -> None:
    assert base_tag == "forged/base-smollm2-135m:latest"
    posts = _blob_posts(double)
    assert pub.ensure_base(bundled_base(), "smollm2-135m") == base_tag
    assert _blob_posts(double) == posts  # second call uploads nothing
    manifest = json.loads((double.store / "manifests/registry.ollama.ai/forged/base-smollm2-135m/latest").read_text())
    kinds = {x["mediaType"] for x in manifest["layers"]}
    assert {"application/vnd.ollama.image.model", "application/vnd.ollama.image.template",
            "application/vnd.ollama.image.params"} <= kinds
    model = next(x for x in manifest["layers"] if x["mediaType"].endswith(".model"))
    assert (double.store / "blobs" / model["digest"].replace(":", "-")).stat().st_size == bundled_base().stat().st_size


def test_create_version_is_idempotent_and_uploads_only_missing(
    pub: Publisher, double: OllamaDouble, base_tag: str, adapters: list[Path]
) -> None:
    first = _create(pub, "idem", 1, base_tag, adapters[0])
    assert first.created and first.tag == "forged/idem:v1" and first.digest
    posts = _blob_posts(double)
    again = _create(pub, "idem", 1, base_tag, adapters[0])
    assert not again.created and again.digest == first.digest
    assert _blob_posts(double) == posts
    # The same adapter under another version reuses the blob already in Ollama.
    _create(pub, "idem", 2, base_tag, adapters[0])
    assert _blob_posts(double) == posts
    info = ollama.Client(double.url).show("forged/idem:v1")
    assert "ADAPTER" in (info.modelfile or "") and "idem repository" in (info.modelfile or "")
    assert re.search(r"^temperature\s+0.2$", info.parameters or "", re.M)
    assert not pub.exists("forged/idem:latest")  # creating never touches :latest
    assert first.to_dict()["tag"] == "forged/idem:v1"


def test_promote_rollback_and_prune(pub: Publisher, double: OllamaDouble, base_tag: str, adapters: list[Path]) -> None:
    for v in (1, 2, 3):
        _create(pub, "pr", v, base_tag, adapters[v - 1])
    pub.promote("pr", 1)
    assert pub.live_version("pr") == 1
    pub.promote("pr", 2, previous=1)
    assert pub.live_version("pr") == 2
    assert _digest(double, "forged/pr:latest") == _digest(double, "forged/pr:v2")
    # The new model stays loaded: Ollama keys runners by base file, so unloading the
    # previous tag by name would have unloaded the new one.
    loaded = ollama.Client(double.url).ps().models
    assert [m.digest for m in loaded] == [_digest(double, "forged/pr:v2")]

    pub.rollback("pr", 1)
    assert pub.live_version("pr") == 1
    with pytest.raises(PublishError, match=r"forged/pr:v9 is not in Ollama \(versions there: v1, v2, v3\)"):
        pub.rollback("pr", 9)
    assert pub.live_version("pr") == 1

    assert pub.versions("pr") == [1, 2, 3]
    keep = publish.keep_list(pub.versions("pr"), 1, pub.live_version("pr"))
    assert keep == [1, 3]
    assert pub.prune("pr", keep) == ["forged/pr:v2"]
    assert pub.versions("pr") == [1, 3]
    assert pub.prune("pr", []) == ["forged/pr:v3"]  # never the live one
    assert pub.versions("pr") == [1] and pub.live_version("pr") == 1


def test_ollama_down_during_publish_then_back(
    pub: Publisher, double_ok: OllamaDouble, base_tag: str, adapters: list[Path]
) -> None:
    double = double_ok
    _create(pub, "down", 1, base_tag, adapters[0])
    pub.promote("down", 1)
    double.down = True
    with pytest.raises(OllamaUnavailable, match="unreachable"):
        _create(pub, "down", 2, base_tag, adapters[1])
    with pytest.raises(OllamaUnavailable):
        pub.promote("down", 2, previous=1)
    double.down = False
    assert pub.live_version("down") == 1 and pub.versions("down") == [1]
    _create(pub, "down", 2, base_tag, adapters[1])
    pub.promote("down", 2, previous=1)
    assert pub.live_version("down") == 2


def test_create_500_leaves_no_tag_and_retry_completes(
    pub: Publisher, double_ok: OllamaDouble, base_tag: str, adapters: list[Path]
) -> None:
    double = double_ok
    _create(pub, "boom", 1, base_tag, adapters[0])
    pub.promote("boom", 1)
    double.fail_create = 1
    with pytest.raises(OllamaUnavailable, match="HTTP 500"):
        _create(pub, "boom", 2, base_tag, adapters[1])
    assert pub.versions("boom") == [1] and pub.live_version("boom") == 1
    made = _create(pub, "boom", 2, base_tag, adapters[1])
    assert made.created
    pub.promote("boom", 2, previous=1)
    assert pub.live_version("boom") == 2


def test_digest_mismatch_is_retried_then_reported(
    pub: Publisher, double_ok: OllamaDouble, base_tag: str, adapters: list[Path], tmp_path: Path
) -> None:
    double = double_ok
    fresh = make_lora_adapter(tmp_path / "fresh.gguf", seed=42)
    # One corrupted transfer: upload() re-sends once and succeeds.
    double.corrupt_uploads = 1
    assert _create(pub, "dm", 1, base_tag, fresh).created
    # Corrupted every time: a retryable error, nothing stored, no tag.
    other = make_lora_adapter(tmp_path / "other.gguf", seed=43)
    double.corrupt_uploads = 2
    with pytest.raises(OllamaUnavailable, match="digest mismatch"):
        _create(pub, "dm", 2, base_tag, other)
    assert pub.versions("dm") == [1]
    assert len(list((double.store / "blobs").glob("sha256-*"))) == len(set((double.store / "blobs").glob("sha256-*")))
    assert not any(p.name.startswith(".") for p in (double.store / "blobs").iterdir())
    assert _create(pub, "dm", 2, base_tag, other).created


def test_double_rejects_bad_digest_with_400(double: OllamaDouble, tmp_path: Path) -> None:
    f = tmp_path / "blob.bin"
    f.write_bytes(b"hello")
    client = ollama.Client(double.url)
    digest = client.create_blob(f)
    assert (double.store / "blobs" / digest.replace(":", "-")).read_bytes() == b"hello"
    r = client._client.post(f"/api/blobs/sha256:{'0' * 64}", content=b"not it")
    assert r.status_code == 400 and "digest mismatch" in r.json()["error"]
    assert not (double.store / "blobs" / f"sha256-{'0' * 64}").exists()


def test_model_that_fails_to_load_never_becomes_latest(
    pub: Publisher, double_ok: OllamaDouble, base_tag: str, adapters: list[Path]
) -> None:
    double = double_ok
    _create(pub, "ld", 1, base_tag, adapters[0])
    _create(pub, "ld", 2, base_tag, adapters[1])
    pub.promote("ld", 1)
    double.fail_load = 1
    with pytest.raises(OllamaUnavailable, match="load forged/ld:v2"):
        pub.promote("ld", 2, previous=1)
    assert pub.live_version("ld") == 1
    pub.promote("ld", 2, previous=1)
    assert pub.live_version("ld") == 2


def test_bad_input_is_one_clear_line(pub: Publisher, base_tag: str, adapters: list[Path], tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    cases = [
        (lambda: _create(pub, "Bad Name", 1, base_tag, adapters[0]), "not usable in an Ollama tag"),
        (lambda: _create(pub, "ok", 0, base_tag, adapters[0]), "positive integer"),
        (lambda: _create(pub, "ok", 1, base_tag, tmp_path / "missing.gguf"), "no such file"),
        (lambda: _create(pub, "ok", 1, base_tag, junk), "not a GGUF file"),
        (lambda: _create(pub, "ok", 1, base_tag, bundled_base()), "expected a GGUF adapter"),
        (lambda: _create(pub, "ok", 1, "forged/base-nope:latest", adapters[0]), "ensure_base"),
        (lambda: pub.promote("ok", 3), "not in Ollama"),
    ]
    for fn, msg in cases:
        with pytest.raises(PublishError, match=msg) as e:
            fn()
        assert "\n" not in str(e.value)


def test_unreachable_host_is_typed() -> None:
    p = Publisher("http://127.0.0.1:9", timeout=2)  # discard port: nothing listens
    with pytest.raises(OllamaUnavailable):
        p.versions("x")
    assert not hasattr(p, "nonexistent")


def test_manual_commands_and_helpers(adapters: list[Path]) -> None:
    text = publish.manual_commands("myrepo", 4, bundled_base(), adapters[0], adapters_ok=True)
    assert "ollama create forged/myrepo:v4 -f Modelfile.forged-myrepo-v4" in text
    assert "ollama cp forged/myrepo:v4 forged/myrepo:latest" in text
    assert f"FROM {bundled_base().resolve()}" in text and f"ADAPTER {adapters[0].resolve()}" in text
    assert 'PARAMETER stop "<|im_end|>"' in text and "{{ .Content }}" in text
    assert "{{ if .Suffix }}<fim_prefix><fim_suffix>{{ .Suffix }}<fim_middle>{{ .Prompt }}{{ else }}" in text
    assert publish.base_chat_template(adapters[0]) is None  # no chat template in an adapter
    assert publish.tag_for("r", 3) == "forged/r:v3"


@needs_llama
@pytest.mark.slow
def test_latest_serves_base_plus_adapter(
    pub: Publisher, double: OllamaDouble, base_tag: str, adapters: list[Path]
) -> None:
    _create(pub, "serve", 1, base_tag, adapters[0])
    _create(pub, "serve", 2, base_tag, adapters[1])
    pub.promote("serve", 1)
    client = ollama.Client(double.url)
    opts = {"temperature": 0, "num_predict": 8}
    # The same raw prompt to the base and to :latest: only the weights differ.
    raw = ("<|im_start|>user\nWrite a Python function that adds two numbers.<|im_end|>\n"
           "<|im_start|>assistant\n")
    base = client.generate(model=base_tag, prompt=raw, raw=True, options=opts).response
    v1 = client.generate(model="forged/serve:latest", prompt=raw, raw=True, options=opts).response
    assert base and v1 and v1 != base
    # Through the chat template and the system prompt, as an editor would call it.
    msgs = [{"role": "user", "content": "Write a Python function that adds two numbers."}]
    chat_v1 = client.chat(model="forged/serve:latest", messages=msgs, options=opts).message.content
    assert chat_v1
    pub.promote("serve", 2, previous=1)
    v2 = client.generate(model="forged/serve:latest", prompt=raw, raw=True, options=opts).response
    assert v2 and v2 not in (v1, base)
    pub.rollback("serve", 1)
    assert client.generate(model="forged/serve:latest", prompt=raw, raw=True, options=opts).response == v1

def test_keep_alive_forever_is_sent_as_a_number(double: OllamaDouble, base_tag: str, tmp_path: Path) -> None:
    # Ollama reads a keep_alive string as a Go duration and rejects a bare "-1".
    p = Publisher(double.url, keep_alive="-1")
    # Its own adapter: Ollama's one runner per base would otherwise keep an earlier
    # test's model name for the same base + adapter.
    _create(p, "ka", 1, base_tag, make_lora_adapter(tmp_path / "ka.gguf", seed=7))
    p.promote("ka", 1)
    (loaded,) = [m for m in ollama.Client(double.url).ps().models if m.model == "forged/ka:v1"]
    assert loaded.expires_at is not None and loaded.expires_at.year >= datetime.now().year + 5  # "forever"
    p.close()


def test_base_republished_when_the_file_under_its_name_changes(double: OllamaDouble, tmp_path: Path) -> None:
    # A stand-in "base": the double accepts any GGUF model file; a tiny one keeps this fast.
    small = make_lora_adapter(tmp_path / "a.gguf")  # an adapter is refused as a base
    p = Publisher(double.url)
    with pytest.raises(PublishError, match="expected a GGUF model"):
        p.ensure_base(small, "tiny")
    tag = p.ensure_base(bundled_base(), "tiny")
    first = _digest(double, tag)
    copy = tmp_path / "base-copy.gguf"
    copy.write_bytes(bundled_base().read_bytes()[:-1] + b"\0")  # same header, other bytes
    posts = _blob_posts(double)
    assert p.ensure_base(copy, "tiny") == tag
    assert _blob_posts(double) == posts + 1 and _digest(double, tag) != first
    assert p.ensure_base(copy, "tiny") == tag and _blob_posts(double) == posts + 1
    p.close()


def make_fused(tmp: Path) -> Path:
    """A real fused export of the bundled base: an mlx-layout LoRA on layer 0's q and v
    (written with numpy, so no torch here) merged by forged.export.export_fused."""
    import numpy as np
    from safetensors.numpy import save_file

    from forged.worker.judge.export import export_fused

    rng = np.random.default_rng(0)
    ad = tmp / "adapter"
    ad.mkdir()
    save_file({f"model.layers.0.self_attn.{m}.{p}": rng.normal(0, 0.05, shape).astype(np.float32)
               for m, out in (("q_proj", 576), ("v_proj", 192))
               for p, shape in (("lora_a", (576, 4)), ("lora_b", (4, out)))}, str(ad / "adapters.safetensors"))
    (ad / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "lora_parameters": {"rank": 4, "scale": 2.0}}))
    (ad / "forged_meta.json").write_text(json.dumps({"backend": "mlx", "layout": "gguf", "method": "lora"}))
    return export_fused(ad, bundled_base(), tmp / "model.gguf").path


def test_fused_export_is_created_from_itself_without_an_adapter(
    pub: Publisher, double: OllamaDouble, tmp_path: Path
) -> None:
    fused = make_fused(tmp_path)
    assert publish.is_fused_export(fused) and not publish.is_fused_export(bundled_base())
    # No base model is needed in Ollama for a fused version: base_tag is not used.
    first = _create(pub, "fz", 1, "forged/base-nope:latest", fused)
    assert first.created and first.adapter_digest == pub._digest(fused)
    manifest = double.read_manifest("forged/fz:v1")
    kinds = {x["mediaType"].rsplit(".", 1)[-1]: x["digest"] for x in manifest["layers"]}
    assert kinds["model"] == first.adapter_digest and "adapter" not in kinds
    assert {"template", "system", "params"} <= kinds.keys()
    modelfile = ollama.Client(double.url).show("forged/fz:v1").modelfile or ""
    assert "ADAPTER" not in modelfile and "fz repository" in modelfile
    assert not _create(pub, "fz", 1, "forged/base-nope:latest", fused).created  # idempotent
    text = publish.manual_commands("fz", 1, bundled_base(), fused)
    assert f"FROM {fused.resolve()}" in text and "ADAPTER" not in text


@needs_llama
def test_fused_version_loads_and_goes_live(pub: Publisher, double: OllamaDouble, tmp_path: Path) -> None:
    _create(pub, "fzl", 1, "unused", make_fused(tmp_path))
    pub.promote("fzl", 1)  # loads it in llama.cpp under its own tag first
    assert pub.live_version("fzl") == 1
    raw = "<|im_start|>user\nWrite a Python function that adds two numbers.<|im_end|>\n<|im_start|>assistant\n"
    out = ollama.Client(double.url).generate(model="forged/fzl:latest", prompt=raw, raw=True,
                                             options={"temperature": 0, "num_predict": 4}).response
    assert out


# ---------------------------------------------------------------- Ollama 0.34.1: no adapters


@pytest.fixture
def new_ollama(tmp_path: Path):
    """An Ollama that refuses adapters (0.34.1), with the bundled base published."""
    with OllamaDouble(tmp_path / "ollama", version="0.34.1") as od:
        p = Publisher(od.url, timeout=30, memory=HostMemory(tmp_path / "hosts.json"))
        yield od, p, p.ensure_base(bundled_base(), "smollm2-135m")
        p.close()


def test_manual_commands_never_print_adapter_unless_known_accepted(adapters: list[Path], tmp_path: Path) -> None:
    text = publish.manual_commands("myrepo", 4, bundled_base(), adapters[0])
    assert "ADAPTER" not in text and "ollama create" not in text and 'export = "auto"' in text
    fused = make_fused(tmp_path)
    text = publish.manual_commands("myrepo", 4, bundled_base(), fused)
    assert f"FROM {fused.resolve()}" in text and "ADAPTER" not in text and "--quantize" not in text


def test_version_tells_whether_adapters_are_accepted(double: OllamaDouble, tmp_path: Path) -> None:
    mem = HostMemory(tmp_path / "hosts.json")
    p = Publisher(double.url, memory=mem)
    try:
        assert p.server_version() == "0.33.5" and p.accepts_adapters() is True
        double.version = "0.34.1"  # upgraded in place: asked again, by version
        assert p.accepts_adapters() is False
        assert json.loads((tmp_path / "hosts.json").read_text())[double.url]["version"] == "0.34.1"
        double.version = "0.0.0"  # a dev build: only a create can tell
        assert p.accepts_adapters() is None
    finally:
        double.version = "0.33.5"
        p.close()
    assert publish.adapters_by_version("v0.34.0") is True and publish.adapters_by_version("0.35.2") is False


def test_adapter_refused_by_the_create_itself_is_remembered(new_ollama, adapters: list[Path], tmp_path: Path) -> None:
    od, p, base_tag = new_ollama
    p.memory.put(od.url, "0.34.1", True, "stale")  # wrong memory: the create's answer wins
    with pytest.raises(AdaptersRefused, match="LoRA adapters are no longer supported.*HTTP 400"):
        _create(p, "nr", 1, base_tag, adapters[0])
    assert not p.exists("forged/nr:v1") and p.memory.get(od.url, "0.34.1") is False
    # the same candidate, fused, is created
    fused = make_fused(tmp_path)
    assert _create(p, "nr", 1, base_tag, fused).created and p.versions("nr") == [1]


def test_refusal_in_the_middle_of_a_create_leaves_no_tag(new_ollama, adapters: list[Path]) -> None:
    od, p, base_tag = new_ollama
    od.refuse_late = True  # the tag is written, then the refusal comes
    with pytest.raises(AdaptersRefused):
        _create(p, "late", 2, base_tag, adapters[1])
    assert ("DELETE", "/api/delete") in od.requests
    assert p.versions("late") == [] and "forged/late:v2" not in {m["name"] for m in od.tags()["models"]}


def test_an_adapter_gguf_given_as_the_model_is_refused_too(new_ollama, adapters: list[Path]) -> None:
    od, p, _ = new_ollama
    digest = p.upload(adapters[0])
    with pytest.raises(ollama.ResponseError, match="no longer supported: a.gguf is a LoRA adapter"):
        ollama.Client(od.url).create(model="forged/x:v1", files={"a.gguf": digest})


@needs_llama
def test_double_quantizes_for_real_before_0_34_1_and_refuses_after(tmp_path: Path) -> None:
    import llama_cpp  # noqa: F401 - the double's quantizer

    from forged.worker.judge.quantize import quantize_gguf

    f16 = quantize_gguf(bundled_base(), tmp_path / "f16.gguf", "f16")
    with OllamaDouble(tmp_path / "old") as od:
        c = ollama.Client(od.url)
        digest = Publisher(od.url).upload(f16)
        c.create(model="forged/q:v1", files={"m.gguf": digest}, quantize="q8_0")
        layer = od.layers(od.read_manifest("forged/q:v1"))["application/vnd.ollama.image.model"]
        assert od.kv(layer["digest"])["general.file_type"] == 7  # Q8_0: the served bytes
        assert layer["size"] < f16.stat().st_size * 0.6
        tags = {m["name"]: m for m in od.tags()["models"]}
        assert tags["forged/q:v1"]["details"]["quantization_level"] == "Q8_0"
        with pytest.raises(ollama.ResponseError, match="only supported for F16 and F32"):
            c.create(model="forged/q:v2", files={"b.gguf": Publisher(od.url).upload(bundled_base())},
                     quantize="q8_0")
        od.version = "0.34.1"
        with pytest.raises(ollama.ResponseError, match="create-time quantization is only supported for safetensors"):
            c.create(model="forged/q:v3", files={"m.gguf": digest}, quantize="q8_0")
        assert "forged/q:v3" not in {m["name"] for m in od.tags()["models"]}


def test_no_room_on_disk_is_retryable_and_creates_nothing(new_ollama, tmp_path: Path) -> None:
    od, p, _ = new_ollama
    fused = make_fused(tmp_path)
    p.room_dirs, p.room_margin = [tmp_path], 1 << 60  # more than any disk has
    with pytest.raises(NoRoom, match="not enough disk") as e:
        _create(p, "room", 1, "", fused)
    assert isinstance(e.value, OllamaUnavailable) and p.versions("room") == []
    p.room_margin = 0
    assert _create(p, "room", 1, "", fused).created


def test_keep_list_keeps_live_and_rollback_target() -> None:
    assert publish.keep_list([1, 2, 3, 4], 1, live=4, previous=3) == [3, 4]
    assert publish.keep_list([1, 2, 3, 4], 1, live=2, previous=1) == [1, 2, 4]
    assert publish.keep_list([1, 2, 3], 2, live=3) == [2, 3]


def _judged(tmp_path: Path, adapter: Path) -> dict:
    fused = make_fused(tmp_path)
    return {"base_gguf": str(bundled_base()), "exports": {
        "adapter": {"kind": "lora", "path": str(adapter), "fidelity": {"passed": True}},
        "fused": {"kind": "fused", "path": str(fused), "quantization": "q8_0", "fidelity": {"passed": True}}}}


def test_a_refused_adapter_publishes_the_same_candidate_fused(new_ollama, adapters: list[Path], tmp_path: Path) -> None:
    od, p, _ = new_ollama
    judged = _judged(tmp_path, adapters[0])
    p.memory.put(od.url, "0.34.1", True, "stale")  # believed to take adapters: the create says no
    made = publish.publish_candidate(p, "fb", 1, judged, mode="auto", base_name="smollm2-135m", temperature=0.2)
    assert made.kind == "fused" and made.quantization == "q8_0" and "no longer supported" in made.note
    assert made.size == Path(judged["exports"]["fused"]["path"]).stat().st_size
    assert "adapter" not in {x["mediaType"].rsplit(".", 1)[-1] for x in od.read_manifest("forged/fb:v1")["layers"]}
    # now known: the next candidate goes straight to the fused export
    assert p.memory.get(od.url, "0.34.1") is False
    made = publish.publish_candidate(p, "fb", 2, judged, mode="auto", base_name="smollm2-135m", temperature=0.2)
    assert made.kind == "fused" and not made.note  # no adapter was tried
    with pytest.raises(AdaptersRefused):  # export = "adapter" insists: nothing else to publish
        publish.publish_candidate(p, "fb", 3, judged, mode="adapter", base_name="smollm2-135m", temperature=0.2)
    assert p.versions("fb") == [1, 2]


def test_manual_commands_for_a_judged_candidate(adapters: list[Path], tmp_path: Path) -> None:
    judged = _judged(tmp_path, adapters[0])
    for known in (None, False):
        text = publish.manual_for(judged, "m", 1, mode="auto", adapters=known, temperature=0.2)
        assert "ADAPTER" not in text and judged["exports"]["fused"]["path"] in text
    text = publish.manual_for(judged, "m", 1, mode="auto", adapters=True, temperature=0.2)
    assert f"ADAPTER {adapters[0].resolve()}" in text
