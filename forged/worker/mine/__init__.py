"""The incremental miner: a repo at a commit → a versioned JSONL dataset.

Importing this package is cheap (no tree-sitter, no numpy): the daemon may import it
for the types; the work runs inside the worker subprocess through :func:`mine_repo`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forged.common.config import DEFAULT_OLLAMA_HOST, DEFAULT_SEQ_LEN
from forged.common.fim import FORGED_TEXT, FimFormat

if TYPE_CHECKING:
    from forged.common.config import MineConfig

# Appended only: stored lines record a kind by its index here.
KINDS = ("continuation", "fim", "doc_to_code", "code_to_doc", "raft", "commit_diff", "teacher")


@dataclass
class MineReport:
    """What one mine produced; ``manifest.json`` is :meth:`to_dict`."""

    repo: str
    commit: str
    changed_since: str | None
    chunker_version: str
    budget_tokens: int
    budget_nws_bytes: int
    files_total: int = 0  # tracked files at the commit
    files_mined: int = 0  # files that produced chunks
    files_parsed: int = 0  # parsed this run (cache misses)
    files_cached: int = 0  # served from the blob cache
    files_changed: int = 0  # changed since `changed_since` (all mined files when None)
    skipped: dict[str, int] = field(default_factory=dict)  # reason → files
    redactions: dict[str, int] = field(default_factory=dict)  # secret kind → replacements
    chunks: int = 0
    symbols: int = 0
    commits: int = 0
    examples: dict[str, int] = field(default_factory=dict)  # split → count
    by_kind: dict[str, dict[str, int]] = field(default_factory=dict)  # split → kind → count
    by_lang: dict[str, dict[str, int]] = field(default_factory=dict)  # split → lang → count
    chars: dict[str, int] = field(default_factory=dict)  # split → characters of text
    tokens_est: dict[str, int] = field(default_factory=dict)  # split → estimated tokens
    duplicates_removed: int = 0
    heldout_files: int = 0
    # The optional teacher (forged.worker.mine.teacher): {"status": "off"} unless [mine] teacher is
    # set; then model, status (ok | partial | unavailable), reason, and this mine's counts:
    # files_revisited, selected, cached, asked, accepted, rejected (reason → n), errors,
    # pending, redactions, seconds.
    teacher: dict[str, Any] = field(default_factory=dict)
    durations: dict[str, float] = field(default_factory=dict)  # stage → seconds
    out_dir: str = ""
    fim_format: dict[str, Any] = field(default_factory=dict)  # FimFormat.to_dict() of the base


    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mine_repo(repo: Path, out_dir: Path, cfg: MineConfig, cache_dir: Path, *, commit: str = "HEAD",
              changed_since: str | None = None,
              progress: Callable[[dict], None] | None = None, linked: bool = True,
              ollama_host: str = DEFAULT_OLLAMA_HOST,
              context_tokens: int = DEFAULT_SEQ_LEN, fim_format: FimFormat | None = None) -> MineReport:
    """Mine ``repo`` at ``commit`` into ``out_dir`` (train.jsonl, valid.jsonl, manifest.json).

    Only blobs missing from the cache under ``cache_dir`` are parsed. With ``linked`` (the
    default) the training split is written as links into the line store
    (:mod:`forged.worker.mine.linked`): read it with :func:`forged.worker.mine.linked.read_bytes`, or
    :func:`forged.worker.mine.linked.materialize` it into plain files. Raises
    :class:`forged.worker.mine.gitio.GitError` (a one-line message) for a bad repo or commit.

    ``ollama_host`` (``[publish] ollama_host``) is used only when ``cfg.teacher`` names a
    model; the mine completes whether or not the teacher answers (see ``rep.teacher``).
    ``context_tokens`` (``[train] seq_len``): RAFT examples are sized to fit it.
    ``fim_format``: the base's (:func:`forged.common.fim.for_base`); FIM examples are
    rendered in it, and it is recorded in the manifest for the trainer, judge and publish.
    """
    from forged.worker.mine.dataset import run

    return run(Path(repo), Path(out_dir), cfg, Path(cache_dir), commit=commit,
               changed_since=changed_since, progress=progress, linked=linked,
               ollama_host=ollama_host, context_tokens=context_tokens,
               fim_format=fim_format or FORGED_TEXT)


__all__ = ["KINDS", "MineReport", "mine_repo"]
