"""A circuit breaker for Redis: stop paying a timeout per call while Redis is dead, probe for its return.

closed --(``failures`` in a row)--> open --(``reset`` seconds)--> half-open: one probe call is let
through; its success closes the breaker, its failure re-opens it for another ``reset``. A probe
that never reports (its caller was cancelled) is forgotten after ``reset`` so the breaker cannot
stay open forever.
"""

from __future__ import annotations

import threading
import time


class CircuitBreaker:
    def __init__(self, failures: int = 3, reset: float = 2.0) -> None:
        self.threshold, self.reset = failures, reset
        self.failures = 0
        self.opened_at: float | None = None
        self._probe_at: float | None = None
        self._lock = threading.Lock()

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half-open" if time.monotonic() - self.opened_at >= self.reset else "open"

    def allow(self) -> bool:
        if self.opened_at is None:  # the common case: no lock
            return True
        now = time.monotonic()
        with self._lock:
            if self.opened_at is None:
                return True
            if now - self.opened_at < self.reset:
                return False
            if self._probe_at is not None and now - self._probe_at < self.reset:
                return False  # a probe is in flight
            self._probe_at = now
            return True

    def success(self) -> None:
        if self.opened_at is not None or self.failures:
            with self._lock:
                self.failures = 0
                self.opened_at = None
                self._probe_at = None

    def failure(self) -> bool:
        """Record a failure; True when this opened (or re-opened) the breaker."""
        with self._lock:
            self.failures += 1
            self._probe_at = None
            if self.opened_at is not None or self.failures >= self.threshold:
                self.opened_at = time.monotonic()
                return True
            return False
