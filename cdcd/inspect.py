"""``cdcd inspect``: is what Redis serves consistent with Postgres right now?

A read-only, rate-limited audit. It reads rows (a sample, or every row with
``--all``), computes each row's cache keys with the compiled rules, reads those
entries from Redis and classifies them; then it samples the keyspace the other
way round (Redis key -> template -> rows) to find values kept for rows that no
longer exist.

What "stale" means, per kind of entry (entries that hold no value -- absent,
tombstone, lease -- or whose recorded tag counters moved are *not cached*, never
stale: no reader would be served from them):

* ``update`` rules, value written by the daemon: it must equal the row's current
  projection. The row is read as *text* with the replication session's settings
  (``DateStyle=ISO``, ``TimeZone=UTC``, ...) and converted by the same
  :mod:`cdcd.sources.pgtypes` functions the pgoutput decoder uses, so a fresh
  entry compares equal (as decoded JSON) whatever the column types.
* values written by applications (``invalidate`` rules, or app fills of
  ``update`` keys that are not the projection): their serialization is the
  application's, so the value cannot be compared. What *can* be checked is
  time: the entry's generation ``g`` is the Redis clock (microseconds) of its
  last write, and ``pg_xact_commit_timestamp(xmin)`` is the commit time of the
  row's last change. Once the daemon has applied past that change, a correctly
  invalidated entry was written after the change (the daemon's tombstone, or a
  guarded fill taken after it), so ``g`` < commit time means the invalidation
  was lost. This needs ``track_commit_timestamp = on``; without it such values
  are counted as *unverifiable*. (The entry's ``v`` cannot serve here: SQL has
  no way to map a row's ``xmin`` to the LSN of its commit, and after a
  tombstone expires a guarded fill legitimately records ``v = 0``.) The two
  server clocks are compared at start and the offset corrected; ``clock_margin``
  absorbs what remains.
* a cached "not found" (``n=1``) for a key some row maps to is stale, whatever
  the rule: the row's insert must have invalidated it, and a guarded fill after
  that insert would have found the row.
* a value the daemon wrote under an ``update`` key no row maps to any more is
  stale (the delete or key change should have left a tombstone). The same for an
  application value is *unverifiable*: an app may legitimately cache an empty
  list under ``user-orders:{user_id}``.

No false positive for a change in flight: every candidate is re-checked after
the daemon's applied version (``<prefix>#cdcd:applied`` field ``version``) has
passed the WAL insert position read after the row was read, and counts as stale
only when neither the row (same ``ctid``/``xmin``) nor the entry (same
generation) moved across that wait. A row visible to the inspector's snapshot
has its commit record before that position, and the daemon applies in commit
order, so by then its invalidation must have reached Redis. (The *insert*
position, ``pg_current_wal_insert_lsn()``, not ``pg_current_wal_lsn()``: with
``synchronous_commit=off`` a commit is visible before its record is written.)
On an idle database the daemon's version only moves with the next transaction;
the inspector then
emits one *heartbeat* -- an empty cdcd invalidation message
(``pg_logical_emit_message(false, 'cdcd', '{"keys":[],"tags":[]}')``, one WAL
record, no table or cache entry touched) -- unless ``heartbeat=False``.
Candidates that do not settle within ``settle_timeout`` (daemon down or
lagging, or a row changing all the time) are reported *unsettled*, not stale,
and make the run inconclusive (exit code 3).

Known limits: the versions the daemon records must be Postgres LSNs (the
postgres source); a key that two tables' templates can both produce is compared
with the rows of the table it was derived from; key -> row lookups for the
orphan scan use the template columns, so without an index on them each lookup
is a sequential scan (the rate limit bounds the load); publications with column
lists are not understood (cdcd creates publications without them); an
application value written less than ``clock_margin`` before the row's change
cannot be told from one written just after it, so such a lost invalidation goes
unreported; a key whose rows cannot be looked up again (a type without an
equality operator) is reported unsettled rather than judged.

Read-only: the Postgres session runs with ``default_transaction_read_only``;
the heartbeat (one WAL record, on a separate connection) is the only write.
Exit codes: 0 consistent, 1 stale ratio above ``threshold`` (or Postgres/Redis
failed), 2 configuration error, 3 inconclusive.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TextIO

from cdcd.sources.pgtypes import convert

if TYPE_CHECKING:  # imported where used: ``cdcd --help`` must not pay for psycopg, redis and pydantic
    import psycopg

    from cdcd.config import Config
    from cdcd.rules import CompiledRule, Rules, Template

EXIT_OK = 0
EXIT_STALE = 1
EXIT_CONFIG = 2
EXIT_INCONCLUSIVE = 3

HEARTBEAT = '{"keys":[],"tags":[]}'
_FIELDS = ("v", "g", "d", "n", "t", "s")
_BYTEA = 17
_JSON = 114


class InspectError(Exception):
    """The inspector cannot run with this configuration (exit code 2)."""


# ------------------------------------------------------------------------------ report


@dataclass(slots=True)
class StaleEntry:
    key: str
    relation: str
    reason: str
    writer: str  # who wrote the entry: cdc | app | ?
    entry_version: int
    applied_version: int | None
    written_at: str | None  # Redis clock of the entry's last write (from its generation)
    row_changed_at: str | None  # commit time of the row's last change (track_commit_timestamp)
    stale_seconds: float | None  # how long before the row's last change the entry was written
    lsn_gap_max: int | None  # applied version - entry version: an upper bound on how far behind, in WAL bytes


@dataclass(slots=True)
class TableStats:
    rows: int = 0
    keys: int = 0
    cached: int = 0
    fresh: int = 0
    stale: int = 0
    unverifiable: int = 0
    not_cached: int = 0


@dataclass
class InspectReport:
    rows_checked: int = 0
    keys_checked: int = 0
    cached: int = 0
    fresh: int = 0
    unverifiable: int = 0
    not_cached: dict[str, int] = field(default_factory=dict)
    orphan_keys_checked: int = 0
    unmapped_keys: int = 0
    foreign_keys: int = 0
    in_flight: int = 0  # candidates that resolved once the daemon caught up
    stale: list[StaleEntry] = field(default_factory=list)
    unsettled: list[str] = field(default_factory=list)
    tables: dict[str, TableStats] = field(default_factory=dict)
    threshold: float = 0.0
    applied_version: int | None = None
    commit_timestamps: bool = False
    clock_offset: float = 0.0  # Redis clock - Postgres clock, seconds
    heartbeats: int = 0
    elapsed: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def stale_ratio(self) -> float:
        return len(self.stale) / self.keys_checked if self.keys_checked else 0.0

    @property
    def consistency_ratio(self) -> float:
        return 1.0 - self.stale_ratio

    @property
    def exit_code(self) -> int:
        if self.stale and self.stale_ratio > self.threshold:
            return EXIT_STALE
        if self.unsettled:
            return EXIT_INCONCLUSIVE
        return EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows_checked": self.rows_checked, "keys_checked": self.keys_checked, "cached": self.cached,
            "fresh": self.fresh, "stale": len(self.stale), "unverifiable": self.unverifiable,
            "not_cached": self.not_cached, "orphan_keys_checked": self.orphan_keys_checked,
            "unmapped_keys": self.unmapped_keys, "foreign_keys": self.foreign_keys, "in_flight": self.in_flight,
            "unsettled": len(self.unsettled), "stale_ratio": self.stale_ratio,
            "consistency_ratio": self.consistency_ratio, "threshold": self.threshold,
            "applied_version": self.applied_version, "commit_timestamps": self.commit_timestamps,
            "clock_offset": round(self.clock_offset, 6), "heartbeats": self.heartbeats,
            "elapsed": round(self.elapsed, 3), "exit_code": self.exit_code,
            "tables": {rel: asdict(s) for rel, s in self.tables.items()},
            "stale_entries": [asdict(s) for s in self.stale],
            "unsettled_keys": self.unsettled, "notes": self.notes,
        }

    def render(self, out: TextIO) -> None:
        w = out.write
        w(f"{'table':<32} {'rows':>8} {'keys':>8} {'cached':>8} {'fresh':>8} {'stale':>6} {'unverif':>8} "
          f"{'not cached':>10}\n")
        for rel, ts in sorted(self.tables.items()):
            w(f"{rel:<32} {ts.rows:>8} {ts.keys:>8} {ts.cached:>8} {ts.fresh:>8} {ts.stale:>6} "
              f"{ts.unverifiable:>8} {ts.not_cached:>10}\n")
        nc = ", ".join(f"{k} {v}" for k, v in sorted(self.not_cached.items())) or "none"
        w(f"\nrows checked {self.rows_checked}, keys checked {self.keys_checked} "
          f"(of which {self.orphan_keys_checked} from the keyspace scan), cached {self.cached}, "
          f"fresh {self.fresh}, stale {len(self.stale)}, unverifiable {self.unverifiable}, "
          f"unsettled {len(self.unsettled)}\n")
        w(f"not cached: {nc}; in flight (resolved on re-check): {self.in_flight}; "
          f"keys matching no template: {self.unmapped_keys}\n")
        w(f"consistency ratio {self.consistency_ratio:.6f} (stale ratio {self.stale_ratio:.6f}, threshold "
          f"{self.threshold}); daemon applied version {self.applied_version}; commit timestamps "
          f"{'on' if self.commit_timestamps else 'off'}; {self.elapsed:.1f}s\n")
        for s in self.stale[:50]:
            how = []
            if s.stale_seconds is not None:
                how.append(f"{s.stale_seconds:.3f}s before the row's last change")
            if s.lsn_gap_max is not None:
                how.append(f"version {s.entry_version}, <= {s.lsn_gap_max} WAL bytes behind the daemon")
            w(f"STALE {s.key} ({s.relation}, written by {s.writer}): {s.reason}"
              f"{'; ' + '; '.join(how) if how else ''}\n")
        if len(self.stale) > 50:
            w(f"... and {len(self.stale) - 50} more stale entries (use --json for all)\n")
        for k in self.unsettled[:20]:
            w(f"UNSETTLED {k}: could not be re-checked after the daemon caught up (daemon down or lagging?)\n")
        for n in self.notes:
            w(f"note: {n}\n")
        verdict = {EXIT_OK: "OK", EXIT_STALE: "STALE ENTRIES ABOVE THRESHOLD",
                   EXIT_INCONCLUSIVE: "INCONCLUSIVE (unsettled candidates)"}[self.exit_code]
        w(f"result: {verdict}\n")


# ------------------------------------------------------------------------------ pieces


class TokenBucket:
    """Paces work to ``rate`` units per second with a burst of one second's worth."""

    def __init__(self, rate: float) -> None:
        self.rate = max(rate, 1e-6)
        self.capacity = max(1.0, self.rate)
        self.tokens = self.capacity
        self.last = time.monotonic()

    def take(self, n: float) -> None:
        while True:
            now = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
            self.last = now
            if self.tokens >= min(n, self.capacity):
                self.tokens -= n  # may go negative for n > capacity: the debt is paid by later waits
                return
            time.sleep((min(n, self.capacity) - self.tokens) / self.rate)


