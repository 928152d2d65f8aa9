"""Forward evaluation: did the live model help with the code written after it?

At the start of a cycle's training stage, before anything is trained, the base and the
live adapter score the code committed since the live model's training commit: the lines
added in ``git diff LIVE_COMMIT..HEAD`` to the files the miner reads, secrets redacted as
the miner redacts them. Neither model has seen that code, so the live model's relative
bits/byte gain over the base on it (``1 − live/base``, with a 95% paired bootstrap
interval over files) is what the user felt from that version: completions on the code
they wrote next. The daemon keeps it with the cycle and with the live version
(docs/judge-export.md, "Forward gain").

Each file's added lines are scored as one text, without the rest of the file as context
(the rest is code the live model trained on). The set is capped (:data:`MAX_FILES`,
:data:`MAX_FILE_BYTES`, :data:`MAX_BYTES`) so the two passes cost well under a minute on
a 135M model on two cores.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forged.common import filters

if TYPE_CHECKING:
    from forged.common.config import Config, MineConfig, TrainConfig

MAX_FILES = 48  # files scored; more changed files are sampled (stable order by path hash)
MAX_FILE_BYTES = 4096  # added bytes kept per file, cut at a line end
MAX_BYTES = 48_000  # added bytes in all
NLL_BATCH = 8  # texts per nll() call: the stop flag is checked between calls
RESULT_FILE = "forward.json"  # in the cycle directory: a resumed training stage scores once


@dataclass(frozen=True)
class ForwardFile:
    path: str
    text: str  # the lines added since the live commit, redacted, capped

    @property
    def n_bytes(self) -> int:
        return len(self.text.encode("utf-8"))


@dataclass
class ForwardSet:
    """The code committed since the live commit that the forward evaluation scores."""

    files: list[ForwardFile] = field(default_factory=list)
    changed: int = 0  # paths changed since the live commit
    skipped: Counter[str] = field(default_factory=Counter)  # why a changed path was left out


@dataclass(frozen=True)
class ForwardResult:
    """The live version's forward gain: ``gain = 1 − live_bpb/base_bpb`` on ``n_files``."""

    version: int | None  # the live version measured
    since: str  # its training commit
    head: str
    n_files: int
    n_bytes: int
    base_bpb: float
    live_bpb: float
    gain: float
    lo: float  # 95% paired bootstrap interval of the gain, resampling files
    hi: float
    changed: int
    skipped: dict[str, int]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _order(paths: list[str]) -> list[str]:
    """A stable order that spreads a capped sample over the tree (not one directory)."""
    return sorted(paths, key=lambda p: hashlib.sha1(p.encode("utf-8", "surrogateescape")).hexdigest())


def added_lines(repo: Path, since: str, head: str, path: str) -> str:
    """The lines ``since..head`` added to ``path``, in order (hunk headers and removals dropped)."""
    from forged.worker.mine.gitio import git

    out = git(repo, "diff", "-U0", "--no-color", "--no-ext-diff", "--no-renames", since, head, "--", path)
    lines, in_hunk = [], False
    for line in out.decode("utf-8", "replace").splitlines(keepends=True):
        if line.startswith("@@"):
            in_hunk = True
        elif in_hunk and line.startswith("+"):
            lines.append(line[1:])
    return "".join(lines)


def _capped(text: str, limit: int) -> str:
    """At most ``limit`` UTF-8 bytes of ``text``, cut at a line end where there is one."""
    raw = text.encode("utf-8")
    if len(raw) <= limit:
        return text
    cut = raw[:limit].decode("utf-8", "ignore")
    return cut[: cut.rfind("\n") + 1] or cut


def forward_set(repo: Path, since: str, head: str, cfg: MineConfig, *, max_files: int = MAX_FILES,
                max_file_bytes: int = MAX_FILE_BYTES, max_bytes: int = MAX_BYTES) -> ForwardSet:
    """What was committed ``since..head`` to files the miner reads, redacted and capped.

    Files are left out as the miner leaves them out (by name, size and content); their
    added lines go through the miner's secret redaction."""
    from forged.worker.mine import gitio
    from forged.worker.mine.redact import redact

    out = ForwardSet()
    changes = gitio.changes(repo, since, head)
    out.changed = len(changes)
    wanted: dict[str, str] = {}
    for path, blob in changes.items():
        reason = "deleted" if blob is None else filters.skip_reason(path)
        if reason:
            out.skipped[reason] += 1
        else:
            wanted[path] = str(blob)
    sizes = gitio.blob_sizes(repo, wanted.values())
    for path in [p for p in wanted if sizes[wanted[p]] > cfg.max_file_bytes]:
        out.skipped["too_large"] += 1
        del wanted[path]
    order = _order(list(wanted))
    blobs = gitio.cat_blobs(repo, [wanted[p] for p in order])  # read lazily: stops at the cap
    total = 0
    for i, (path, (_, blob)) in enumerate(zip(order, blobs, strict=False)):
        if len(out.files) >= max_files or total >= max_bytes:
            out.skipped["over_cap"] += len(order) - i
            break
        text = _added(repo, since, head, path, blob, max_file_bytes, out.skipped)
        if text is not None:
            text = _capped(redact(text, path)[0], max_bytes - total)
            out.files.append(ForwardFile(path, text))
            total += len(text.encode("utf-8"))
    blobs.close()
    return out


