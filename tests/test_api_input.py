"""Bad input on the control socket: every request field type-checked, every malformed
request a 4xx with a JSON error, no traceback anywhere (issue 16)."""

from __future__ import annotations

import json
import random
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from forged.ctl import connect_unix
from tests.conftest import make_repo
from tests.daemon_proc import DaemonProc

QUIET = """
[gates]
poll_seconds = 0.5
[watch]
settle_seconds = 0.2
"""


@pytest.fixture
def daemon(short_tmp: Path) -> Iterator[DaemonProc]:
    d = DaemonProc(short_tmp / "h", QUIET).start()
    yield d
    if d.proc and d.proc.poll() is None:
        d.stop()


def raw_request(sock: Path, data: bytes, read: bool = True) -> bytes:
    s = connect_unix(str(sock), 10)  # waits its turn when the backlog is full
    try:
        s.sendall(data)
        if not read:
            return b""
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
        return reply
    except OSError:
        return b""
    finally:
        s.close()


def post(path: str, body: bytes) -> bytes:
    return b"POST %s HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (path.encode(), len(body), body)


def tracebacks(d: DaemonProc, out: str) -> list[str]:
    logs = "".join(p.read_text(errors="replace") for p in d.home.rglob("*.log"))
    return [t for t in (out, logs) if "Traceback" in t or "Error:" in t and "File \"" in t]


def test_force_must_be_a_json_boolean(daemon: DaemonProc, short_tmp: Path) -> None:
    make_repo(short_tmp / "r", {"a.py": "x = 1\n"})
    assert daemon.ctl("pause").returncode == 0
    assert daemon.ctl("repos", "add", str(short_tmp / "r")).returncode == 0
    for bad in ("no", 0, 1, None, [], "true"):
        code, err = daemon.request("POST", "/v1/repos/r/forge", {"force": bad})
        assert code == 400 and err["error"].startswith("force: must be a JSON boolean"), (bad, err)
    code, err = daemon.request("POST", "/v1/repos/r/forge", {"forse": True})
    assert code == 400 and err["error"].startswith("forse: unknown field"), err
    code, err = daemon.request("POST", "/v1/repos", {"path": str(short_tmp / "r"), "name": 7})
    assert code == 400 and err["error"].startswith("name: must be a string"), err
    code, err = daemon.request("POST", "/v1/repos", {"path": ["x"]})
    assert code == 400 and err["error"].startswith("path: must be a string"), err
    code, err = daemon.request("DELETE", "/v1/repos", {"name": {"a": 1}})
    assert code == 400 and err["error"].startswith("name: must be a string"), err
    code, detail = daemon.request("GET", "/v1/repos/r")
    assert code == 200 and not detail.get("cycles"), detail  # nothing was forced
    code, res = daemon.request("POST", "/v1/repos/r/forge", {"force": False})
    assert code == 200 and res["forced"] is False


def test_unbounded_input_gets_a_400_not_a_crash(daemon: DaemonProc) -> None:
    make = daemon.request
    code, err = make("POST", "/v1/pause", raw=b"[" * 100_000)
    assert code == 400, err
    code, err = make("POST", "/v1/pause", raw=b'{"a":' * 50 + b"1" + b"}" * 50)
    assert code == 400 and "nested" in err["error"], err
    code, err = make("POST", "/v1/repos/x/rollback", raw=b'{"version": 1%s}' % (b"0" * 5000))
    assert code == 400 and "body is not JSON" in err["error"], err
    code, err = make("POST", "/v1/repos/x/forge", raw=b'{"force": NaN}')
    assert code == 400, err
    code, err = make("GET", "/v1/events?after=" + "9" * 40)
    assert code == 400 and err["error"].startswith("after:"), err
    code, err = make("GET", "/v1/events?after=1&follow=maybe")
    assert code == 400 and err["error"].startswith("follow:"), err
    code, events = make("GET", "/v1/events?after=0&follow=0")
    assert code == 200


def test_rollback_version_is_checked_before_sqlite(daemon: DaemonProc, short_tmp: Path) -> None:
    make_repo(short_tmp / "r", {"a.py": "x = 1\n"})
    assert daemon.ctl("pause").returncode == 0
    assert daemon.ctl("repos", "add", str(short_tmp / "r")).returncode == 0
    for bad in (10**30, -1, 0, "v99999999999", 1.5, True, "latest"):
        code, err = daemon.request("POST", "/v1/repos/r/rollback", {"version": bad})
        assert code == 400 and err["error"].startswith("version:"), (bad, err)
    code, err = daemon.request("POST", "/v1/repos/r/rollback", {"version": "v3"})
    assert code == 409 and "not a published version" in err["error"], err


