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


def test_the_question_shows_each_metric_with_n_and_interval() -> None:
    """What the user approves on: every metric with its paired 95% interval and n, vs the base
    before anything is live (built from the cycle's stored judge result)."""
    import json
    import sqlite3

    from forged.daemon.releases import approval_request

    judge = {"reference": "base", "base": {"bpb": 1.2544, "fim_bpb": 1.8008}, "live": None,
             "candidate": {"bpb": 1.1004, "fim_bpb": 1.5406, "n_texts": 24, "seconds": 3.0},
             "deltas": {"fim_bpb": {"candidate": 1.54, "reference": 1.8002, "diff": -0.2602,
                                    "lo": -0.2826, "hi": -0.2419, "n": 276}}}
    db = sqlite3.connect(":memory:")
    db.row_factory = sqlite3.Row
    repo = db.execute("SELECT 'click' AS name, ? AS accounting", (json.dumps({"commits": 4}),)).fetchone()
    cyc = db.execute("SELECT ? AS metrics", (json.dumps({"judge": judge}),)).fetchone()
    req = approval_request(repo, cyc, 3)
    text = approval.describe(req)
    assert "vs base:" in text
    assert "FIM-middle bpb 1.80→1.54 (−14.5%, 95% CI −15.7…−13.4%, n=276)" in text
    assert "bpb 1.25→1.10 (n=24, no interval stored)" in text
    assert set(req.metric_deltas) == {"bpb", "fim_bpb"}  # counts and timings are no metrics
