"""A hole in the fill guard found while measuring nines (issue 13 item 2), and its fix.

Postgres makes a commit visible to other sessions only after its WAL is flushed *and* any
synchronous-replication wait is over (``SyncRepWaitForLSN`` runs before
``ProcArrayEndTransaction``), but the logical walsender ships flushed WAL at once. So the daemon could
apply a change's tombstone while the change was still invisible; a fill token taken then was "after
the tombstone", its query still read the old row, and its fill landed and stayed until the TTL
(design notes §2 assume "token after the apply => query after the commit"). A synchronous standby that
never answers makes the window as long as we like; on an overloaded machine it is milliseconds
(BENCHMARKS.md section 18: stale cdcd keys at quiescent checkpoints in some runs).

The Postgres source now releases a transaction only once a server snapshot sees it
(``cdcd.sources.visibility_gate``, docs/consistency.md): these tests hold a commit invisible with a
synchronous standby that never answers and check that nothing of it, or after it, lands early.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
import redis

from cdcd.devservers import PostgresServer, RedisServer
from cdcd.fillguard import FillGuard
from cdcd.keyspace import Keyspace
from tests.helpers import EXAMPLE_SCHEMA, DaemonThread, config_dict, entry, make_config, unique, wait_until


def _setting(conn: psycopg.Connection[Any], assignment: str) -> None:
    conn.execute(f"ALTER SYSTEM {assignment}")
    conn.execute("SELECT pg_reload_conf()")


@dataclass
class Scene:
    """A database with the example schema, a keyspace prefix, and the sessions that hold commits invisible."""

    dsn: str
    redis_url: str
    prefix: str
    r: redis.Redis
    admin: psycopg.Connection[Any]
    writer: psycopg.Connection[Any]
    daemon: DaemonThread | None = None

    def start(self, slot: str | None = None, wait: bool = True) -> DaemonThread:
        config = make_config(config_dict(self.dsn, self.redis_url, slot or unique("s"), self.prefix))
        self.daemon = DaemonThread(config).start(wait=wait)
        return self.daemon


@pytest.fixture
def scene(own_pg: PostgresServer, redis_server: RedisServer) -> Iterator[Scene]:
    """Each test's own database; afterwards the standby setting is reset, sessions closed, the daemon stopped."""
    dsn = own_pg.create_database(unique("vr"))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(EXAMPLE_SCHEMA.read_text())
    s = Scene(dsn, redis_server.url, unique("vr") + ":", redis.Redis.from_url(redis_server.url),
              psycopg.connect(dsn, autocommit=True), psycopg.connect(dsn, autocommit=True))
    try:
        yield s
    finally:
        _setting(s.admin, "RESET synchronous_standby_names")
        s.admin.close()
        s.writer.close()
        if s.daemon is not None:
            s.daemon.stop()


def _lsn(conn: psycopg.Connection[Any]) -> int:
    return int(conn.execute("SELECT pg_current_wal_lsn() - '0/0'").fetchone()[0])  # type: ignore[index]


def _invisible_update(writer: psycopg.Connection[Any], sql: str) -> threading.Thread:
    """Run ``sql`` on ``writer`` in a thread: with a synchronous standby that never answers, its commit is
    flushed (and streamed) but waits, invisible to other sessions, until it is cancelled or released."""
    def run() -> None:
        with contextlib.suppress(psycopg.Error):  # the test ended with the commit still waiting
            writer.execute(sql)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_a_fill_around_the_tombstone_of_an_invisible_commit_does_not_stay_stale(scene: Scene) -> None:
    dsn, prefix, r, admin, writer = scene.dsn, scene.prefix, scene.r, scene.admin, scene.writer
    d = scene.start()
    writer.execute("INSERT INTO orders VALUES (10, 1, 7, 5.00, 'new')")
    v0 = int(wait_until(lambda: entry(r, f"{prefix}order:10").get("v"), what="insert applied"))
    _setting(admin, "SET synchronous_standby_names = 'nobody'")  # commits now wait, invisible
    time.sleep(0.5)
    update = _invisible_update(writer, "UPDATE orders SET status = 'paid' WHERE id = 10")
    wait_until(lambda: d.daemon.status()["waiting_for_visibility"], what="the daemon holds the invisible commit")
    assert int(entry(r, f"{prefix}order:10")["v"]) == v0, "a tombstone landed before its commit was visible"
    guard = FillGuard(r, Keyspace(prefix))
    token = guard.read("order:10")  # before the tombstone: the fill must lose to it
    with psycopg.connect(dsn, autocommit=True) as reader:
        status = reader.execute("SELECT status FROM orders WHERE id = 10").fetchone()[0]  # type: ignore[index]
        assert status == "new"  # still invisible
        guard.fill(token, json.dumps({"id": 10, "status": status}).encode(), ttl=300)
        reader.execute("SELECT pg_cancel_backend(%s)", (writer.info.backend_pid,))  # committed locally: visible
        update.join(10)
        _setting(reader, "RESET synchronous_standby_names")
        wait_until(lambda: int(entry(r, f"{prefix}order:10").get("v", 0)) > v0, what="tombstone applied")
        token = guard.read("order:10")  # after the tombstone: the query must see the commit
        now = reader.execute("SELECT status FROM orders WHERE id = 10").fetchone()[0]  # type: ignore[index]
        assert now == "paid"
    time.sleep(0.5)  # anything the daemon would still do about it
    cached = guard.read("order:10")
    assert not cached.hit or json.loads(cached.value or b"null") == {"id": 10, "status": "paid"}
    assert d.error is None


