"""structlog setup: JSON lines in production, readable colours on a terminal."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

# URL userinfo (postgresql://user:secret@host) and key=value secrets (password=secret, sslpassword=...)
_URL_SECRET = re.compile(r"(://[^:/@\s]+:)([^@\s]+)(@)")
_KV_SECRET = re.compile(r"((?:password|passwd|sslpassword|secret|token)\s*[=:]\s*)('[^']*'|\"[^\"]*\"|\S+)",
                        re.IGNORECASE)


def redact(text: str) -> str:
    return _KV_SECRET.sub(r"\1***", _URL_SECRET.sub(r"\1***\3", text))


def _redact_secrets(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Defense in depth: no code path logs a DSN on purpose, but driver errors may quote one."""
    for k, v in event.items():
        if isinstance(v, str) and ("@" in v or "=" in v or ":" in v):
            event[k] = redact(v)
    return event


def configure(fmt: str = "auto", level: str = "info") -> None:
    lvl = getattr(logging, level.upper())
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: structlog.typing.Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            _redact_secrets,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
