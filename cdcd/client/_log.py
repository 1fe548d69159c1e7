"""Logging: structlog when the application configured it (the daemon does), else the standard library.

The client must import with nothing but ``redis``, and a library must not print on its own: an
unconfigured structlog writes every event, debug included, to stdout. So each event goes to
structlog only if ``structlog.is_configured()`` at that moment, otherwise to the stdlib logger
``cdcd.client`` (silent below WARNING unless the application says otherwise). Both are called the
same way, ``log.debug("event", key=value, ...)``; no call is on a hot path.
"""

from __future__ import annotations

import logging
from typing import Any

try:
    import structlog as _structlog
except ImportError:  # pragma: no cover - depends on the environment
    _structlog = None  # type: ignore[assignment]


class _Log:
    def __init__(self, name: str) -> None:
        self.name = name
        self._std = logging.getLogger(name)

    def _emit(self, level: int, event: str, kw: dict[str, Any]) -> None:
        if _structlog is not None and _structlog.is_configured():
            getattr(_structlog.get_logger(self.name), logging.getLevelName(level).lower())(event, **kw)
        elif self._std.isEnabledFor(level):
            self._std.log(level, "%s %s", event, " ".join(f"{k}={v!r}" for k, v in kw.items()))

    def debug(self, event: str, **kw: Any) -> None:
        self._emit(logging.DEBUG, event, kw)

    def info(self, event: str, **kw: Any) -> None:
        self._emit(logging.INFO, event, kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._emit(logging.WARNING, event, kw)

    def error(self, event: str, **kw: Any) -> None:
        self._emit(logging.ERROR, event, kw)


log = _Log("cdcd.client")
