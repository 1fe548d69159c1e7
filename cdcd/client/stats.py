"""Counters per tier, readable from the client and exportable to Prometheus.

Plain ints on a slotted object: the L1 hit path increments one without a lock.
In CPython an ``obj.attr += 1`` on a slotted int is not interrupted by another
thread in practice (no eval-breaker check between its bytecodes), but nothing
guarantees it, so treat the numbers as exact for tests of one thread and as
very close under heavy thread contention.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

# counter -> (tier, event): the grouping of :meth:`Stats.by_tier` and of the Prometheus labels
TIERS: dict[str, tuple[str, str]] = {
    "l1_hits": ("l1", "hit"),
    "l1_misses": ("l1", "miss"),
    "stale_served": ("l1", "stale_served"),
    "l1_evictions": ("l1", "eviction"),
    "l1_put_refused": ("l1", "put_refused"),
    "l1_resets": ("l1", "reset"),
    "l2_hits": ("l2", "hit"),
    "l2_misses": ("l2", "miss"),
    "fills": ("l2", "fill"),
    "fills_refused": ("l2", "fill_refused"),
    "negative_fills": ("l2", "negative_fill"),
    "redis_errors": ("l2", "error"),
    "breaker_open": ("l2", "breaker_open"),
    "loader_calls": ("loader", "call"),
    "loader_errors": ("loader", "error"),
    "loader_timeouts": ("loader", "timeout"),
    "coalesced": ("loader", "coalesced"),
    "refreshes": ("loader", "refresh"),
    "early_refreshes": ("loader", "early_refresh"),
    "fail_safe": ("loader", "fail_safe"),
    "backplane_messages": ("backplane", "message"),
    "backplane_gaps": ("backplane", "gap"),
    "backplane_reconnects": ("backplane", "reconnect"),
    "published": ("backplane", "published"),
    "ryw_waits": ("consistency", "ryw_wait"),
    "ryw_timeouts": ("consistency", "ryw_timeout"),
    "exists_absent": ("exists", "absent"),
    "replica_behind": ("l2", "replica_behind"),
}


@dataclass(slots=True)
class Stats:
    """What the cache did, by tier. ``snapshot()`` for a flat dict, ``by_tier()`` for a nested one."""

    l1_hits: int = 0
    """Served from L1 (fresh, or within the XFetch window)."""
    l1_misses: int = 0
    """L1 had nothing servable: L2 (and maybe the loader) was asked."""
    stale_served: int = 0
    """Served from L1 past the soft TTL while one background refresh runs (stale-while-revalidate)."""
    l1_evictions: int = 0
    l1_put_refused: int = 0
    """Inserts refused because an invalidation overtook the read that produced them (the insert race)."""
    l1_resets: int = 0
    """Whole-L1 expiries: backplane gap, reconnect, new daemon run."""
    l2_hits: int = 0
    l2_misses: int = 0
    """No usable L2 entry: absent, tombstone, lease, tag counter moved, or a forced refresh."""
    fills: int = 0
    """Guarded fills that landed in L2."""
    fills_refused: int = 0
    """Guarded fills refused because a newer change reached the key (not an error)."""
    negative_fills: int = 0
    redis_errors: int = 0
    breaker_open: int = 0
    """Times the circuit breaker opened."""
    loader_calls: int = 0
    loader_errors: int = 0
    loader_timeouts: int = 0
    ryw_waits: int = 0
    """Reads with a position that had to wait for the daemon's watermark (read-your-writes)."""
    ryw_timeouts: int = 0
    """Reads whose position was not applied within ``ryw_timeout`` (bypassed or raised)."""
    coalesced: int = 0
    """Callers that waited for another caller's load instead of calling the loader (single flight)."""
    refreshes: int = 0
    """Background refreshes started (stale-while-revalidate, XFetch, soft timeout)."""
    early_refreshes: int = 0
    """XFetch draws that asked for an early refresh."""
    fail_safe: int = 0
    """Last known values served because the loader failed or timed out, or Redis was unreachable."""
    backplane_messages: int = 0
    backplane_gaps: int = 0
    backplane_reconnects: int = 0
    published: int = 0
    exists_absent: int = 0
    """Reads an existence filter answered "definitely absent": no Redis entry read, no loader call."""
    replica_behind: int = 0
    """Hot-key replica reads that found a copy older than a version this process had seen (a miss, never served)."""

    def snapshot(self) -> dict[str, int]:
        return asdict(self)

    def by_tier(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for name, value in self.snapshot().items():
            tier, event = TIERS[name]
            out.setdefault(tier, {})[event] = value
        return out

    def register_prometheus(self, registry: Any = None, prefix: str = "cdcd_client") -> Any:
        """Expose these counters through prometheus_client (optional dependency) as
        ``<prefix>_events_total{tier=..., event=...}``. Returns the collector (to unregister it)."""
        from prometheus_client import REGISTRY
        from prometheus_client.core import CounterMetricFamily

        stats = self

        class _Collector:
            def collect(self) -> Iterator[Any]:
                family = CounterMetricFamily(f"{prefix}_events", "cdcd client cache events by tier",
                                             labels=["tier", "event"])
                for name, value in stats.snapshot().items():
                    family.add_metric(list(TIERS[name]), value)
                yield family

        collector = _Collector()
        (registry if registry is not None else REGISTRY).register(collector)
        return collector