@dataclass(slots=True)
class Col:
    name: str
    oid: int
    typname: str


@dataclass(slots=True)
class Table:
    relation: str
    rule: CompiledRule
    columns: list[Col]
    pk: list[str]
    reltuples: float

    @property
    def quoted(self) -> str:
        schema, _, table = self.relation.partition(".")
        return f"{_ident(schema)}.{_ident(table)}"

    def col(self, name: str) -> Col | None:
        for c in self.columns:
            if c.name == name:
                return c
        return None


@dataclass(slots=True)
class DbRow:
    ctid: str
    xmin: str
    committed: float | None  # commit time of the row's last change, Postgres clock (unix seconds)
    raw: dict[str, str | None]
    values: dict[str, Any]


@dataclass(slots=True)
class Entry:
    v: int
    g: int | None
    d: bytes | None
    n: bool
    t: str | None
    s: str

    @property
    def holds(self) -> bool:
        return self.d is not None or self.n


@dataclass
class Check:
    """One key of one table: how to find its rows again, and what the last round saw."""

    key: str  # full Redis key
    table: Table
    lookups: list[tuple[Template, dict[str, str]]]  # template + raw text of its columns
    rows: list[DbRow] = field(default_factory=list)
    entry: Entry | None = None
    lsn: int = 0
    origin: str = "row"  # "row" (row-driven) or "scan" (keyspace scan)
    verdict: str = ""
    detail: str = ""

    def fingerprint(self) -> tuple[Any, ...]:
        return (self.entry.g if self.entry else None, self.entry.v if self.entry else None,
                tuple(sorted((r.ctid, r.xmin) for r in self.rows)))


