"""The control socket: HTTP/1.1 + JSON over a Unix domain socket.

Works with plain tools: ``curl --unix-socket ~/.../forged.sock http://forged/v1/status``.
Only the daemon's own uid may talk to it (``SO_PEERCRED`` / ``LOCAL_PEERCRED``);
the socket lives in a 0700 directory and is created 0600 under umask 077.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import socketserver
import struct
import sys
import time
from collections.abc import Callable, Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from forged import __version__
from forged.common import log
from forged.common.paths import check_socket_path
from forged.daemon.errors import Conflict, DomainError, Invalid, NotFound, Unavailable
from forged.daemon.fields import ApiError, parse_body

__all__ = ["API_PREFIX", "ApiError", "ControlServer", "Router", "http_status"]

API_PREFIX = "/v1"


HTTP_STATUS: dict[type[DomainError], int] = {Invalid: 400, NotFound: 404, Conflict: 409, Unavailable: 503}


def http_status(error: DomainError) -> int:
    """The HTTP status a refusal of the daemon's is answered with."""
    return next((code for cls, code in HTTP_STATUS.items() if isinstance(error, cls)), 400)


Handler = Callable[[dict[str, str], dict[str, Any], dict[str, list[str]]], Any]
"""A route handler: (path params, JSON body, query) → JSON-able result, or an iterator
of JSON-able objects for a streaming (NDJSON) response."""


class Router:
    def __init__(self) -> None:
        self.routes: list[tuple[str, re.Pattern[str], Handler]] = []

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        rx = re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern) + "$")
        self.routes.append((method, rx, handler))

    def match(self, method: str, path: str) -> tuple[Handler, dict[str, str]]:
        allowed = False
        for m, rx, handler in self.routes:
            if mo := rx.match(path):
                if m == method:
                    return handler, mo.groupdict()
                allowed = True
        if allowed:
            raise ApiError(405, f"method {method} not allowed on {path}")
        raise ApiError(404, f"no such endpoint: {method} {path}")


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end of a Unix socket, or None if unknown."""
    try:
        if sys.platform.startswith("linux"):
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _pid, uid, _gid = struct.unpack("3i", creds)
            return uid
        if sys.platform == "darwin":
            # struct xucred { u_int cr_version; uid_t cr_uid; short cr_ngroups; gid_t cr_groups[16]; }
            SOL_LOCAL, LOCAL_PEERCRED = 0, 0x001  # noqa: N806 (names from <sys/un.h>)
            creds = sock.getsockopt(SOL_LOCAL, LOCAL_PEERCRED, struct.calcsize("IIh16I"))
            _version, uid = struct.unpack_from("II", creds)
            return uid
    except OSError:
        return None
    return None


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"forged/{__version__}"
    timeout = 15  # a client that stalls mid-request is dropped, not waited on forever
    server: ControlServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        log.get("forged.api").debug("http", msg=format % args)

    def _send_json(self, status: int, payload: Any) -> None:
        body = (json.dumps(payload, default=str) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self._send_json(status, {"error": message, "status": status})

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # http.server's own parse errors (bad request line, too-long headers) come here:
        # answer in JSON like every other error. An unknown method is the client's
        # mistake (405), not a server limitation (http.server says 501).
        if code == HTTPStatus.NOT_IMPLEMENTED:
            code, message = 405, f"method {self.command!r} not allowed"
        self._error(code, message or HTTPStatus(code).phrase)

    def _stream(self, items: Iterator[Any]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.close_connection = True
        try:
            for item in items:
                if self.server.shutting_down:
                    break
                data = (json.dumps(item, default=str) + "\n").encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass  # the client went away

    def _handle(self, method: str) -> None:
        uid = peer_uid(self.connection)
        if uid is None or uid != os.getuid():
            self._error(403, "forbidden: this socket serves only its owner's uid")
            return
        path, _, qs = self.path.partition("?")
        query: dict[str, list[str]] = {}
        for part in filter(None, qs.split("&")):
            k, _, v = part.partition("=")
            query.setdefault(k, []).append(v)
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self._error(400, "bad Content-Length")
            return
        if length < 0 or length > self.server.max_body:
            self._error(413, f"request body over {self.server.max_body} bytes")
            return
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self._error(411, "chunked request bodies are not accepted; send Content-Length")
            return
        raw = self.rfile.read(length) if length else b""
        try:
            body = parse_body(raw)
            if not path.startswith(API_PREFIX + "/"):
                raise ApiError(404, f"unknown API version or path: {path} (this daemon serves {API_PREFIX})")
            handler, params = self.server.router.match(method, path[len(API_PREFIX):])
            result = handler(params, body, query)
        except ApiError as e:
            self._error(e.status, e.message)
            return
        except DomainError as e:
            self._error(http_status(e), str(e))
            return
        except Exception as e:  # a bug in a handler must not take the daemon down
            log.get("forged.api").exception("handler_failed", path=path)
            self._error(500, f"internal error: {type(e).__name__}: {e}")
            return
        if isinstance(result, Iterator):
            self._stream(result)
        else:
            self._send_json(200, result)

    def do_GET(self) -> None:  # noqa: N802 (stdlib naming)
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def do_DELETE(self) -> None:  # noqa: N802
        self._handle("DELETE")


class ControlServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = False
    # socketserver's default of 5 overflows under a few dozen polling clients; the kernel
    # caps this at somaxconn.
    request_queue_size = 128

    def __init__(self, path: Path, router: Router, max_body: int = 1 << 20) -> None:
        check_socket_path(path)
        self.router = router
        self.max_body = max_body
        self.shutting_down = False
        self.sock_path = path
        claim_socket_path(path)
        old = os.umask(0o077)
        try:
            super().__init__(str(path), _RequestHandler)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self.sock_ino = path.stat().st_ino

    def handle_error(self, request: Any, client_address: Any) -> None:
        """One log line for a client that hung up mid-reply; a traceback only for our bugs
        (socketserver's default prints every one of them to stderr)."""
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | TimeoutError):
            log.get("forged.api").info("client_disconnected", error=type(exc).__name__)
        else:
            log.get("forged.api").exception("request_failed")

    def close(self) -> None:
        self.shutting_down = True
        self.shutdown()
        self.server_close()
        # Only remove the socket file if it is still ours: another daemon may have
        # taken over the path (e.g. after our home was deleted and recreated).
        with contextlib.suppress(FileNotFoundError):
            if self.sock_path.stat().st_ino == self.sock_ino:
                self.sock_path.unlink()


def socket_alive(path: Path, timeout: float = 1.0) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def claim_socket_path(path: Path) -> None:
    """Remove a stale socket file, refusing if a live daemon answers on it."""
    if not path.exists() and not path.is_symlink():
        return
    if socket_alive(path):
        raise RuntimeError(f"another forged daemon is already listening on {path}")
    path.unlink()


def wait_for_socket(path: Path, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if socket_alive(path, timeout=0.2):
            return True
        time.sleep(0.05)
    return False
