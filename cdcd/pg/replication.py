"""Logical replication objects on the server: ``wal_level``, the publication, the slot, and the slot's lag.

Checked (and created when the settings allow it) before the daemon streams; refused with the
exact SQL to run otherwise, so an operator who manages them by hand knows what is missing.
Queries take a psycopg 3 connection in autocommit mode.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import structlog

from cdcd.pg.lsn import str_to_lsn
from cdcd.sources.base import SourceError

if TYPE_CHECKING:  # annotations only: the Kafka source imports the schema guard without psycopg
    import psycopg

log = structlog.get_logger("cdcd.source.postgres")


def quote_rel(relation: str) -> str:
    """``schema.table`` -> ``"schema"."table"``."""
    schema, _, table = relation.partition(".")
    return f'"{schema}"."{table}"'


def check_wal_level(conn: psycopg.Connection[Any]) -> None:
    wal_level = conn.execute("SHOW wal_level").fetchone()
    if wal_level is None or wal_level[0] != "logical":
        raise SourceError(f"Postgres has wal_level={wal_level[0] if wal_level else '?'}; logical replication "
                          "needs wal_level=logical (postgresql.conf, then restart the server)")


def gone_by_name(conn: psycopg.Connection[Any], relations: Iterable[str]) -> set[str]:
    """The relations no table answers to by name now."""
    return {rel for rel in relations if conn.execute("SELECT to_regclass(%s)", (quote_rel(rel),)).fetchone()
            in (None, (None,))}


def ensure_publication(conn: psycopg.Connection[Any], publication: str, wanted: set[str], create: bool) -> None:
    """The publication exists and carries ``wanted`` (created or extended when ``create``)."""
    pub = conn.execute("SELECT puballtables FROM pg_publication WHERE pubname = %s", (publication,)).fetchone()
    if pub is None:
        if not create:
            raise SourceError(f"publication {publication!r} does not exist and create_publication is off; "
                              f"create it: CREATE PUBLICATION {publication} FOR TABLE "
                              f"{', '.join(quote_rel(r) for r in sorted(wanted))};")
        conn.execute(f'CREATE PUBLICATION "{publication}" FOR TABLE '
                     f"{', '.join(quote_rel(r) for r in sorted(wanted))}")
        log.info("publication_created", publication=publication, tables=sorted(wanted))
    elif not pub[0]:
        have = {f"{r[0]}.{r[1]}" for r in conn.execute(
            "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s", (publication,))}
        missing = sorted(wanted - have)
        if missing:
            if not create:
                raise SourceError(f"publication {publication!r} lacks tables {missing}; add them: ALTER "
                                  f"PUBLICATION {publication} ADD TABLE "
                                  f"{', '.join(quote_rel(r) for r in missing)};")
            conn.execute(f'ALTER PUBLICATION "{publication}" ADD TABLE '
                         f"{', '.join(quote_rel(r) for r in missing)}")
            log.info("publication_extended", publication=publication, added=missing)


def ensure_slot(conn: psycopg.Connection[Any], slot: str, create: bool) -> None:
    """The logical slot exists with the pgoutput plugin (created when ``create``)."""
    row = conn.execute("SELECT plugin, database FROM pg_replication_slots WHERE slot_name = %s",
                       (slot,)).fetchone()
    if row is None:
        if not create:
            raise SourceError(f"replication slot {slot!r} does not exist and create_slot is off; "
                              f"create it: SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput');")
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
        log.info("slot_created", slot=slot)
    elif row[0] != "pgoutput":
        raise SourceError(f"replication slot {slot!r} uses plugin {row[0]!r}; cdcd needs pgoutput")


def slot_exists(conn: psycopg.Connection[Any], slot: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone() is not None


def slot_stats(conn: psycopg.Connection[Any], slot: str) -> dict[str, int] | None:
    """Lag and retained WAL of the slot, from pg_replication_slots (None when the slot is gone)."""
    row = conn.execute(
        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint, "
        "pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint, "
        "pg_wal_lsn_diff(confirmed_flush_lsn, '0/0')::bigint "
        "FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()
    if row is None:
        return None
    return {"lag_bytes": int(row[0] or 0), "retained_bytes": int(row[1] or 0), "confirmed_lsn": int(row[2] or 0)}


def create_temporary_slot(repl_cursor: Any, name: str) -> tuple[int, str]:
    """A temporary pgoutput slot with an exported snapshot, on a psycopg2 replication connection's cursor.

    Returns the slot's consistent point (an LSN) and the snapshot's name; the slot goes away with the
    connection. Every transaction that committed before the consistent point is in the snapshot.
    """
    repl_cursor.execute(f"CREATE_REPLICATION_SLOT {name} TEMPORARY LOGICAL pgoutput EXPORT_SNAPSHOT")
    created = repl_cursor.fetchone()
    if created is None:
        raise RuntimeError("CREATE_REPLICATION_SLOT returned no row")
    _, consistent_point, snapshot_name, _ = created
    return str_to_lsn(consistent_point), str(snapshot_name)
