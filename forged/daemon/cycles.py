"""A cycle's stage transitions, as a table over :class:`~forged.common.protocol.Stage`.

Heavy stages run in a worker subprocess (:data:`HEAVY`); the light ones after the judge
(publish, approve, promote) run in the daemon (:mod:`forged.daemon.releases`). A paused
or failed cycle resumes at its ``resume_stage``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from forged.common.protocol import Stage

MAX_ATTEMPTS = 5


@dataclass(frozen=True)
class HeavyStep:
    """One worker run: the stage it runs in, where a success leads, what it keeps."""

    worker: str  # ``forged worker <worker>``
    running: Stage  # the cycle's stage while it runs (and where it resumes)
    then: Stage  # the stage after a successful run (the judge may reject instead)
    keep: Callable[[dict[str, Any]], dict[str, Any]]  # result → the cycle's metrics


MINE = HeavyStep("mine", Stage.MINING, Stage.TRAINING, lambda r: {"dataset": r.get("manifest", {})})
def _keep_train(r: dict[str, Any]) -> dict[str, Any]:
    """The training result, and the live version's forward gain when one was measured."""
    return {"train": r.get("train", {}), **({"forward": r["forward"]} if r.get("forward") else {})}


TRAIN = HeavyStep("train", Stage.TRAINING, Stage.JUDGING, _keep_train)
JUDGE = HeavyStep("judge", Stage.JUDGING, Stage.PUBLISHING,
                  lambda r: {k: r.get(k) for k in ("judge", "export", "fidelity")})

HEAVY: dict[Stage, HeavyStep] = {Stage.DUE: MINE, Stage.MINING: MINE, Stage.TRAINING: TRAIN, Stage.JUDGING: JUDGE}
"""The heavy stages and the worker run each one needs."""

STEP_OF_WORKER = {s.worker: s for s in (MINE, TRAIN, JUDGE)}

LIGHT = (Stage.PUBLISHING, Stage.READY_TO_PUBLISH, Stage.PROMOTING)
"""Stages the daemon itself carries out (Ollama calls), retried at ``retry_at``."""

RESUMABLE = (Stage.PAUSED, Stage.FAILED)


def heavy_step(stage: str, resume_stage: str | None) -> HeavyStep | None:
    """The worker run a cycle in ``stage`` waits for, if any."""
    if stage in RESUMABLE:
        stage = resume_stage or Stage.DUE
    return HEAVY.get(Stage(stage)) if stage in HEAVY else None


def backoff(attempts: int, base: float = 30.0) -> float:
    return min(3600.0, base * 2 ** max(0, attempts - 1))


def retry_later(attempts: int, base: float) -> dict[str, Any]:
    """The cycle columns for one more failed attempt: counted, retried after a backoff."""
    return {"attempts": attempts, "retry_at": time.time() + backoff(attempts, base)}
