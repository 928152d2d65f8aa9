"""The daemon spine, end to end through its real Unix socket."""

from __future__ import annotations

import json
import os
import plistlib
import shutil
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from forged.common import config, paths
from forged.daemon import service
from tests.conftest import QUIET, make_repo
from tests.daemon_proc import DaemonProc


def test_status_shape_and_permissions(daemon: DaemonProc, short_tmp: Path) -> None:
    code, st = daemon.request("GET", "/v1/status")
    assert code == 200
    assert set(st["daemon"]) >= {"pid", "version", "uptime"}
    assert st["daemon"]["pid"] == daemon.proc.pid
    assert isinstance(st["gates"], dict) and isinstance(st["repos"], list)
    assert stat.S_IMODE(daemon.socket.stat().st_mode) == 0o600
    assert stat.S_IMODE(daemon.socket.parent.stat().st_mode) == 0o700

    repo = make_repo(short_tmp / "My Repo", {"a.py": "def f():\n    return 1\n"})
    r = daemon.ctl("repos", "add", str(repo))
    assert r.returncode == 0, r.stderr
    code, st = daemon.request("GET", "/v1/status")
    (entry,) = st["repos"]
    assert entry["name"] == "my-repo"
    assert set(entry) >= {"name", "path", "stage", "progress", "live_version", "pending_approval"}
    # forgectl's table shows it too
    out = daemon.ctl("status")
    assert out.returncode == 0 and "my-repo" in out.stdout
    listed = daemon.ctl("repos", "list", "--json")  # JSON alone: a script parses it
    assert listed.returncode == 0 and [r["name"] for r in json.loads(listed.stdout)["repos"]] == ["my-repo"]


def test_bad_repo_paths_are_refused_with_clear_errors(daemon: DaemonProc, short_tmp: Path) -> None:
    plain = short_tmp / "plain"
    plain.mkdir()
    r = daemon.ctl("repos", "add", str(plain))
    assert r.returncode == 1 and "not a git" in r.stderr.lower()
    bare = short_tmp / "bare.git"
    subprocess.run(["git", "init", "-q", "--bare", str(bare)], check=True)
    r = daemon.ctl("repos", "add", str(bare))
    assert r.returncode == 1 and "bare" in r.stderr.lower()
    repo = make_repo(short_tmp / "ok", {"a.py": "x = 1\n"})
    assert daemon.ctl("repos", "add", str(repo), "--name", "Bad Name!").returncode == 1
    assert daemon.ctl("repos", "add", str(repo)).returncode == 0
    dup = daemon.ctl("repos", "add", str(repo))
    assert dup.returncode == 1 and "already" in dup.stderr
    assert daemon.ctl("repos", "remove", "ok").returncode == 0
    assert daemon.ctl("repos", "remove", "ok").returncode == 1


def test_other_uid_is_refused(daemon: DaemonProc) -> None:
    if os.getuid() != 0 or not shutil.which("setpriv") or not shutil.which("curl"):
        pytest.skip("needs root, setpriv and curl to act as another uid")
    # Open the directory and socket up so that only the peer-credential check stands
    # between user 'nobody' and the API.
    os.chmod(daemon.socket.parent, 0o755)
    os.chmod(daemon.home, 0o755)
    os.chmod(daemon.home.parent, 0o755)
    os.chmod(daemon.socket, 0o666)
    r = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "curl", "-s", "-o", "/dev/null",
         "-w", "%{http_code}", "--unix-socket", str(daemon.socket), "http://forged/v1/status"],
        capture_output=True, text=True, timeout=20)
    assert r.stdout == "403", (r.stdout, r.stderr)
    code, _ = daemon.request("GET", "/v1/status")
    assert code == 200


def test_second_daemon_refuses_to_start(daemon: DaemonProc) -> None:
    second = DaemonProc(daemon.home)
    second.start(wait=False)
    assert second.proc is not None
    assert second.proc.wait(timeout=30) == 1
    out = second.proc.stdout.read().decode() if second.proc.stdout else ""
    assert "another forged daemon" in out
    assert daemon.request("GET", "/v1/status")[0] == 200


def test_stale_socket_is_recovered_and_sigterm_cleans_up(short_tmp: Path) -> None:
    d = DaemonProc(short_tmp / "h", QUIET).start()
    out = d.stop(signal.SIGKILL)
    assert d.socket.exists(), out  # kill -9 leaves the socket file behind
    d.start()
    assert d.request("GET", "/v1/status")[0] == 200
    d.stop(signal.SIGTERM)
    assert d.proc.returncode == 0
    assert not d.socket.exists()


