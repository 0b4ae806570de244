"""structlog JSON logging, configured once per process; request ids are bound per request."""

from __future__ import annotations

import logging
import os
import sys

import structlog

_configured = False


class _StderrLogger:
    """Writes each rendered line to the *current* ``sys.stderr`` (which test runners swap)."""

    def msg(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    log = debug = info = warning = warn = error = critical = exception = fatal = msg


def _stderr_factory(*args) -> _StderrLogger:
    return _StderrLogger()


def configure(service: str = "", level: str | None = None) -> None:
    global _configured
    level_name = (level or os.environ.get("YUEBING_LOG_LEVEL", "INFO")).upper()
    logging.basicConfig(stream=sys.stderr, level=level_name, format="%(message)s")
    processors = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        structlog.processors.JSONRenderer(),
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level_name)),
        logger_factory=_stderr_factory,
        cache_logger_on_first_use=True,
    )
    if service:
        structlog.contextvars.bind_contextvars(service=service)
    _configured = True


def get_logger(name: str = ""):
    return structlog.get_logger(name) if name else structlog.get_logger()
