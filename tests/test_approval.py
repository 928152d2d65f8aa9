"""Approval prompts. osascript cannot run on Linux, so the one seam (``run``) is fed the
real output formats; notify-send is exercised the same way."""

from __future__ import annotations

import pytest

from forged.daemon import approval
from forged.daemon.approval import ApprovalRequest, ask

REQ = ApprovalRequest(repo="click", version=3, commits=12, metric_deltas={"bpb": -0.0123, "exact": 0.05})
BUS = {"DBUS_SESSION_BUS_ADDRESS": "unix:path=/run/user/1000/bus"}


class Fake:
    """Records commands; answers each with the next canned (rc, stdout)."""

    def __init__(self, *answers: tuple[int, str]) -> None:
        self.answers = list(answers)
        self.calls: list[list[str]] = []

    def __call__(self, cmd: list[str]) -> tuple[int, str]:
        self.calls.append(cmd)
        return self.answers.pop(0) if self.answers else (0, "")


@pytest.mark.parametrize(
    "stdout, expected",
    [
        ("button returned:Approve, gave up:false\n", "approve"),
        ("button returned:Reject, gave up:false\n", "reject"),
        ("button returned:Later, gave up:false\n", "later"),
        ("button returned:, gave up:true\n", None),
    ],
)
def test_macos_dialog_answers(stdout: str, expected: str | None) -> None:
    run = Fake((0, ""), (0, stdout))
    assert ask(REQ, 120, run=run, platform="darwin") == expected
    notification, dialog = run.calls
    assert notification[:2] == ["osascript", "-e"] and notification[2].startswith("display notification ")
    script = dialog[2]
    assert 'buttons {"Reject", "Later", "Approve"}' in script
    assert "giving up after 120" in script and 'default button "Approve"' in script
    # What changed: version, commits since the live model, metric deltas.
    assert "forged/click:v3" in script and "12 commits since the live model" in script
    assert "bpb −0.0123" in script and "exact +0.05" in script


def test_macos_no_gui_session_is_no_answer() -> None:
    run = Fake((1, ""), (1, ""))  # osascript fails without a window server
    assert ask(REQ, 5, run=run, platform="darwin") is None


def test_applescript_quoting_survives_hostile_repo_names() -> None:
    req = ApprovalRequest(repo='we"ird\\name', version=1, commits=1)
    run = Fake((0, ""), (0, "button returned:Approve, gave up:false"))
    ask(req, 5, run=run, platform="darwin")
    script = run.calls[1][2]
    assert 'we\\"ird\\\\name' in script and "\n" not in script


def test_linux_notify_send_actions() -> None:
    run = Fake((0, "approve\n"))
    assert ask(REQ, 60, run=run, platform="linux", env=BUS) == "approve"
    cmd = run.calls[0]
    assert cmd[0] == "notify-send" and "--wait" in cmd and "--expire-time=60000" in cmd
    assert {"--action=approve=Approve", "--action=reject=Reject", "--action=later=Later"} <= set(cmd)
    assert "forged/click:v3" in cmd[-1]


def test_linux_dismissed_or_expired_is_no_answer() -> None:
    assert ask(REQ, 60, run=Fake((0, "")), platform="linux", env=BUS) is None


def test_linux_old_notify_send_falls_back_to_plain_notification() -> None:
    run = Fake((1, ""), (0, ""))  # "Unknown option --action"
    assert ask(REQ, 60, run=run, platform="linux", env=BUS) is None
    assert len(run.calls) == 2 and "--wait" not in run.calls[1]


def test_linux_without_notification_server_asks_nothing() -> None:
    run = Fake()
    assert ask(REQ, 60, run=run, platform="linux", env={}) is None
    assert run.calls == []


def test_missing_tool_and_other_platforms() -> None:
    assert ask(REQ, 60, run=Fake((127, "")), platform="linux", env=BUS) is None
    assert ask(REQ, 60, run=Fake(), platform="win32") is None


def test_default_runner_reports_missing_program() -> None:
    run = approval._default_runner(5)
    assert run(["forged-no-such-program-xyz"]) == (127, "")
    assert run(["sh", "-c", "echo 'button returned:Later, gave up:false'"]) == (0, "button returned:Later, gave up:false\n")


def test_notify() -> None:
    run = Fake((0, ""))
    assert approval.notify("forged", "click v3 is live", run=run, platform="darwin")
    assert run.calls[0][2] == 'display notification "click v3 is live" with title "forged"'
    assert not approval.notify("forged", "x", run=Fake(), platform="linux", env={})


def test_describe_singular_and_no_metrics() -> None:
    text = approval.describe(ApprovalRequest(repo="r", version=2, commits=1))
    assert "1 commit since the live model" in text and "vs live" not in text
    assert "forgectl approve|reject r" in text
