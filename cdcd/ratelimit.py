"""One rate limiter for the commands that read the database in bulk (``cdcd warm``, ``cdcd inspect``).

Both must never saturate a production database, and both pace the same way: a
token bucket of ``rate`` units (rows, scanned keys) per second with a burst of
one second's worth. ``rate <= 0`` means unlimited.
"""

from __future__ import annotations

import time


class TokenBucket:
    """Paces work to ``rate`` units per second with a burst of one second's worth (``rate <= 0``: no limit)."""

    def __init__(self, rate: float) -> None:
        self.unlimited = rate <= 0
        self.rate = max(rate, 1e-6)
        self.capacity = max(1.0, self.rate)
        self.tokens = self.capacity
        self.last = time.monotonic()

    def take(self, n: float) -> None:
        """Wait until ``n`` units may go. A request above the burst goes at once and its debt is paid by
        later waits, so a large page is never refused and the average rate still holds."""
        if self.unlimited:
            return
        while True:
            now = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
            self.last = now
            if self.tokens >= min(n, self.capacity):
                self.tokens -= n  # may go negative for n > capacity: the debt is paid by later waits
                return
            time.sleep((min(n, self.capacity) - self.tokens) / self.rate)
