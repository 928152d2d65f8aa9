"""Request bodies and query strings of the control API: parsed with bounds, checked by type.

Every field a handler reads goes through one of these, so a wrong type is a 400 naming the
field (``{"force": "no"}`` is not a truthy force) and nothing unbounded reaches SQLite or
the JSON encoder.
"""

from __future__ import annotations

import json
import re
from typing import Any


class ApiError(Exception):
    """An answer other than 200: the status and a one-line message naming the problem."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

MAX_DEPTH = 32  # a request body is a flat object; anything deeper is not ours
MAX_INT = 2**53 - 1  # exact in every JSON reader, and inside SQLite's int64
_VERSION = re.compile(r"v?(\d{1,9})")


def parse_body(raw: bytes) -> dict[str, Any]:
    """A JSON object with bounded nesting, finite numbers and bounded integers."""
    if not raw.strip():
        return {}

    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON number")

    try:
        body = json.loads(raw, parse_constant=no_constant)
    except RecursionError:
        raise ApiError(400, f"body is nested more than {MAX_DEPTH} levels deep") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, and ints over 4300 digits
        raise ApiError(400, f"body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "body must be a JSON object")
    _check_bounds(body, "", 0)
    return body


def _check_bounds(v: Any, where: str, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise ApiError(400, f"body is nested more than {MAX_DEPTH} levels deep")
    if isinstance(v, bool):
        return
    if isinstance(v, int) and abs(v) > MAX_INT:
        raise ApiError(400, f"{where or 'body'}: integer out of range (at most {MAX_INT})")
    items = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ()
    for k, x in items:
        _check_bounds(x, f"{where}.{k}" if where else str(k), depth + 1)


def only(body: dict[str, Any], *allowed: str) -> None:
    """A 400 naming the first field this endpoint does not take."""
    for k in body:
        if k not in allowed:
            takes = ", ".join(allowed) if allowed else "no fields"
            raise ApiError(400, f"{k}: unknown field (this endpoint takes {takes})")


def boolean(body: dict[str, Any], key: str, default: bool = False) -> bool:
    v = body.get(key, default)
    if not isinstance(v, bool):
        raise ApiError(400, f"{key}: must be a JSON boolean (true or false), got {json.dumps(v)}")
    return v


def string(body: dict[str, Any], key: str, default: str = "") -> str:
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, str):
        raise ApiError(400, f"{key}: must be a string, got {json.dumps(v)}")
    return v


def version(body: dict[str, Any], key: str = "version") -> int | None:
    """A model version: a JSON integer ≥ 1, or a string "N" / "vN"; None when absent."""
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, int) and not isinstance(v, bool):
        n = v
    elif isinstance(v, str) and (m := _VERSION.fullmatch(v.strip())):
        n = int(m.group(1))
    else:
        raise ApiError(400, f"{key}: {json.dumps(v)} is not a version number (N or vN)")
    if not 1 <= n < 2**31:
        raise ApiError(400, f"{key}: {n} is out of range (1 to {2**31 - 1})")
    return n


def query_int(query: dict[str, list[str]], key: str, default: int, lo: int, hi: int) -> int:
    raw = query.get(key, [None])[0]
    if raw is None:
        return default
    if not re.fullmatch(r"-?\d{1,19}", raw) or not lo <= int(raw) <= hi:
        raise ApiError(400, f"{key}: must be an integer from {lo} to {hi}, got {raw[:40]!r}")
    return int(raw)


def query_bool(query: dict[str, list[str]], key: str, default: bool) -> bool:
    raw = query.get(key, [None])[0]
    if raw is None:
        return default
    if raw not in ("0", "1", "true", "false"):
        raise ApiError(400, f"{key}: must be 0, 1, true or false, got {raw[:40]!r}")
    return raw in ("1", "true")
