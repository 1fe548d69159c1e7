"""A bounded top-K frequency sketch (Misra-Gries "Frequent"), cheap enough for a cache's read path.

Why Misra-Gries and not Space-Saving's stream summary or count-min + heap: in pure Python the
cost that matters is the number of dict operations per offered key. Here a key already tracked
costs one ``dict.get`` and one store; a new key while there is room, one store; a new key when
the table is full triggers one *decrement round* (every counter minus one, zeros dropped) built
by a single comprehension. A round costs O(capacity) but removes ``capacity + 1`` units from the
total count, so there are at most ``total / (capacity + 1)`` rounds: O(1) amortized per key, and
the table never holds more than ``capacity`` keys whatever the stream (memory bounded by
configuration, not by input).

Guarantee (Misra & Gries 1982): for every key, ``estimate <= true count <= estimate + rounds``,
with ``rounds <= total / (capacity + 1)``. So every key read more than ``total / (capacity + 1)``
times is in the table, and the ranking of keys whose counts differ by more than ``rounds`` is
exact. Summaries of several processes merge by adding counts (Agarwal et al. 2012), which is how
the fleet's hot set is formed (:mod:`cdcd.hotset`).

Thread safety: offers from several threads may lose a count when they race with each other or with a
decrement round (a plain dict under the GIL, no lock on the read path); the estimates stay within the
bound above minus the lost offers, which is fine for ranking hot keys.
"""

from __future__ import annotations

import heapq
from operator import itemgetter


class TopK:
    """At most ``capacity`` counters; :meth:`top` ranks the heaviest keys offered so far."""

    __slots__ = ("capacity", "counts", "rounds", "total")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self.counts: dict[str, int] = {}
        self.rounds = 0  # decrement rounds so far: the bound on every estimate's error
        self.total = 0

    def offer(self, key: str) -> None:
        counts = self.counts
        n = counts.get(key)
        if n is not None:
            counts[key] = n + 1
        elif len(counts) < self.capacity:
            counts[key] = 1
        else:  # the new key's unit cancels one unit of every tracked key
            self.counts = {k: c - 1 for k, c in counts.items() if c > 1}
            self.rounds += 1
        self.total += 1

    def top(self, n: int) -> list[tuple[str, int]]:
        """The ``n`` keys with the highest estimates, heaviest first (estimates are lower bounds)."""
        return heapq.nlargest(n, self.counts.items(), key=itemgetter(1))

    def __len__(self) -> int:
        return len(self.counts)
