"""The catalog queries the daemon's startup check, ``cdcd warm`` and ``cdcd inspect`` share.

One place decides what "the columns of a table" means, so the three can never
disagree about it. In particular generated columns (``GENERATED ALWAYS AS ...
STORED``) are listed but flagged: logical replication (pgoutput up to Postgres
17) does not send them, so the daemon never sees their values. A rule that
renders a key or tag from one, or projects one, could never be applied
correctly and is refused by :func:`rule_errors`; a projection of "all columns"
means all *replicated* columns (:attr:`TableInfo.replicated`), which is what
the daemon writes.

Queries take a psycopg 3 connection and only read ``pg_catalog``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cdcd.rules import TableRule, Template

if TYPE_CHECKING:  # annotations only: the Kafka source imports the schema guard without psycopg
    import psycopg

IDENTITY_NAMES = {"d": "DEFAULT", "f": "FULL", "n": "NOTHING", "i": "USING INDEX"}


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type_oid: int
    type_name: str  # format_type(atttypid, NULL)
    attnum: int
    generated: bool  # not sent by logical replication


@dataclass(frozen=True, slots=True)
class TableInfo:
    oid: int
    relation: str  # schema.table
    kind: str  # pg_class.relkind
    replident: str  # pg_class.relreplident: d, f, n or i
    reltuples: float
    columns: tuple[Column, ...]  # live columns in attnum order, generated ones included

    @property
    def replicated(self) -> tuple[Column, ...]:
        """The columns whose values the replication stream carries."""
        return tuple(c for c in self.columns if not c.generated)

    @property
    def identity_name(self) -> str:
        return IDENTITY_NAMES.get(self.replident, self.replident)

    def column(self, name: str) -> Column | None:
        for c in self.columns:
            if c.name == name:
                return c
        return None


_TABLE = ("SELECT c.oid, n.nspname, c.relname, c.relkind, c.relreplident, c.reltuples FROM pg_class c "
          "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE ")
_KINDS = ("r", "p")  # ordinary and partitioned tables: what a publication can carry


def _table(conn: psycopg.Connection[Any], row: Any) -> TableInfo | None:
    if row is None:
        return None
    oid, schema, name, kind, ident, reltuples = row
    return TableInfo(int(oid), f"{schema}.{name}", str(kind), str(ident), float(reltuples),
                     tuple(columns(conn, int(oid))))


def table_by_name(conn: psycopg.Connection[Any], relation: str) -> TableInfo | None:
    """``schema.table`` (a table or partitioned table), or None when there is none by that name."""
    schema, _, table = relation.partition(".")
    row = conn.execute(_TABLE + "n.nspname = %s AND c.relname = %s AND c.relkind = ANY(%s)",
                       (schema, table, list(_KINDS))).fetchone()
    return _table(conn, row)


def table_by_oid(conn: psycopg.Connection[Any], oid: int) -> TableInfo | None:
    """The table a relation OID (as in pgoutput Relation messages) names now, or None when it was dropped."""
    row = conn.execute(_TABLE + "c.oid = %s AND c.relkind = ANY(%s)", (oid, list(_KINDS))).fetchone()
    return _table(conn, row)


def columns(conn: psycopg.Connection[Any], oid: int) -> list[Column]:
    """Live (not dropped) columns of a relation, in attnum order; generated ones flagged."""
    return [Column(r[0], int(r[1]), r[2], int(r[3]), r[4] != "")
            for r in conn.execute(
                "SELECT attname, atttypid, format_type(atttypid, NULL), attnum, attgenerated FROM pg_attribute "
                "WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped ORDER BY attnum", (oid,))]


def attnums(conn: psycopg.Connection[Any], oid: int) -> dict[str, int]:
    """Column name -> attnum of the live columns (a rename keeps the attnum; a drop and re-add does not)."""
    return {c.name: c.attnum for c in columns(conn, oid)}


def primary_key(conn: psycopg.Connection[Any], oid: int) -> list[str]:
    """Primary-key columns in key order (empty when the table has none)."""
    return [r[0] for r in conn.execute(
        "SELECT a.attname FROM pg_index i JOIN LATERAL unnest(i.indkey) WITH ORDINALITY k(attnum, ord) "
        "ON true JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum "
        "WHERE i.indrelid = %s AND i.indisprimary ORDER BY k.ord", (oid,))]


def identity_columns(conn: psycopg.Connection[Any], table: TableInfo) -> set[str] | None:
    """Columns whose old values an UPDATE/DELETE sends: None means all of them (REPLICA IDENTITY FULL)."""
    if table.replident == "f":
        return None
    return {r[0] for r in conn.execute(
        "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
        "AND a.attnum = ANY(i.indkey) WHERE i.indrelid = %s AND "
        "(i.indisreplident OR (i.indisprimary AND %s = 'd'))", (table.oid, table.replident))}


def live_columns(conn: psycopg.Connection[Any], oids: list[int]) -> dict[int, tuple[str, str, set[str]]]:
    """OID -> (schema, table, live column names) for the relations that still exist (the schema guard's check)."""
    rows = conn.execute(
        "SELECT c.oid, n.nspname, c.relname, "
        "array(SELECT attname::text FROM pg_attribute WHERE attrelid = c.oid AND attnum > 0 "
        "AND NOT attisdropped) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.oid = ANY(%s)", (oids,)).fetchall()
    return {int(r[0]): (str(r[1]), str(r[2]), set(r[3])) for r in rows}


def rule_errors(relation: str, rule: TableRule, table: TableInfo) -> list[str]:
    """Why ``rule`` cannot be applied to ``table``: missing columns, generated columns. Empty when it can."""
    errors: list[str] = []
    names = {c.name for c in table.columns}
    generated = {c.name for c in table.columns if c.generated}

    def gen(c: str) -> str:
        return (f"uses generated column {c!r} of {relation}: logical replication does not send generated "
                f"columns, so cdcd never sees its value; use the columns it is computed from instead")

    for t in (*rule.keys, *rule.tags):
        for c in Template.parse(t).columns:
            if c not in names:
                errors.append(f"tables.{relation}: template {t!r} names column {c!r}, which {relation} does not "
                              f"have (columns: {', '.join(sorted(names))})")
            elif c in generated:
                errors.append(f"tables.{relation}: template {t!r} " + gen(c))
    for c in rule.columns or []:
        if c not in names:
            errors.append(f"tables.{relation}.columns: {relation} has no column {c!r}")
        elif c in generated:
            errors.append(f"tables.{relation}.columns: the projection " + gen(c))
    return errors
