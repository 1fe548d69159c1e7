"""Postgres logical replication source: a pgoutput slot streamed over the replication protocol.

Why two drivers: psycopg 3 serves every ordinary SQL statement (setup, schema
checks, lag queries), but it has no streaming-replication API (its tracker,
issue 71); psycopg2's ``LogicalReplicationConnection`` drives
``START_REPLICATION``, keepalives and standby status updates in C. Rather than
hand-parse COPY BOTH frames, the stream uses psycopg2 and nothing else does.

Visibility: a transaction is handed on only once a snapshot taken on the server sees it (the
walsender ships a commit before other sessions can see it; ``cdcd.sources.visibility_gate``), checked
on a side connection of its own (docs/consistency.md, "A tombstone lands only after its commit is
visible").

Checkpointing: the slot's confirmed flush position moves only in :meth:`ack`,
which the daemon calls after Redis acknowledged every transaction up to that
position. Crash anywhere and the slot re-delivers from there; versions in Redis
make the repeat harmless.
"""

from __future__ import annotations

import contextlib
import select
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import psycopg
import psycopg2
import psycopg2.extensions
import psycopg2.extras
import structlog

from cdcd.change import Reads, Rejected, Transaction
from cdcd.pg import replication, schema, session
from cdcd.pg.lsn import lsn_to_str
from cdcd.pg.pgoutput import DecodeError, PgOutputDecoder
from cdcd.pg.snapshots import ProbeError, SnapshotProbe
from cdcd.pg.visibility import Snapshot
from cdcd.rules import TableRule
from cdcd.sources.base import SourceError, SourceUnavailable
from cdcd.sources.schemaguard import PgSchemaGuard
from cdcd.sources.settings import PostgresSourceSettings
from cdcd.sources.visibility_gate import VisibilityCounts, VisibilityGate, VisibilityWait

log = structlog.get_logger("cdcd.source.postgres")

_FORCE_FEEDBACK_EVERY = 0.05  # seconds: acks are forced out at most this often


