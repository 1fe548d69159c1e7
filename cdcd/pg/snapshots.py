"""The visibility check's side connection: ``pg_current_snapshot()`` on demand (the thin driver of
:mod:`cdcd.pg.visibility`), shared by the Postgres source and the Kafka source's optional check.

Its query runs in the daemon loop (blocking, in libpq), so a server or network that stops answering
must end it rather than hold the loop: a statement timeout and a TCP user timeout (unacknowledged data)
of ``TIMEOUT_MS``. libpq's own ``PQexec`` through ``psycopg.pq`` serves the one statement and its one
text value: half the CPU of ``conn.execute()`` or less (BENCHMARKS.md section 24).
"""

from __future__ import annotations

import contextlib
from typing import Any

import psycopg
from psycopg import pq

from cdcd.pg import session
from cdcd.pg.visibility import Snapshot, SnapshotError, parse_snapshot

TIMEOUT_MS = 10_000


class ProbeError(Exception):
    """The snapshot could not be read (connection refused or lost, timeout, an unexpected reply)."""


class SnapshotProbe:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._conn: psycopg.Connection[Any] | None = None
        self._query = b"SELECT pg_current_snapshot()::text"

    def open(self) -> None:
        self.close()
        try:
            conn = psycopg.connect(session.conninfo(self.dsn), autocommit=True, connect_timeout=5,
                                   tcp_user_timeout=TIMEOUT_MS)
            conn.execute("SELECT set_config('statement_timeout', %s, false)", (str(TIMEOUT_MS),))
        except psycopg.Error as exc:
            raise ProbeError(f"visibility check connection failed: {str(exc).strip()}") from exc
        if conn.info.server_version < 130000:
            self._query = b"SELECT txid_current_snapshot()::text"  # the same text, before pg_snapshot existed
        self._conn = conn

    @property
    def backend_pid(self) -> int | None:
        return self._conn.info.backend_pid if self._conn is not None and not self._conn.closed else None

    def fetch(self) -> Snapshot:
        conn = self._conn
        if conn is None or conn.closed:
            raise ProbeError("visibility check: no connection")
        try:
            res = conn.pgconn.exec_(self._query)
        except psycopg.Error as exc:
            self.close()
            raise ProbeError(f"visibility check failed: {str(exc).strip()}") from exc
        if res.status != pq.ExecStatus.TUPLES_OK or res.ntuples != 1:
            error = (res.error_message or b"").decode("utf-8", "replace").strip()
            self.close()
            raise ProbeError(f"visibility check failed: {error or 'no snapshot returned'}")
        try:
            return parse_snapshot((res.get_value(0, 0) or b"").decode("ascii"))
        except (SnapshotError, UnicodeDecodeError) as exc:
            raise ProbeError(f"visibility check: {exc}") from exc

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
        self._conn = None
