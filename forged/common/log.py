"""structlog setup: JSON lines to a rotating file, readable lines on the console.

Cycle code binds ``repo`` and ``cycle`` with :func:`structlog.contextvars.bound_contextvars`
so every line it writes carries them.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
from pathlib import Path

import structlog

_SHARED = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def setup(log_file: Path | None, level: str = "info", console: bool = True) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    root.setLevel(level.upper())
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.handlers.RotatingFileHandler(log_file, maxBytes=10 * 2**20, backupCount=5, encoding="utf-8")
        fh.setFormatter(structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                        structlog.processors.format_exc_info,
                        structlog.processors.JSONRenderer()],
            foreign_pre_chain=_SHARED,
        ))
        root.addHandler(fh)
    if console:
        ch = logging.StreamHandler(sys.stderr)
        ch.setFormatter(structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                        # plain tracebacks: rich's pretty ones cost ~0.5 s of CPU each
                        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty(),
                                                      exception_formatter=structlog.dev.plain_traceback)],
            foreign_pre_chain=_SHARED,
        ))
        root.addHandler(ch)
    # Libraries we use are chatty at INFO.
    for noisy in ("apscheduler", "watchdog", "git", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    structlog.configure(
        processors=[*_SHARED, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


def get(name: str = "forged") -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
