"""Ask the user whether a judged candidate may go live.

Runs inside the daemon: standard library only. The daemon has no app bundle and no
window, so it asks through the tools every desktop already has:

- macOS: ``osascript`` — ``display notification`` (no buttons, but lands in Notification
  Center) and then ``display dialog … buttons {"Reject", "Later", "Approve"} giving up
  after N``, which prints ``button returned:Approve, gave up:false``.
  (``UNUserNotificationCenter`` would need a signed bundle.)
- Linux: ``notify-send --action=… --wait`` (libnotify ≥ 0.7.9) prints the chosen
  action's key; only when a notification server is on the session bus.

Whatever the answer, ``forgectl approve|reject REPO`` works too: ``ask`` returning None
means "no answer here", not "rejected". Persisting the decision is the caller's job.

All process spawning goes through one seam, ``run(cmd) -> (returncode, stdout)``, so
tests feed it the real output formats.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from forged.daemon.publish import tag_for

Runner = Callable[[list[str]], tuple[int, str]]
Answer = str | None  # "approve" | "reject" | "later" | None

BUTTONS = ("Reject", "Later", "Approve")  # macOS puts the last (default) one rightmost
_ANSWERS = {"approve", "reject", "later"}


@dataclass
class ApprovalRequest:
    """What the user is asked about: a judged candidate version of one repo's model."""

    repo: str
    version: int
    commits: int  # commits since the live model was trained
    metric_deltas: dict[str, float] = field(default_factory=dict)  # candidate − live
    tag: str = ""  # forged/<repo>:v<N>; filled in when empty
    # Each metric with its n and 95% interval (forged.common.judged.judge_text); shown
    # instead of the bare deltas when present, so a noisy change reads as one.
    metric_lines: list[str] = field(default_factory=list)
    reference: str = "live"  # what the candidate was compared with: live, or base before any

    def __post_init__(self) -> None:
        if not self.tag:
            self.tag = tag_for(self.repo, self.version)


def _fmt_delta(name: str, value: float) -> str:
    # Enough digits for bits/byte changes in the third decimal; a real minus sign.
    text = f"{value:+.4f}".rstrip("0").rstrip(".")
    return f"{name} {text.replace('-', '−')}"


def title(req: ApprovalRequest) -> str:
    return f"forged: new model for {req.repo}"


def describe(req: ApprovalRequest) -> str:
    """The body of the question: version, commits since the live model, metric deltas."""
    commits = f"{req.commits} commit{'s' if req.commits != 1 else ''} since the live model"
    lines = [f"{req.tag} is ready ({commits})."]
    if req.metric_lines:
        lines.append(f"vs {req.reference}:")
        lines += [f"  {m}" for m in req.metric_lines]
    elif req.metric_deltas:
        lines.append(f"vs {req.reference}: "
                     + ", ".join(_fmt_delta(k, v) for k, v in sorted(req.metric_deltas.items())))
    lines.append(f"Approve to make it {tag_for(req.repo, 'latest')} "
                 f"(or later: forgectl approve|reject {req.repo}).")
    return "\n".join(lines)


def _applescript_string(s: str) -> str:
    """An AppleScript string literal (backslash and quote escaped, newlines as \\n)."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _default_runner(timeout: float) -> Runner:
    def run(cmd: list[str]) -> tuple[int, str]:
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        except FileNotFoundError:
            return 127, ""
        except subprocess.TimeoutExpired:
            return 124, ""
        return p.returncode, p.stdout

    return run


def has_notification_server(env: Mapping[str, str]) -> bool:
    """A session bus to reach a notification server (a headless box has none)."""
    if env.get("DBUS_SESSION_BUS_ADDRESS"):
        return True
    runtime = env.get("XDG_RUNTIME_DIR")
    return bool(runtime) and os.path.exists(os.path.join(runtime, "bus"))


def parse_dialog(stdout: str) -> Answer:
    """``button returned:Approve, gave up:false`` → "approve"; gave up → None."""
    if re.search(r"gave up:\s*true", stdout):
        return None
    m = re.search(r"button returned:\s*([^,\n]*)", stdout)
    answer = m.group(1).strip().lower() if m else ""
    return answer if answer in _ANSWERS else None


def _ask_macos(req: ApprovalRequest, timeout: float, run: Runner) -> Answer:
    body = describe(req)
    run(["osascript", "-e",
         f"display notification {_applescript_string(body.splitlines()[0])} "
         f"with title {_applescript_string(title(req))}"])
    buttons = "{" + ", ".join(_applescript_string(b) for b in BUTTONS) + "}"
    rc, out = run(["osascript", "-e",
                   f"display dialog {_applescript_string(body)} with title {_applescript_string(title(req))} "
                   f"buttons {buttons} default button {_applescript_string('Approve')} "
                   f"giving up after {max(1, int(timeout))}"])
    # rc != 0: no GUI session (e.g. over ssh), or the dialog was dismissed with an error.
    return parse_dialog(out) if rc == 0 else None


def _ask_linux(req: ApprovalRequest, timeout: float, run: Runner, env: Mapping[str, str]) -> Answer:
    if not has_notification_server(env):
        return None
    base = ["notify-send", "--app-name=forged", f"--expire-time={int(timeout * 1000)}"]
    rc, out = run([*base, "--wait",
                   "--action=approve=Approve", "--action=reject=Reject", "--action=later=Later",
                   title(req), describe(req)])
    if rc == 0:
        answer = out.strip().splitlines()[-1].strip().lower() if out.strip() else ""
        return answer if answer in _ANSWERS else None  # closed or expired: no answer
    if rc not in (124, 127):
        # An old notify-send without --action/--wait: still tell the user, ask nothing.
        run([*base, title(req), describe(req)])
    return None


def ask(
    req: ApprovalRequest,
    timeout: float,
    *,
    run: Runner | None = None,
    platform: str = sys.platform,
    env: Mapping[str, str] | None = None,
) -> Answer:
    """Ask once, blocking up to ``timeout`` seconds (call it from a worker thread).

    Returns "approve", "reject", "later", or None when there is no way to ask here or
    the question went unanswered; the candidate then waits for ``forgectl approve``.
    """
    run = run or _default_runner(timeout + 10)  # the tools give up first; this is a backstop
    if platform == "darwin":
        return _ask_macos(req, timeout, run)
    if platform.startswith("linux"):
        return _ask_linux(req, timeout, run, os.environ if env is None else env)
    return None


def notify(
    heading: str,
    body: str,
    *,
    run: Runner | None = None,
    platform: str = sys.platform,
    env: Mapping[str, str] | None = None,
) -> bool:
    """A plain notification (e.g. "v3 is live", "Ollama unreachable"). True if shown."""
    run = run or _default_runner(10)
    if platform == "darwin":
        rc, _ = run(["osascript", "-e",
                     f"display notification {_applescript_string(body)} with title {_applescript_string(heading)}"])
        return rc == 0
    if platform.startswith("linux") and has_notification_server(os.environ if env is None else env):
        rc, _ = run(["notify-send", "--app-name=forged", heading, body])
        return rc == 0
    return False
