"""Counters per tier, readable from the client and exportable to Prometheus."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Stats:
    """Plain ints: incremented on hot paths without locks (a lost increment under a race is acceptable)."""

    l1_hits: int = 0
    l1_misses: int = 0
    l2_hits: int = 0
    l2_misses: int = 0
    stale_served: int = 0
    coalesced: int = 0
    refreshes: int = 0
    early_refreshes: int = 0
    fail_safe: int = 0
    fills: int = 0
    fills_refused: int = 0
    negative_fills: int = 0
    loader_calls: int = 0
    loader_errors: int = 0
    loader_timeouts: int = 0
    redis_errors: int = 0
    breaker_open: int = 0
    l1_evictions: int = 0
    backplane_messages: int = 0
    backplane_gaps: int = 0
    l1_resets: int = 0

    def snapshot(self) -> dict[str, int]:
        return asdict(self)

    def register_prometheus(self, registry: Any = None, prefix: str = "cdcd_client") -> None:
        """Expose these counters through prometheus_client (optional dependency)."""
        from prometheus_client import REGISTRY
        from prometheus_client.core import CounterMetricFamily

        stats = self

        class _Collector:
            def collect(self) -> Iterator[Any]:
                for name, value in stats.snapshot().items():
                    yield CounterMetricFamily(f"{prefix}_{name}", f"cdcd client {name.replace('_', ' ')}",
                                              value=value)

        (registry or REGISTRY).register(_Collector())
