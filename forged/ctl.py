"""forgectl: the small client of the forged daemon's control socket.

Exit codes: 0 ok, 1 error, 2 usage, 3 daemon not running.
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from forged import __version__
from forged.common import config, paths
from forged.common.judged import judge_text

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NO_DAEMON = 0, 1, 2, 3


class DaemonNotRunning(Exception):
    pass


class ApiFailure(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("forged", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = connect_unix(self.unix_path, self.timeout)


# How long a refused connect is retried: a full listen backlog is ECONNREFUSED on macOS
# (EAGAIN on Linux), but so is a socket file no daemon listens on any more.
REFUSED_RETRY_S = 5.0


def connect_unix(path: str, timeout: float | None) -> socket.socket:
    """A socket connected to ``path``, retrying while the daemon's backlog is full.

    A connect with a timeout is non-blocking, so a full backlog fails at once (EAGAIN)
    instead of waiting its turn: retry with backoff until ``timeout``. FileNotFoundError
    (no daemon) is not retried; ECONNREFUSED is, for at most REFUSED_RETRY_S.
    """
    start = time.monotonic()
    delay = 0.005
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(path)
            return s
        except (BlockingIOError, InterruptedError, ConnectionRefusedError) as e:
            s.close()
            waited = time.monotonic() - start
            limit = REFUSED_RETRY_S if isinstance(e, ConnectionRefusedError) else float("inf")
            if timeout is not None:
                limit = min(limit, timeout)
            if waited + delay > limit:
                if isinstance(e, BlockingIOError):
                    raise TimeoutError(f"{path}: the daemon accepted no connection in "
                                       f"{waited:.0f} s (busy)") from None
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
        except BaseException:
            s.close()
            raise


class Client:
    def __init__(self, sock: Path, timeout: float = 30.0) -> None:
        self.sock = sock
        self.timeout = timeout

    def _open(self, method: str, path: str, body: dict[str, Any] | None, timeout: float | None = None
              ) -> http.client.HTTPResponse:
        conn = _UnixConnection(str(self.sock), self.timeout if timeout is None else timeout)
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data else {}
        try:
            conn.request(method, "/v1" + path, body=data, headers=headers)
            return conn.getresponse()
        except (FileNotFoundError, ConnectionRefusedError):
            raise DaemonNotRunning(str(self.sock)) from None

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        resp = self._open(method, path, body)
        raw = resp.read()
        try:
            payload = json.loads(raw or b"{}")
        except json.JSONDecodeError:
            raise ApiFailure(resp.status, f"daemon sent non-JSON: {raw[:200]!r}") from None
        if resp.status >= 400:
            raise ApiFailure(resp.status, payload.get("error", f"HTTP {resp.status}"))
        return payload

    def stream(self, path: str) -> Iterator[dict[str, Any]]:
        resp = self._open("GET", path, None, timeout=None)
        if resp.status >= 400:
            raise ApiFailure(resp.status, json.loads(resp.read() or b"{}").get("error", f"HTTP {resp.status}"))
        while line := resp.readline():
            yield json.loads(line)


# -- rendering --------------------------------------------------------------------------


def _age(ts: float | None) -> str:
    if not ts:
        return "—"
    s = max(0, time.time() - ts)
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{int(s // n)}{unit}"
    return f"{int(s)}s"


def _progress_text(r: dict[str, Any]) -> str:
    cyc = r.get("cycle") or {}
    prog = cyc.get("progress") or {}
    if prog.get("step") is not None:
        total = prog.get("total_steps") or prog.get("max_steps") or "?"
        eta = f", ETA {int(prog['eta_s'])}s" if prog.get("eta_s") is not None else ""
        loss = f", loss {prog['loss']:.3f}" if isinstance(prog.get("loss"), int | float) else ""
        return f"step {prog['step']}/{total}{loss}{eta}"
    if prog.get("total") and prog.get("metric"):
        return f"judging {prog.get('model', '')} {prog['metric']} {prog.get('done', 0)}/{prog['total']}"
    if prog.get("questions_total"):
        return f"teacher {prog.get('questions_done', 0)}/{prog['questions_total']} questions"
    if prog.get("files_total"):
        return f"{prog.get('files_done', 0)}/{prog['files_total']} files"
    if prog.get("text"):  # a stage's own words (export, fidelity check)
        return str(prog["text"])
    return (r.get("progress") or {}).get("text") or "—"


def render_status(st: dict[str, Any]) -> str:
    d = st["daemon"]
    lines = [f"forged {d['version']} · pid {d['pid']} · up {_age(time.time() - d['uptime'])}"
             + (" · PAUSED" if d.get("paused") else "")]
    gates = st.get("gates") or {}
    gl = [f"{k}={v['state']}" for k, v in gates.items() if isinstance(v, dict)]
    lines.append("gates: " + ("open" if gates.get("open") else "closed") + (" (" + ", ".join(gl) + ")" if gl else ""))
    w = st.get("worker")
    if w:
        lines.append(f"worker: {w['stage']} for {w['repo']} (pid {w['pid']}, {int(w['running_s'])}s)")
    repos = st.get("repos") or []
    if not repos:
        lines.append("no repos registered — add one: forgectl repos add PATH")
        return "\n".join(lines)
    rows = [("REPO", "STAGE", "PROGRESS", "LIVE", "PENDING")]
    for r in repos:
        pending = r.get("pending_approval")
        rows.append((r["name"], r["stage"], _progress_text(r), f"v{r['live_version']}" if r.get("live_version") else "—",
                     f"v{pending['version']} (forgectl approve {r['name']})" if pending else "—"))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines.append("")
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    for r in repos:
        cyc = r.get("cycle") or {}
        if r.get("live_tag"):
            lines.append(f"{r['name']}: use model {r['live_tag']}")
        if r.get("forward"):
            lines += [f"{r['name']}: forward gain {line.strip()}" for line in _forward_lines([r["forward"]])[1:]]
        if r.get("failure"):
            lines.append(f"{r['name']}: failing: {r['failure']}")
        if cyc.get("reason") and cyc.get("stage") in ("failed", "paused", "ready_to_publish", "promoting"):
            lines.append(f"{r['name']}: {cyc['stage']}: {cyc['reason']}")
        for w in cyc.get("warnings") or []:
            lines.append(f"{r['name']}: warning ({w.get('stage')}): {w.get('message')}")
        if cyc.get("manual_command"):
            lines.append(f"{r['name']}: Ollama is not answering; publish by hand with:\n{cyc['manual_command']}")
        lines += _judged_lines(r)
    return "\n".join(lines)


def _judged_lines(r: dict[str, Any]) -> list[str]:
    """The pending candidate's metrics, else the last cycle's: each with n and a 95% interval."""
    pending, last = r.get("pending_approval") or {}, r.get("last_cycle") or {}
    which, judged = (f"v{pending.get('version')} awaiting approval", pending.get("judge")) if pending.get("judge") \
        else (f"last cycle {last.get('id')}", last.get("judge"))
    if not judged:
        return []
    return [f"{r['name']}: {which}:"] + [f"  {line}" for line in judged]


def render_repo(r: dict[str, Any]) -> str:
    out = [f"{r['name']}  {r['path']}  stage={r['stage']}", f"progress: {_progress_text(r)}"]
    if r.get("failure"):
        out.append(f"failing: {r['failure']}")
    if r.get("live_tag"):
        out.append(f"live: v{r['live_version']} — use model {r['live_tag']}")
    for c in r.get("cycles", [])[:5]:
        m = c.get("metrics") if isinstance(c.get("metrics"), dict) else {}
        out.append(f"  cycle {c['id']}: {c['stage']} {c.get('reason') or ''}".rstrip())
        # each metric with the paired difference's 95% interval and n: is the change more than noise?
        out += [f"    {line}" for line in judge_text(m.get("judge"))]
    versions = [v for v in r.get("versions") or [] if v.get("state") not in ("deleted", "rejected", "candidate")]
    if versions:
        out.append("versions:")
    for v in versions:
        quant = v.get("quantization") or ("base's own" if v.get("kind") == "adapter" else "?")
        size = f"{v['size'] / 1e6:,.1f} MB" if v.get("size") else "?"
        out.append(f"  v{v['version']}  {v['state']:<9}  {v.get('kind') or '?':<7}  {quant:<10}  {size}")
    return "\n".join(out + _forward_lines(r.get("forward") or []))


def _forward_lines(trend: list[dict[str, Any]]) -> list[str]:
    """Each version's forward gain over the base on the code committed after it, oldest first."""
    out = ["forward gain (each version vs the base on the code committed after it, 95% CI):"] if trend else []
    for t in trend:
        try:
            out.append(f"  v{t['version']}  {100 * t['gain']:+.2f}% [{100 * t['lo']:+.2f}%, {100 * t['hi']:+.2f}%]"
                       f"  n={t['n_files']} files, {t['n_bytes']:,} bytes"
                       f"  bpb {t['base_bpb']:.4f}→{t['live_bpb']:.4f}  (cycle {t.get('cycle_id')})")
        except (KeyError, TypeError, ValueError):
            out.append(f"  v{t.get('version')}  not measured")
    return out


