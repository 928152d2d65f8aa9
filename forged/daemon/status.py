"""What ``forgectl status`` shows of a repo: read from the store, never written.

Pure functions of the store, the config, the running worker and the repo's watcher,
so status can be tested without a scheduler.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from sqlite3 import Row
from typing import Any

from forged.common import config
from forged.common.judged import judge_text
from forged.common.protocol import Stage
from forged.daemon.errors import NotFound
from forged.daemon.store import State


def _stage(repo: Row, cyc: Row | None, awaiting: Row | None, failure: str | None) -> str:
    if repo["missing"]:
        return "missing"
    if cyc is not None:
        return str(cyc["stage"])
    if awaiting is not None:
        return Stage.AWAITING_APPROVAL.value
    return "failing" if failure else "watching"


def _cycle_info(cyc: Row, worker: Any) -> dict[str, Any]:
    metrics = json.loads(cyc["metrics"] or "{}")
    return {
        "id": cyc["id"], "stage": cyc["stage"], "reason": cyc["reason"], "attempts": cyc["attempts"],
        "retry_at": cyc["retry_at"], "forced": bool(cyc["forced"]), "version": cyc["version"],
        "progress": worker.progress if worker is not None and worker.cycle_id == cyc["id"] else None,
        "manual_command": metrics.get("manual_command") if cyc["stage"] == Stage.READY_TO_PUBLISH else None,
        "warnings": metrics.get("warnings") or [],
    }


def _judge_lines(cyc: Row | None) -> list[str]:
    """The cycle's judged metrics, each with n and its 95% interval ([] before the judge ran)."""
    if cyc is None:
        return []
    try:
        metrics = json.loads(cyc["metrics"] or "{}")
    except ValueError:
        return []
    return judge_text(metrics.get("judge")) if isinstance(metrics, dict) else []


def _progress(acc: dict[str, Any], thresholds: config.ThresholdConfig) -> dict[str, Any]:
    return {
        "text": acc.get("progress"), "due": acc.get("due", False),
        "lines": acc.get("lines_changed"), "min_lines": thresholds.min_changed_lines,
        "commits": acc.get("commits"), "min_commits": thresholds.min_commits,
        "uncommitted_lines": acc.get("uncommitted_lines"), "diverged": acc.get("diverged", False),
        "deferred": acc.get("deferred"),
    }


def repo_status(store: State, cfg: config.Config, repo: Row, worker: Any = None, watcher: Any = None,
                failure: str | None = None) -> dict[str, Any]:
    """One repo: its stage, change accounting, live version, pending approval, cycles.

    ``failure``: why its watcher or change accounting fails (stage "failing"), or None."""
    from forged.daemon.publish import tag_for

    name, rid = str(repo["name"]), int(repo["id"])
    cyc = store.open_cycle(rid)
    awaiting = store.pending_approval(rid)
    last = store.last_cycle(rid)
    live = repo["live_version"]
    return {
        "name": name, "path": repo["path"], "branch": repo["branch"], "missing": bool(repo["missing"]),
        "watch": {"active": watcher is not None, "passes": getattr(watcher, "passes", 0),
                  "events": (getattr(watcher, "stats", None) or {}).get("events", 0),
                  "accounted_at": repo["accounted_at"]},
        "stage": _stage(repo, cyc, awaiting, failure),
        "failure": failure,
        "progress": _progress(json.loads(repo["accounting"] or "{}"), cfg.thresholds),
        "live_version": live,
        "live_tag": tag_for(name, "latest") if live else None,
        "forward": (forward_trend(store.versions(rid)) or [None])[-1],  # the latest version measured
        "pending_approval": {"version": awaiting["version"], "cycle_id": awaiting["cycle_id"],
                             "tag": tag_for(name, int(awaiting["version"])),
                             "judge": _judge_lines(store.awaiting_cycle(rid))} if awaiting else None,
        "cycle": _cycle_info(cyc, worker) if cyc is not None else None,
        "last_cycle": {"id": last["id"], "stage": last["stage"], "reason": last["reason"],
                       "finished_at": last["finished_at"], "judge": _judge_lines(last)} if last is not None else None,
    }


def repo_detail(store: State, cfg: config.Config, repo: Row, worker: Any = None,
                watcher: Any = None, failure: str | None = None) -> dict[str, Any]:
    """:func:`repo_status` plus the last ten cycles and every model version."""
    out = repo_status(store, cfg, repo, worker, watcher, failure)
    out["cycles"] = [{**dict(c), "metrics": json.loads(c["metrics"]) if c["metrics"] else None}
                     for c in store.recent_cycles(int(repo["id"]), 10)]
    out["versions"] = store.versions(int(repo["id"]))
    out["forward"] = forward_trend(out["versions"])
    return out


FORWARD_KEYS = ("version", "cycle_id", "gain", "lo", "hi", "n_files", "n_bytes", "base_bpb", "live_bpb",
                "since", "head")


def forward_trend(versions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each version's forward gain (measured at the cycle after it went live), oldest first."""
    return [{k: v["forward"].get(k) for k in FORWARD_KEYS}
            for v in reversed(versions) if isinstance(v.get("forward"), dict)]


def report(store: State, repo: Row, cycle_dir: Callable[[str, int], Path]) -> dict[str, Any]:
    """Write the report of the repo's latest cycle into its directory."""
    from forged.daemon.report import write_report

    cyc = store.last_cycle(int(repo["id"]))
    if cyc is None:
        raise NotFound(f"{repo['name']!r} has no cycle yet")
    cdir = cycle_dir(repo["name"], int(cyc["id"]))
    cdir.mkdir(parents=True, exist_ok=True)
    path = write_report(cdir, repo["name"], dict(cyc), forward=forward_trend(store.versions(int(repo["id"]))))
    return {"path": str(path), "cycle_id": cyc["id"]}