def _ident(name: str) -> str:
    """A quoted identifier for queries run with parameters (every query here is: ``%`` is doubled)."""
    return '"' + name.replace('"', '""').replace("%", "%%") + '"'


def _s(b: Any) -> str | None:
    if b is None:
        return None
    return b.decode() if isinstance(b, bytes) else str(b)


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat() if ts is not None else None


# ------------------------------------------------------------------------------ the inspector


class Inspector:
    def __init__(self, config: Config, rate: float, settle_timeout: float, heartbeat: bool = True,
                 clock_margin: float = 0.05, page_size: int = 500) -> None:
        import psycopg
        import redis

        from cdcd.config import PostgresSourceSettings
        from cdcd.pg import session

        if not isinstance(config.source, PostgresSourceSettings):
            # Rows come from Postgres, and a candidate settles once the daemon's version (an LSN in the
            # slot's commit order) passes a WAL position: neither holds for a Kafka/Debezium source.
            raise InspectError(f"inspect needs the postgres source (it reads the rows and compares the slot's "
                               f"commit LSNs); this configuration's source is {config.source.type!r}")
        self.config = config
        self.rules: Rules = config.rules()
        self.ks = self.rules.keyspace
        self.bucket = TokenBucket(rate)
        self.settle_timeout = settle_timeout
        self.heartbeat = heartbeat
        self.clock_margin = clock_margin
        self.page = max(1, min(page_size, int(rate) or 1))
        self.report = InspectReport()
        self.redis = redis.Redis.from_url(config.redis.url, **config.redis.client_kwargs())
        self.conninfo = config.source.conninfo()  # password and TLS settings merged in
        # The replication session's text formats (cdcd.pg.session): rows read here must convert to
        # exactly the values the pgoutput decoder produced from the same data.
        self.pg: psycopg.Connection[Any] = psycopg.connect(
            session.conninfo(self.conninfo, read_only=True), autocommit=True, connect_timeout=5,
            application_name="cdcd-inspect")
        self.tables: dict[str, Table] = {}
        self.offset = 0.0  # Redis clock - Postgres clock
        self.offset_err = 0.0
        self._tag_cache: dict[str, str | None] = {}

    def close(self) -> None:
        self.pg.close()
        self.redis.close()

    # -------------------------------------------------------------- setup

    def setup(self) -> None:
        row = self.pg.execute("SHOW track_commit_timestamp").fetchone()
        self.report.commit_timestamps = bool(row and row[0] == "on")
        if not self.report.commit_timestamps:
            self.report.notes.append(
                "track_commit_timestamp is off: values written by applications (invalidate rules) cannot be "
                "dated and are counted as unverifiable; turn it on (needs a restart) to check them")
        self._measure_clocks()
        from cdcd.pg import catalog

        errors: list[str] = []
        for rel, rule in self.rules.by_relation.items():
            info = catalog.table_by_name(self.pg, rel)
            if info is None:
                self.report.notes.append(f"{rel}: table does not exist; skipped")
                continue
            errors.extend(catalog.rule_errors(rel, self.rules.source[rel], info))
            cols = [Col(c.name, c.type_oid, c.type_name) for c in info.replicated]
            self.tables[rel] = Table(rel, rule, cols, catalog.primary_key(self.pg, info.oid), info.reltuples)
        if errors:
            raise InspectError("rules do not match the database schema:\n  " + "\n  ".join(errors))

    def _measure_clocks(self) -> None:
        """Offset between the Redis and Postgres clocks (best of three), so times compare across servers."""
        best: tuple[float, float] | None = None
        for _ in range(3):
            t0 = time.time()
            row = self.pg.execute("SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()
            t1 = time.time()
            sec, usec = self.redis.time()
            t2 = time.time()
            pg_now = float(row[0]) if row else t0
            pg_off = pg_now - (t0 + t1) / 2
            redis_off = (sec + usec / 1e6) - (t1 + t2) / 2
            err = (t1 - t0) / 2 + (t2 - t1) / 2
            if best is None or err < best[1]:
                best = (redis_off - pg_off, err)
        assert best is not None
        self.offset, self.offset_err = best
        self.report.clock_offset = self.offset

    # -------------------------------------------------------------- Postgres

    def _select_list(self, t: Table) -> str:
        ts = "extract(epoch FROM pg_xact_commit_timestamp(xmin))::float8" if self.report.commit_timestamps \
            else "NULL::float8"
        return "ctid::text, xmin::text, " + ts + ", " + ", ".join(_ident(c.name) for c in t.columns)

    def _rows(self, t: Table, query: str, params: Sequence[Any] = ()) -> list[DbRow]:
        """Rows as raw text (column output functions), converted exactly like the pgoutput decoder does."""
        cur = self.pg.execute(query, list(params))
        res = cur.pgresult
        out: list[DbRow] = []
        if res is None:
            return out
        cols = t.columns
        for i in range(res.ntuples):
            raw: dict[str, str | None] = {}
            values: dict[str, Any] = {}
            for j, c in enumerate(cols, start=3):
                b = res.get_value(i, j)
                text = b.decode() if b is not None else None
                raw[c.name] = text
                values[c.name] = None if text is None else convert(c.oid, text)
            committed = res.get_value(i, 2)
            out.append(DbRow(ctid=(res.get_value(i, 0) or b"").decode(), xmin=(res.get_value(i, 1) or b"").decode(),
                             committed=float(committed) if committed is not None else None, raw=raw, values=values))
        return out

    def _lsn(self) -> int:
        row = self.pg.execute(
            "SELECT pg_wal_lsn_diff(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() "
            "ELSE pg_current_wal_insert_lsn() END, '0/0')::text").fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def _sample(self, t: Table, n: int) -> list[DbRow]:
        sel = self._select_list(t)
        if t.reltuples > 100_000:
            pct = min(100.0, 200.0 * n / t.reltuples)  # whole blocks: cheap on big tables, oversampled 2x
            q = f"SELECT {sel} FROM {t.quoted} TABLESAMPLE SYSTEM ({pct:.6f}) ORDER BY random() LIMIT {int(n)}"
        elif t.reltuples > 5 * n:
            pct = min(100.0, 200.0 * n / t.reltuples)
            q = f"SELECT {sel} FROM {t.quoted} TABLESAMPLE BERNOULLI ({pct:.6f}) ORDER BY random() LIMIT {int(n)}"
        else:  # small or never analyzed (reltuples -1): a scan with a top-N sort
            q = f"SELECT {sel} FROM {t.quoted} ORDER BY random() LIMIT {int(n)}"
        return self._rows(t, q)

    def _pages(self, t: Table) -> Iterator[list[DbRow]]:
        """Every row, in pages: keyset on the primary key, else block ranges (never one long snapshot)."""
        sel = self._select_list(t)
        if t.pk:
            pk_cols = [t.col(c) for c in t.pk]
            order = ", ".join(_ident(c) for c in t.pk)
            last: list[str | None] | None = None
            while True:
                self.bucket.take(self.page)
                if last is None:
                    rows = self._rows(t, f"SELECT {sel} FROM {t.quoted} ORDER BY {order} LIMIT {self.page}")
                else:
                    cond = "(" + order + ") > (" + ", ".join(
                        f"%s::{c.typname}" for c in pk_cols if c is not None) + ")"
                    rows = self._rows(t, f"SELECT {sel} FROM {t.quoted} WHERE {cond} ORDER BY {order} "
                                         f"LIMIT {self.page}", last)
                if not rows:
                    return
                yield rows
                last = [rows[-1].raw[c] for c in t.pk]
        else:
            block = 0
            step = 64
            while True:
                size = self.pg.execute("SELECT pg_relation_size(%s::regclass) / current_setting('block_size')::int",
                                       (t.quoted.replace("%%", "%"),)).fetchone()
                if size is None or block >= int(size[0]):
                    return
                rows = self._rows(t, f"SELECT {sel} FROM {t.quoted} WHERE ctid >= '({block},0)'::tid "
                                     f"AND ctid < '({block + step},0)'::tid")
                block += step
                if rows:
                    self.bucket.take(len(rows))
                    yield rows

    def _lookup(self, t: Table, template: Template, values: dict[str, str], key: str) -> list[DbRow] | None:
        """Rows whose ``template`` renders ``key``; None when the values cannot be looked up."""
        import psycopg

        conds, params = [], []
        for col, text in values.items():
            c = t.col(col)
            if c is None:
                return None
            if c.oid == _JSON:
                conds.append(f"{_ident(col)}::jsonb = %s::jsonb")
            else:
                conds.append(f"{_ident(col)} = %s::{c.typname}")
            params.append(text)
        try:
            rows = self._rows(t, f"SELECT {self._select_list(t)} FROM {t.quoted} WHERE {' AND '.join(conds)}",
                              params)
        except psycopg.Error:
            return None  # e.g. 'email:x' is not a bigint: this template does not produce this key
        bare = key[len(self.ks.prefix):]
        return [r for r in rows if template.render(r.values) == bare]

    def _reload(self, c: Check) -> bool:
        rows: dict[str, DbRow] = {}
        ok = False
        for template, values in c.lookups:
            found = self._lookup(c.table, template, values, c.key)
            if found is None:
                continue
            ok = True
            for r in found:
                rows[r.ctid] = r
        c.rows = list(rows.values())
        return ok

    def _emit_heartbeat(self) -> None:
        import psycopg

        try:
            with psycopg.connect(self.conninfo, autocommit=True, connect_timeout=5,
                                 application_name="cdcd-inspect-heartbeat") as conn:
                conn.execute("SELECT pg_logical_emit_message(false, 'cdcd', %s)", (HEARTBEAT,))
            self.report.heartbeats += 1
        except psycopg.Error as exc:
            self.report.notes.append(f"heartbeat failed ({str(exc).strip()}): on an idle database candidates "
                                     "may stay unsettled")
            self.heartbeat = False

    # -------------------------------------------------------------- Redis

    def _entries(self, keys: Sequence[str]) -> list[Entry | str | None]:
        """Entry per key; None when absent, "foreign" when the key is not a cdcd entry."""
        out: list[Entry | str | None] = []
        for start in range(0, len(keys), 500):
            pipe: Any = self.redis.pipeline(transaction=False)
            for k in keys[start:start + 500]:
                pipe.hmget(k, *_FIELDS)
            for res in pipe.execute(raise_on_error=False):
                if isinstance(res, Exception):
                    out.append("foreign")
                    continue
                v, g, d, n, t, s = res
                if v is None and g is None and d is None:
                    out.append(None)
                    continue
                try:
                    gs = _s(g)
                    out.append(Entry(v=int(_s(v) or 0), g=int(gs) if gs is not None else None, d=d,
                                     n=_s(n) == "1", t=_s(t), s=_s(s) or "?"))
                except ValueError:
                    out.append("foreign")
        return out

    def _tags_valid(self, entries: Iterable[Entry]) -> dict[str, str | None]:
        """Current counters of every tag the given entries recorded (one MGET)."""
        names: set[str] = set()
        for e in entries:
            if e.holds and e.t:
                try:
                    names.update(json.loads(e.t))
                except (ValueError, TypeError):
                    continue
        names = {n for n in names if n not in self._tag_cache}
        if names:
            ordered = sorted(names)
            vals = self.redis.mget([self.ks.tag(n) for n in ordered])
            self._tag_cache.update({n: _s(v) for n, v in zip(ordered, vals, strict=True)})
        return self._tag_cache

    def _applied(self) -> int | None:
        v = self.redis.hget(self.ks.applied, "version")
        try:
            return int(_s(v)) if v is not None else None  # type: ignore[arg-type]
        except ValueError:
            return None

    # -------------------------------------------------------------- classification

    def _classify(self, c: Check, tags: dict[str, str | None]) -> None:
        e = c.entry
        if e is None:
            c.verdict, c.detail = "absent", ""
            return
        if not e.holds:
            c.verdict = "lease" if e.s == "lease" else "tombstone"
            return
        if e.t:
            try:
                snap = json.loads(e.t)
            except ValueError:
                snap = {}
            if isinstance(snap, dict) and any(tags.get(k) != str(v) for k, v in snap.items()):
                c.verdict = "tag_invalid"  # readers check tags: this entry is never served
                return
        rule = c.table.rule
        if e.n:
            if c.rows:
                c.verdict, c.detail = "stale", "cached as not found, but the row exists"
            else:
                c.verdict = "fresh"
            return
        assert e.d is not None
        if rule.action == "update":
            if any(self._equal(e.d, self._projection(rule, r)) for r in c.rows):
                c.verdict = "fresh"
                return
            if e.s == "cdc":
                c.verdict = "stale"
                c.detail = ("value differs from the row's current projection" if c.rows
                            else "holds a value but no row maps to this key any more")
                return
        if not c.rows:
            c.verdict, c.detail = "unverifiable", "application value for a key no row maps to"
            return
        if not self.report.commit_timestamps or e.g is None:
            c.verdict, c.detail = "unverifiable", "application value; commit times unknown"
            return
        written = e.g / 1e6
        changed = [r.committed + self.offset for r in c.rows if r.committed is not None]
        if changed and written < max(changed) - self.clock_margin - self.offset_err:
            c.verdict, c.detail = "stale", "written before the row's last change, which the daemon has applied"
            return
        c.verdict = "fresh" if changed else "unverifiable"
        if not changed:
            c.detail = "commit time of the row's last change unknown (frozen or too old)"

    @staticmethod
    def _projection(rule: CompiledRule, row: DbRow) -> bytes:
        from cdcd.rules import encode_projection

        vals = row.values
        proj = vals if rule.columns is None else {k: vals.get(k) for k in rule.columns}
        return encode_projection(proj)

    @staticmethod
    def _equal(have: bytes, want: bytes) -> bool:
        if have == want:
            return True
        try:
            return bool(json.loads(have) == json.loads(want))
        except ValueError:
            return False

    def _stale_entry(self, c: Check, applied: int | None) -> StaleEntry:
        e = c.entry
        assert e is not None
        written = e.g / 1e6 if e.g is not None else None
        changed = [r.committed + self.offset for r in c.rows if r.committed is not None]
        row_at = max(changed) if changed else None
        return StaleEntry(
            key=c.key, relation=c.table.relation, reason=c.detail, writer=e.s, entry_version=e.v,
            applied_version=applied, written_at=_iso(written), row_changed_at=_iso(row_at),
            stale_seconds=round(row_at - written, 6) if row_at is not None and written is not None
            and row_at > written else None,
            lsn_gap_max=applied - e.v if applied is not None and e.v and applied >= e.v else None)

    # -------------------------------------------------------------- passes

    def _checks_for_rows(self, t: Table, rows: list[DbRow], lsn: int, seen: set[str]) -> list[Check]:
        by_key: dict[str, Check] = {}
        for r in rows:
            for tpl in t.rule.keys:
                k = tpl.render(r.values)
                if k is None:
                    continue
                full = self.ks.entry(k)
                lookup = (tpl, {col: r.raw[col] or "" for col in tpl.columns})
                c = by_key.get(full)
                if c is None:
                    c = by_key[full] = Check(full, t, [lookup], [r], lsn=lsn)
                else:
                    if all(x[0] is not tpl or x[1] != lookup[1] for x in c.lookups):
                        c.lookups.append(lookup)
                    if all(x.ctid != r.ctid for x in c.rows):
                        c.rows.append(r)
        seen.update(by_key)
        return list(by_key.values())

    def _evaluate(self, checks: list[Check]) -> list[Check]:
        """Read entries, classify, tally; return the candidates (stale on first sight)."""
        found = self._entries([c.key for c in checks])
        entries = [e for e in found if isinstance(e, Entry)]
        self._tag_cache.clear()
        tags = self._tags_valid(entries)
        candidates = []
        for c, e in zip(checks, found, strict=True):
            if e == "foreign":
                self.report.foreign_keys += 1
                continue
            c.entry = e if isinstance(e, Entry) else None
            self._classify(c, tags)
            stats = self.report.tables.setdefault(c.table.relation, TableStats())
            stats.keys += 1
            self.report.keys_checked += 1
            if c.origin == "scan":
                self.report.orphan_keys_checked += 1
            if c.verdict == "stale":
                candidates.append(c)
            else:
                self._tally(c)
        return candidates

    def _tally(self, c: Check) -> None:
        stats = self.report.tables.setdefault(c.table.relation, TableStats())
        if c.verdict in ("fresh", "stale", "unverifiable"):
            stats.cached += 1
            self.report.cached += 1
        if c.verdict == "fresh":
            stats.fresh += 1
            self.report.fresh += 1
        elif c.verdict == "unverifiable":
            stats.unverifiable += 1
            self.report.unverifiable += 1
        elif c.verdict == "stale":
            stats.stale += 1
        else:
            stats.not_cached += 1
            self.report.not_cached[c.verdict] = self.report.not_cached.get(c.verdict, 0) + 1

    def _settle(self, pending: list[Check]) -> None:
        """Re-check candidates after the daemon passed the WAL position read after their rows."""
        deadline = time.monotonic() + self.settle_timeout
        while pending:
            target = max(c.lsn for c in pending)
            if not self._wait_applied(target, deadline):
                break
            previous = {id(c): c.fingerprint() for c in pending}
            lost: list[Check] = []
            for c in pending:
                if not self._reload(c):
                    lost.append(c)  # its rows cannot be looked up again: never call it stale
            for c in lost:
                pending.remove(c)
                self.report.unsettled.append(c.key)
                self._tally_unsettled(c)
            if not pending:
                break
            lsn = self._lsn()
            found = self._entries([c.key for c in pending])
            self._tag_cache.clear()
            tags = self._tags_valid([e for e in found if isinstance(e, Entry)])
            still: list[Check] = []
            applied = self._applied()
            for c, e in zip(pending, found, strict=True):
                c.entry = e if isinstance(e, Entry) else None
                c.lsn = lsn
                self._classify(c, tags)
                if c.verdict != "stale":
                    self.report.in_flight += 1
                    self._tally(c)
                elif c.fingerprint() == previous[id(c)]:
                    self.report.stale.append(self._stale_entry(c, applied))
                    self._tally(c)
                else:
                    still.append(c)  # the row or the entry moved: wait for the daemon once more
            pending = still
            if time.monotonic() >= deadline:
                break
        for c in pending:
            self.report.unsettled.append(c.key)
            self._tally_unsettled(c)

    def _tally_unsettled(self, c: Check) -> None:
        stats = self.report.tables.setdefault(c.table.relation, TableStats())
        stats.cached += 1
        self.report.cached += 1

    def _wait_applied(self, target: int, deadline: float) -> bool:
        start = time.monotonic()
        beat = False
        while True:
            applied = self._applied()
            if applied is not None and applied >= target:
                self.report.applied_version = applied
                return True
            now = time.monotonic()
            if now >= deadline:
                self.report.applied_version = applied
                return False
            if self.heartbeat and not beat and now - start >= 0.2:
                self._emit_heartbeat()  # an idle database: give the daemon a position past the target
                beat = True
            time.sleep(0.02)

    def _scan_keys(self, limit: int | None) -> Iterator[str]:
        n = 0
        for raw in self.redis.scan_iter(match=_glob_escape(self.ks.prefix) + "*", count=1000):
            k = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
            if self.ks.is_system(k):
                continue
            yield k
            n += 1
            if limit is not None and n >= limit:
                return

    def _match(self, key: str) -> list[tuple[Table, Template, dict[str, str]]]:
        bare = key[len(self.ks.prefix):]
        out = []
        for t in self.tables.values():
            for tpl in t.rule.keys:
                values = tpl.match(bare)  # the daemon's own templates, unescaped
                if values is None:
                    continue
                for col, text in values.items():
                    c = t.col(col)
                    if c is not None and c.oid == _BYTEA:
                        values[col] = "\\x" + text
                out.append((t, tpl, values))
        return out

    def run(self, sample: int | None, all_rows: bool) -> InspectReport:
        t0 = time.monotonic()
        self.setup()
        seen: set[str] = set()
        candidates: list[Check] = []
        n = sample if sample is not None else 1000
        for t in self.tables.values():
            stats = self.report.tables.setdefault(t.relation, TableStats())
            pages: Iterable[list[DbRow]] = self._pages(t) if all_rows else [self._sample(t, n)]
            for rows in pages:
                lsn = self._lsn()  # after the rows: every change they show committed before this position
                if not all_rows:
                    self.bucket.take(len(rows))
                stats.rows += len(rows)
                self.report.rows_checked += len(rows)
                checks = self._checks_for_rows(t, rows, lsn, seen)
                for start in range(0, len(checks), 500):
                    candidates.extend(self._evaluate(checks[start:start + 500]))
        # The other way round: keys whose row is gone (deleted rows, changed key columns).
        batch: list[Check] = []
        for key in self._scan_keys(None if all_rows else n):
            if key in seen:
                continue
            self.bucket.take(1)
            matches = self._match(key)
            if not matches:
                self.report.unmapped_keys += 1
                continue
            by_table: dict[str, Check] = {}
            for t, tpl, values in matches:
                c = by_table.setdefault(t.relation, Check(key, t, [], origin="scan"))
                c.lookups.append((tpl, values))
            # a key several tables' templates produce is checked against the table that has rows for it
            batch.extend(by_table.values())
            if len(batch) >= 200:
                candidates.extend(self._evaluate_scanned(batch))
                batch = []
        if batch:
            candidates.extend(self._evaluate_scanned(batch))
        self._settle(candidates)
        if self.report.applied_version is None:
            self.report.applied_version = self._applied()
        self.report.elapsed = time.monotonic() - t0
        return self.report

    def _evaluate_scanned(self, checks: list[Check]) -> list[Check]:
        """Keyspace-scan keys: only those holding something need their rows looked up."""
        found = self._entries([c.key for c in checks])
        holding: list[Check] = []
        by_key: dict[str, list[Check]] = {}
        for c, e in zip(checks, found, strict=True):
            if isinstance(e, Entry) and e.holds:
                by_key.setdefault(c.key, []).append(c)
        for group in by_key.values():
            for c in group:
                if not self._reload(c):
                    c.lookups = []
            usable = [c for c in group if c.lookups]
            with_rows = [c for c in usable if c.rows]
            pick = (with_rows or usable)[:1]
            holding.extend(pick)
            if not usable:
                self.report.unmapped_keys += 1
        lsn = self._lsn()
        for c in holding:
            c.lsn = lsn
        return self._evaluate(holding) if holding else []


def _glob_escape(s: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", s)


# ------------------------------------------------------------------------------ entry points


def run_inspect(config: Config, sample: int | None, all_rows: bool, rate: float, threshold: float,
                settle_timeout: float, out: TextIO | None, *, json_output: bool = False, heartbeat: bool = True,
                clock_margin: float = 0.05) -> InspectReport:
    """Inspect, print the report to ``out`` (text or JSON), return it; ``report.exit_code`` is the verdict."""
    inspector = Inspector(config, rate=rate, settle_timeout=settle_timeout, heartbeat=heartbeat,
                          clock_margin=clock_margin)
    try:
        report = inspector.run(sample, all_rows)
    finally:
        inspector.close()
    report.threshold = threshold
    if out is not None:
        if json_output:
            out.write(json.dumps(report.to_dict(), indent=2) + "\n")
        else:
            report.render(out)
    return report


def cmd_inspect(args: argparse.Namespace) -> int:
    import psycopg
    import redis

    from cdcd.config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"cdcd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        report = run_inspect(config, None if args.all else args.sample, args.all, args.rate, args.threshold,
                             args.settle_timeout, sys.stdout, json_output=args.json, heartbeat=not args.no_heartbeat,
                             clock_margin=args.clock_margin)
    except InspectError as exc:
        print(f"cdcd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (psycopg.Error, redis.RedisError) as exc:
        print(f"cdcd: inspect failed: {str(exc).strip()}", file=sys.stderr)
        return EXIT_STALE
    return report.exit_code


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``cdcd inspect`` on the CLI's subparsers."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "inspect", help="check that cached entries agree with the database (read-only, rate-limited)",
        description="Exit codes: 0 consistent, 1 stale ratio above --threshold (or a failure), 2 configuration "
                    "error, 3 inconclusive (candidates did not settle within --settle-timeout).")
    p.add_argument("--config", "-c", required=True)
    p.add_argument("--sample", type=int, default=1000, help="rows sampled per table (default 1000)")
    p.add_argument("--all", action="store_true", help="check every row (paged) and scan the whole keyspace")
    p.add_argument("--rate", type=float, default=2000.0, help="rows (and scanned keys) per second at most")
    p.add_argument("--threshold", type=float, default=0.0, help="stale/checked ratio tolerated (default 0)")
    p.add_argument("--settle-timeout", type=float, default=10.0,
                   help="seconds to wait for the daemon to pass a candidate's position before re-checking")
    p.add_argument("--no-heartbeat", action="store_true",
                   help="never emit the empty cdcd message that moves an idle daemon's version forward")
    p.add_argument("--clock-margin", type=float, default=0.05,
                   help="seconds of clock uncertainty tolerated when dating application values")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(fn=cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m cdcd.inspect --config FILE`` until the CLI wires the subcommand in."""
    parser = argparse.ArgumentParser(prog="cdcd")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(["inspect", *(sys.argv[1:] if argv is None else argv)])
    return int(args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
