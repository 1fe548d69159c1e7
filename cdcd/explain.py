"""``cdcd explain``: the keys and tags a row maps to, rendered exactly as the daemon renders them.

The daemon never sees JSON or Python values. It receives each column's *text* as the type's
output function prints it (pgoutput, under the session settings of :mod:`cdcd.pg.session`),
decodes that text with :mod:`cdcd.pg.pgtypes` and renders keys from the result. A value
typed on the command line is not that text: ``12.5`` for a ``numeric(10,2)`` column is
``12.50`` in the WAL, ``"2024-02-29 10:11:12+02"`` for a ``timestamptz`` arrives as
``2024-02-29 08:11:12+00``, a ``char(4)`` value arrives padded. Rendering the JSON directly
printed keys the daemon never writes.

So, with a Postgres source, explain lets the database coerce the row to the table's column
types (``jsonb_populate_record``: type modifiers such as a numeric scale included), reads each
column's output text back under the replication session's settings, and decodes and renders
it with the daemon's own code. Without a database (``--offline``, a Kafka source, or a server
that cannot be reached) it renders the JSON values: numbers exactly as written (parsed as
``Decimal``/``int``, so ``12.50`` stays ``12.50``), strings as given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from cdcd.rules import Rules, qualify


class ExplainError(Exception):
    """The row or the table is wrong (exit code 2); the message says what."""


@dataclass
class Explained:
    keys: list[str]
    tags: list[str]
    unresolved: list[str]
    notes: list[str] = field(default_factory=list)  # printed to stderr: how the row was rendered
    copies: list[str] = field(default_factory=list)  # hot-key replicas of the keys (docs/hot-keys.md)

    def as_dict(self) -> dict[str, list[str]]:
        out = {"keys": self.keys, "tags": self.tags, "unresolved": self.unresolved}
        if self.copies:
            out["copies"] = self.copies
        return out


def parse_row(text: str) -> dict[str, Any]:
    """The ``--row`` JSON object; numbers keep the digits they were written with."""
    try:
        row = json.loads(text, parse_float=Decimal)
    except json.JSONDecodeError as exc:
        raise ExplainError(f"--row is not JSON: {exc}") from None
    if not isinstance(row, dict):
        raise ExplainError("--row must be a JSON object of column: value")
    return row


def explain(rules: Rules, table: str, row_text: str, dsn: str | None) -> Explained:
    """Keys and tags of ``row_text`` (JSON) in ``table``; through Postgres when ``dsn`` is given and answers."""
    row = parse_row(row_text)
    relation = qualify(table)
    if relation not in rules.by_relation:
        raise ExplainError(f"no rule for table {relation}")
    notes: list[str] = []
    if dsn is None:
        notes.append("rendered from the JSON values as given (no database): give values as the source sends "
                     "them (e.g. 12.50 for numeric(10,2), timestamptz as 2024-02-29T08:11:12+00:00)")
    else:
        import psycopg

        try:
            row, unknown = decode_via_postgres(dsn, relation, row_text, set(row))
        except psycopg.OperationalError as exc:
            notes.append(f"database not reachable ({str(exc).strip().splitlines()[0] if str(exc).strip() else exc}); "
                         "rendered from the JSON values as given, which may differ from what the daemon writes "
                         "for numeric, temporal, char(n) and bytea columns (use --offline to skip the database)")
        else:
            if unknown:
                notes.append(f"{relation} has no column(s) {', '.join(sorted(unknown))}: ignored, as the daemon "
                             "never sees them")
    out = rules.explain(relation, row)
    return Explained(out["keys"], out["tags"], out["unresolved"], notes, out.get("copies", []))


def decode_via_postgres(dsn: str, relation: str, row_text: str, given: set[str]) -> tuple[dict[str, Any], set[str]]:
    """The row as the daemon decodes it: Postgres coerces it to the column types and prints each column's
    output text in the replication session's settings; :func:`cdcd.pg.pgtypes.convert` decodes it.

    Returns the decoded row (only the columns given) and the given names the table does not have.
    Raises ``psycopg.OperationalError`` when the server cannot be reached, :class:`ExplainError` when
    the table does not exist or a value does not fit its column's type.
    """
    import psycopg
    from psycopg import sql

    from cdcd.pg import session
    from cdcd.pg.pgtypes import convert

    schema, _, name = relation.partition(".")
    query = sql.SQL("SELECT * FROM jsonb_populate_record(NULL::{}, %s::jsonb)").format(sql.Identifier(schema, name))
    with psycopg.connect(session.conninfo(dsn, read_only=True), autocommit=True, connect_timeout=5,
                         application_name="cdcd-explain") as conn:
        try:
            cur = conn.execute(query, (row_text,))
        except psycopg.errors.UndefinedTable:
            raise ExplainError(f"table {relation} does not exist in the database") from None
        except psycopg.errors.DataError as exc:
            raise ExplainError(f"--row does not fit {relation}: {str(exc).strip()}") from None
        res = cur.pgresult
        if res is None or res.ntuples != 1:
            raise ExplainError(f"could not coerce --row to {relation}")
        row: dict[str, Any] = {}
        for j in range(res.nfields):
            col = (res.fname(j) or b"").decode()
            if col not in given:
                continue  # not given: the template reports it as unresolved, as for a column the source omits
            raw = res.get_value(0, j)
            row[col] = None if raw is None else convert(res.ftype(j), raw.decode())
    return row, given - set(row)