class PostgresSource:
    def __init__(self, settings: PostgresSourceSettings, tables: Mapping[str, TableRule],
                 reads: Callable[[str, str], Reads] | None = None) -> None:
        """``tables``: the rules' table rules by ``schema.table`` (what the source publishes and guards).
        ``reads``: which columns the planner reads per table (``Rules.reads``), so the decoder skips the
        rest; None decodes every column."""
        self.settings = settings
        self.tables = tables
        self.reads = reads
        self.name = f"pg:{settings.slot}"
        self._conn: Any = None
        self._cur: Any = None
        self._decoder = PgOutputDecoder(self.name, settings.max_transaction_changes, settings.max_transaction_bytes)
        self.schema_guard = PgSchemaGuard(tables)
        self._catalog: psycopg.Connection[Any] | None = None  # the guard's catalog checks
        self._probe = SnapshotProbe(settings.conninfo())  # the visibility checks' side connection
        self.gate = VisibilityGate(self._fetch_snapshot, time.monotonic)
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
            return psycopg.connect(session.conninfo(self.settings.conninfo()), autocommit=True, connect_timeout=5)
        except psycopg.OperationalError as exc:
            raise SourceUnavailable(f"cannot connect to Postgres: {str(exc).strip()}") from exc

    def check_schema(self, conn: psycopg.Connection[Any]) -> list[str]:
        """The rules against the live schema (:func:`cdcd.pg.schema.check_schema`); errors raise, returns warnings."""
        return schema.check_schema(conn, self.tables, self.schema_guard)

    def setup(self) -> None:
        """wal_level, publication, slot: check, create when allowed, refuse clearly otherwise."""
        s = self.settings
        with self.sql() as conn:
            replication.check_wal_level(conn)
            self.warnings = self.check_schema(conn)
            for w in self.warnings:
                log.warning("replica_identity", detail=w)
            # tables the guard found broken (or gone by name at a reconnect) are not the publication's business
            wanted = {rel for rel in self.tables if rel not in self.schema_guard.broken}
            if self.schema_guard.bound:  # at first start check_schema already refused missing tables
                wanted -= replication.gone_by_name(conn, wanted)
            replication.ensure_publication(conn, s.publication, wanted, s.create_publication)
            replication.ensure_slot(conn, s.slot, s.create_slot)

    @property
    def creates_slot(self) -> bool:
        return self.settings.create_slot

    def slot_exists(self) -> bool:
        with self.sql() as conn:
            return replication.slot_exists(conn, self.settings.slot)

    # ------------------------------------------------------------------ streaming

    def connect(self) -> None:
        self.close()
        self.setup()
        with self.sql() as sqlconn:
            server_version = sqlconn.info.server_version
            encoding = session.stream_encoding(sqlconn.info.parameter_status("server_encoding") or "")
        # No transaction is released unchecked: without the side connection the source does not start.
        self._open_probe()
        try:
            # The session pins the text formats pgtypes parses (walsender output uses these settings).
            conn = psycopg2.connect(session.conninfo(self.settings.conninfo(), encoding=encoding), connect_timeout=5,
                                    connection_factory=psycopg2.extras.LogicalReplicationConnection)
        except psycopg2.OperationalError as exc:
            raise SourceUnavailable(f"replication connection failed: {str(exc).strip()}") from exc
        cur = conn.cursor()
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
        self._decoder.reads = self.reads  # decode only the columns the rules read
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
                self._catalog = psycopg.connect(session.conninfo(self.settings.conninfo()), autocommit=True,
                                                connect_timeout=5)
            self.schema_guard.check_catalog(self._catalog)
        except psycopg.Error as exc:
            log.debug("schema_check_failed", error=str(exc).strip())
            if self._catalog is not None:
                with contextlib.suppress(psycopg.Error):
                    self._catalog.close()
            self._catalog = None

    def _poll(self, timeout: float) -> Sequence[Transaction | Rejected]:
        """Read what the server sends into the gate; return the visible prefix of what it holds (waiting
        for the head's visibility, with backoff, until ``timeout``)."""
        cur = self._cur
        if cur is None:
            raise SourceUnavailable("not connected")
        gate = self.gate
        deadline = time.monotonic() + timeout
        decoder = self._decoder
        out: Sequence[Transaction | Rejected] = []
        try:
            while True:
                room = gate.held_changes < self.settings.max_batch  # reading is bounded while the head waits
                msg = cur.read_message() if room else None
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
                        gate.hold(item)
                    continue
                now = time.monotonic()
                releasable = gate.held and (not decoder.in_transaction or not room or now >= deadline)
                if releasable:
                    out = gate.release()  # drained what the server had: hand on what is visible now
                    if out:
                        break
                elif not gate.held and self.watermark() > self._watermark_reported:
                    break  # idle and the watermark moved: let the daemon announce it now
                remaining = deadline - now
                if remaining <= 0:
                    break
                wait = min(remaining, 0.5)
                if gate.wait is not None:
                    if releasable:
                        wait = min(wait, gate.next_check_in())
                    self._keep_alive_waiting()
                interval = self.settings.watermark_interval
                if interval and not gate.held:
                    wait = min(wait, self._request_reply(interval))
                if room:
                    select.select([self._conn], [], [], wait)
                else:
                    time.sleep(wait)  # the socket stays readable: select would spin
        except psycopg2.Error as exc:
            raise SourceUnavailable(f"replication stream broken: {str(exc).strip()}") from exc
        for item in out:
            if isinstance(item.position, int) and item.position > self._handed:
                self._handed = item.position
        return out

    # ------------------------------------------------------------------ visibility

    def _fetch_snapshot(self) -> Snapshot:
        """A fresh server snapshot on the side connection. A failure is the source's failure: the daemon
        backs off and reconnects (re-delivery from the slot), it never applies without the check."""
        try:
            return self._probe.fetch()
        except ProbeError as exc:
            raise SourceUnavailable(str(exc)) from exc

    def _open_probe(self) -> None:
        try:
            self._probe.open()
        except ProbeError as exc:
            raise SourceUnavailable(str(exc)) from exc

    def _keep_alive_waiting(self) -> None:
        """While the head waits, the session must not look dead to the server (``wal_sender_timeout``):
        a status update without a new ack, at most every ``status_interval``."""
        if time.monotonic() - self._last_forced >= self.settings.status_interval:
            self._send_feedback(force=True)

    def visibility_wait(self) -> VisibilityWait | None:
        return self.gate.wait

    def visibility_counts(self) -> VisibilityCounts:
        return self.gate.take_counts()

    # ------------------------------------------------------------------ applied watermark

    def watermark(self) -> int:
        """The applied watermark: every transaction whose commit ended at or before it has been acked,
        i.e. applied to Redis (docs/read-your-writes.md).

        Transactions arrive in commit order and a position is acked only after Redis applied it, so the
        highest ack is one. While nothing is pending (every position handed out acked, no transaction
        half-read), the server's WAL end from its last keepalive is one too: the walsender reports as its
        end the WAL it has decoded, and sends every published commit before it (psycopg2 keeps it in
        ``cursor.wal_end``; XLogData headers carry their own position, never a later one).

        Visibility: a commit can be at or before the WAL end and still invisible (its session waits for a
        synchronous standby). Every such commit of a published table was sent before the keepalive, so it
        is held by the gate, and the WAL end is claimed only while nothing is held: W never covers an
        invisible commit of a table the rules name. An invisible commit that touched no published table is
        not sent (pgoutput skips empty transactions) and W may pass it: no cache entry derives from it.
        The client's own position (``commit_position``) is read after its commit returned, i.e. after its
        commit became visible, so waiting for W >= it never waits for an invisible commit of its own.
        """
        w = self._acked
        cur = self._cur
        if (cur is not None and self._acked >= self._handed and not self._decoder.in_transaction
                and not self.gate.held):
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
        self.gate.clear()  # the next session re-delivers what was held
        self._probe.close()
        if self._catalog is not None:
            with contextlib.suppress(psycopg.Error):
                self._catalog.close()
            self._catalog = None

    def describe(self) -> dict[str, Any]:
        wait = self.gate.wait
        return {"slot": self.settings.slot, "acked_lsn": lsn_to_str(self._acked),
                "received_lsn": lsn_to_str(self._received),
                "waiting_for_visibility_xid": wait.xid if wait is not None else None}

    def lag_stats(self) -> dict[str, Any] | None:
        """Lag and retained WAL of the slot (None when the slot is gone)."""
        with self.sql() as conn:
            return replication.slot_stats(conn, self.settings.slot)
