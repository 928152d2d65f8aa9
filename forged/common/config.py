"""Configuration: ``config.toml`` → typed, validated dataclasses.

Every key has a default here and a commented copy in the checkout's ``config.toml``.
Validation is driven by the dataclass fields: an unknown key, a wrong type or a bad
value raises :class:`ConfigError` naming the key path and, where it can be found,
the file and line (``config.toml:12: repos[1].path: directory does not exist``).

forged never rewrites the user's file: repos registered with ``forgectl repos add``
live in the state database, so the user's comments and layout are never lost.
``[[repos]]`` in the file are registered at start as well (declarative setup).
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TAG_SAFE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class ConfigError(ValueError):
    """A config problem, already phrased for the user (one line)."""


def _check(fn: typing.Callable[[Any], str | None], doc: str = "") -> dict[str, Any]:
    return {"check": fn, "doc": doc}


def _range(lo: float, hi: float) -> dict[str, Any]:
    """A numeric key's bounds: every number has one (non-finite ones never reach a check)."""
    def check(v: Any) -> str | None:
        return None if lo <= v <= hi else f"must be from {lo:g} to {hi:g}"

    return {"check": check, "range": (lo, hi)}


def _one_of(*choices: str) -> typing.Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if v in choices else f"must be one of {', '.join(map(repr, choices))}"

    return check


def _hhmm_range(v: Any) -> str | None:
    for item in v:
        if not re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d-([01]\d|2[0-3]):[0-5]\d", item):
            return f"{item!r} is not a 'HH:MM-HH:MM' range"
    return None


def _module_names(v: Any) -> str | None:
    if not v:
        return "must name at least one module (e.g. 'q_proj')"
    bad = [m for m in v if not re.fullmatch(r"[A-Za-z_][\w.]*", m)]
    return f"{bad[0]!r} is not a module name" if bad else None


BUNDLED_BASES = ("smollm2-135m",)  # forged.common.models.BUNDLED's keys (tests keep them equal)


def _base_model_form(v: Any) -> str | None:
    """The spec's form; whether a local path exists is checked in :func:`parse`."""
    kind, _, rest = v.strip().partition(":")
    if not v.strip():
        return "must name a base model ('bundled:smollm2-135m', 'ollama:NAME', a .gguf file or an HF directory)"
    if kind == "bundled" and rest not in BUNDLED_BASES:
        return f"unknown bundled model {rest!r} (known: {', '.join(BUNDLED_BASES)})"
    if kind == "ollama" and not rest.strip():
        return "'ollama:' needs a model name, e.g. 'ollama:qwen2.5-coder:0.5b'"
    return None


def _http_url(v: Any) -> str | None:
    return None if re.fullmatch(r"https?://[^\s/]+(/\S*)?", v) else "must be an http(s) URL"


def _duration(v: Any) -> str | None:
    ok = re.fullmatch(r"-?\d+(\.\d+)?(ns|us|ms|s|m|h)?(\d+(\.\d+)?(ns|us|ms|s|m|h))*", v)
    return None if ok else "must be a duration such as '30m', '1h', '0' or '-1'"


@dataclass
class RepoConfig:
    path: str
    name: str = ""  # default: the directory name, made tag-safe
    branch: str = ""  # default: whatever HEAD is


@dataclass
class DaemonConfig:
    log_level: str = field(default="info", metadata=_check(_one_of("debug", "info", "warning", "error")))
    max_concurrent_jobs: int = field(default=1, metadata=_range(1, 64))
    max_request_bytes: int = field(default=1_048_576, metadata=_range(1024, 1 << 30))
    retry_seconds: float = field(default=30.0, metadata=_range(1, 86400))
    worker_nice: int = field(default=10, metadata=_range(0, 19))


@dataclass
class WatchConfig:
    settle_seconds: float = field(default=2.0, metadata=_range(0, 3600))
    max_wait_seconds: float = field(default=30.0, metadata=_range(0.1, 86400))
    reconcile_interval_minutes: float = field(default=10.0, metadata=_range(0.1, 10080))


@dataclass
class ThresholdConfig:
    min_changed_lines: int = field(default=300, metadata=_range(1, 10**9))
    min_commits: int = field(default=10, metadata=_range(1, 10**6))
    max_age_days: float = field(default=7.0, metadata=_range(0.001, 3650))
    count_uncommitted: bool = False


# Tokens per training sequence ([train] seq_len); the miner sizes RAFT examples to fit it.
DEFAULT_SEQ_LEN = 512


