"""The inspector's working data: a rules table as the catalog shows it, a row as read, one key to check.

A cache entry as read from Redis is :class:`cdcd.fillguard.Entry`, the same parse the client uses;
columns are :class:`cdcd.pg.catalog.Column`, the catalog's own description.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cdcd.fillguard import Entry
    from cdcd.keys import Template
    from cdcd.pg.catalog import Column
    from cdcd.rules import CompiledRule


@dataclass(slots=True)
class Table:
    relation: str
    rule: CompiledRule
    columns: list[Column]  # the replicated ones: what the daemon's rows carry
    pk: list[str]
    reltuples: float

    @property
    def quoted(self) -> str:
        schema, _, table = self.relation.partition(".")
        return f"{ident(schema)}.{ident(table)}"

    def col(self, name: str) -> Column | None:
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
        return (self.entry.generation if self.entry else None, self.entry.version if self.entry else None,
                tuple(sorted((r.ctid, r.xmin) for r in self.rows)))


def ident(name: str) -> str:
    """A quoted identifier for queries run with parameters (every query here is: ``%`` is doubled)."""
    return '"' + name.replace('"', '""').replace("%", "%%") + '"'


def iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat() if ts is not None else None


def generation(e: Entry) -> int | None:
    """The entry's generation as a number: the Redis clock (microseconds) of its last write."""
    return int(e.generation) if e.generation is not None else None
