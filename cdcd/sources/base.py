"""The contract between a change source and the daemon loop.

The loop is: ``poll()`` -> plan -> apply to Redis -> ``ack()``. A source must
never advance its durable checkpoint (slot flush position, Kafka offset) on
receipt; only ``ack()`` may, and only up to what it is given. A crash anywhere
therefore re-delivers, and versioned writes make re-delivery harmless.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from cdcd.change import Rejected, Transaction


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
