"""The daemon's Prometheus metrics, one registry per daemon instance.

A registry per instance (not the global default) lets tests and benchmarks run
several daemons in one process without their counters bleeding together. The
hot path aggregates per batch and touches these once per batch, not per change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from cdcd.sinks.redis import ApplyResult

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.changes = Counter("cdcd_changes_total", "Row changes received, by table and op", ["table", "op"],
                               registry=r)
        self.transactions = Counter("cdcd_transactions_total", "Committed transactions applied", registry=r)
        self.batches = Counter("cdcd_batches_total", "Batches applied to Redis", registry=r)
        self.writes = Counter("cdcd_writes_total", "Entry writes sent to Redis, by kind", ["kind"], registry=r)
        self.stale_writes = Counter("cdcd_writes_refused_total",
                                    "Writes Redis refused because the entry held a newer version", registry=r)
        self.refused_fenced = Counter("cdcd_writes_refused_fenced_total",
                                      "Tombstones older than the entry: refused, but in-flight fills still fenced "
                                      "(new generation, app-filled value dropped)", registry=r)
        self.fence_writes = Counter("cdcd_fence_writes_total", "Fence writes applied: records without a trustworthy "
                                    "commit-order version, applied as invalidation only", registry=r)
        self.tag_bumps = Counter("cdcd_tag_bumps_total", "Tag counters bumped", registry=r)
        self.degraded_transactions = Counter(
            "cdcd_degraded_transactions_total",
            "Transactions past source.max_transaction_changes/bytes, applied as table-wide invalidations",
            registry=r)
        self.degraded_changes = Counter("cdcd_degraded_changes_total",
                                        "Row changes of degraded transactions (counted, not kept)", registry=r)
        self.backplane = Counter("cdcd_backplane_messages_total", "Backplane messages published", registry=r)
        self.retries = Counter("cdcd_retries_total", "Retries after a failure, by what failed", ["target"],
                               registry=r)
        self.errors = Counter("cdcd_errors_total", "Errors by kind", ["kind"], registry=r)
        self.problems = Counter("cdcd_unmapped_total",
                                "Changes the rules could not fully map, by kind and table", ["kind", "table"],
                                registry=r)
        self.schema_changes = Counter("cdcd_schema_changes_total",
                                      "Schema changes that broke a table's rule, by table and kind", ["table", "kind"],
                                      registry=r)
        self.dead_letters = Counter("cdcd_dead_letters_total", "Records sent to the dead-letter destination",
                                    registry=r)
        self.redis_refused = Counter("cdcd_redis_refused_total", "Writes Redis refused for a reason retrying "
                                     "cannot fix (dead-lettered, key made safe), by reason", ["reason"], registry=r)
        self.redis_restores = Counter("cdcd_redis_restores_total", "Registry and table counters restored after "
                                      "Redis lost them (restart, flush, failover)", registry=r)
        self.redis_rtt = Histogram("cdcd_redis_roundtrip_seconds", "Time the loop spent on each batch's Redis "
                                   "round trip: sending it plus blocking for its replies (Redis work overlapped "
                                   "with planning the next batch is not counted; cdcd.sinks.redis.PendingApply)",
                                   buckets=_LATENCY_BUCKETS, registry=r)
        self.commit_to_apply = Histogram("cdcd_commit_to_apply_seconds",
                                         "Commit timestamp to Redis acknowledgement, per batch (newest commit)",
                                         buckets=_LATENCY_BUCKETS, registry=r)
        self.position = Gauge("cdcd_source_position", "Last acknowledged source position (LSN or offset)",
                              registry=r)
        self.version = Gauge("cdcd_applied_version", "Version of the newest change applied", registry=r)
        self.watermark = Gauge("cdcd_applied_watermark", "Source position up to which every committed transaction "
                                                         "is applied and announced (read-your-writes)", registry=r)
        self.visibility_waits = Counter("cdcd_source_visibility_waits_total", "Transactions the stream delivered "
                                        "before the server showed them to new snapshots: they (and every later "
                                        "one) were held until visible", registry=r)
        self.visibility_wait = Histogram("cdcd_source_visibility_wait_seconds", "How long each such transaction "
                                         "was held until the server showed it", buckets=_LATENCY_BUCKETS,
                                         registry=r)
        self.visibility_checks = Counter("cdcd_source_visibility_checks_total", "Server snapshots queried to check "
                                         "that delivered transactions are visible", registry=r)
        self.connected = Gauge("cdcd_connected", "1 when connected, by target", ["target"], registry=r)
        self.slot_lag = Gauge("cdcd_slot_lag_bytes", "WAL between the server's insert position and the slot's "
                              "confirmed flush position", registry=r)
        self.lag_alarm = Gauge("cdcd_lag_alarm", "1 while the slot retains more WAL than monitor.max_retained_wal",
                               registry=r)
        self.exists_fp = Gauge("cdcd_exists_filter_fp_estimate", "Estimated false-positive rate of a table's "
                               "existence filter (bit fill ratio ** k)", ["table"], registry=r)
        self.exists_builds = Counter("cdcd_exists_filter_builds_total", "Existence filter generations built from a "
                                     "snapshot, by table and reason", ["table", "reason"], registry=r)
        self.slot_retained = Gauge("cdcd_slot_retained_wal_bytes", "WAL the slot keeps on the server", registry=r)
        # several Redis targets (targets:, docs/multi-target.md); a single redis: target has none of these
        self.target_connected = Gauge("cdcd_target_connected", "1 while the target's Redis answers", ["target"],
                                      registry=r)
        self.target_position = Gauge("cdcd_target_applied_position", "Highest source position (Postgres LSN) the "
                                     "target applied: every change up to it is in that Redis", ["target"],
                                     registry=r)
        self.target_batches = Counter("cdcd_target_batches_total", "Batches the target applied", ["target"],
                                      registry=r)
        self.target_pending = Gauge("cdcd_target_pending_changes", "Row changes read from the source but not yet "
                                    "applied to the target (its backlog)", ["target"], registry=r)
        self.target_lag = Gauge("cdcd_target_lag_seconds", "Age of the oldest batch the target has not applied "
                                "(0 when caught up)", ["target"], registry=r)
        self.backpressure = Gauge("cdcd_target_backpressure", "1 while the target's backlog is at "
                                  "max_pending_changes and the daemon has stopped reading the source", ["target"],
                                  registry=r)
        self.backpressure_events = Counter("cdcd_target_backpressure_events_total", "Times the target's full "
                                           "backlog stopped the daemon reading the source", ["target"], registry=r)

    def count_apply(self, result: ApplyResult) -> None:
        """The counters of one batch applied to one Redis (once per target with several targets)."""
        self.writes.labels("tombstone").inc(result.tombstones)
        self.writes.labels("value").inc(result.values)
        if result.floored:
            self.writes.labels("floored").inc(result.floored)
        self.stale_writes.inc(result.refused)
        self.refused_fenced.inc(result.fenced)
        self.fence_writes.inc(result.fences)
        self.tag_bumps.inc(result.tags)
        self.backplane.inc(result.messages)
        self.redis_rtt.observe(result.rtt)
