"""The contract between a change source and the daemon loop.

The loop is: ``poll()`` -> plan -> apply to Redis -> ``ack()``. A source must
never advance its durable checkpoint (slot flush position, Kafka offset) on
receipt; only ``ack()`` may, and only up to what it is given. A crash anywhere
therefore re-delivers, and versioned writes make re-delivery harmless.

Beyond :class:`Source`, a source may offer optional capabilities, each a runtime-checkable
protocol below; the daemon asks ``isinstance(source, KeepsAlive)`` rather than probing for
attribute names, so a capability is declared by its signature and checked by mypy where it is used.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from cdcd.change import Rejected, Transaction

if TYPE_CHECKING:
    from cdcd.sources.schemaguard import SchemaGuard
    from cdcd.sources.visibility_gate import VisibilityCounts, VisibilityWait


class SourceError(Exception):
    """The source cannot continue as configured (missing slot, auth...): an operator must act."""


class SourceUnavailable(Exception):
    """The source is down for now (connection lost): the loop backs off and reconnects."""


@runtime_checkable
class Source(Protocol):
    name: str

    def connect(self) -> None:
        """Open connections, check/create what the configuration allows. Raises SourceError or SourceUnavailable."""

    def poll(self, timeout: float) -> Sequence[Transaction | Rejected]:
        """Committed transactions (and rejected records) in source order; empty after ``timeout`` seconds."""

    def ack(self, positions: Sequence[Any]) -> None:
        """Redis has acknowledged everything these positions stand for: advance the checkpoint."""

    def close(self) -> None:
        """Stop consuming; must not advance the checkpoint past what was acked."""

    def describe(self) -> dict[str, Any]:
        """Position and lag figures for logs, status and metrics."""


@runtime_checkable
class KeepsAlive(Protocol):
    """A source whose server drops a silent client (Postgres' ``wal_sender_timeout``)."""

    def keepalive(self) -> None:
        """Tell the server we are alive without acknowledging more; called while the daemon waits for
        Redis. Raises SourceUnavailable (the loop reconnects after the batch; nothing was acked)."""


@runtime_checkable
class SlotSource(Protocol):
    """A source that reads through a server-side slot the server can lose (a Postgres replication slot).

    A slot that vanished after the daemon used it means changes were lost in between: the daemon then
    invalidates everything derived from the rules' tables before reconnecting.
    """

    @property
    def creates_slot(self) -> bool:
        """Whether ``connect`` (re)creates a missing slot; if not, a lost slot stops the daemon."""

    def slot_exists(self) -> bool:
        """Raises SourceUnavailable when the server cannot be asked."""


@runtime_checkable
class ReportsLag(Protocol):
    """A source that can say how far behind it is (slot lag and retained WAL, or consumer lag)."""

    def lag_stats(self) -> dict[str, Any] | None:
        """Figures for /status and metrics: ``lag_bytes`` and ``retained_bytes`` are read by the monitor;
        None when unknown. Called from the monitor thread, never concurrently with itself."""


@runtime_checkable
class GuardsSchema(Protocol):
    """A source that checks the rules against its own schema knowledge (Postgres: relation OIDs and
    the catalog). Other sources get the daemon's record field-list check."""

    schema_guard: SchemaGuard


@runtime_checkable
class HasWatermark(Protocol):
    """An applied watermark for read-your-writes (docs/read-your-writes.md): a position such that every
    transaction committed at or before it has been acked. Postgres has one; Kafka topics do not."""

    def watermark(self) -> int: ...

    def watermark_published(self, position: int) -> None:
        """The daemon announced ``position``: stop waking up early for it."""


@runtime_checkable
class WaitsForVisibility(Protocol):
    """A source that releases a transaction only once the server shows it to new snapshots (Postgres:
    docs/consistency.md), so a tombstone never lands before readers can see the new row."""

    def visibility_wait(self) -> VisibilityWait | None:
        """The transaction at the head of the stream being waited for, or None."""

    def visibility_counts(self) -> VisibilityCounts:
        """Waits begun, wait durations ended and snapshots queried since the last call."""
