"""``cdcd warm``: fill Redis for ``update`` rules from a consistent snapshot, without a stampede.

Starting on an empty cache sends every first read to the database at once.
Warm-up writes the rows' projections ahead of time, rate-limited, through the
same versioned compare-and-set as the daemon, so it can never overwrite a newer
change the daemon has applied.

The version is exact, not a guess: a *temporary* replication slot is created
with an exported snapshot. Its consistent point ``L`` splits the world in two:
every transaction that committed before ``L`` is visible in the snapshot (so
its commit LSN is below ``L``), every later one is not (commit LSN at or above
``L``). Writing the snapshot's rows at version ``L - 1`` therefore loses to
every change the snapshot missed and wins only over changes it already
contains. (``pg_current_wal_lsn()`` read inside a REPEATABLE READ transaction
is not exact: a transaction can have written its commit record before the
snapshot yet still be invisible to it.)

Rows are read as text and decoded with the replication decoder's converters,
so keys and projections come out byte-identical to what the daemon writes.
Tags are not bumped: warming changes nothing an application has cached.
"""

from __future__ import annotations

import contextlib
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
import psycopg2
import psycopg2.extras
import structlog
from psycopg import sql
from psycopg.types.string import TextLoader

from cdcd.config import Config, postgres_source
from cdcd.keyspace import SCRIPTS, Keyspace
from cdcd.pg import catalog, replication, session
from cdcd.pg.lsn import lsn_to_str
from cdcd.pg.pgtypes import convert
from cdcd.ratelimit import TokenBucket
from cdcd.rules import CompiledRule, TableRule, encode_projection
from cdcd.sinks.epochs import TableEpochs

log = structlog.get_logger("cdcd.warm")

_APPLY = SCRIPTS["apply"]
_ENSURE = SCRIPTS["ensure_tag"]


@dataclass
class TableReport:
    table: str
    rows: int = 0
    written: int = 0
    refused: int = 0  # the daemon had already applied a newer change: correct, not an error
    seconds: float = 0.0


@dataclass
class WarmReport:
    version: int = 0
    tables: list[TableReport] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(t.rows for t in self.tables)


class Progress:
    """A bar on a terminal, a log line every few seconds otherwise."""

    def __init__(self, table: str, total: int, stream: Any = None) -> None:
        self.table, self.total = table, max(total, 1)
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = self.last = time.monotonic()

    def update(self, done: int, final: bool = False) -> None:
        now = time.monotonic()
        rate = done / max(now - self.t0, 1e-6)
        if self.tty:
            width = 30
            filled = int(width * min(done, self.total) / self.total)
            self.stream.write(f"\r{self.table:24} [{'#' * filled}{'.' * (width - filled)}] "
                              f"{done}/{self.total} rows {rate:,.0f}/s" + ("\n" if final else ""))
            self.stream.flush()
        elif final or now - self.last >= 5:
            self.last = now
            log.info("warm_progress", table=self.table, rows=done, total=self.total, rate=round(rate))


def _rows(conn: psycopg.Connection[Any], relation: str, cols: Sequence[catalog.Column],
          page: int) -> Iterator[dict[str, Any]]:
    """Rows as the replication stream carries them: replicated columns only, text converted by pgtypes.

    The text is each type's output function, as pgoutput sends it: psycopg is told to hand it over
    unparsed. Not a ``::text`` cast, which differs for some types (``true::text`` is ``true``, not ``t``;
    ``char(n)::text`` drops the padding).
    """
    schema, _, table = relation.partition(".")
    query = sql.SQL("SELECT {} FROM {}").format(
        sql.SQL(", ").join(sql.Identifier(c.name) for c in cols), sql.Identifier(schema, table))
    with conn.cursor(name=f"cdcd_warm_{uuid.uuid4().hex[:8]}") as cur:
        for oid in {c.type_oid for c in cols}:
            cur.adapters.register_loader(oid, TextLoader)  # this cursor only: the output text, as a str
        cur.itersize = page
        cur.execute(query)
        for rec in cur:
            yield {c.name: (None if v is None else convert(c.type_oid, v)) for c, v in zip(cols, rec, strict=True)}


def _entries(rule: CompiledRule, row: dict[str, Any]) -> tuple[list[str], bytes]:
    proj = row if rule.columns is None else {c: row[c] for c in rule.columns}
    keys = [k for k in (t.render(row) for t in rule.keys) if k is not None]
    return keys, encode_projection(proj)


def warm(config: Config, tables: list[str] | None = None, rate: float = 10_000, page: int = 1000,
         on_snapshot: Callable[[int], None] | None = None, progress_stream: Any = None) -> WarmReport:
    """Write every ``update`` rule's rows at the snapshot's version. Returns counts per table."""
    rules = config.rules()
    ks = rules.keyspace
    wanted = [r for r in rules.by_relation.values() if r.action == "update"]
    if tables:
        names = {t if "." in t else f"public.{t}" for t in tables}
        unknown = names - {r.relation for r in rules.by_relation.values()}
        if unknown:
            raise ValueError(f"no rule for {sorted(unknown)}")
        not_update = names - {r.relation for r in wanted}
        if not_update:
            raise ValueError(f"{sorted(not_update)}: only action 'update' rules have values to warm")
        wanted = [r for r in wanted if r.relation in names]
    client: Any = config.redis.client()
    epochs = table_epochs(client, ks, wanted)
    report = WarmReport()
    limiter = TokenBucket(rate)  # rows per second; 0 = unlimited
    with snapshot(config, "cdcd warm", on_snapshot) as (conn, version):
        report.version = version
        infos = _tables(conn, rules.source, wanted)
        for rule in wanted:
            report.tables.append(_warm_table(conn, client, rule, infos[rule.relation], version,
                                             epochs, limiter, page, progress_stream, ks))
    return report



