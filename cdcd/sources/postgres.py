"""Postgres logical replication source: a pgoutput slot streamed over the replication protocol.

Why two drivers: psycopg 3 serves every ordinary SQL statement (setup, schema
checks, lag queries), but it has no streaming-replication API (its tracker,
issue 71); psycopg2's ``LogicalReplicationConnection`` drives
``START_REPLICATION``, keepalives and standby status updates in C. Rather than
hand-parse COPY BOTH frames, the stream uses psycopg2 and nothing else does.

Checkpointing: the slot's confirmed flush position moves only in :meth:`ack`,
which the daemon calls after Redis acknowledged every transaction up to that
position. Crash anywhere and the slot re-delivers from there; versions in Redis
make the repeat harmless.
"""

from __future__ import annotations

import contextlib
import select
import time
from collections.abc import Sequence
from typing import Any

import psycopg
import psycopg2
import psycopg2.extensions
import psycopg2.extras
import structlog

from cdcd.change import Rejected, Transaction
from cdcd.config import PostgresSourceSettings
from cdcd.pg import catalog, session
from cdcd.rules import Rules
from cdcd.sources.base import SourceError, SourceUnavailable
from cdcd.sources.pgoutput import DecodeError, PgOutputDecoder, lsn_to_str
from cdcd.sources.schemaguard import PgSchemaGuard, needed_columns

log = structlog.get_logger("cdcd.source.postgres")

_FORCE_FEEDBACK_EVERY = 0.05  # seconds: acks are forced out at most this often


def _split(relation: str) -> tuple[str, str]:
    schema, _, table = relation.partition(".")
    return schema, table


def _quote_rel(relation: str) -> str:
    schema, table = _split(relation)
    return f'"{schema}"."{table}"'


