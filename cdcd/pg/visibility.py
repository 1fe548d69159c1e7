"""When a decoded commit is visible to new snapshots on the server: the fill guard's premise.

Postgres makes a commit visible to other sessions only after its WAL is flushed *and* any
synchronous-replication wait is over (``RecordTransactionCommit``: ``XLogFlush``, clog,
``SyncRepWaitForLSN``; ``ProcArrayEndTransaction`` only later), while the logical walsender ships
flushed WAL at once. A tombstone applied for a commit still invisible lets a fill token taken after
it read the old row (tests/test_visibility_race.py). So the source releases a transaction only once a
snapshot taken on the server sees it; this module is the pure half of that check (no I/O): the
snapshot's text form, widening pgoutput's 32-bit xid to the snapshot's 64-bit space, and the horizon
kept between queries. ``cdcd.sources.visibility_gate`` drives it.
"""

from __future__ import annotations

from dataclasses import dataclass

_XID_SPACE = 1 << 32
_HALF = 1 << 31


class SnapshotError(ValueError):
    """The server's snapshot text is not ``xmin:xmax:xip,...`` (a protocol surprise, never user data)."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A server snapshot in 64-bit xids (``pg_current_snapshot()``): every xid below ``xmin`` has
    finished; xids in ``[xmin, xmax)`` have finished unless listed in ``xip``; ``xmax`` and above have
    not. A transaction the stream delivered committed, so "finished" here means committed and visible."""

    xmin: int
    xmax: int
    xip: frozenset[int]

    def full_xid(self, xid: int) -> int:
        """``xid`` (32 bits, as pgoutput's Begin carries it) in this snapshot's 64-bit space.

        Postgres compares 32-bit xids modulo 2**32 within half the space (``TransactionIdPrecedes``) and
        its wraparound protection keeps every live xid within 2**31 of the next one; so the 64-bit xid is
        the one with these low 32 bits nearest to ``xmax``. This handles the epoch boundary both ways: a
        transaction from the previous epoch seen after ``xmax`` wrapped, and one just past the wrap while
        ``xmax`` is still below it.
        """
        if xid < 0:
            raise ValueError(f"xid {xid} is not a transaction id")
        if xid >= _XID_SPACE:
            return xid  # already 64 bits (with its epoch): nothing to guess
        delta = (xid - self.xmax) % _XID_SPACE
        if delta >= _HALF:
            delta -= _XID_SPACE
        return self.xmax + delta

    def sees(self, xid: int) -> bool:
        """Whether a committed transaction with 32-bit ``xid`` is visible in this snapshot."""
        full = self.full_xid(xid)
        return full < self.xmin or (full < self.xmax and full not in self.xip)


def parse_snapshot(text: str) -> Snapshot:
    """``pg_snapshot``/``txid_snapshot`` text, ``xmin:xmax:xip1,xip2,...`` (xip may be empty)."""
    parts = text.strip().split(":")
    if len(parts) != 3:
        raise SnapshotError(f"snapshot {text!r}: expected xmin:xmax:xip")
    try:
        xmin, xmax = int(parts[0]), int(parts[1])
        xip = frozenset(int(x) for x in parts[2].split(",") if x)
    except ValueError as exc:
        raise SnapshotError(f"snapshot {text!r}: {exc}") from exc
    if not 0 <= xmin <= xmax or any(not xmin <= x < xmax for x in xip):
        raise SnapshotError(f"snapshot {text!r}: out of order (want 0 <= xmin <= xip < xmax)")
    return Snapshot(xmin, xmax, xip)


class Horizon:
    """The newest snapshot seen, answering "is this commit visible?" without a query when it can.

    A newer snapshot sees everything an older one saw (a finished transaction stays finished and new
    xids are assigned above every snapshot's ``xmax``), so the last snapshot is a sound cache: a
    transaction it sees is visible now. Only one it does not see needs a fresh query; on a stream that
    is catching up on old commits one query covers many batches.
    """

    def __init__(self) -> None:
        self.snapshot: Snapshot | None = None

    def sees(self, xid: int) -> bool:
        return self.snapshot is not None and self.snapshot.sees(xid)

    def update(self, snapshot: Snapshot) -> None:
        """Take a fresh snapshot (queried after the kept one on the same server, so it sees at least as much)."""
        self.snapshot = snapshot

    def reset(self) -> None:
        self.snapshot = None