@dataclass
class MineKinds:
    continuation: float = field(default=1.0, metadata=_range(0, 100))
    fim: float = field(default=1.0, metadata=_range(0, 100))
    doc_to_code: float = field(default=0.5, metadata=_range(0, 100))
    code_to_doc: float = field(default=0.5, metadata=_range(0, 100))
    raft: float = field(default=1.0, metadata=_range(0, 100))
    commit_diff: float = field(default=0.5, metadata=_range(0, 100))
    teacher: float = field(default=0.25, metadata=_range(0, 100))  # needs [mine] teacher


@dataclass
class MineConfig:
    chunk_tokens: int = field(default=384, metadata=_range(16, 32768))
    max_file_bytes: int = field(default=1_000_000, metadata=_range(1024, 1 << 30))
    heldout_fraction: float = field(default=0.05, metadata=_range(0, 0.5))
    raft_distractors: int = field(default=4, metadata=_range(0, 64))
    raft_oracle_fraction: float = field(default=0.8, metadata=_range(0, 1))
    max_commits: int = field(default=500, metadata=_range(0, 10**6))
    workers: int = field(default=0, metadata=_range(0, 1024))  # 0 = one per core
    seed: int = field(default=0, metadata=_range(0, 2**32 - 1))
    teacher: str = ""  # an Ollama model that writes extra Q/A; "" = off
    teacher_max_calls: int = field(default=100, metadata=_range(0, 10**6))  # per mine; 0 = cached answers only
    teacher_max_minutes: float = field(default=15.0, metadata=_range(0.01, 1440))  # asking time per mine
    teacher_timeout_seconds: float = field(default=120.0, metadata=_range(0.1, 3600))  # one teacher call
    kinds: MineKinds = field(default_factory=MineKinds)


@dataclass
class TrainConfig:
    backend: str = field(default="auto", metadata=_check(_one_of("auto", "mlx", "torch")))
    base_model: str = field(default="bundled:smollm2-135m", metadata=_check(_base_model_form))
    method: str = field(default="pissa", metadata=_check(_one_of("lora", "pissa")))
    quantized: bool = False  # QLoRA: train on a 4-bit base
    rank: int = field(default=16, metadata=_range(1, 1024))
    alpha: float = field(default=16.0, metadata=_range(0.001, 65536))
    rslora: bool = True
    dora: bool = False
    dropout: float = field(default=0.0, metadata=_range(0, 0.9))
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata=_check(_module_names),
    )
    pissa_niter: int = field(default=4, metadata=_range(0, 100))  # 0 = exact SVD
    learning_rate: float = field(default=1e-4, metadata=_range(1e-9, 1))
    lr_schedule: str = field(default="cosine", metadata=_check(_one_of("cosine", "linear", "constant")))
    warmup_steps: int = field(default=10, metadata=_range(0, 10**6))
    batch_size: int = field(default=4, metadata=_range(1, 1024))
    seq_len: int = field(default=DEFAULT_SEQ_LEN, metadata=_range(8, 131072))
    grad_accum: int = field(default=1, metadata=_range(1, 1024))
    grad_checkpoint: bool = False
    max_grad_norm: float = field(default=1.0, metadata=_range(0, 1e6))
    seed: int = field(default=0, metadata=_range(0, 2**32 - 1))
    max_steps: int = field(default=200, metadata=_range(0, 10**8))  # 0 = no limit
    max_minutes: float = field(default=60.0, metadata=_range(0, 10080))
    max_tokens: int = field(default=0, metadata=_range(0, 10**13))
    checkpoint_every: int = field(default=20, metadata=_range(1, 10**8))
    replay_ratio: float = field(default=0.3, metadata=_range(0, 1))
    full_retrain_every: int = field(default=5, metadata=_range(1, 10**4))
    eval_every: int = field(default=0, metadata=_range(0, 10**8))  # held-out loss every N steps; 0 = start/end only
    threads: int = field(default=0, metadata=_range(0, 1024))  # CPU threads for training; 0 = all cores
    # FIM examples: loss on the middle only, or on the prefix and suffix code too (never the markers)
    fim_loss: str = field(default="all", metadata=_check(_one_of("middle", "all")))
    # The other examples: loss on the completion / assistant turns only, or on the prompt's content too
    prompt_loss: str = field(default="none", metadata=_check(_one_of("none", "all")))


