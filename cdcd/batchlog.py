"""The daemon's ``batch`` log line, at a rate a person can read.

A draining daemon applies hundreds to thousands of batches per second; one JSON line per batch costs
time (see BENCHMARKS.md, "batch log lines") and nobody reads them. So at ``info`` the daemon writes at
most one ``batch`` line per ``log.batch_interval`` seconds: the first batch after a quiet interval is
logged at once, the batches after it within the interval are summed into the next line. At ``debug``
(or with ``batch_interval: 0``) every batch gets its own line.

Every line says how many batches it covers (``batches``) and when the newest of them was applied
(``last_at``, same format as ``timestamp``: a line written later, when the loop went idle or stopped,
still tells when the work was done). Sums: ``txns``, ``changes``, ``writes``, ``refused``, ``tags``;
``version`` is the newest; ``redis_ms`` is the mean per batch and ``redis_ms_max`` the largest (what
they measure: :class:`cdcd.sinks.redis.PendingApply`); ``lag_ms`` is the largest commit-to-apply lag
of the oldest commit in any of the batches.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


class BatchLog:
    """Sums batches between ``batch`` lines; ``emit`` is the logger method to write one (e.g. ``log.info``)."""

    def __init__(self, emit: Any, interval: float) -> None:
        self._emit = emit
        self.interval = interval
        self._last_line = float("-inf")  # monotonic time of the last line written
        self._reset()

    def _reset(self) -> None:
        self.batches = self.txns = self.changes = self.writes = self.refused = self.tags = 0
        self.version: Any = None
        self.redis_s = 0.0
        self.redis_max_s = 0.0
        self.lag_ms: float | None = None
        self.last_at = 0.0

    def add(self, txns: int, changes: int, writes: int, refused: int, tags: int, version: Any, redis_s: float,
            lag_ms: float | None) -> None:
        """One applied (and acknowledged) batch; writes a line now if the interval allows it."""
        self.batches += 1
        self.txns += txns
        self.changes += changes
        self.writes += writes
        self.refused += refused
        self.tags += tags
        if version:
            self.version = version
        self.redis_s += redis_s
        self.redis_max_s = max(self.redis_max_s, redis_s)
        if lag_ms is not None and (self.lag_ms is None or lag_ms > self.lag_ms):
            self.lag_ms = lag_ms
        self.last_at = time.time()
        if time.monotonic() - self._last_line >= self.interval:
            self.flush()

    def idle(self) -> None:
        """The loop has nothing to do: write what is pending once the interval allows it."""
        if self.batches and time.monotonic() - self._last_line >= self.interval:
            self.flush()

    def flush(self) -> None:
        """Write what is pending now (also on stop)."""
        if not self.batches:
            return
        self._last_line = time.monotonic()
        self._emit("batch", batches=self.batches, txns=self.txns, changes=self.changes, writes=self.writes,
                   refused=self.refused, tags=self.tags, version=self.version,
                   redis_ms=round(self.redis_s * 1000 / self.batches, 2),
                   redis_ms_max=round(self.redis_max_s * 1000, 2),
                   lag_ms=None if self.lag_ms is None else round(self.lag_ms, 1), last_at=_iso(self.last_at))
        self._reset()
