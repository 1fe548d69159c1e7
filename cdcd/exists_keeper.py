"""Keeps the rules' existence filters seeded and fresh: builds a generation from a snapshot, in the background.

The batch path keeps a seeded filter current (new keys' bits go in every batch's pipeline, see
:mod:`cdcd.sinks.exists`); this thread does what the batch path cannot: it seeds a filter that has
no active generation (first start, Redis lost it, a degraded transaction unseeded it, the rules
changed its size) and rebuilds one whose estimated false-positive rate drifted past its bound
(deletes leave their bits set). A build:

1. ``begin``: allocate the inactive generation and mark it as being built. Every batch applied from
   here on sets its new keys in it too.
2. Take a snapshot at a known LSN (a temporary replication slot, exactly as ``cdcd warm``): every
   transaction that committed before its consistent point ``L`` is in the snapshot; every later one
   committed after step 1 was acknowledged, so the daemon applies it after step 1: in the new generation.
3. ``fill``: set every snapshot row's key; ``switch``: one script makes the new generation active.

So the new generation holds every key that exists at the switch, and the old one stays in use until
then. A build that dies half-way (the daemon stopped, Postgres or Redis went down) leaves the active
generation as it was (or the filter unseeded, answering "maybe"); the next start begins it again.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import psycopg2
import psycopg2.extras
import structlog
from psycopg import sql

from cdcd.config import Config, ConfigError, postgres_source
from cdcd.metrics import Metrics
from cdcd.pg import replication, session
from cdcd.rules import ExistsSpec, Rules
from cdcd.sinks.redis import RedisSink
from cdcd.warm import _rows, _tables

log = structlog.get_logger("cdcd.exists")

PAGE = 2000  # snapshot rows per fill call
TICK = 1.0  # seconds between looks at each filter's meta (a missing filter is re-seeded within this)
GROWTH = 1.05  # after a rebuild, rebuild again only once this many more bits are set (no loop when over capacity)


class ExistsKeeper:
    def __init__(self, config: Config, rules: Rules, sink: RedisSink, metrics: Metrics,
                 stop: threading.Event) -> None:
        self.config, self.rules, self.sink, self.metrics, self.stop = config, rules, sink, metrics, stop
        self.after_page: Callable[[str], None] | None = None  # called after each filled page (tests)
        self._building: set[str] = set()
        self._next_check: dict[str, float] = {}
        self._warned: set[str] = set()
        self.state: dict[str, dict[str, Any]] = {rel: {"seeded": False} for rel in rules.exists}
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="cdcd-exists", daemon=True)
        self._thread.start()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def run(self) -> None:
        failures = 0
        while not self.stop.is_set():
            try:
                for rel, spec in self.rules.exists.items():
                    if self.stop.is_set():
                        return
                    self.tend(rel, spec)
                failures = 0
            except ConfigError as exc:
                log.error("exists_filter_disabled", error=str(exc),
                          detail="existence filters are seeded from a Postgres snapshot; they stay unseeded and "
                                 "every check answers 'maybe'")
                return
            except Exception as exc:  # Postgres or Redis down, a build that failed: never take the daemon down
                failures += 1
                self.metrics.errors.labels("exists_filter").inc()
                log.warning("exists_filter_failed", error=str(exc), retry_in=min(30, failures * 2))
                if self.stop.wait(min(30, failures * 2)):
                    return
                continue
            self.stop.wait(TICK)

    def tend(self, rel: str, spec: ExistsSpec) -> None:
        """Look at one filter; build it when it needs a generation."""
        st = self.sink.exists.state(rel)
        reason: str | None = None
        if st.active is None:
            reason = "unseeded"
        elif st.lost:
            reason = "lost"  # evicted or deleted: checks answer "maybe" until a new generation is built
        elif st.params != spec.params_id:
            reason = "resized"  # the rules changed the filter's size or key template
        elif st.building is not None and rel not in self._building:
            reason = "interrupted"  # a rebuild a stopped daemon had begun: it was needed, start it over
        elif time.monotonic() >= self._next_check.get(rel, 0.0):
            self._next_check[rel] = time.monotonic() + spec.check_every
            bits = self.sink.exists.bitcount(rel, st.active)
            fp = spec.params.fp_rate(bits / spec.params.m)
            self.metrics.exists_fp.labels(rel).set(fp)
            self.state[rel].update(seeded=True, fp_estimate=fp, bits=bits, generation=st.generation,
                                   version=st.version)
            if fp > spec.bound:
                if bits > st.bits * GROWTH:
                    reason = "drift"
                elif rel not in self._warned:
                    self._warned.add(rel)
                    log.warning("exists_filter_over_capacity", table=rel, fp_estimate=round(fp, 4), bound=spec.bound,
                                detail="rebuilt from a snapshot and still over its bound: the table holds more "
                                       "keys than exists_filter.expected; raise it")
        if reason is not None:
            if reason in ("unseeded", "lost"):
                self.state[rel]["seeded"] = False
            self.build(rel, spec, reason)

    def build(self, rel: str, spec: ExistsSpec, reason: str) -> bool:
        """One generation from a snapshot (see the module docstring); False when it was abandoned."""
        t0 = time.monotonic()
        build_id = uuid.uuid4().hex
        self.sink.exists.load_scripts()  # Redis may have restarted since the sink loaded them
        self.metrics.exists_builds.labels(rel, reason).inc()
        log.info("exists_filter_build", table=rel, reason=reason, m=spec.params.m, k=spec.params.k)
        self._building.add(rel)
        try:
            self.sink.exists.begin(rel, build_id)
            rows, version, done = self._fill_from_snapshot(rel, spec, build_id)
            if not done:
                return False
            bits = self.sink.exists.switch(rel, build_id, version)
        finally:
            self._building.discard(rel)
        if bits is None:
            log.warning("exists_filter_build_cancelled", table=rel,
                        detail="the build was cancelled (a degraded transaction or a newer build); starting over")
            return False
        fp = spec.params.fp_rate(bits / spec.params.m)
        self.metrics.exists_fp.labels(rel).set(fp)
        self._next_check[rel] = time.monotonic() + spec.check_every
        self.state[rel].update(seeded=True, fp_estimate=fp, bits=bits, rows=rows, version=version,
                               last_build_s=round(time.monotonic() - t0, 3), last_build_reason=reason)
        log.info("exists_filter_ready", table=rel, rows=rows, bits=bits, fp_estimate=round(fp, 5), version=version,
                 seconds=round(time.monotonic() - t0, 2))
        return True

    def _fill_from_snapshot(self, rel: str, spec: ExistsSpec, build_id: str) -> tuple[int, int, bool]:
        """(rows read, snapshot version, finished)."""
        conninfo = postgres_source(self.config, "the existence filter").conninfo()
        repl = psycopg2.connect(conninfo, connection_factory=psycopg2.extras.LogicalReplicationConnection)
        rows = 0
        try:
            point, snapshot = replication.create_temporary_slot(repl.cursor(), f"cdcd_xf_{build_id[:16]}")
            with psycopg.connect(session.conninfo(conninfo)) as conn:
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
                info = _tables(conn, self.rules.source, [self.rules.by_relation[rel]])[rel]
                cols = [c for c in info.replicated if c.name in spec.template.columns]
                render = spec.template.render
                page: list[str] = []
                for row in _rows(conn, rel, cols, PAGE):
                    rows += 1
                    key = render(row)
                    if key is not None:
                        page.append(key)
                    if len(page) >= PAGE:
                        if not self._page(rel, build_id, page):
                            return rows, 0, False
                        page = []
                if page and not self._page(rel, build_id, page):
                    return rows, 0, False
        finally:
            repl.close()  # drops the temporary slot
        return rows, point - 1, True

    def _page(self, rel: str, build_id: str, keys: list[str]) -> bool:
        if not self.sink.exists.fill(rel, build_id, keys):
            log.warning("exists_filter_build_cancelled", table=rel, detail="the build is no longer current")
            return False
        if self.after_page is not None:
            self.after_page(rel)
        return not self.stop.is_set()