@dataclass
class JudgeConfig:
    min_bpb_gain: float = field(default=0.002, metadata=_range(0, 10))
    tolerance: float = field(default=0.02, metadata=_range(0, 1))
    max_examples: int = field(default=200, metadata=_range(1, 10**6))
    fidelity_min_corr: float = field(default=0.95, metadata=_range(0, 1))
    # FIM and RAFT need greedy generation, which dominates judge time: cap them apart.
    max_generate: int = field(default=32, metadata=_range(1, 10**5))
    # A RAFT prompt carries the oracle and distractor documents, sized by the miner to fit
    # [train] seq_len; 0 = as many as max_generate.
    max_raft: int = field(default=0, metadata=_range(0, 10**5))
    # Generated FIM middles (exact match, edit similarity), drawn from the teacher-forced ones.
    max_fim: int = field(default=64, metadata=_range(1, 10**5))
    # Teacher-forced FIM middles (FIM bits/byte), the generated ones among them; 0 = every
    # held-out FIM example.
    max_fim_bpb: int = field(default=0, metadata=_range(0, 10**6))
    # FIM examples also scored with BM25-retrieved training-side context (fim_bpb_rag, not
    # gated: does fine-tuning add to retrieval?); teacher-forced, so cheap; 0 = off.
    max_rag: int = field(default=48, metadata=_range(0, 10**5))
    # Fidelity: llama.cpp's held-out loss gain may differ from the trainer's by this share.
    fidelity_loss_tolerance: float = field(default=0.25, metadata=_range(0, 1))
    # A fused version is checked as Ollama will serve it (quantized): it must keep this
    # share of the trainer's held-out loss gain, else the next precision up is tried.
    fidelity_min_gain: float = field(default=0.9, metadata=_range(0, 1))


DEFAULT_OLLAMA_HOST = "http://127.0.0.1:11434"


@dataclass
class PublishConfig:
    ollama_host: str = field(default=DEFAULT_OLLAMA_HOST, metadata=_check(_http_url))
    keep_versions: int = field(default=3, metadata=_range(1, 1000))
    auto_approve: bool = False
    approval_timeout_seconds: float = field(default=300.0, metadata=_range(1, 604800))
    temperature: float = field(default=0.2, metadata=_range(0, 5))
    # "adapter": GGUF LoRA on the base; "fused": full GGUF with the adapter merged, quantized
    # (forged.worker.judge.export.export_fused); "auto": adapter where the Ollama server still
    # accepts adapters (before 0.34.1), fused where it does not (docs/publishing.md)
    export: str = field(default="auto", metadata=_check(_one_of("auto", "adapter", "fused")))
    # precision of a fused version: "auto" = closest to the base's own, never below 8-bit
    # for bases under 1B parameters
    quantize: str = field(default="auto", metadata=_check(_one_of("auto", "q8_0", "q4_K_M", "f16")))
    # Ollama keep_alive for the warm-up load of a new :latest
    keep_alive: str = field(default="30m", metadata=_check(_duration))


@dataclass
class GatesConfig:
    idle: bool = True
    min_idle_minutes: float = field(default=10.0, metadata=_range(0, 1440))
    power: bool = True
    memory: bool = True
    memory_headroom_mb: int = field(default=1024, metadata=_range(0, 10**7))
    max_memory_pressure: float = field(default=10.0, metadata=_range(0, 100))  # Linux PSI some avg10, %
    thermal: bool = True
    disk: bool = True
    min_free_disk_gb: float = field(default=2.0, metadata=_range(0, 1e9))
    quiet_hours: list[str] = field(default_factory=list, metadata=_check(_hhmm_range))
    poll_seconds: float = field(default=5.0, metadata=_range(0.1, 3600))


