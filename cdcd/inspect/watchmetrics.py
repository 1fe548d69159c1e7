"""Prometheus metrics of ``cdcd inspect --watch``: reads by outcome, staleness, nines per bound.

A registry of its own (not the daemon's, not the global default): the watcher is a separate
process with its own port, and tests run several in one process. Counters grow with each round;
the nines and shares are gauges recomputed from the whole run's counts (a ``rate()`` over the
counters gives a windowed share if one is wanted).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from cdcd.inspect.nines import HISTOGRAM_EDGES, NinesCounter, format_bound


class WatchMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.reads = Counter("cdcd_watch_reads_total", "Sampled keys by outcome: consistent or stale are reads; "
                             "miss, unverifiable and unsettled are not", ["outcome"], registry=r)
        self.staleness = Histogram("cdcd_watch_staleness_seconds", "Stale reads: time from the commit of the "
                                   "change the entry missed to the read", buckets=HISTOGRAM_EDGES, registry=r)
        self.stale_beyond = Gauge("cdcd_watch_stale_beyond", "Stale reads whose staleness exceeds the bound "
                                  "(or is unknown), since the watch started", ["bound"], registry=r)
        self.share = Gauge("cdcd_watch_consistency_ratio", "Share of reads consistent with the database within "
                           "the bound, since the watch started", ["bound"], registry=r)
        self.nines = Gauge("cdcd_watch_nines", "-log10(1 - consistency ratio) within the bound; with no "
                           "inconsistent read, log10(reads) (a lower bound)", ["bound"], registry=r)
        self.capped = Gauge("cdcd_watch_nines_capped", "1 when cdcd_watch_nines is a lower bound (no "
                            "inconsistent read within the bound yet)", ["bound"], registry=r)
        self.errors = Counter("cdcd_watch_errors_total", "Rounds that failed on a Postgres or Redis error (logged "
                              "as watch_round_failed; the watch retries)", registry=r)
        self._last = {"consistent": 0, "stale": 0, "miss": 0, "unverifiable": 0, "unsettled": 0}
        self._server: Any = None
        for outcome in self._last:
            self.reads.labels(outcome)

    def update(self, c: NinesCounter, new_staleness: list[float]) -> None:
        """Bring the metrics up to ``c``'s counts; ``new_staleness``: the known staleness of reads since last time."""
        now = {"consistent": c.consistent, "stale": c.stale, "miss": c.misses, "unverifiable": c.unverifiable,
               "unsettled": c.unsettled}
        for outcome, count in now.items():
            if count > self._last[outcome]:
                self.reads.labels(outcome).inc(count - self._last[outcome])
        self._last = now
        for s in new_staleness:
            self.staleness.observe(s)
        for n in c.all():
            label = format_bound(n.bound)
            self.stale_beyond.labels(label).set(c.stale_beyond(n.bound))
            if n.value is None or n.share is None:
                continue
            self.share.labels(label).set(n.share)
            self.nines.labels(label).set(n.value)
            self.capped.labels(label).set(1 if n.capped else 0)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` on ``port`` (0: a free one); returns the port bound."""
        from prometheus_client import start_http_server

        self._server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._server.server_address[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