def malformed(n: int, seed: int) -> Iterator[bytes]:
    """``n`` requests a careless or hostile client might send, across every endpoint."""
    rng = random.Random(seed)
    paths = ["/v1/status", "/v1/repos", "/v1/repos/r", "/v1/repos/r/forge", "/v1/repos/r/approve",
             "/v1/repos/r/reject", "/v1/repos/r/rollback", "/v1/repos/r/report", "/v1/pause",
             "/v1/resume", "/v1/events?after=x", "/v1/events?after=" + "9" * 30, "/v1/nope"]
    keys = ["force", "version", "path", "name", "branch", "zzz"]
    values: list[bytes] = [b'"no"', b"1e999", b"-1", b"1" * 400, b"null", b"[]", b"{}", b'"\\ud800"',
                           b"NaN", b"Infinity", b'"' + b"x" * 5000 + b'"', b"9" * 30, b"tru"]
    for i in range(n):
        kind = i % 8
        path = rng.choice(paths)
        if kind == 0:
            body = b"[" * rng.randrange(1, 200_000)
        elif kind == 1:
            k = rng.choice(keys).encode()
            body = b'{"%s": %s}' % (k, rng.choice(values))
        elif kind == 2:
            body = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
        elif kind == 3:
            body = b'{"a":' * rng.randrange(33, 3000) + b"1" + b"}" * rng.randrange(0, 3000)
        elif kind == 4:
            body = json.dumps({rng.choice(keys): rng.choice([1.5, [1], {"x": None}, "", -(2**70)])}).encode()
        elif kind == 5:
            yield b"GET %s HTTP/1.1\r\n\r\n" % (path.replace("/v1", "/v1" + "/.." * rng.randrange(1, 3)).encode())
            continue
        elif kind == 6:
            yield b"DELETE /v1/repos HTTP/1.1\r\nContent-Length: 12\r\n\r\n" + b'{"name": 12}'
            continue
        else:
            body = b'{"force": "no", "version": ' + b"7" * rng.randrange(20, 40) + b"}"
        yield post(path, body)


def probe(d: DaemonProc, n: int, seed: int = 16) -> dict[int, int]:
    """Status → count; a status outside 400..499 is reported with its first request."""
    statuses: dict[int, int] = {}
    for data in malformed(n, seed):
        reply = raw_request(d.socket, data)
        code = int(reply.split()[1]) if reply.startswith(b"HTTP/1.") else 0
        statuses[code] = statuses.get(code, 0) + 1
        if not 400 <= code < 500 and statuses[code] == 1:
            print("unexpected", code, data[:200], reply[-300:])
    return statuses


def test_malformed_requests_get_only_4xx_and_leave_no_traceback(daemon: DaemonProc, short_tmp: Path) -> None:
    make_repo(short_tmp / "r", {"a.py": "x = 1\n"})
    assert daemon.ctl("pause").returncode == 0
    assert daemon.ctl("repos", "add", str(short_tmp / "r")).returncode == 0
    statuses = probe(daemon, 400)
    assert statuses and all(400 <= c < 500 for c in statuses), statuses
    # Clients that hang up before the reply: one log line each, not a traceback.
    for _ in range(50):
        raw_request(daemon.socket, b"GET /v1/status HTTP/1.1\r\n\r\n", read=False)
    code, st = daemon.request("GET", "/v1/status")
    assert code == 200
    out = daemon.stop()
    assert tracebacks(daemon, out) == []


def test_registration_refuses_what_it_cannot_watch(daemon: DaemonProc, short_tmp: Path) -> None:
    repo = make_repo(short_tmp / "r", {"a.py": "x = 1\n"})
    code, err = daemon.request("POST", "/v1/repos", {"path": str(repo), "branch": "nope"})
    assert code == 400 and err["error"].startswith("branch: ") and "'nope' does not exist" in err["error"], err
    odd = make_repo(short_tmp / "a\nb", {"a.py": "x = 1\n"})
    code, err = daemon.request("POST", "/v1/repos", {"path": str(odd)})
    assert code == 400 and "newline" in err["error"], err
    code, st = daemon.request("GET", "/v1/status")
    assert st["repos"] == []


def test_a_repo_whose_accounting_fails_shows_as_failing(daemon: DaemonProc, short_tmp: Path) -> None:
    from tests.conftest import git

    repo = make_repo(short_tmp / "r", {"a.py": "x = 1\n"})
    git(repo, "branch", "feature")
    assert daemon.ctl("pause").returncode == 0
    assert daemon.ctl("repos", "add", str(repo), "--branch", "feature").returncode == 0
    daemon.wait_for(lambda st: st["repos"][0]["watch"]["accounted_at"])
    assert daemon.request("GET", "/v1/status")[1]["repos"][0]["stage"] == "watching"
    git(repo, "branch", "-D", "feature")
    entry = daemon.wait_for(lambda st: st["repos"][0]["stage"] == "failing" and st["repos"][0])
    assert "branch 'feature' does not exist" in entry["failure"]
    out = daemon.ctl("status").stdout
    assert "failing" in out and "r: failing: cannot account changes:" in out, out
    git(repo, "branch", "feature")  # back: watching again
    daemon.wait_for(lambda st: st["repos"][0]["stage"] == "watching")
