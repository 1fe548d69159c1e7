"""``cdcd warm --hot``: fill exactly the fleet's hot keys, at a consistent version, before traffic arrives.

After a failover, a flush or a new region, the first minutes of reads go to the database. A full
``cdcd warm`` fills every row of every ``update`` rule; most of them are never read soon. Clients
that opted in to hot-key detection publish what they read most (:mod:`cdcd.client.hotkeys`,
:mod:`cdcd.hotset`); this reads that set from Redis and fills those keys only.

Each hot key is mapped back to its row the way ``cdcd inspect`` does (the daemon's own templates,
:func:`cdcd.inspect.keymatch.match_key`, then :meth:`cdcd.inspect.rows.RowReader.lookup`), on the
same exported snapshot and at the same version ``L - 1`` as ``cdcd warm`` (:func:`cdcd.warm.snapshot`),
and written through the daemon's versioned APPLY script: a change the daemon applied meanwhile is
newer and wins. Nothing is skipped silently: keys that match no rule, keys of ``invalidate`` rules
(their values are the application's, only it can fill them), keys whose row does not exist and
keys that several rows or tables could render are each counted and listed.

A lookup whose text cannot be cast to the column's type (``user:abc`` for a bigint id) fails in
Postgres; it runs under a savepoint so the snapshot transaction survives. Lookups use the template
columns: without an index on them each is a sequential scan (the rate limit bounds the load).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
import structlog

from cdcd.config import Config, postgres_source
from cdcd.hotset import read_fleet
from cdcd.inspect.keymatch import match_key
from cdcd.inspect.model import DbRow, Table
from cdcd.inspect.rows import RowReader
from cdcd.keyspace import SCRIPTS
from cdcd.ratelimit import TokenBucket
from cdcd.rules import encode_projection
from cdcd.warm import Progress, copies, snapshot, table_epochs

log = structlog.get_logger("cdcd.warm")

_APPLY = SCRIPTS["apply"]
_BATCH = 100


@dataclass
class HotWarmReport:
    version: int = 0
    processes: int = 0
    hot_keys: int = 0
    written: int = 0
    refused: int = 0  # the daemon had already applied a newer change: correct, not an error
    unmatched: list[str] = field(default_factory=list)  # no rule's template renders it
    not_warmable: list[tuple[str, str]] = field(default_factory=list)  # (key, why)
    missing_rows: list[str] = field(default_factory=list)  # a rule's key, but no such row in the snapshot
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"version": self.version, "processes": self.processes, "hot_keys": self.hot_keys,
                "written": self.written, "refused": self.refused, "unmatched": self.unmatched,
                "not_warmable": [{"key": k, "why": w} for k, w in self.not_warmable],
                "missing_rows": self.missing_rows, "seconds": round(self.seconds, 3)}


def warm_hot(config: Config, top: int = 1000, min_score: float = 0.0, rate: float = 2000, max_age: float = 300.0,
             hot_from: str | None = None, on_snapshot: Callable[[int], None] | None = None,
             progress_stream: Any = None) -> HotWarmReport:
    """Fill the fleet's ``top`` hottest keys (score >= ``min_score``) at a snapshot's version.

    ``hot_from``: read the hot set from this Redis URL (the one clients publish to, e.g. the old Redis
    before traffic moves to the new one) instead of the configuration's Redis, which is filled.
    """
    t0 = time.monotonic()
    rules = config.rules()
    ks = rules.keyspace
    client: Any = config.redis.client()
    source: Any = client
    if hot_from:
        import redis

        source = redis.Redis.from_url(hot_from, socket_timeout=config.redis.socket_timeout)
    fleet = read_fleet(source, ks, max_age=max_age, top=top, min_score=min_score)
    report = HotWarmReport(processes=len(fleet.processes), hot_keys=len(fleet.keys))
    updates = [r for r in rules.by_relation.values() if r.action == "update"]
    epochs = table_epochs(client, ks, updates)  # before the snapshot (see table_epochs)
    bucket = TokenBucket(rate)  # keys per second; 0 = unlimited
    with snapshot(config, "cdcd warm --hot", on_snapshot) as (conn, version):
        report.version = version
        reader = RowReader(postgres_source(config, "cdcd warm --hot").conninfo(), bucket, 1, conn=conn)
        tables, errors, _notes = reader.tables(rules)
        if errors:
            raise ValueError("rules do not match the database schema:\n  " + "\n  ".join(errors))
        progress = Progress("hot set", len(fleet.keys), progress_stream)
        pipe = client.pipeline(transaction=False)
        pending = 0
        for done, (key, _score) in enumerate(fleet.keys, start=1):
            bucket.take(1)
            row = _row_for(conn, reader, tables, key, report)
            if row is not None:
                t, r = row
                rule = t.rule
                proj = r.values if rule.columns is None else {c: r.values[c] for c in rule.columns}
                data = encode_projection(proj)
                for target, snap in copies(ks, rule, key, epochs):  # the entry, and its hot-key replicas
                    pipe.execute_command("EVALSHA", _APPLY.sha, 1, target, version, "v", rule.ttl_ms, data, snap)
                    pending += 1
            if pending >= _BATCH:
                _flush(pipe, report)
                pending = 0
                progress.update(done)
        if pending:
            _flush(pipe, report)
        progress.update(len(fleet.keys), final=True)
    report.seconds = time.monotonic() - t0
    log.info("warm_hot_done", hot_keys=report.hot_keys, written=report.written, refused=report.refused,
             unmatched=len(report.unmatched), not_warmable=len(report.not_warmable),
             missing_rows=len(report.missing_rows), version=version, seconds=round(report.seconds, 2))
    return report


def _flush(pipe: Any, report: HotWarmReport) -> None:
    results = pipe.execute()
    applied = sum(1 for x in results if x == 1)
    report.written += applied
    report.refused += len(results) - applied


def _row_for(conn: psycopg.Connection[Any], reader: RowReader, tables: dict[str, Table], key: str,
             report: HotWarmReport) -> tuple[Table, DbRow] | None:
    """The one row of an ``update`` rule that renders ``key``; anything else is recorded in ``report``."""
    matches = match_key(tables.values(), key)
    if not matches:
        report.unmatched.append(key)
        return None
    updates = [m for m in matches if m[0].rule.action == "update"]
    if not updates:
        report.not_warmable.append((key, "invalidate rule: its values are the application's to fill"))
        return None
    found: list[tuple[Table, DbRow]] = []
    for t, tpl, values in updates:
        conn.execute("SAVEPOINT cdcd_hot")
        rows = reader.lookup(t, tpl, values, key)
        if rows is None:  # the cast failed (or the column is gone): undo the error, keep the snapshot
            conn.execute("ROLLBACK TO SAVEPOINT cdcd_hot")
        conn.execute("RELEASE SAVEPOINT cdcd_hot")
        found.extend((t, r) for r in rows or () if all((t.relation, r.ctid) != (u.relation, x.ctid) for u, x in found))
    if not found:
        report.missing_rows.append(key)
        return None
    if len(found) > 1:
        report.not_warmable.append((key, f"{len(found)} rows render it "
                                         f"({', '.join(sorted({t.relation for t, _ in found}))})"))
        return None
    return found[0]
