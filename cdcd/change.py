"""The change model every source produces and everything downstream consumes.

Sources differ (pgoutput frames, Debezium envelopes); from here on nothing does.
A source hands the daemon whole :class:`Transaction` objects only after their
commit, so no downstream code can act on work that may still roll back.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


class Op(enum.Enum):
    INSERT = "c"
    UPDATE = "u"
    DELETE = "d"
    TRUNCATE = "t"
    READ = "r"  # snapshot read: the row as it was, not a change
    SCHEMA = "s"  # a schema change broke the table's rule: bump its table tag (cdcd.sources.schemaguard)


class _Unavailable:
    """A column value the source did not send (unchanged TOAST, or not in the old key).

    It is a distinct singleton rather than ``None`` because ``None`` is a real
    SQL NULL; rendering a key from an unavailable value must fail loudly, and a
    projection containing one must never be written to the cache.
    """

    _instance: _Unavailable | None = None

    def __new__(cls) -> _Unavailable:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNAVAILABLE"

    def __bool__(self) -> bool:
        return False


UNAVAILABLE: Any = _Unavailable()

Row = dict[str, Any]


@dataclass(slots=True)
class Change:
    """One row change.

    ``before`` is the old row as far as the source knows it: the full row under
    ``REPLICA IDENTITY FULL``, only the key columns under the default identity
    (and only when the key changed), or ``None``. ``after`` is the new row for
    inserts, updates and snapshot reads.
    """

    op: Op
    schema: str
    table: str
    before: Row | None = None
    after: Row | None = None

    @property
    def relation(self) -> str:
        return f"{self.schema}.{self.table}"


@dataclass(frozen=True, slots=True)
class Reads:
    """The columns a consumer reads from one table's rows; ``None`` means every column.

    Why: a source that knows this decodes only those columns and skips the rest (no text
    decoding, no type conversion), which is most of a row decoder's cost on wide tables. The
    planner says what it reads (:meth:`cdcd.rules.Rules.reads`); a source without it decodes all.
    ``old`` must be a subset of ``new`` (an unchanged TOAST value in the new row is taken from the
    old one, which is then decoded with ``new``'s columns).
    """

    new: frozenset[str] | None  # of the new row (inserts, updates, snapshot reads)
    old: frozenset[str] | None  # of the old row (updates, deletes)


ALL_COLUMNS = Reads(None, None)


@dataclass(slots=True)
class Invalidation:
    """An explicit invalidation an application emitted inside its transaction.

    Postgres: ``pg_logical_emit_message(true, 'cdcd', '{"keys": [...], "tags": [...]}')``;
    Debezium: op ``m`` with that prefix. Applied at the transaction's version.
    """

    keys: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Transaction:
    """A committed transaction, the unit the daemon applies and acknowledges.

    ``version`` is what the Redis compare-and-set compares: for Postgres the
    commit LSN, for Debezium the configured source position. It only grows
    along one source stream (per partition for Kafka).

    ``position`` is opaque to everything but the source that made it: the
    source gets it back in ``ack()`` once Redis has acknowledged the
    transaction, and only then may it advance its checkpoint.
    """

    version: int
    changes: list[Change]
    position: Any
    commit_time: datetime | None = None
    xid: int | None = None
    invalidations: list[Invalidation] = field(default_factory=list)
    origin: str = ""  # e.g. "pg:slot" or "kafka:topic/partition": for logs only
    fence: bool = False  # version is only a lower bound of its commit order: invalidate only (docs/versions.md)
    # Set when the source stopped collecting rows past its per-transaction cap: ``changes`` is then
    # empty and ``touched`` counts the row changes per (schema, table). The planner turns that into
    # "everything derived from these tables is stale" (a table tag bump and a floor at the commit
    # version), which costs O(tables), not O(rows). See docs/huge-transactions-and-truncates.md.
    touched: dict[tuple[str, str], int] | None = None

    @property
    def degraded(self) -> bool:
        return self.touched is not None

    def __len__(self) -> int:
        return len(self.changes) + len(self.invalidations)


@dataclass(slots=True)
class Rejected:
    """A record a source could not turn into a change (malformed, unknown type...).

    Sources never drop input silently: they yield this instead, the daemon
    counts it, logs it with its position and dead-letters it, then moves on.
    """

    reason: str
    position: Any
    raw: bytes | str | None = None
    origin: str = ""
    key: str | None = None  # the Redis key concerned, when Redis refused a write to it
