"""After the judge: publish a candidate to Ollama, ask for approval, promote, roll back, prune.

These stages run in the daemon (they are Ollama calls, not ML). A stage that cannot
reach Ollama stays where it is and is retried with a backoff. :class:`Releases` needs
no scheduler: the engine calls :meth:`Releases.run_due` from its tick.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from sqlite3 import Row
from typing import TYPE_CHECKING, Any

from forged.common import config, log
from forged.common.models import base_tag_name
from forged.common.protocol import Stage
from forged.daemon.cycles import LIGHT, retry_later
from forged.daemon.errors import Conflict, Invalid, Unavailable

if TYPE_CHECKING:
    from forged.daemon.publish import Publisher
from forged.daemon.store import State


class Releases:
    """Publishing, approval, promotion, rollback and pruning of one daemon's models.

    ``cycle_dir(repo, cycle_id)`` is where a cycle's files are; ``on_live(repo)`` runs
    (in a thread) after a promotion moved the repo's cursor. ``lock`` serialises these
    operations with the engine's own stage changes.
    """

    def __init__(self, cfg: config.Config, store: State, cycle_dir: Callable[[str, int], Path],
                 on_live: Callable[[str], None], lock: threading.RLock | None = None, *,
                 state_dir: Path) -> None:
        self.cfg = cfg
        self.state_dir = state_dir  # where the per-host memory of Ollama's answers lives
        self.store = store
        self.cycle_dir = cycle_dir
        self.on_live = on_live
        self.lock = lock or threading.RLock()
        self.log = log.get("forged.daemon.releases")
        self._asking: set[int] = set()

    def publisher(self, timeout: float = 60.0) -> Publisher:
        from forged.daemon.publish import HostMemory, Publisher

        gates = self.cfg.gates
        return Publisher(self.cfg.publish.ollama_host, keep_alive=self.cfg.publish.keep_alive, timeout=timeout,
                         memory=HostMemory(self.state_dir / "ollama_hosts.json"),
                         room_dirs=[self.state_dir],
                         room_margin=int(gates.min_free_disk_gb * 1e9) if gates.disk else 0)

    def adapters_hint(self) -> bool | None:
        """Whether the Ollama server creates adapter models (asked, or remembered when down)."""
        from forged.daemon.publish import OllamaUnavailable, PublishError

        pub = self.publisher(timeout=5.0)
        try:
            return pub.accepts_adapters()
        except (OllamaUnavailable, PublishError):
            return pub.memory.known(pub.host)
        finally:
            pub.close()

    def run_due(self, now: float) -> None:
        """Carry out every light stage whose (retry) time has come."""
        for cyc in self.store.cycles_in(LIGHT, now):
            with self.lock:
                fresh = self.store.cycle(int(cyc["id"]))
                if fresh is None or fresh["finished_at"] is not None or fresh["stage"] != cyc["stage"]:
                    continue
                if cyc["stage"] == Stage.PROMOTING:
                    self.promote(fresh)
                else:
                    self.publish(fresh)

    def _set_stage(self, cycle_id: int, stage: Stage, **fields: Any) -> None:
        self.store.set_stage(cycle_id, stage, **fields)
        self.log.info("stage", cycle=cycle_id, stage=stage, reason=fields.get("reason"))

    def _retry(self, cyc: Row, stage: Stage, error: Exception) -> None:
        self._set_stage(int(cyc["id"]), stage, reason=f"Ollama: {error}",
                             **retry_later(int(cyc["attempts"]) + 1, self.cfg.daemon.retry_seconds))

    # -- publish ----------------------------------------------------------------------
    def publish(self, cyc: Row) -> None:
        from forged.daemon.publish import (
            AdaptersRefused,
            NoRoom,
            OllamaUnavailable,
            PublishError,
            tag_for,
        )

        repo = self.store.repo_by_id(int(cyc["repo_id"]))
        assert repo is not None
        name, cid = str(repo["name"]), int(cyc["id"])
        judged = json.loads((self.cycle_dir(name, cid) / "judge.result.json").read_text())
        adapter_dir = self.cycle_dir(name, cid) / "train" / "adapter"
        version = cyc["version"]
        if version is None:
            version = self.store.add_candidate(cyc, lambda v: tag_for(name, v), str(adapter_dir))
        pub = self.publisher()
        try:
            made = self._create(pub, name, version, judged, adapter_dir)
        except AdaptersRefused as e:
            # Nothing else of this candidate to publish (export = "adapter", or its fused
            # model failed the fidelity check): waiting will not change Ollama's answer.
            self._set_stage(cid, Stage.REJECTED, reason=f"not published: {e}; the candidate has no checked "
                            "fused model ([publish] export = \"auto\" makes one)", finished=True)
            self.store.set_version_state(int(repo["id"]), version, "rejected")
            return
        except (OllamaUnavailable, PublishError, OSError) as e:
            # Commands to publish by hand only while Ollama is unreachable: one that answered
            # (refused, or out of room) would refuse them too. A stale set is cleared.
            unreachable = isinstance(e, OllamaUnavailable) and not isinstance(e, NoRoom)
            self._store_manual(pub, cid, name, version, judged if unreachable else None)
            self._retry(cyc, Stage.READY_TO_PUBLISH, e)
            self.log.warning("publish_waiting", repo=name, version=version, error=str(e))
            return
        finally:
            pub.close()
        self.store.record_published(int(repo["id"]), version, made.to_dict())
        if made.note:
            self.log.warning("adapter_refused", repo=name, version=version, note=made.note)
            self.store.merge_metrics(cid, {"publish_note": made.note})
        self.store.set_version_state(int(repo["id"]), version, "published")
        if self.cfg.publish.auto_approve:
            self.approve(cyc, via="auto_approve")
            return
        self._await_approval(repo, cyc, version)

    def _create(self, pub: Any, repo: str, version: int, judged: dict[str, Any], adapter_dir: Path) -> Any:
        """The candidate's Ollama tag, from the best export this server takes."""
        from forged.daemon.publish import publish_candidate, recorded_fim

        # An ollama:NAME base keeps its own template and parameters, plus a Suffix branch.
        serving = pub.serving(self.cfg.train.base_model, Path(judged["base_gguf"]), recorded_fim(adapter_dir))
        return publish_candidate(pub, repo, version, judged, mode=self.cfg.publish.export,
                                 base_name=base_tag_name(self.cfg.train.base_model),
                                 temperature=self.cfg.publish.temperature, serving=serving)

    def _store_manual(self, pub: Any, cycle_id: int, repo: str, version: int,
                      judged: dict[str, Any] | None) -> None:
        """The commands to publish by hand (None: none apply), stored before the stage changes:
        status shows them with that stage (a client polling between two writes saw
        ready_to_publish without them)."""
        from forged.daemon.publish import manual_for

        manual = None if judged is None else manual_for(
            judged, repo, version, mode=self.cfg.publish.export, adapters=pub.memory.known(pub.host),
            temperature=self.cfg.publish.temperature)
        self.store.merge_metrics(cycle_id, {"manual_command": manual})

    # -- approval ---------------------------------------------------------------------
    def _await_approval(self, repo: Row, cyc: Row, version: int) -> None:
        """A newer candidate supersedes an unanswered one; then the user is asked."""
        cid = int(cyc["id"])
        for old in self.store.other_awaiting_cycles(int(repo["id"]), cid):
            self._set_stage(int(old["id"]), Stage.SUPERSEDED, reason=f"superseded by v{version}", finished=True)
            self.store.answer_approval(int(old["id"]), "superseded")
        self.store.request_approval(int(repo["id"]), cid, version)
        self._set_stage(cid, Stage.AWAITING_APPROVAL, attempts=0, retry_at=None)
        self._ask_async(repo, cyc, version)

    def _ask_async(self, repo: Row, cyc: Row, version: int) -> None:
        from forged.daemon.approval import ask

        if int(cyc["id"]) in self._asking:
            return
        self._asking.add(int(cyc["id"]))
        req = approval_request(repo, cyc, version)

        def run() -> None:
            try:
                answer = ask(req, self.cfg.publish.approval_timeout_seconds)
                if answer in ("approve", "reject"):
                    self.answer(repo, answer, via="notification")
            except Exception:
                self.log.exception("approval_prompt_failed", repo=repo["name"])
            finally:
                self._asking.discard(int(cyc["id"]))

        threading.Thread(target=run, name="approval", daemon=True).start()

    def answer(self, repo: Row, answer: str, via: str) -> dict[str, Any]:
        with self.lock:
            cyc = self.store.awaiting_cycle(int(repo["id"]))
            if cyc is None:
                raise Conflict(f"nothing is awaiting approval for {repo['name']!r}")
            version = int(cyc["version"])
            if answer == "approve":
                self.approve(cyc, via=via)
                row = self.store.cycle(int(cyc["id"]))
                return {"approved": version, "stage": row["stage"] if row else None,
                        "reason": row["reason"] if row else None}
            self.store.reject(cyc, via)
            self._set_stage(int(cyc["id"]), Stage.REJECTED, reason=f"rejected by user ({via})", finished=True)
            return {"rejected": version}

    def approve(self, cyc: Row, via: str) -> None:
        self.store.answer_approval(int(cyc["id"]), "approved", via)
        self._set_stage(int(cyc["id"]), Stage.PROMOTING, reason=f"approved ({via})", retry_at=None, attempts=0)
        fresh = self.store.cycle(int(cyc["id"]))
        assert fresh is not None
        self.promote(fresh)

    # -- promote, prune, roll back ----------------------------------------------------------
    def promote(self, cyc: Row) -> None:
        from forged.daemon.publish import OllamaUnavailable, PublishError, tag_for

        repo = self.store.repo_by_id(int(cyc["repo_id"]))
        assert repo is not None
        version = int(cyc["version"])
        try:
            with self.publisher() as pub:
                pub.promote(repo["name"], version, previous=repo["live_version"])
        except (OllamaUnavailable, PublishError, OSError) as e:
            self._retry(cyc, Stage.PROMOTING, e)
            return
        self.store.promote(int(repo["id"]), version, cyc["head_commit"])
        self._set_stage(int(cyc["id"]), Stage.LIVE, reason=f"{tag_for(repo['name'], 'latest')} = v{version}",
                             finished=True)
        self.prune(repo)
        threading.Thread(target=self.on_live, args=(repo["name"],), daemon=True).start()

    def prune(self, repo: Row) -> None:
        from forged.daemon.publish import keep_list

        repo_id = int(repo["id"])
        versions = self.store.published_versions(repo_id)
        live = self.store.repo_by_id(repo_id)["live_version"]  # type: ignore[index]
        # the version `forgectl rollback` would restore stays too, however few are kept
        previous = next((v for v in versions if live is not None and v < live), None)
        keep = keep_list(versions, self.cfg.publish.keep_versions, live, previous)
        try:
            with self.publisher() as pub:
                deleted = pub.prune(repo["name"], keep)
        except Exception as e:  # noqa: BLE001 (pruning is best-effort; retried next promotion)
            self.log.warning("prune_failed", repo=repo["name"], error=str(e))
            return
        if deleted:
            gone = [int(t.rsplit(":v", 1)[1]) for t in deleted]
            # a fused version is a whole model: say what pruning gave back
            self.log.info("pruned", repo=repo["name"], tags=deleted,
                          freed_bytes=self.store.published_size(repo_id, gone))
            self.store.mark_deleted(repo_id, keep)

    def rollback(self, repo: Row, version: Any = None) -> dict[str, Any]:
        from forged.daemon.publish import OllamaUnavailable, PublishError

        live = repo["live_version"]
        if version is None:
            version = self.store.previous_published(int(repo["id"]), live or 0)
            if version is None:
                raise Conflict(f"no earlier published version of {repo['name']!r} to roll back to")
        try:
            version = int(str(version).lstrip("v"))
        except ValueError:
            raise Invalid(f"version: {version!r} is not a version number") from None
        target = self.store.model_version(int(repo["id"]), version)
        if target is None or target["state"] not in ("published", "live"):
            raise Conflict(f"v{version} of {repo['name']!r} is not a published version")
        try:
            with self.publisher() as pub:
                pub.rollback(repo["name"], version)
        except (OllamaUnavailable, PublishError) as e:
            raise Unavailable(f"Ollama: {e}") from None
        self.store.rollback(repo, target)
        return {"live_version": version, "previous": live}



def approval_request(repo: Row, cyc: Row, version: int) -> Any:
    """What the approval prompt shows: the candidate's metric deltas against the live model
    (or the base when nothing is live yet)."""
    from forged.common.judged import judge_text, metric_lines, reference_name
    from forged.daemon.approval import ApprovalRequest
    from forged.daemon.publish import tag_for

    judge = json.loads(cyc["metrics"] or "{}").get("judge") or {}
    deltas = {m.key: round(m.candidate - m.reference, 4) for m in metric_lines(judge)}
    acc = json.loads(repo["accounting"] or "{}")
    return ApprovalRequest(repo=repo["name"], version=version, commits=int(acc.get("commits") or 0),
                           metric_deltas=deltas, tag=tag_for(repo["name"], version),
                           metric_lines=judge_text(judge), reference=reference_name(judge))
