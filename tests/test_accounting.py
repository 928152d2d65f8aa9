"""Change accounting against real git repositories built in temp dirs."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from forged.common.config import ThresholdConfig
from forged.daemon.accounting import RepoError, account, check_work_tree, git_state
from tests.gitrepo import ENV, GitRepo

CFG = ThresholdConfig(min_changed_lines=300, min_commits=10, max_age_days=7.0)


@pytest.fixture
def repo(tmp_path: Path) -> GitRepo:
    r = GitRepo(tmp_path / "r")
    r.lines("src/app.py", 50)
    r.write(".gitignore", "*.log\nout/\n")
    r.commit("initial")
    return r


# --- check_work_tree -------------------------------------------------------------------


def test_check_work_tree_accepts_top_and_subdir(repo: GitRepo) -> None:
    assert check_work_tree(repo.root) == repo.root.resolve()
    assert check_work_tree(repo.root / "src") == repo.root.resolve()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda t: t / "nope", "no such directory"),
        (lambda t: (t / "f.txt").write_text("x") and t / "f.txt", "not a directory"),
        (lambda t: (t / "plain").mkdir() or t / "plain", "not a git repository"),
    ],
)
def test_check_work_tree_rejects(tmp_path: Path, make, message: str) -> None:
    with pytest.raises(RepoError, match=message) as e:
        check_work_tree(make(tmp_path))
    assert "\n" not in str(e.value)


def test_check_work_tree_rejects_bare_and_git_dir(tmp_path: Path, repo: GitRepo) -> None:
    bare = tmp_path / "bare.git"
    subprocess.run(["git", "init", "-q", "--bare", str(bare)], check=True, env=ENV)
    with pytest.raises(RepoError, match="bare repository"):
        check_work_tree(bare)
    with pytest.raises(RepoError, match=r"inside a \.git directory"):
        check_work_tree(repo.root / ".git" / "refs")


def test_git_state(repo: GitRepo, tmp_path: Path) -> None:
    st = git_state(repo.root)
    assert st.head == repo.head() and st.branch == "main" and st.operation is None
    empty = GitRepo(tmp_path / "empty")
    assert git_state(empty.root).head is None
    (repo.root / ".git" / "index.lock").write_text("")
    assert git_state(repo.root).operation == "index.lock"


# --- thresholds ------------------------------------------------------------------------


def test_no_cursor_counts_whole_history(repo: GitRepo) -> None:
    a = account(repo.root, None, CFG)
    assert a.base is None and a.head == repo.head()
    assert (a.commits, a.files_changed, a.lines_changed) == (1, 1, 50)  # .gitignore isn't read
    assert not a.due and a.progress == "50 / 300 lines, 1 / 10 commits"
    assert a.last_commit_at is not None and abs(a.last_commit_at - time.time()) < 120


def test_empty_repo(tmp_path: Path) -> None:
    a = account(GitRepo(tmp_path / "e").root, None, CFG)
    assert a.head is None and not a.due and a.commits == 0


def test_uncommitted_edits_below_threshold_then_commits_over_it(repo: GitRepo) -> None:
    cursor = repo.head()
    repo.lines("src/big.py", 400)  # untracked
    repo.lines("src/app.py", 60, tag="y")  # 50 removed + 60 added
    a = account(repo.root, cursor, CFG)
    assert not a.due and a.lines_changed == 0 and a.commits == 0
    assert a.uncommitted_files == 2 and a.uncommitted_lines == 510
    assert "510 uncommitted lines not counted" in a.progress
    # Opting in counts them.
    a = account(repo.root, cursor, ThresholdConfig(count_uncommitted=True))
    assert a.due and a.due_reasons == ["510 changed lines >= 300"]
    repo.commit("work")
    a = account(repo.root, cursor, CFG)
    assert a.due and a.commits == 1 and a.files_changed == 2 and a.lines_changed == 510
    assert a.uncommitted_files == 0 and a.progress.startswith("510 / 300 lines, 1 / 10 commits")


def test_min_commits(repo: GitRepo) -> None:
    cursor = repo.head()
    for i in range(9):
        repo.write("src/app.py", f"v = {i}\n" + (repo.root / "src/app.py").read_text())
        repo.commit(f"c{i}")
    a = account(repo.root, cursor, CFG)
    assert (a.commits, a.lines_changed, a.due) == (9, 9, False)
    repo.write("src/other.py", "z = 1\n")
    repo.commit("tenth")
    a = account(repo.root, cursor, CFG)
    assert a.due and a.due_reasons == ["10 commits >= 10"]


def test_only_files_the_miner_reads_count(repo: GitRepo) -> None:
    cursor = repo.head()
    repo.lines("node_modules/lib/index.js", 500)
    repo.lines("vendor/x.go", 500)
    repo.lines("static/app.min.js", 500)
    repo.lines("package-lock.json", 500)
    repo.lines("data.csv", 500)
    repo.lines("logo.png", 5)
    repo.commit("noise")
    repo.write("debug.log", "x\n" * 1000)  # ignored: never reaches git
    (repo.root / "img.py").write_bytes(b"\0\1\2" * 100)
    repo.commit("binary")
    a = account(repo.root, cursor, CFG)
    assert a.commits == 1  # the binary .py commit; the noise commit touched nothing read
    assert a.lines_changed == 0 and not a.due


def test_rename_is_not_a_rewrite(repo: GitRepo) -> None:
    cursor = repo.head()
    repo.git("mv", "src/app.py", "src/main.py")
    repo.commit("rename")
    a = account(repo.root, cursor, CFG)
    assert a.commits == 1 and a.lines_changed == 0


def test_max_age(repo: GitRepo) -> None:
    cursor = repo.head()
    now = time.time()
    old = now - 8 * 86400
    a = account(repo.root, cursor, CFG, cursor_at=old, now=now)
    assert not a.due, "no change since the model: age alone is not enough"
    repo.write("src/app.py", "changed = 1\n")
    repo.commit("small")
    a = account(repo.root, cursor, CFG, cursor_at=old, now=now)
    assert a.due and a.due_reasons == ["live model 8.0 days old >= 7"]
    assert a.progress == "51 / 300 lines, 1 / 10 commits, 8.0 / 7 days"
    assert not account(repo.root, cursor, CFG, cursor_at=now - 86400, now=now).due


# --- history rewrites ------------------------------------------------------------------


def test_branch_switch_diffs_against_merge_base(repo: GitRepo) -> None:
    fork = repo.head()
    repo.git("checkout", "-q", "-b", "feature")
    repo.lines("src/feat.py", 20)
    repo.commit("feature work")
    repo.git("checkout", "-q", "main")
    repo.lines("src/main_only.py", 30)
    cursor = repo.commit("main work")  # the model was trained on main
    repo.git("checkout", "-q", "feature")
    a = account(repo.root, cursor, CFG)
    assert a.diverged and a.base == fork
    assert (a.commits, a.lines_changed) == (1, 20)
    assert "not an ancestor" in (a.note or "")
    # Registered branch main: accounted on main whatever is checked out.
    a = account(repo.root, cursor, CFG, branch="main")
    assert not a.diverged and a.head == cursor and a.commits == 0
    with pytest.raises(RepoError, match="branch 'gone' does not exist"):
        account(repo.root, cursor, CFG, branch="gone")


def test_amend(repo: GitRepo) -> None:
    parent = repo.head()
    repo.lines("src/a.py", 10)
    cursor = repo.commit("first try")
    repo.lines("src/a.py", 12)
    repo.git("add", "-A")
    repo.git("commit", "-q", "--amend", "-m", "second try")
    a = account(repo.root, cursor, CFG)
    assert a.diverged and a.base == parent
    assert (a.commits, a.lines_changed) == (1, 12)


def test_rebase(repo: GitRepo) -> None:
    repo.git("checkout", "-q", "-b", "topic")
    repo.lines("src/t.py", 40)
    cursor = repo.commit("topic")
    repo.git("checkout", "-q", "main")
    repo.lines("src/m.py", 7)
    main_tip = repo.commit("main moves")
    repo.git("checkout", "-q", "topic")
    repo.git("rebase", "-q", "main")
    a = account(repo.root, cursor, CFG)
    # Base is the old fork point: the rebased topic commit and main's commit are new.
    assert a.diverged and a.base != cursor
    assert (a.commits, a.lines_changed) == (2, 47)
    assert repo.git("merge-base", "--is-ancestor", main_tip, "HEAD", check=False) == ""


def test_cursor_garbage_collected(repo: GitRepo) -> None:
    a = account(repo.root, "0123456789abcdef0123456789abcdef01234567", CFG)
    assert a.diverged and a.base is None and a.lines_changed == 50
    assert "no longer exists" in (a.note or "")


def test_rebase_in_progress_defers(repo: GitRepo) -> None:
    repo.git("checkout", "-q", "-b", "topic")
    repo.write("src/app.py", "topic = 1\n")
    repo.commit("topic")
    repo.git("checkout", "-q", "main")
    repo.write("src/app.py", "main = 1\n")
    repo.commit("main")
    repo.git("checkout", "-q", "topic")
    repo.git("rebase", "main", check=False)  # conflicts: stops mid-rebase
    assert git_state(repo.root).operation == "rebase"
    a = account(repo.root, None, CFG)
    assert a.deferred == "rebase in progress" and not a.due
    repo.git("rebase", "--abort")
    assert account(repo.root, None, CFG).deferred is None


def test_account_does_not_touch_the_index(repo: GitRepo) -> None:
    """A plain `git diff` rewrites .git/index (stat refresh): the watcher would loop."""
    (repo.root / "src/app.py").touch()
    os.utime(repo.root / "src/app.py", (time.time() + 5, time.time() + 5))
    index = repo.root / ".git" / "index"
    before = index.stat().st_mtime_ns
    account(repo.root, None, CFG)
    assert index.stat().st_mtime_ns == before


def test_to_dict_is_json_ready(repo: GitRepo) -> None:
    import json

    d = account(repo.root, None, CFG).to_dict()
    assert json.loads(json.dumps(d))["progress"] == "50 / 300 lines, 1 / 10 commits"


def test_commit_made_while_the_daemon_was_down_is_seen_on_start(repo: GitRepo) -> None:
    """No watcher ran: the start-up reconcile (account from the stored cursor) finds it."""
    cursor = repo.head()
    stored = account(repo.root, cursor, CFG).to_dict()  # last pass before the daemon stopped
    repo.lines("src/offline.py", 301)
    repo.commit("while forged was down")
    a = account(repo.root, cursor, CFG)
    assert stored["due"] is False and a.due and a.head != stored["head"]
