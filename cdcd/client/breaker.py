"""A circuit breaker for Redis: stop paying a timeout per call while Redis is dead, probe for its return."""

from __future__ import annotations

import threading
import time


class CircuitBreaker:
    """closed -> (``failures`` in a row) -> open -> (``reset`` seconds) -> half-open: one probe -> closed/open."""

    def __init__(self, failures: int = 3, reset: float = 2.0) -> None:
        self.threshold, self.reset = failures, reset
        self.failures = 0
        self.opened_at: float | None = None
        self._probing = False
        self._lock = threading.Lock()

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half-open" if time.monotonic() - self.opened_at >= self.reset else "open"

    def allow(self) -> bool:
        if self.opened_at is None:
            return True
        with self._lock:
            if time.monotonic() - self.opened_at < self.reset or self._probing:
                return False
            self._probing = True  # exactly one probe at a time
            return True

    def success(self) -> None:
        if self.opened_at is not None or self.failures:
            with self._lock:
                self.failures = 0
                self.opened_at = None
                self._probing = False

    def failure(self) -> bool:
        """Record a failure; True when this opened (or re-opened) the breaker."""
        with self._lock:
            self.failures += 1
            self._probing = False
            if self.opened_at is not None or self.failures >= self.threshold:
                self.opened_at = time.monotonic()
                return True
            return False
