"""``forged demo``: the main job on the embedded default, for a fresh checkout.

Runs the daemon in the foreground with this checkout registered and the bundled
SmolLM2-135M base, and starts a first forge cycle at once (gates ignored for that
one cycle, with a small time budget) so a newcomer sees mine → train → judge →
export → publish happen within minutes. The daemon keeps running afterwards, as it
would under launchd/systemd; Ctrl-C stops it cleanly.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

from forged.common import config, paths
from forged.daemon.main import LockHeld, configured_daemon

# A small budget: the first cycle should finish in ~10 minutes on a 2-core CPU.
DEMO_CONFIG = """\
# Written by `forged demo`: this checkout, the bundled base, a small first-cycle budget.
# Edit freely; `forged demo` will not overwrite it. All keys: config.toml at the repo root.
[train]
max_steps = 40
max_minutes = 5.0
seq_len = 256
batch_size = 4
learning_rate = 2e-4
warmup_steps = 4
checkpoint_every = 10

[mine]
heldout_fraction = 0.1
max_commits = 100

[judge]
max_examples = 24
max_generate = 8
max_raft = 4
max_rag = 24
max_fim_bpb = 128

[[repos]]
path = "{repo}"
name = "{name}"
"""

RESTING = ("ready_to_publish", "awaiting_approval", "live", "rejected", "failed", "paused")


def cycle_summary(status: dict, name: str, elapsed: float) -> str | None:
    """What the demo prints once ``name``'s first cycle rests (None while it runs): where
    it ended, the judge's metrics with n and intervals, and what to do next."""
    (r,) = [x for x in status["repos"] if x["name"] == name]
    last = r.get("last_cycle") or {}
    cyc = r.get("cycle") or {}
    stage = cyc.get("stage") or last.get("stage")
    if stage not in RESTING:
        return None
    lines = [f"forged demo: first cycle ended at '{stage}' after {elapsed:.0f}s"
             f" ({cyc.get('reason') or last.get('reason') or ''})"]
    judged = (r.get("pending_approval") or {}).get("judge") or last.get("judge") or []
    if judged:  # each metric with its n and the paired 95% interval, as status shows it
        lines += ["what the judge measured on held-out code (candidate vs the live model, or the base on a first cycle):",
                  *[f"  {line}" for line in judged]]
    if cyc.get("manual_command"):
        lines.append("Ollama did not answer; to publish by hand:\n" + cyc["manual_command"])
    if stage == "awaiting_approval":
        lines.append(f"approve it with: forgectl approve {name}")
    lines.append(f"report: forgectl report {name}  ·  the daemon keeps running (Ctrl-C stops it)")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="forged demo", description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, default=paths.checkout_root(), help="repo to forge (default: this checkout)")
    ap.add_argument("--exit-after-cycle", action="store_true", help="stop the daemon when the first cycle rests")
    args = ap.parse_args(argv)
    if args.repo is None:
        print("forged demo: not running from a checkout; pass --repo PATH", file=sys.stderr)
        return 2
    p = paths.resolve()
    p.ensure()
    repo = args.repo.resolve()
    name = config.default_repo_name(repo)
    if not p.config_file.exists():
        p.config_file.write_text(DEMO_CONFIG.format(repo=repo, name=name))
        print(f"forged demo: wrote {p.config_file}")
    d = configured_daemon(p, "forged demo")
    if d is None:
        return 1
    try:
        d.start()
    except (LockHeld, RuntimeError, OSError) as e:
        print(f"forged demo: {e}", file=sys.stderr)
        return 1
    assert d.state is not None and d.engine is not None
    row = d.state.repo(name)
    if row is None:
        print(f"forged demo: {name} is not registered in {p.config_file}", file=sys.stderr)
        d.stop()
        return 1
    started = time.time()
    res = d.engine.forge_now(row, force=True)
    print(f"forged demo: cycle {res['cycle_id']} for {name} started; follow it with "
          f"`FORGED_HOME={p.state_dir.parent} .venv/bin/forgectl watch`")

    def follow() -> None:
        while not d.stopping.is_set():
            text = cycle_summary(d.status(), name, time.time() - started)
            if text:
                print(text, flush=True)
                if args.exit_after_cycle:
                    d.stopping.set()
                return
            time.sleep(2)

    threading.Thread(target=follow, daemon=True).start()
    import signal

    def on_signal(signum: int, _frame: object) -> None:
        d.log.info("signal", signal=signal.Signals(signum).name)
        d.stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        d.wait()
    finally:
        d.stop()
    return 0
