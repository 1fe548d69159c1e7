"""The rules against the live schema, at startup and at every reconnect of the replication source.

The same checks as the schema guard's at run time (:class:`cdcd.sources.schemaguard.PgSchemaGuard`):
at startup a mismatch is a configuration error (fix the rules, nothing is served yet); on a
reconnect, rules the guard already marked broken are skipped (they stay broken, tag-bump only)
so one broken table never stops the others. ``cdcd check`` runs the same function.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from cdcd.pg import catalog
from cdcd.pg.replication import quote_rel
from cdcd.rules import TableRule
from cdcd.sources.base import SourceError
from cdcd.sources.schemaguard import PgSchemaGuard, needed_columns

if TYPE_CHECKING:  # annotations only: the Kafka source imports the schema guard without psycopg
    import psycopg


def check_schema(conn: psycopg.Connection[Any], tables: Mapping[str, TableRule], guard: PgSchemaGuard) -> list[str]:
    """Validate the rules against the live schema and bind each table to its OID. Errors raise; returns warnings."""
    errors: list[str] = []
    warnings: list[str] = []
    for rel, rule in tables.items():
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
                f"Run: ALTER TABLE {quote_rel(rel)} REPLICA IDENTITY FULL;")
    if errors:
        raise SourceError("rules do not match the database schema:\n  " + "\n  ".join(errors))
    return warnings
