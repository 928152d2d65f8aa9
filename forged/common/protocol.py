"""What the daemon and its worker subprocess say to each other.

The daemon starts ``forged worker STAGE --cycle-dir DIR`` and reads JSON lines from its
stdout: one :class:`StartedEvent`, any number of :class:`ProgressEvent`, then one
:class:`ResultEvent` or :class:`ErrorEvent`. The exit code says how it ended. A cycle's
stages (:class:`Stage`) are stored in SQLite as their string values.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal, NotRequired, TypedDict

EXIT_OK, EXIT_FAILED, EXIT_STOPPED = 0, 1, 3
"""Worker exit codes: done; failed (an error event says why); stopped on request
(training checkpointed, mining and judging rerun from the start)."""

WORKER_STAGES = ("mine", "train", "judge")
"""The heavy stages a worker runs: ``forged worker mine|train|judge``."""


class Stage(StrEnum):
    """Where a cycle stands (the ``cycles.stage`` column)."""

    DUE = "due"
    MINING = "mining"
    TRAINING = "training"
    JUDGING = "judging"
    PUBLISHING = "publishing"
    READY_TO_PUBLISH = "ready_to_publish"  # Ollama unreachable: retried, a manual command shown
    AWAITING_APPROVAL = "awaiting_approval"
    PROMOTING = "promoting"
    LIVE = "live"
    PAUSED = "paused"  # a gate closed or the user paused: resumes at resume_stage
    FAILED = "failed"  # retried at retry_at from resume_stage until attempts run out
    REJECTED = "rejected"
    SUPERSEDED = "superseded"


class StartedEvent(TypedDict):
    event: Literal["started"]
    ts: float
    stage: str
    pid: int


class ProgressEvent(TypedDict):
    """A stage's progress. ``kind`` is the stage's own name for it: ``step`` (many a
    second), ``warning`` (something the user should know), or a milestone."""

    event: Literal["progress"]
    ts: float
    kind: NotRequired[str]
    stage: NotRequired[str]
    text: NotRequired[str]
    message: NotRequired[str]


class ResultEvent(TypedDict, total=False):
    """The stage's result (also written to ``<stage>.result.json``)."""

    event: Literal["result"]
    ts: float
    manifest: dict[str, Any]  # mine
    train: dict[str, Any]  # train
    stopped: bool  # train: checkpointed on request
    forward: dict[str, Any] | None  # train: the live version's forward gain (judge/forward.py)
    judge: dict[str, Any]  # judge, and the export it checked
    passed: bool
    export: dict[str, Any]
    export_error: str
    fidelity: dict[str, Any]
    base_gguf: str


class ErrorEvent(TypedDict):
    event: Literal["error"]
    ts: float
    message: str
    traceback: NotRequired[str]


EventName = Literal["started", "progress", "result", "error"]
WorkerEvent = StartedEvent | ProgressEvent | ResultEvent | ErrorEvent


def usable_export(entry: dict[str, Any]) -> bool:
    """Whether a judge result's export (``exports[kind]``) may be published: a file was
    kept and its llama.cpp check passed (results from before the check carry none)."""
    return bool(entry.get("path")) and bool((entry.get("fidelity") or {}).get("passed", True))
