"""What the daemon's operations refuse with; the API layer maps each to an HTTP status."""

from __future__ import annotations


class DomainError(Exception):
    """A request the daemon cannot carry out, with a message for the user."""


class Invalid(DomainError):
    """The request names something malformed (HTTP 400)."""


class NotFound(DomainError):
    """The request names something that does not exist (HTTP 404)."""


class Conflict(DomainError):
    """The request does not fit the current state (HTTP 409)."""


class Unavailable(DomainError):
    """A service the operation needs (Ollama) cannot be reached (HTTP 503)."""