@dataclass
class Config:
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    watch: WatchConfig = field(default_factory=WatchConfig)
    thresholds: ThresholdConfig = field(default_factory=ThresholdConfig)
    mine: MineConfig = field(default_factory=MineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    gates: GatesConfig = field(default_factory=GatesConfig)
    repos: list[RepoConfig] = field(default_factory=list)
    source: Path | None = field(default=None, metadata={"internal": True})


def _type_name(t: Any) -> str:
    return getattr(t, "__name__", str(t))


def _build(cls: type, data: Any, keypath: str, locate: typing.Callable[[str], str]) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{locate(keypath)}{keypath}: expected a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        kp = f"{keypath}.{key}" if keypath else key
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{locate(kp)}{kp}: unknown key (known: {known})")
        f = fields[key]
        kwargs[key] = _coerce(hints[key], value, kp, locate)
        check = f.metadata.get("check")
        if check is not None and (problem := check(kwargs[key])):
            raise ConfigError(f"{locate(kp)}{kp}: {problem} (got {value!r})")
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{locate(keypath)}{keypath}: missing required key {missing[0]!r}")
    return cls(**kwargs)


def _coerce(t: Any, value: Any, kp: str, locate: typing.Callable[[str], str]) -> Any:
    origin = typing.get_origin(t)
    if dataclasses.is_dataclass(t):
        return _build(t, value, kp, locate)
    if origin is list:
        (item_t,) = typing.get_args(t)
        if not isinstance(value, list):
            raise ConfigError(f"{locate(kp)}{kp}: expected a list, got {type(value).__name__}")
        return [_coerce(item_t, v, f"{kp}[{i}]", locate) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        return value
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        # TOML writes 2 for 2.0; accept ints where floats are asked for.
        float: isinstance(value, int | float) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(t, True)
    if not ok:
        raise ConfigError(
            f"{locate(kp)}{kp}: expected {_type_name(t)}, got {type(value).__name__} {value!r}"
        )
    if t is float and not math.isfinite(value):
        raise ConfigError(f"{locate(kp)}{kp}: must be a finite number (got {value!r})")
    return float(value) if t is float else value


def _locator(path: Path | None, text: str) -> typing.Callable[[str], str]:
    """Best-effort 'file:line: ' for a key path (tomllib keeps no positions)."""
    if path is None:
        return lambda kp: ""
    lines = text.splitlines()

    def locate(kp: str) -> str:
        parts = re.findall(r"([A-Za-z_][\w-]*)(?:\[(\d+)\])?", kp)
        if not parts:
            return f"{path}: "
        start = 0
        # Walk to the table header of the leading parts, honouring [[array]] indexes (the
        # key itself first: an unknown or mistyped table is named by its own header).
        for depth in range(len(parts), 0, -1):
            header = ".".join(p for p, _ in parts[:depth])
            idx = int(parts[depth - 1][1]) if parts[depth - 1][1] else None
            pat = re.compile(rf"^\s*\[\[?\s*{re.escape(header)}\s*\]\]?\s*(#.*)?$")
            hits = [i for i, line in enumerate(lines) if pat.match(line)]
            if hits:
                start = hits[idx] if idx is not None and idx < len(hits) else hits[0]
                if depth == len(parts):
                    return f"{path}:{start + 1}: "
                break
        leaf = parts[-1][0]
        pat = re.compile(rf"^\s*{re.escape(leaf)}\s*=")
        for i in range(start, len(lines)):
            if pat.match(lines[i]):
                return f"{path}:{i + 1}: "
            if i > start and lines[i].lstrip().startswith("["):
                break
        return f"{path}:{start + 1}: " if start else f"{path}: "

    return locate


def parse(text: str, source: Path | None = None, check_paths: bool = True) -> Config:
    locate = _locator(source, text)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source or '<config>'}: not valid TOML: {e}") from None
    cfg = _build(Config, data, "", locate)
    cfg.source = source
    base = cfg.train.base_model.strip()
    if check_paths and not base.startswith(("bundled:", "ollama:")):
        p = Path(base).expanduser()
        if not (p.is_dir() or (p.is_file() and p.suffix == ".gguf")):
            raise ConfigError(f"{locate('train.base_model')}train.base_model: {base!r} does not resolve: "
                              "not a .gguf file or a directory (or use 'bundled:...' / 'ollama:NAME')")
    seen: dict[str, int] = {}
    for i, repo in enumerate(cfg.repos):
        kp = f"repos[{i}]"
        p = Path(repo.path).expanduser()
        if re.search(r"[\x00-\x1f\x7f]", repo.path):
            raise ConfigError(f"{locate(kp + '.path')}{kp}.path: a path with a newline or other control "
                              "character cannot be watched")
        if check_paths and not p.is_dir():
            raise ConfigError(f"{locate(kp + '.path')}{kp}.path: directory does not exist ({repo.path})")
        repo.name = repo.name or default_repo_name(p)
        if not TAG_SAFE.match(repo.name):
            raise ConfigError(
                f"{locate(kp + '.name')}{kp}.name: {repo.name!r} is not usable in an Ollama tag "
                "(lowercase letters, digits, '.', '_', '-'; at most 64)"
            )
        if repo.name in seen:
            raise ConfigError(f"{locate(kp + '.name')}{kp}.name: {repo.name!r} already used by repos[{seen[repo.name]}]")
        seen[repo.name] = i
    return cfg


def default_repo_name(path: Path) -> str:
    name = re.sub(r"[^a-z0-9._-]+", "-", path.resolve().name.lower()).strip("-._")
    return (name or "repo")[:64]


def from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from :func:`to_dict` output (the worker gets its config this way)."""
    return _build(Config, data, "", lambda kp: "")


def load(path: Path, check_paths: bool = True) -> Config:
    """Load a config file; a missing file means all defaults."""
    if not path.exists():
        cfg = Config()
        cfg.source = None
        return cfg
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    return parse(text, path, check_paths=check_paths)


def to_dict(cfg: Config) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d.pop("source", None)
    return d
