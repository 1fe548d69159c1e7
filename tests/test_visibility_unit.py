"""The visibility check without a server: snapshot text, 32->64-bit xids across epochs, the horizon
cache, and the gate's order, backoff and counts (tests/test_visibility_race.py runs it for real)."""

from __future__ import annotations

import pytest

from cdcd.change import Rejected, Transaction
from cdcd.pg.visibility import Horizon, Snapshot, SnapshotError, parse_snapshot
from cdcd.sources.visibility_gate import BACKOFF, VisibilityGate

EPOCH = 1 << 32


def test_parse_snapshot() -> None:
    assert parse_snapshot("10:20:12,15") == Snapshot(10, 20, frozenset({12, 15}))
    assert parse_snapshot("748:748:\n") == Snapshot(748, 748, frozenset())
    big = f"{5 * EPOCH + 7}:{5 * EPOCH + 9}:{5 * EPOCH + 8}"
    assert parse_snapshot(big) == Snapshot(5 * EPOCH + 7, 5 * EPOCH + 9, frozenset({5 * EPOCH + 8}))


@pytest.mark.parametrize("text", ["", "1:2", "a:b:", "5:3:", "3:9:2", "3:9:9", "1:2:3:4", "-1:2:"])
def test_parse_snapshot_refuses_malformed(text: str) -> None:
    with pytest.raises(SnapshotError):
        parse_snapshot(text)


def test_visibility_rule() -> None:
    s = Snapshot(100, 110, frozenset({100, 105}))
    assert s.sees(99)  # below xmin: finished
    assert not s.sees(100) and not s.sees(105)  # in progress
    assert s.sees(101) and s.sees(109)  # finished in [xmin, xmax)
    assert not s.sees(110) and not s.sees(200)  # at or past xmax: not yet


def test_full_xid_in_the_snapshots_epoch() -> None:
    s = Snapshot(3 * EPOCH + 1000, 3 * EPOCH + 2000, frozenset())
    assert s.full_xid(1500) == 3 * EPOCH + 1500
    assert s.full_xid(2500) == 3 * EPOCH + 2500  # running, past xmax
    assert s.full_xid(3 * EPOCH + 5) == 3 * EPOCH + 5  # already 64 bits (a source that sends the epoch)
    with pytest.raises(ValueError):
        s.full_xid(-1)


def test_wraparound_previous_epoch_after_xmax_wrapped() -> None:
    """xmax just wrapped into epoch 4; a transaction from the end of epoch 3 is older, not 2**32 newer."""
    s = Snapshot(3 * EPOCH + (EPOCH - 50), 4 * EPOCH + 10, frozenset({3 * EPOCH + (EPOCH - 20)}))
    assert s.full_xid(EPOCH - 30) == 3 * EPOCH + EPOCH - 30
    assert s.sees(EPOCH - 30)  # finished, between xmin and xmax, not in xip
    assert not s.sees(EPOCH - 20)  # in xip
    assert s.sees(5)  # epoch 4, below xmax (xids 0-2 are never normal, but the arithmetic holds)
    assert not s.sees(10) and not s.sees(11)  # at and past xmax in epoch 4


def test_wraparound_next_epoch_before_xmax_wrapped() -> None:
    """xmax is still at the end of epoch 3; a committing transaction just past the wrap is newer."""
    s = Snapshot(3 * EPOCH + (EPOCH - 100), 3 * EPOCH + (EPOCH - 5), frozenset())
    assert s.full_xid(3) == 4 * EPOCH + 3
    assert not s.sees(3)  # past xmax: not yet visible, never mistaken for an old finished xid
    assert s.sees(EPOCH - 6)
    assert s.sees(EPOCH - 200)  # below xmin