def copies(ks: Keyspace, rule: CompiledRule, key: str, epochs: TableEpochs) -> list[tuple[str, str]]:
    """(Redis key, table-tag snapshot) of every entry warm writes for ``key``: the entry itself and, for a rule
    with hot-key replicas, each copy with its own slot's mirror of the table counter (as the daemon writes
    them: docs/hot-keys.md#hot-key-replicas), so a client reading copies finds them warm too."""
    tag = rule.table_tag
    out = [(ks.entry(key), epochs.snapshot(tag))]
    for slot in rule.replicas:
        out.append((ks.replica(key, slot), epochs.snapshot(tag, slot)))
    return out


def table_epochs(client: Any, ks: Keyspace, rules: Iterable[CompiledRule]) -> TableEpochs:
    """The rules' table counters, read *before* the snapshot is taken (and the scripts loaded).

    A TRUNCATE after this point either is in the snapshot (its rows are gone) or bumps the counter
    later, which invalidates what warm writes. Read after the snapshot, a bump could be recorded with
    rows that predate it.
    """
    for s in (_APPLY, _ENSURE):
        client.script_load(s.source)
    epochs = TableEpochs()
    for rule in rules:
        for slot in (None, *rule.replicas):  # a replicated rule's copies record their slot's mirror
            epochs.set(rule.table_tag, client.execute_command("EVALSHA", _ENSURE.sha, 1,
                                                              ks.counter(rule.table_tag, slot)), slot)
    return epochs


@contextlib.contextmanager
def snapshot(config: Config, label: str, on_snapshot: Callable[[int], None] | None = None
             ) -> Iterator[tuple[psycopg.Connection[Any], int]]:
    """A read-only REPEATABLE READ session on a temporary slot's exported snapshot, and its version ``L - 1``.

    Same session settings as the replication stream: values must print (a timestamptz in UTC, ...)
    exactly as the daemon receives them, or warm would write other keys and bytes.
    """
    conninfo = postgres_source(config, label).conninfo()
    repl = psycopg2.connect(conninfo, connection_factory=psycopg2.extras.LogicalReplicationConnection)
    try:
        point, snapshot_name = replication.create_temporary_slot(repl.cursor(), f"cdcd_warm_{uuid.uuid4().hex[:12]}")
        version = point - 1
        log.info("warm_snapshot", snapshot=snapshot_name, consistent_point=lsn_to_str(point), version=version)
        if on_snapshot is not None:
            on_snapshot(version)
        with psycopg.connect(session.conninfo(conninfo)) as conn:
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot_name)))
            yield conn, version
    finally:
        repl.close()  # drops the temporary slot

def _tables(conn: psycopg.Connection[Any], source: Mapping[str, TableRule],
            wanted: Sequence[CompiledRule]) -> dict[str, catalog.TableInfo]:
    """The catalog entry of every table to warm; refuses rules the daemon could not apply either."""
    out: dict[str, catalog.TableInfo] = {}
    errors: list[str] = []
    for rule in wanted:
        table = catalog.table_by_name(conn, rule.relation)
        if table is None:
            errors.append(f"tables.{rule.relation}: table {rule.relation} does not exist")
            continue
        errors.extend(catalog.rule_errors(rule.relation, source[rule.relation], table))
        out[rule.relation] = table
    if errors:
        raise ValueError("rules do not match the database schema:\n  " + "\n  ".join(errors))
    return out


def _warm_table(conn: psycopg.Connection[Any], client: Any, rule: CompiledRule, info: catalog.TableInfo,
                version: int, epochs: TableEpochs, limiter: TokenBucket, page: int, progress_stream: Any,
                ks: Keyspace) -> TableReport:
    t0 = time.monotonic()
    rep = TableReport(rule.relation)
    schema, _, table = rule.relation.partition(".")
    total_row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, table))).fetchone()
    progress = Progress(rule.relation, int(total_row[0]) if total_row else 0, progress_stream)
    cols = info.replicated
    pipe = client.pipeline(transaction=False)
    pending = 0

    def flush() -> None:
        nonlocal pipe, pending
        if not pending:
            return
        results = pipe.execute()
        applied = sum(1 for x in results if x == 1)
        rep.written += applied
        rep.refused += len(results) - applied
        pipe = client.pipeline(transaction=False)
        pending = 0

    for row in _rows(conn, rule.relation, cols, page):
        keys, data = _entries(rule, row)
        for k in keys:
            for target, snap in copies(ks, rule, k, epochs):
                pipe.execute_command("EVALSHA", _APPLY.sha, 1, target, version, "v", rule.ttl_ms, data, snap)
                pending += 1
        rep.rows += 1
        if rep.rows % page == 0:
            flush()
            limiter.take(page)
            progress.update(rep.rows)
    flush()
    progress.update(rep.rows, final=True)
    rep.seconds = time.monotonic() - t0
    log.info("warm_table_done", table=rule.relation, rows=rep.rows, written=rep.written, refused=rep.refused,
             seconds=round(rep.seconds, 2))
    return rep
