"""Start a real forged daemon in a subprocess against a temp FORGED_HOME (test helper)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from forged.ctl import connect_unix
from forged.daemon.server import wait_for_socket


class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        super().__init__("forged", timeout=timeout)
        self.path_ = str(path)

    def connect(self) -> None:
        self.sock = connect_unix(self.path_, self.timeout)  # forgectl's: waits out a full backlog


STARTED: list[subprocess.Popen[bytes]] = []  # conftest kills any a failed test left running


class DaemonProc:
    def __init__(self, home: Path, config_text: str | None = None, env: dict[str, str] | None = None) -> None:
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        if config_text is not None:
            (home / "config.toml").write_text(config_text)
        self.env = {**os.environ, "FORGED_HOME": str(home), **(env or {})}
        self.env.pop("FORGED_CONFIG", None)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.home / "run" / "forged.sock"

    def start(self, wait: bool = True) -> DaemonProc:
        self.proc = subprocess.Popen([sys.executable, "-m", "forged"], env=self.env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        STARTED.append(self.proc)
        if wait and not wait_for_socket(self.socket, timeout=20):
            out = self.stop()
            raise RuntimeError(f"daemon did not come up: {out}")
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> str:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return out.decode(errors="replace")

    def request(self, method: str, path: str, body: Any = None, raw: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, Any]:
        conn = UnixHTTP(self.socket)
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        conn.request(method, path, body=data, headers=headers or {})
        resp = conn.getresponse()
        payload = resp.read()
        conn.close()
        try:
            return resp.status, json.loads(payload)
        except json.JSONDecodeError:
            return resp.status, payload

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "forged.ctl", *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def wait_for(self, pred: Any, timeout: float = 30.0, interval: float = 0.2) -> Any:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            _, st = self.request("GET", "/v1/status")
            last = st
            if (v := pred(st)):
                return v
            time.sleep(interval)
        raise AssertionError(f"condition not met in {timeout}s; last status: {json.dumps(last)[:2000]}")