def _added(repo: Path, since: str, head: str, path: str, blob: bytes, limit: int,
           skipped: Counter[str]) -> str | None:
    """A file's added lines (capped), or None, counted in ``skipped``, when the miner would
    not read its content (binary, generated, minified, LFS pointer) or only lines went."""
    from forged.worker.mine.dataset import content_skip

    reason = content_skip(blob) or _not_utf8(blob)
    text = "" if reason else _capped(added_lines(repo, since, head, path), limit)
    if not reason and not text.strip():
        reason = "nothing_added"
    if reason:
        skipped[reason] += 1
        return None
    return text


def _not_utf8(blob: bytes) -> str | None:
    try:
        blob.decode("utf-8")
    except UnicodeDecodeError:
        return "not_utf8"  # the miner skips these too
    return None


def _bpb(backend: Any, texts: list[str], stop: threading.Event | None) -> list[float] | None:
    """Bits per byte of each text under the backend's current adapter state; None if stopped."""
    nats: list[float] = []
    for i in range(0, len(texts), NLL_BATCH):
        if stop is not None and stop.is_set():
            return None
        nats += backend.nll(texts[i : i + NLL_BATCH])
    return [n / math.log(2) / max(len(t.encode("utf-8")), 1) for n, t in zip(nats, texts, strict=True)]


def score_forward(fs: ForwardSet, train_cfg: TrainConfig, live_adapter: Path, *, version: int | None,
                  since: str, head: str, stop: threading.Event | None = None) -> ForwardResult | None:
    """Score base and live adapter on ``fs`` (one model load: the base is the adapter disabled).

    None when there is nothing to score or a stop was asked for."""
    import gc

    from forged.worker.judge.stats import relative_gain
    from forged.worker.train import load_model

    if not fs.files:
        return None
    t0 = time.monotonic()
    texts = [f.text for f in fs.files]
    weights = [float(max(f.n_bytes, 1)) for f in fs.files]
    backend = load_model(train_cfg, live_adapter)
    backend.set_adapter_enabled(False)
    base = _bpb(backend, texts, stop)
    backend.set_adapter_enabled(True)
    live = _bpb(backend, texts, stop) if base is not None else None
    del backend
    gc.collect()
    if base is None or live is None:
        return None
    g = relative_gain(live, base, weights, seed=train_cfg.seed)
    wsum = sum(weights)
    return ForwardResult(
        version=version, since=since, head=head, n_files=len(texts), n_bytes=int(wsum),
        base_bpb=sum(b * w for b, w in zip(base, weights, strict=True)) / wsum,
        live_bpb=sum(v * w for v, w in zip(live, weights, strict=True)) / wsum,
        gain=g.value, lo=g.lo, hi=g.hi, changed=fs.changed, skipped=dict(fs.skipped),
        seconds=round(time.monotonic() - t0, 2))


def run_forward(cycle_dir: Path, job: dict[str, Any], cfg: Config, progress: Callable[[dict], None],
                stop: threading.Event | None = None) -> dict[str, Any] | None:
    """The training stage's forward evaluation of the live version (None: no live version,
    nothing new to score, or stopped). Kept in ``forward.json`` so a resumed stage reuses it."""
    from forged.worker.mine.gitio import GitError

    saved = cycle_dir / RESULT_FILE
    if saved.exists():
        return json.loads(saved.read_text()).get("forward")
    if not job.get("live_adapter") or not job.get("live_commit"):
        return None
    since, head = str(job["live_commit"]), str(job["head_commit"])
    progress({"event": "forward", "stage": "train", "text": "scoring the live model on the code written since it"})
    try:
        fs = forward_set(Path(job["repo_path"]), since, head, cfg.mine)
    except GitError as e:  # the live commit is gone (history rewritten): nothing to compare on
        progress({"event": "warning", "message": f"forward evaluation skipped: {e}"})
        return None
    result = score_forward(fs, cfg.train, Path(job["live_adapter"]), version=job.get("live_version"),
                           since=since, head=head, stop=stop)
    if stop is not None and stop.is_set():
        return None  # not kept: the resumed stage scores again
    out = result.to_dict() if result is not None else None
    saved.write_text(json.dumps({"forward": out}, indent=1))
    return out