def test_horizon() -> None:
    h = Horizon()
    assert not h.sees(5)  # nothing known: ask the server
    h.update(Snapshot(100, 110, frozenset({105})))
    assert h.sees(50) and h.sees(101) and not h.sees(105)
    h.reset()
    assert not h.sees(50)


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _Server:
    """Hands out the snapshot set by the test and counts the queries."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.queries = 0

    def __call__(self) -> Snapshot:
        self.queries += 1
        return self.snapshot


def _txn(xid: int, lsn: int, changes: int = 1) -> Transaction:
    from cdcd.change import Change, Op

    return Transaction(version=lsn, changes=[Change(Op.UPDATE, "public", "t")] * changes, position=lsn, xid=xid)


def test_gate_releases_the_visible_prefix_in_order() -> None:
    clock, server = _Clock(), _Server(Snapshot(100, 110, frozenset({103})))
    gate = VisibilityGate(server, clock)
    t1, t2, t3 = _txn(101, 1), _txn(103, 2, 3), _txn(104, 3)
    bad = Rejected(reason="x", position=4, origin="test")
    for item in (t1, t2, bad, t3):
        gate.hold(item)
    assert gate.held_changes == 6
    assert gate.release() == [t1]  # t2 is in progress: it and everything after it wait (104 is visible)
    assert server.queries == 1
    assert gate.wait is not None and gate.wait.xid == 103
    assert gate.held_changes == 5
    assert gate.release() == []  # too early for the next query: backoff
    assert server.queries == 1
    clock.now += BACKOFF.compute(0)
    assert gate.release() == [] and server.queries == 2
    clock.now += BACKOFF.compute(1) / 2
    assert gate.release() == [] and server.queries == 2  # the doubled delay is not over
    clock.now += 2.0
    server.snapshot = Snapshot(100, 110, frozenset())  # t2's commit became visible
    assert gate.release() == [t2, bad, t3]
    assert gate.wait is None and not gate.held and gate.held_changes == 0
    counts = gate.take_counts()
    assert counts.waits == 1 and counts.checks == 3
    assert counts.durations == [pytest.approx(2.0 + BACKOFF.compute(0) + BACKOFF.compute(1) / 2)]
    assert gate.take_counts().checks == 0  # drained


def test_gate_uses_the_last_snapshot_before_querying() -> None:
    server = _Server(Snapshot(500, 510, frozenset()))
    gate = VisibilityGate(server, _Clock())
    gate.hold(_txn(400, 1))
    assert len(gate.release()) == 1 and server.queries == 1
    for i, xid in enumerate((450, 505, 499)):  # all seen by the kept snapshot: no query
        gate.hold(_txn(xid, 2 + i))
    assert len(gate.release()) == 3 and server.queries == 1
    gate.hold(_txn(510, 9))  # not in the kept snapshot: one query, still invisible
    assert gate.release() == [] and server.queries == 2


def test_gate_backoff_is_capped() -> None:
    clock, server = _Clock(), _Server(Snapshot(10, 20, frozenset({15})))
    gate = VisibilityGate(server, clock)
    gate.hold(_txn(15, 1))
    delays = []
    for _ in range(12):
        gate.release()
        delays.append(gate.next_check_in())
        clock.now += delays[-1]
    assert delays[0] == pytest.approx(0.0002)
    assert max(delays) == pytest.approx(0.05) and delays[-1] == pytest.approx(0.05)
    assert server.queries == 12


def test_gate_clear_drops_what_is_held_and_the_snapshot() -> None:
    clock, server = _Clock(), _Server(Snapshot(10, 20, frozenset({15})))
    gate = VisibilityGate(server, clock)
    gate.hold(_txn(15, 1))
    gate.release()
    clock.now += 1
    gate.clear()  # a new session re-delivers from the checkpoint
    assert not gate.held and gate.wait is None and gate.horizon.snapshot is None
    assert gate.take_counts().durations == [pytest.approx(1.0)]


def test_gate_without_xid_passes_after_the_head() -> None:
    """A non-transactional logical message has no xid: released in its place, never ahead of a waiting one."""
    server = _Server(Snapshot(10, 20, frozenset({15})))
    gate = VisibilityGate(server, _Clock())
    msg = Transaction(version=7, changes=[], position=7)
    gate.hold(_txn(15, 5))
    gate.hold(msg)
    assert gate.release() == []
    gate2 = VisibilityGate(server, _Clock())
    gate2.hold(msg)
    assert gate2.release() == [msg] and server.queries == 1  # no query for it