def _metric(d: DaemonThread, name: str, labels: dict[str, str] | None = None) -> float:
    return d.daemon.metrics.registry.get_sample_value(name, labels or {}) or 0.0


@pytest.mark.slow
def test_an_invisible_commit_is_held_in_order_with_the_slot_alive_and_released_promptly(scene: Scene) -> None:
    """Hold T1 invisible past wal_sender_timeout, commit T2 (visible: synchronous_commit = local) after it:
    neither lands, the slot stays with the same walsender, /status, readiness and metrics say why, the
    read-your-writes watermark stays below T2; released, both land promptly and in commit order."""
    prefix, r, admin, writer, slot = scene.prefix, scene.r, scene.admin, scene.writer, unique("s")
    other = psycopg.connect(scene.dsn, autocommit=True)
    _setting(admin, "SET wal_sender_timeout = '2s'")
    d = scene.start(slot)
    try:
        writer.execute("INSERT INTO orders VALUES (20, 1, 7, 5.00, 'new'), (21, 1, 7, 5.00, 'new')")
        wait_until(lambda: entry(r, f"{prefix}order:21").get("v"), what="inserts applied")
        v20, v21 = (int(entry(r, f"{prefix}order:{i}")["v"]) for i in (20, 21))
        pid = admin.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s",
                            (slot,)).fetchone()[0]  # type: ignore[index]
        _setting(admin, "SET synchronous_standby_names = 'nobody'")
        time.sleep(0.5)
        t1 = _invisible_update(writer, "UPDATE orders SET status = 'paid' WHERE id = 20")
        wait = wait_until(lambda: d.daemon.status()["waiting_for_visibility"], what="the daemon holds T1")
        assert wait["xid"] > 0
        other.execute("SET synchronous_commit = local")  # T2 commits after T1 and is visible at once
        other.execute("UPDATE orders SET status = 'paid' WHERE id = 21")
        t2_pos = _lsn(other)  # what a read-your-writes client of T2 waits for
        assert other.execute("SELECT status FROM orders WHERE id = 20").fetchone()[0] == "new"  # type: ignore[index]
        wait_until(lambda: d.daemon.source.describe()["received_lsn"] != "0/0" and
                   d.daemon.source.gate.held_changes >= 2, what="T2 received behind T1")  # type: ignore[attr-defined]
        time.sleep(2.5)  # past wal_sender_timeout (2 s)
        wait_until(lambda: not d.daemon.readiness()[0], what="not ready after 5 s of waiting")  # the bound
        assert int(entry(r, f"{prefix}order:20")["v"]) == v20, "T1 applied while invisible"
        assert int(entry(r, f"{prefix}order:21")["v"]) == v21, "T2 applied before T1 (order)"
        assert d.daemon.source.watermark() < t2_pos  # type: ignore[attr-defined]
        assert _metric(d, "cdcd_applied_watermark") < t2_pos
        still = admin.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s",
                              (slot,)).fetchone()[0]  # type: ignore[index]
        assert still == pid, "the replication session was dropped while waiting"
        assert _metric(d, "cdcd_errors_total", {"kind": "source"}) == 0
        status = d.daemon.status()
        assert status["waiting_for_visibility"]["xid"] == wait["xid"]
        assert status["waiting_for_visibility"]["waited_s"] >= 5
        ready, reasons = d.daemon.readiness()
        assert not ready and any(f"xid {wait['xid']}" in why for why in reasons), reasons
        assert _metric(d, "cdcd_source_visibility_waits_total") >= 1
        checks = _metric(d, "cdcd_source_visibility_checks_total")
        assert 5 < checks < 1000, checks  # backoff: re-queried, but not in a spin (cap 50 ms over ~5 s)

        released = time.monotonic()
        _setting(admin, "RESET synchronous_standby_names")  # the server releases T1's wait: now visible
        wait_until(lambda: int(entry(r, f"{prefix}order:21").get("v", 0)) > v21, what="T2 applied")
        took = time.monotonic() - released
        t1_version, t2_version = (int(entry(r, f"{prefix}order:{i}")["v"]) for i in (20, 21))
        assert v20 < t1_version < t2_version  # both applied, versions in commit order
        assert took < 5, took  # promptly (generous: a shared machine)
        t1.join(10)
        wait_until(lambda: d.daemon.source.watermark() >= t2_pos, what="watermark past T2")  # type: ignore[attr-defined]
        assert d.daemon.status()["waiting_for_visibility"] is None
        assert d.daemon.readiness()[0]
        assert _metric(d, "cdcd_source_visibility_wait_seconds_count") >= 1
        assert _metric(d, "cdcd_source_visibility_wait_seconds_sum") >= 5
        assert d.error is None
    finally:
        _setting(admin, "RESET wal_sender_timeout")  # the fixture resets the standby, closes and stops the rest
        other.close()