# -- commands ---------------------------------------------------------------------------


def cmd_doctor(p: paths.Paths, client: Client) -> int:
    import importlib.util

    ok = True

    def line(good: bool | None, what: str, detail: str) -> None:
        nonlocal ok
        mark = {True: "ok  ", False: "FAIL", None: "warn"}[good]
        ok = ok and good is not False
        print(f"[{mark}] {what}: {detail}")

    line(sys.version_info >= (3, 11), "python", sys.version.split()[0])
    try:
        cfg = config.load(p.config_file)
        line(True, "config", str(p.config_file) if p.config_file.exists() else "defaults (no file)")
    except config.ConfigError as e:
        cfg = None
        line(False, "config", str(e))
    for mod, extra in (("torch", "torch"), ("peft", "torch"), ("mlx_lm", "mlx"), ("tree_sitter", "mine"),
                       ("llama_cpp", "verify")):
        found = importlib.util.find_spec(mod) is not None
        line(True if found else None, f"module {mod}", "importable" if found else f"missing (pip install 'forged[{extra}]')")
    if cfg is not None:
        try:
            from forged.common.backends import choose_backend

            name, why = choose_backend(cfg.train)
            line(True, "training back end", f"{name} — {why}")
        except Exception as e:  # noqa: BLE001
            line(False, "training back end", str(e))
        try:
            import ollama

            ollama.Client(host=cfg.publish.ollama_host, timeout=3).list()
            line(True, "ollama", f"reachable at {cfg.publish.ollama_host}")
        except Exception as e:  # noqa: BLE001
            line(None, "ollama", f"not reachable at {cfg.publish.ollama_host} ({type(e).__name__}); "
                                 "cycles will stop at 'ready to publish'")
    try:
        paths.check_socket_path(p.socket)
        line(True, "socket path", f"{p.socket} ({len(str(p.socket))} bytes)")
    except ValueError as e:
        line(False, "socket path", str(e))
    if p.run_dir.exists():
        mode = p.run_dir.stat().st_mode & 0o777
        line(mode == 0o700, "run dir permissions", f"{p.run_dir} mode {mode:o}")
    try:
        st = client.call("GET", "/status")
        line(True, "daemon", f"running, pid {st['daemon']['pid']}")
    except DaemonNotRunning:
        line(None, "daemon", "not running (start it: forged, or forgectl install)")
    target = p.state_dir if p.state_dir.exists() else Path.home()
    free = shutil.disk_usage(target).free / 2**30
    line(free >= 2, "disk", f"{free:.1f} GiB free at {target}")
    return EXIT_OK if ok else EXIT_ERROR


