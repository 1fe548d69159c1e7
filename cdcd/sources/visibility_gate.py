"""Hold decoded transactions back until the server shows them to new snapshots; release them in order.

Why: the fill guard's premise is "a fill token taken after a tombstone => the fill's query ran after
the commit". The walsender sends a commit once its WAL is flushed, which can be before the commit is
visible (a synchronous-replication wait, or just a busy machine: ``cdcd.pg.visibility``). The source
therefore hands the daemon a transaction only once a server snapshot sees it, so a tombstone lands
only after its commit is visible. Order is the contract: a transaction the server does not show yet
holds back every later one (and any rejected record after it), whatever their own visibility.

This module has no I/O: the snapshot comes from a callable (``cdcd.sources.postgres`` passes a query
on a side connection), the clock is passed in, so tests drive waits, backoff and wraparound directly.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from redis.backoff import ExponentialBackoff

from cdcd.change import Rejected, Transaction
from cdcd.pg.visibility import Horizon, Snapshot

log = structlog.get_logger("cdcd.source.visibility")

BACKOFF = ExponentialBackoff(cap=0.05, base=0.0002)  # re-query after 0.2 ms, doubling up to 50 ms
LONG_WAIT = 1.0  # seconds: a wait past this is logged (at most every LOG_EVERY seconds)
LOG_EVERY = 10.0


@dataclass(frozen=True, slots=True)
class VisibilityWait:
    """The transaction at the head of the stream the server does not show yet."""

    xid: int
    since: float  # monotonic
    queries: int  # snapshots taken during this wait


@dataclass(frozen=True, slots=True)
class VisibilityCounts:
    """What happened since the daemon last asked (for its metrics)."""

    waits: int  # waits begun
    durations: list[float]  # seconds, of waits that ended
    checks: int  # snapshots queried


class VisibilityGate:
    def __init__(self, fetch: Callable[[], Snapshot], clock: Callable[[], float]) -> None:
        self._fetch = fetch
        self._clock = clock
        self.horizon = Horizon()
        self._held: deque[Transaction | Rejected] = deque()
        self.held_changes = 0  # row changes held (a rejected record counts one): the source's read budget
        self.wait: VisibilityWait | None = None
        self._next_check = 0.0
        self._failures = 0
        self._last_log = float("-inf")
        self._queries = 0  # since the daemon last drained these three
        self._finished: list[float] = []
        self._started = 0

    @property
    def held(self) -> bool:
        return bool(self._held)

    def hold(self, item: Transaction | Rejected) -> None:
        self._held.append(item)
        self.held_changes += len(item) if isinstance(item, Transaction) else 1

    def clear(self) -> None:
        """A new replication session re-delivers from the slot's checkpoint: drop what was held, forget the
        snapshot (it may be another server after a failover) and any wait."""
        self._held.clear()
        self.held_changes = 0
        self.horizon.reset()
        if self.wait is not None:
            self._finished.append(self._clock() - self.wait.since)
        self.wait = None
        self._failures = 0

    def next_check_in(self) -> float:
        """Seconds until the head may be checked again (0 when not waiting)."""
        if self.wait is None:
            return 0.0
        return max(0.0, self._next_check - self._clock())

    def release(self) -> list[Transaction | Rejected]:
        """The longest visible prefix of what is held, in order. Queries the server at most once per call,
        and while waiting only when the backoff allows; raises what the fetch raises."""
        out: list[Transaction | Rejected] = []
        queried = False
        while self._held:
            item = self._held[0]
            xid = item.xid if isinstance(item, Transaction) else None
            if xid is not None and not self.horizon.sees(xid):
                if not queried and (self.wait is None or self._clock() >= self._next_check):
                    self.horizon.update(self._fetch())
                    self._queries += 1
                    queried = True
                if not self.horizon.sees(xid):
                    self._invisible(xid, queried)
                    break
            self._held.popleft()
            self.held_changes -= len(item) if isinstance(item, Transaction) else 1
            self._end_wait()
            out.append(item)
        return out

    def _invisible(self, xid: int, queried: bool) -> None:
        """The head is not visible yet: start (or go on with) waiting for it, and schedule the next query."""
        now = self._clock()
        w = self.wait
        if w is None:
            w = self.wait = VisibilityWait(xid, now, int(queried))
            self._started += 1
            self._failures = 0
        elif queried:
            w = self.wait = VisibilityWait(w.xid, w.since, w.queries + 1)
        else:
            return  # checked too early: the schedule stands
        self._next_check = now + BACKOFF.compute(self._failures)
        self._failures += 1
        waited = now - w.since
        if waited >= LONG_WAIT and now - self._last_log >= LOG_EVERY:
            self._last_log = now
            log.warning("waiting_for_visibility", xid=xid, waited_s=round(waited, 1), queries=w.queries,
                        detail="the transaction's commit is in the WAL but the server does not show it to other "
                               "sessions yet (a synchronous standby that does not answer, typically); it and every "
                               "later transaction wait, so no cache entry is invalidated before readers can see "
                               "the new row")

    def _end_wait(self) -> None:
        """The head waited for became visible (it is being released)."""
        w = self.wait
        if w is None:
            return
        waited = self._clock() - w.since
        self._finished.append(waited)
        if waited >= LONG_WAIT:
            log.info("visible_after_wait", xid=w.xid, waited_s=round(waited, 3), queries=w.queries)
        self.wait = None
        self._failures = 0

    def take_counts(self) -> VisibilityCounts:
        """Waits begun, wait durations ended and snapshots queried since the last call."""
        counts = VisibilityCounts(self._started, self._finished, self._queries)
        self._started, self._finished, self._queries = 0, [], 0
        return counts