class PostgresSource:
    def __init__(self, settings: PostgresSourceSettings, rules: Rules) -> None:
        self.settings = settings
        self.rules = rules
        self.name = f"pg:{settings.slot}"
        self._conn: Any = None
        self._cur: Any = None
        self._decoder = PgOutputDecoder(self.name, settings.max_transaction_changes, settings.max_transaction_bytes)
        self.schema_guard = PgSchemaGuard(rules)
        self._catalog: psycopg.Connection[Any] | None = None  # the guard's catalog checks
        self._acked = 0
        self._received = 0
        self._handed = 0  # highest position poll() returned: the watermark never passes an unacked one
        self._watermark = 0
        self._watermark_reported = 0
        self._last_reply_request = 0.0
        self._last_forced = 0.0
        self.warnings: list[str] = []

    # ------------------------------------------------------------------ setup

    def sql(self) -> psycopg.Connection[Any]:
        try:
            return psycopg.connect(self.settings.conninfo(), autocommit=True, connect_timeout=5)
        except psycopg.OperationalError as exc:
            raise SourceUnavailable(f"cannot connect to Postgres: {str(exc).strip()}") from exc

    def check_schema(self, conn: psycopg.Connection[Any]) -> list[str]:
        """Validate the rules against the live schema and bind each table to its OID. Errors raise; returns warnings.

        The same checks as the schema guard's at run time: at startup a mismatch is a configuration error
        (fix the rules, nothing is served yet); on a reconnect, rules the guard already marked broken are
        skipped (they stay broken, tag-bump only) so one broken table never stops the others.
        """
        errors: list[str] = []
        warnings: list[str] = []
        guard = self.schema_guard
        for rel, rule in self.rules.source.items():
            if rel in guard.broken:
                continue
            table = catalog.table_by_name(conn, rel)
            if table is None:
                if rel in guard.bound:  # a reconnect: renamed or dropped while we were away; the OID tells which
                    guard.request_check()
                    continue
                errors.append(f"tables.{rel}: table {rel} does not exist")
                continue
            reconnect = rel in guard.bound
            guard.bind(rel, table.oid)
            if rel in guard.broken:
                continue
            cols = {c.name for c in table.columns}
            if reconnect and needed_columns(rule) - cols:
                guard.request_check()  # lost a column while we were away: the guard breaks the rule, no exit
                continue
            errors.extend(catalog.rule_errors(rel, rule, table))
            if needed_columns(rule) - cols:
                continue  # reported above
            ident_cols = catalog.identity_columns(conn, table)
            needed = rule.template_columns()
            if ident_cols is not None and not needed <= ident_cols:
                extra = sorted(needed - ident_cols)
                warnings.append(
                    f"{rel} has REPLICA IDENTITY {table.identity_name}: the old values of {extra} are not sent, so an "
                    f"update that changes them cannot drop the old keys/tags and a delete cannot compute them. "
                    f"Run: ALTER TABLE {_quote_rel(rel)} REPLICA IDENTITY FULL;")
        if errors:
            raise SourceError("rules do not match the database schema:\n  " + "\n  ".join(errors))
        return warnings

    def _gone_by_name(self, conn: psycopg.Connection[Any], rels: set[str]) -> set[str]:
        if not self.schema_guard.bound:
            return set()  # first start: check_schema already refused missing tables
        return {rel for rel in rels if conn.execute("SELECT to_regclass(%s)", (_quote_rel(rel),)).fetchone()
                in (None, (None,))}

    def setup(self) -> None:
        """wal_level, publication, slot: check, create when allowed, refuse clearly otherwise."""
        s = self.settings
        with self.sql() as conn:
            wal_level = conn.execute("SHOW wal_level").fetchone()
            if wal_level is None or wal_level[0] != "logical":
                raise SourceError(f"Postgres has wal_level={wal_level[0] if wal_level else '?'}; logical replication "
                                  "needs wal_level=logical (postgresql.conf, then restart the server)")
            self.warnings = self.check_schema(conn)
            for w in self.warnings:
                log.warning("replica_identity", detail=w)
            # tables the guard found broken (or gone by name at a reconnect) are not the publication's business
            wanted = {rel for rel in self.rules.source if rel not in self.schema_guard.broken}
            wanted -= self._gone_by_name(conn, wanted)
            pub = conn.execute("SELECT puballtables FROM pg_publication WHERE pubname = %s",
                               (s.publication,)).fetchone()
            if pub is None:
                if not s.create_publication:
                    raise SourceError(f"publication {s.publication!r} does not exist and create_publication is off; "
                                      f"create it: CREATE PUBLICATION {s.publication} FOR TABLE "
                                      f"{', '.join(_quote_rel(r) for r in sorted(wanted))};")
                conn.execute(f'CREATE PUBLICATION "{s.publication}" FOR TABLE '
                             f"{', '.join(_quote_rel(r) for r in sorted(wanted))}")
                log.info("publication_created", publication=s.publication, tables=sorted(wanted))
            elif not pub[0]:
                have = {f"{r[0]}.{r[1]}" for r in conn.execute(
                    "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s", (s.publication,))}
                missing = sorted(wanted - have)
                if missing:
                    if not s.create_publication:
                        raise SourceError(f"publication {s.publication!r} lacks tables {missing}; add them: ALTER "
                                          f"PUBLICATION {s.publication} ADD TABLE "
                                          f"{', '.join(_quote_rel(r) for r in missing)};")
                    conn.execute(f'ALTER PUBLICATION "{s.publication}" ADD TABLE '
                                 f"{', '.join(_quote_rel(r) for r in missing)}")
                    log.info("publication_extended", publication=s.publication, added=missing)
            slot = conn.execute("SELECT plugin, database FROM pg_replication_slots WHERE slot_name = %s",
                                (s.slot,)).fetchone()
            if slot is None:
                if not s.create_slot:
                    raise SourceError(f"replication slot {s.slot!r} does not exist and create_slot is off; "
                                      f"create it: SELECT pg_create_logical_replication_slot('{s.slot}', 'pgoutput');")
                conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (s.slot,))
                log.info("slot_created", slot=s.slot)
            elif slot[0] != "pgoutput":
                raise SourceError(f"replication slot {s.slot!r} uses plugin {slot[0]!r}; cdcd needs pgoutput")

    def slot_exists(self) -> bool:
        with self.sql() as conn:
            return conn.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s",
                                (self.settings.slot,)).fetchone() is not None

    # ------------------------------------------------------------------ streaming

    def connect(self) -> None:
        self.close()
        self.setup()
        try:
            # The session pins the text formats pgtypes parses (walsender output uses these settings).
            conn = psycopg2.connect(session.conninfo(self.settings.conninfo()), connect_timeout=5,
                                    connection_factory=psycopg2.extras.LogicalReplicationConnection)
        except psycopg2.OperationalError as exc:
            raise SourceUnavailable(f"replication connection failed: {str(exc).strip()}") from exc
        cur = conn.cursor()
        with self.sql() as sqlconn:
            server_version = sqlconn.info.server_version
        options = {"proto_version": "1", "publication_names": self.settings.publication}
        if server_version >= 140000:
            options["messages"] = "true"
        try:
            cur.start_replication(slot_name=self.settings.slot, decode=False, options=options,
                                  status_interval=max(1, round(self.settings.status_interval)))
        except psycopg2.Error as exc:
            conn.close()
            msg = str(exc).strip()
            if "is active for PID" in msg:
                raise SourceUnavailable(f"slot {self.settings.slot!r} is in use by another consumer: {msg}") from exc
            if "does not exist" in msg:
                raise SourceUnavailable(f"slot {self.settings.slot!r} vanished: {msg}") from exc
            raise SourceError(f"START_REPLICATION failed: {msg}") from exc
        self._conn, self._cur = conn, cur
        self._decoder = PgOutputDecoder(self.name, self.settings.max_transaction_changes,
                                        self.settings.max_transaction_bytes)
        self._decoder.on_relation = self.schema_guard.on_relation
        log.info("replication_started", slot=self.settings.slot, publication=self.settings.publication,
                 options=options)

    def poll(self, timeout: float) -> Sequence[Transaction | Rejected]:
        out = self._poll(timeout)
        if self.schema_guard.check_due():
            self._check_catalog()
        return out

    def _check_catalog(self) -> None:
        """The guard's catalog check (a DROP TABLE sends nothing down the stream); never fatal here."""
        try:
            if self._catalog is None or self._catalog.closed:
                self._catalog = psycopg.connect(self.settings.conninfo(), autocommit=True, connect_timeout=5)
            self.schema_guard.check_catalog(self._catalog)
        except psycopg.Error as exc:
            log.debug("schema_check_failed", error=str(exc).strip())
            if self._catalog is not None:
                with contextlib.suppress(psycopg.Error):
                    self._catalog.close()
            self._catalog = None

    def _poll(self, timeout: float) -> Sequence[Transaction | Rejected]:
        cur = self._cur
        if cur is None:
            raise SourceUnavailable("not connected")
        out: list[Transaction | Rejected] = []
        budget = self.settings.max_batch
        deadline = time.monotonic() + timeout
        decoder = self._decoder
        try:
            while True:
                msg = cur.read_message()
                if msg is not None:
                    self._received = max(self._received, msg.data_start)
                    try:
                        item = decoder.feed(msg.payload, msg.data_start)
                    except DecodeError as exc:
                        # A corrupt stream cannot be resynchronised mid-session: reconnect and
                        # re-read from the slot's confirmed position.
                        where = lsn_to_str(msg.data_start)
                        raise SourceUnavailable(f"pgoutput decode error at {where}: {exc}") from exc
                    if item is not None:
                        out.append(item)
                        budget -= len(item) if isinstance(item, Transaction) else 1
                        if budget <= 0:
                            break
                    continue
                if out and not decoder.in_transaction:
                    break  # drained what the server had: hand it on now (latency over batch size)
                if not out and self.watermark() > self._watermark_reported:
                    break  # idle and the watermark moved: let the daemon announce it now
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                wait = min(remaining, 0.5)
                interval = self.settings.watermark_interval
                if interval and not out:
                    wait = min(wait, self._request_reply(interval))
                select.select([self._conn], [], [], wait)
        except psycopg2.Error as exc:
            raise SourceUnavailable(f"replication stream broken: {str(exc).strip()}") from exc
        for item in out:
            if isinstance(item.position, int) and item.position > self._handed:
                self._handed = item.position
        return out

    # ------------------------------------------------------------------ applied watermark

    def watermark(self) -> int:
        """The applied watermark: every transaction whose commit ended at or before it has been acked,
        i.e. applied to Redis (docs/read-your-writes.md).

        Transactions arrive in commit order and a position is acked only after Redis applied it, so the
        highest ack is one. While nothing is pending (every position handed out acked, no transaction
        half-read), the server's WAL end from its last keepalive is one too: the walsender reports as its
        end the WAL it has decoded, and sends every published commit before it (psycopg2 keeps it in
        ``cursor.wal_end``; XLogData headers carry their own position, never a later one).
        """
        w = self._acked
        cur = self._cur
        if cur is not None and self._acked >= self._handed and not self._decoder.in_transaction:
            w = max(w, int(cur.wal_end or 0))
        if w > self._watermark:
            self._watermark = w
        return self._watermark

    def watermark_published(self, position: int) -> None:
        """The daemon announced ``position``: poll() stops waking up early for it."""
        self._watermark_reported = max(self._watermark_reported, position)

    def _request_reply(self, interval: float) -> float:
        """Ask the server for a keepalive (it carries its WAL end) at most every ``interval`` seconds while
        idle; returns how long until the next request is due."""
        now = time.monotonic()
        due = self._last_reply_request + interval - now
        if due > 0:
            return due
        self._last_reply_request = now
        if self._acked:
            self._cur.send_feedback(write_lsn=self._acked, flush_lsn=self._acked, reply=True, force=True)
        else:
            self._cur.send_feedback(reply=True, force=True)
        return interval

    def ack(self, positions: Sequence[Any]) -> None:
        lsns = [p for p in positions if isinstance(p, int)]
        if not lsns:
            return
        top = max(lsns)
        if top <= self._acked:
            return
        self._acked = top
        self._send_feedback(force=time.monotonic() - self._last_forced >= _FORCE_FEEDBACK_EVERY)

    def keepalive(self) -> None:
        """While the daemon waits for Redis, tell the server we are alive (without acking more)."""
        self._send_feedback(force=True)

    def _send_feedback(self, force: bool) -> None:
        if self._cur is None:
            return
        try:
            if self._acked:
                self._cur.send_feedback(write_lsn=self._acked, flush_lsn=self._acked, force=force)
            else:
                self._cur.send_feedback(force=force)
        except psycopg2.Error as exc:
            raise SourceUnavailable(f"cannot send standby status: {str(exc).strip()}") from exc
        if force:
            self._last_forced = time.monotonic()

    def flush(self) -> None:
        """Make sure the last ack reached the server (before a graceful exit)."""
        if self._acked:
            self._send_feedback(force=True)

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(SourceUnavailable):
                self.flush()
            with contextlib.suppress(psycopg2.Error):
                self._conn.close()
        self._conn = self._cur = None
        if self._catalog is not None:
            with contextlib.suppress(psycopg.Error):
                self._catalog.close()
            self._catalog = None

    def describe(self) -> dict[str, Any]:
        return {"slot": self.settings.slot, "acked_lsn": lsn_to_str(self._acked),
                "received_lsn": lsn_to_str(self._received)}

    def slot_stats(self) -> dict[str, int] | None:
        """Lag and retained WAL of the slot, from pg_replication_slots (None when the slot is gone)."""
        with self.sql() as conn:
            row = conn.execute(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint, "
                "pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint, "
                "pg_wal_lsn_diff(confirmed_flush_lsn, '0/0')::bigint "
                "FROM pg_replication_slots WHERE slot_name = %s", (self.settings.slot,)).fetchone()
        if row is None:
            return None
        return {"lag_bytes": int(row[0] or 0), "retained_bytes": int(row[1] or 0), "confirmed_lsn": int(row[2] or 0)}