def cmd_logs(p: paths.Paths, follow: bool, lines: int) -> int:
    f = p.log_file
    if not f.exists():
        print(f"no log yet at {f}", file=sys.stderr)
        return EXIT_ERROR
    with f.open(encoding="utf-8", errors="replace") as fh:
        for line in fh.readlines()[-lines:]:
            print(line, end="")
        while follow:
            line = fh.readline()
            if line:
                print(line, end="", flush=True)
            else:
                time.sleep(0.5)
    return EXIT_OK


def cmd_watch(client: Client) -> int:
    for ev in client.stream("/events"):
        kind = ev.get("kind")
        if kind in ("hello", "status"):
            st = ev["status"]
            sys.stdout.write("\x1b[2J\x1b[H" if sys.stdout.isatty() else "")
            print(render_status(st))
            for r in st.get("repos", []):
                prog = ((r.get("cycle") or {}).get("progress") or {})
                if prog.get("step") is not None and prog.get("total_steps"):
                    frac = min(1.0, prog["step"] / max(1, prog["total_steps"]))
                    print(f"{r['name']:>16} [{'#' * int(frac * 30):<30}] {frac:4.0%}")
        else:
            ts = time.strftime("%H:%M:%S", time.localtime(ev.get("ts", time.time())))
            data = ev.get("data") or {}
            detail = " ".join(f"{k}={v}" for k, v in data.items() if not isinstance(v, dict | list))
            print(f"{ts} {ev.get('repo') or '-':<12} {kind:<12} {detail}")
        sys.stdout.flush()
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="forgectl", description="Control the forged daemon.")
    ap.add_argument("--version", action="version", version=f"forgectl {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("status", help="daemon, gates and each repo's stage")
    s.add_argument("repo", nargs="?")
    s.add_argument("--json", action="store_true")
    r = sub.add_parser("repos", help="add, remove or list repos")
    rs = r.add_subparsers(dest="repos_cmd", required=True)
    a = rs.add_parser("add")
    a.add_argument("path")
    a.add_argument("--name")
    a.add_argument("--branch")
    rm = rs.add_parser("remove")
    rm.add_argument("name")
    ls = rs.add_parser("list")
    ls.add_argument("--json", action="store_true")
    f = sub.add_parser("forge", help="make a repo due now")
    f.add_argument("repo")
    f.add_argument("--force", action="store_true", help="also ignore the resource gates")
    for name in ("approve", "reject"):
        x = sub.add_parser(name, help=f"{name} the candidate awaiting approval")
        x.add_argument("repo")
    rb = sub.add_parser("rollback", help="put an earlier version back on :latest")
    rb.add_argument("repo")
    rb.add_argument("version", nargs="?")
    sub.add_parser("pause", help="stop forging (a running worker checkpoints)")
    sub.add_parser("resume")
    sub.add_parser("watch", help="follow events and progress live")
    lg = sub.add_parser("logs")
    lg.add_argument("-f", "--follow", action="store_true")
    lg.add_argument("-n", "--lines", type=int, default=50)
    c = sub.add_parser("config", help="check the configuration")
    c.add_argument("config_cmd", choices=["check", "path", "show"])
    sub.add_parser("doctor", help="check the installation")
    rp = sub.add_parser("report", help="write the last cycle's HTML report and print its path")
    rp.add_argument("repo")
    for name in ("install", "uninstall"):
        x = sub.add_parser(name, help=f"{name} the launchd agent / systemd user unit")
        x.add_argument("--dry-run", action="store_true")
    return ap


def _config(args: argparse.Namespace, p: paths.Paths, client: Client) -> int:
    if args.config_cmd == "path":
        print(p.config_file)
        return EXIT_OK
    try:
        cfg = config.load(p.config_file)
    except config.ConfigError as e:
        print(f"forgectl: config error: {e}", file=sys.stderr)
        return EXIT_ERROR
    if args.config_cmd == "show":
        print(json.dumps(config.to_dict(cfg), indent=2))
    else:
        print(f"config ok: {p.config_file if p.config_file.exists() else 'no file, all defaults'}")
    return EXIT_OK


def _service(args: argparse.Namespace, p: paths.Paths, client: Client) -> int:
    from forged.daemon import service

    return service.main(args.cmd, dry_run=args.dry_run, p=p)


def _status(args: argparse.Namespace, p: paths.Paths, client: Client) -> int:
    if args.repo:
        r = client.call("GET", f"/repos/{args.repo}")
        print(json.dumps(r, indent=2) if args.json else render_repo(r))
    else:
        st = client.call("GET", "/status")
        print(json.dumps(st, indent=2) if args.json else render_status(st))
    return EXIT_OK


def _repos(args: argparse.Namespace, p: paths.Paths, client: Client) -> int:
    if args.repos_cmd == "add":
        body = {"path": str(Path(args.path).expanduser().resolve()), "name": args.name, "branch": args.branch}
        res = client.call("POST", "/repos", {k: v for k, v in body.items() if v})
        print(f"added {res['added']} ({res['path']})")
    elif args.repos_cmd == "remove":
        client.call("DELETE", f"/repos/{args.name}")
        print(f"removed {args.name} (its data and models are kept)")
    else:
        res = client.call("GET", "/repos")
        if args.json:
            print(json.dumps(res, indent=2))
        else:
            for r in res["repos"]:
                print(f"{r['name']:<20} {r['stage']:<18} {r['path']}")
    return EXIT_OK


def _forge(args: argparse.Namespace, p: paths.Paths, client: Client) -> int:
    res = client.call("POST", f"/repos/{args.repo}/forge", {"force": args.force})
    print(f"{args.repo}: cycle {res['cycle_id']} is {res['stage']}" + (" (gates ignored)" if args.force else ""))
    return EXIT_OK


def _decide(args: argparse.Namespace, p: paths.Paths, client: Client) -> int:
    print(json.dumps(client.call("POST", f"/repos/{args.repo}/{args.cmd}")))
    return EXIT_OK


def _rollback(args: argparse.Namespace, p: paths.Paths, client: Client) -> int:
    res = client.call("POST", f"/repos/{args.repo}/rollback", {"version": args.version} if args.version else {})
    print(f"{args.repo}: :latest is now v{res['live_version']} (was v{res['previous']})")
    return EXIT_OK


def _pause(args: argparse.Namespace, p: paths.Paths, client: Client) -> int:
    res = client.call("POST", f"/{args.cmd}")
    print("paused" if res["paused"] else "resumed")
    return EXIT_OK


def _report(args: argparse.Namespace, p: paths.Paths, client: Client) -> int:
    print(client.call("GET", f"/repos/{args.repo}/report")["path"])
    return EXIT_OK


Command = Callable[[argparse.Namespace, paths.Paths, Client], int]
COMMANDS: dict[str, Command] = {
    "config": _config,
    "doctor": lambda args, p, client: cmd_doctor(p, client),
    "logs": lambda args, p, client: cmd_logs(p, args.follow, args.lines),
    "install": _service,
    "uninstall": _service,
    "watch": lambda args, p, client: cmd_watch(client),
    "status": _status,
    "repos": _repos,
    "forge": _forge,
    "approve": _decide,
    "reject": _decide,
    "rollback": _rollback,
    "pause": _pause,
    "resume": _pause,
    "report": _report,
}


def run(args: argparse.Namespace, p: paths.Paths) -> int:
    command = COMMANDS.get(args.cmd)
    return command(args, p, Client(p.socket)) if command else EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    from forged.daemon.main import default_home

    default_home()
    ap = build_parser()
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0) and EXIT_USAGE
    p = paths.resolve()
    try:
        return run(args, p)
    except DaemonNotRunning as e:
        print(f"forgectl: the forged daemon is not running (no answer on {e}).\n"
              f"  start it in the foreground: forged\n  or as a service: forgectl install", file=sys.stderr)
        return EXIT_NO_DAEMON
    except ApiFailure as e:
        print(f"forgectl: {e}", file=sys.stderr)
        return EXIT_ERROR
    except (OSError, TimeoutError) as e:
        print(f"forgectl: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