def test_garbage_on_the_socket_leaves_the_daemon_serving(daemon: DaemonProc) -> None:
    rng = __import__("random").Random(7)
    payloads = [
        b"\x00\xff" * 50 + b"\r\n\r\n",
        b"GET\r\n\r\n",
        b"POST /v1/repos HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n",
        b"POST /v1/repos HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
        b"POST /v1/repos HTTP/1.1\r\nContent-Length: 3\r\n\r\n[1]",
        b"GET /v1/" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
        b"GET /v2/status HTTP/1.1\r\n\r\n",
        b"BREW /v1/status HTTP/1.1\r\n\r\n",
        b"POST /v1/repos/x/forge HTTP/1.1\r\nContent-Length: 5\r\n\r\n{\"a\":",
    ]
    statuses: list[int] = []
    for i in range(1000):
        data = payloads[i % len(payloads)] if i % 3 else bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(str(daemon.socket))
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            reply = s.recv(200)
            if reply.startswith(b"HTTP/1."):
                statuses.append(int(reply.split()[1]))
        except OSError:
            pass
        finally:
            s.close()
    assert statuses and all(400 <= c < 500 for c in statuses), sorted(set(statuses))
    code, st = daemon.request("GET", "/v1/status")
    assert code == 200 and st["daemon"]["pid"] == daemon.proc.pid
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(daemon.socket))
    s.sendall(b"POST /v1/repos HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (2 << 20) + b"x" * 1000)
    reply = b""
    while chunk := s.recv(4096):
        reply += chunk
    s.close()
    assert reply.startswith(b"HTTP/1.1 413") and b'"error"' in reply


def test_forgectl_without_daemon_exits_3(short_tmp: Path) -> None:
    env = {**os.environ, "FORGED_HOME": str(short_tmp / "none")}
    r = subprocess.run([sys.executable, "-m", "forged.ctl", "status"], env=env, capture_output=True, text=True)
    assert r.returncode == 3 and "not running" in r.stderr
    r = subprocess.run([sys.executable, "-m", "forged.ctl", "frobnicate"], env=env, capture_output=True, text=True)
    assert r.returncode == 2


def test_malformed_config_names_the_key_and_daemon_does_not_start(short_tmp: Path) -> None:
    home = short_tmp / "h"
    d = DaemonProc(home, "[train]\nrank = 'sixteen'\n")
    d.start(wait=False)
    assert d.proc.wait(timeout=30) == 1
    out = d.proc.stdout.read().decode()
    assert "train.rank" in out and "config.toml:2" in out
    assert not d.socket.exists()
    r = d.ctl("config", "check")
    assert r.returncode == 1 and "train.rank" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(("text", "needle"), [
    ("[trian]\nrank = 4\n", "trian: unknown key"),
    ("[gates]\nquiet_hours = ['25:00-01:00']\n", "gates.quiet_hours"),
    ("[publish]\nkeep_versions = 0\n", "publish.keep_versions: must be from 1 to 1000"),
    ("[[repos]]\npath = '/nonexistent/x'\n", "repos[0].path: directory does not exist"),
    ("[daemon\n", "not valid TOML"),
    ("[train]\nbackend = 'tpu'\n", "train.backend: must be one of"),
])
def test_config_errors(tmp_path: Path, text: str, needle: str) -> None:
    f = tmp_path / "config.toml"
    f.write_text(text)
    with pytest.raises(config.ConfigError) as e:
        config.load(f)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_shipped_config_documents_every_default() -> None:
    import tomllib

    path = Path(__file__).parent.parent / "config.toml"
    shipped = config.load(path)
    assert config.to_dict(shipped) == config.to_dict(config.Config())

    def keys(d: dict, prefix: str = "") -> set[str]:
        return {k for name, v in d.items() if name != "repos"
                for k in (keys(v, f"{prefix}{name}.") if isinstance(v, dict) else {f"{prefix}{name}"})}

    # every key is written out, not only right by default: the file is the reference users copy from
    assert keys(tomllib.loads(path.read_text())) == keys(config.to_dict(config.Config()))


def test_paths_precedence(tmp_path: Path) -> None:
    p = paths.resolve({"FORGED_HOME": str(tmp_path), "FORGED_CONFIG": str(tmp_path / "other.toml")})
    assert p.config_file == tmp_path / "other.toml"
    assert p.socket.parent == tmp_path / "run"
    p = paths.resolve({"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "cfg")})
    if sys.platform != "darwin":
        assert p.config_file == tmp_path / "cfg" / "forged" / "config.toml"
    with pytest.raises(ValueError, match="socket path"):
        paths.check_socket_path(Path("/tmp/" + "x" * 200))


def test_service_files_render(tmp_path: Path) -> None:
    p = paths.resolve({"FORGED_HOME": str(tmp_path)})
    plist = plistlib.loads(service.render_plist(p).encode())
    assert plist["Label"] == service.LABEL
    assert plist["ProgramArguments"][0] == str(Path(sys.executable).absolute())
    assert plist["ProcessType"] != "Background"  # Background pins to efficiency cores
    assert plist["KeepAlive"] == {"SuccessfulExit": False} and plist["RunAtLoad"] is True
    assert all(Path(plist[k]).is_absolute() for k in ("StandardOutPath", "StandardErrorPath", "WorkingDirectory"))
    unit = service.render_systemd(p)
    assert f"ExecStart={Path(sys.executable).absolute()} -m forged" in unit
    f = tmp_path / "forged.service"
    f.write_text(unit)
    if shutil.which("systemd-analyze"):
        r = subprocess.run(["systemd-analyze", "verify", "--user", str(f)], capture_output=True, text=True)
        # verify complains about the environment (no user manager in a container) but never about our syntax
        assert "forged.service:" not in r.stderr or "Unknown" not in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "forged.ctl", "install", "--dry-run"], capture_output=True, text=True,
                       env={**os.environ, "FORGED_HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert ("systemctl" if sys.platform.startswith("linux") else "launchctl") in r.stdout, r.stdout


def test_daemon_imports_no_ml_libraries(tmp_path: Path) -> None:
    """The daemon process stays small: its whole import graph is free of ML libraries."""
    code = f"""
import sys, types
from pathlib import Path
from forged.common import config, paths
from forged.daemon.main import Daemon
import forged.daemon.engine, forged.daemon.releases, forged.daemon.status, forged.daemon.workers, forged.daemon.gates, forged.daemon.watcher, forged.daemon.accounting, forged.daemon.publish, forged.daemon.approval, forged.ctl
d = Daemon(paths.resolve({{'FORGED_HOME': {str(tmp_path)!r}}}), config.Config())
d.start()
d.engine.tick()
need = d.engine._memory_needed()
d.stop()
heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'mlx', 'numpy', 'gguf', 'tree_sitter', 'llama_cpp',
                           'detect_secrets', 'bm25s') if m in sys.modules)
print(need, heavy)
assert not heavy, heavy
assert need > 100 * 2**20, need
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "FORGED_HOME": str(tmp_path)})
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]


def test_configuration_reference_documents_every_key() -> None:
    import dataclasses
    import typing

    doc = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    missing = []

    def walk(cls: type, prefix: str) -> None:
        for name, t in typing.get_type_hints(cls).items():
            if name in ("source", "repos"):
                continue
            if dataclasses.is_dataclass(t):
                if f"[{prefix}{name}]" not in doc:
                    missing.append(f"[{prefix}{name}]")
                walk(t, f"{prefix}{name}.")
            elif f"`{name}`" not in doc:
                missing.append(prefix + name)

    walk(config.Config, "")
    assert not missing, f"docs/configuration.md lacks {missing}"


def test_daemon_stops_when_its_home_is_deleted(short_tmp: Path) -> None:
    d = DaemonProc(short_tmp / "h", QUIET).start()
    shutil.rmtree(d.home)
    assert d.proc.wait(timeout=30) == 0
    second = DaemonProc(short_tmp / "h", QUIET).start()  # a fresh one can take over
    assert second.request("GET", "/v1/status")[0] == 200
    second.stop()


def test_status_line_says_what_each_stage_is_doing() -> None:
    from forged.ctl import _progress_text

    def line(prog: dict) -> str:
        return _progress_text({"cycle": {"progress": prog}, "progress": {"text": "40 / 300 lines"}})

    assert line({"step": 3, "total_steps": 40, "loss": 1.5}) == "step 3/40, loss 1.500"
    assert line({"metric": "fim", "model": "base", "done": 2, "total": 8}) == "judging base fim 2/8"
    # the judge worker's export and llama.cpp check take minutes: their own words, not the
    # repo's change accounting
    assert line({"stage": "export", "text": "checking the export in llama.cpp against the trainer"}) \
        == "checking the export in llama.cpp against the trainer"
    assert line({}) == "40 / 300 lines"


_POLLER = """
import http.client, os, socket, sys, time
class C(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(sys.argv[1])
print("up", flush=True)
while not os.path.exists(sys.argv[2]):
    try:
        c = C("forged", timeout=5)
        c.request("GET", "/v1/status")
        c.getresponse().read()
        c.close()
    except OSError:
        time.sleep(0.01)
"""


def test_forgectl_waits_its_turn_on_a_busy_daemon(daemon: DaemonProc, short_tmp: Path) -> None:
    """30 clients polling status fill a small listen backlog; forgectl must still get in."""
    stop = short_tmp / "stop"
    pollers = [subprocess.Popen([sys.executable, "-c", _POLLER, str(daemon.socket), str(stop)],
                                stdout=subprocess.PIPE) for _ in range(30)]
    try:
        for p in pollers:
            assert p.stdout is not None and p.stdout.readline() == b"up\n"
        results = [daemon.ctl("status", timeout=60) for _ in range(20)]
    finally:
        stop.touch()
        for p in pollers:
            p.wait(timeout=30)
    failed = [r.stderr.strip() for r in results if r.returncode != 0]
    assert failed == [], f"{len(failed)}/20 failed: {failed[:3]}"