def test_a_lost_visibility_connection_reconnects_and_never_releases_unchecked(scene: Scene) -> None:
    """The side connection dies while the head waits: the source's error path (back off, reconnect,
    re-deliver from the slot), no crash, nothing applied unchecked; released, the change lands."""
    prefix, r, admin, writer = scene.prefix, scene.r, scene.admin, scene.writer
    d = scene.start()
    writer.execute("INSERT INTO orders VALUES (30, 1, 7, 5.00, 'new')")
    v0 = int(wait_until(lambda: entry(r, f"{prefix}order:30").get("v"), what="insert applied"))
    _setting(admin, "SET synchronous_standby_names = 'nobody'")
    time.sleep(0.5)
    update = _invisible_update(writer, "UPDATE orders SET status = 'paid' WHERE id = 30")
    wait_until(lambda: d.daemon.status()["waiting_for_visibility"], what="the daemon holds the commit")
    side = d.daemon.source._probe.backend_pid  # type: ignore[attr-defined]
    admin.execute("SELECT pg_terminate_backend(%s)", (side,))
    wait_until(lambda: _metric(d, "cdcd_errors_total", {"kind": "source"}) >= 1, what="source error path")
    wait_until(lambda: d.daemon.source_ok and d.daemon.status()["waiting_for_visibility"],
               what="reconnected and waiting again")
    assert int(entry(r, f"{prefix}order:30")["v"]) == v0
    _setting(admin, "RESET synchronous_standby_names")
    wait_until(lambda: int(entry(r, f"{prefix}order:30").get("v", 0)) > v0, what="applied once visible")
    update.join(10)
    assert d.error is None


def test_without_the_visibility_connection_the_source_does_not_start(
        scene: Scene, monkeypatch: pytest.MonkeyPatch) -> None:
    """The side connection cannot be made (a connection limit, say): the daemon backs off and retries like
    any source outage, applies nothing unchecked, and starts streaming once it can be made."""
    from cdcd.pg.snapshots import ProbeError, SnapshotProbe

    scene.admin.execute("INSERT INTO orders VALUES (40, 1, 7, 5.00, 'new')")
    dsn, prefix, r = scene.dsn, scene.prefix, scene.r
    attempts: list[int] = []
    allow = threading.Event()
    real = SnapshotProbe.open

    def refuse(self: SnapshotProbe) -> None:
        attempts.append(1)
        if not allow.is_set():
            raise ProbeError("visibility check connection failed: too many clients (injected)")
        real(self)

    monkeypatch.setattr(SnapshotProbe, "open", refuse)
    d = scene.start(wait=False)
    wait_until(lambda: attempts, what="first attempt (the slot exists by then)")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE orders SET status = 'paid' WHERE id = 40")
    wait_until(lambda: len(attempts) >= 3, what="retried")
    assert entry(r, f"{prefix}order:40") == {}  # nothing streamed, so nothing applied
    assert _metric(d, "cdcd_retries_total", {"target": "source"}) >= 2
    assert d.error is None and d.thread.is_alive()
    allow.set()
    wait_until(lambda: entry(r, f"{prefix}order:40").get("v"), what="applied once the check could be made")
