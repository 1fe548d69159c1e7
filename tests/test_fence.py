"""Defence in depth against mis-ordered sources, against real Redis (docs/versions.md).

A tombstone that arrives with a version older than the entry's is refused (the entry keeps its version), but
it still moves the generation and drops an app-filled value: a fill in flight fails and the next reader
misses. A mis-ordered source can then cost a miss, never a stale fill. A *fence* (a record whose version
is only a lower bound of its commit order) always invalidates and never lowers the version.
"""

from __future__ import annotations

import pytest
import redis

from cdcd.backplane import Sequencer
from cdcd.change import Change, Invalidation, Op, Transaction
from cdcd.devservers import RedisServer
from cdcd.fillguard import FillGuard
from cdcd.rules import Batch, Rules, Write
from cdcd.sinks.redis import ApplyResult, RedisSink
from tests.helpers import config_dict, entry, make_config, unique

TTL = 60_000


@pytest.fixture
def rules(redis_server: RedisServer) -> Rules:
    return make_config(config_dict("postgresql://unused/none", redis_server.url, "unused", unique("f") + ":")).rules()


@pytest.fixture(params=[True, False], ids=["packed", "pipeline"])
def sink(request: pytest.FixtureRequest, r: redis.Redis, rules: Rules) -> RedisSink:
    s = RedisSink(r, rules, Sequencer("cdcd"))
    s.packed = request.param
    s.prepare()
    return s


def apply(sink: RedisSink, *writes: Write) -> ApplyResult:
    batch = Batch()
    for w in writes:
        batch.put(w)
        batch.version = max(batch.version, w.version)
    return sink.apply(batch)


def tomb(sink: RedisSink, key: str, version: int, fence: bool = False) -> Write:
    return Write(sink.ks.entry(key), version, None, TTL, fence=fence)


def value(sink: RedisSink, key: str, version: int, data: bytes) -> Write:
    return Write(sink.ks.entry(key), version, data, TTL)


def test_older_tombstone_fences_a_fill_in_flight_and_drops_an_app_value(sink: RedisSink, r: redis.Redis) -> None:
    guard = FillGuard(r, sink.ks)
    full = sink.ks.entry("user-orders:7")
    assert apply(sink, tomb(sink, "user-orders:7", 200)).applied == 1  # T_a, applied first
    # app B fills after T_a (its read saw T_a), app A takes its token and reads the database...
    b = guard.read("user-orders:7")
    assert guard.fill(b, b'["a"]', ttl=300)
    a = guard.read("user-orders:7")
    assert a.value == b'["a"]'  # a hit; say A reads anyway (tag check failed) with the hit's generation
    # ... T_b commits and arrives mis-versioned (older than T_a): refused, but it fences
    res = apply(sink, tomb(sink, "user-orders:7", 100))
    assert (res.applied, res.refused, res.fenced) == (0, 1, 1)
    e = entry(r, full)
    assert "d" not in e and e["v"] == "200" and e["s"] == "cdc"  # app value dropped, version kept
    assert 0 < r.pttl(full) <= TTL
    assert guard.fill(a, b'["a"]', ttl=300) is False  # the stale fill is refused
    fresh = guard.read("user-orders:7")
    assert not fresh.hit and guard.fill(fresh, b'["a","b"]', ttl=300)


def test_older_tombstone_keeps_a_daemon_value_but_moves_the_generation(sink: RedisSink, r: redis.Redis) -> None:
    full = sink.ks.entry("user:1")
    apply(sink, value(sink, "user:1", 300, b'{"n":2}'))
    before = entry(r, full)
    res = apply(sink, tomb(sink, "user:1", 100))
    after = entry(r, full)
    assert res.fenced == 1 and after["d"] == before["d"] and after["v"] == "300"
    assert int(after["g"]) > int(before["g"])


def test_redelivery_and_older_values_touch_nothing(sink: RedisSink, r: redis.Redis) -> None:
    full = sink.ks.entry("user:2")
    apply(sink, tomb(sink, "user:2", 300))
    before = entry(r, full)
    res = apply(sink, tomb(sink, "user:2", 300))  # the same tombstone again: not older, no fence
    assert (res.applied, res.fenced) == (0, 0)
    res = apply(sink, value(sink, "user:2", 100, b"old"))  # an older value: refused, as always
    assert (res.applied, res.fenced) == (0, 0)
    assert entry(r, full) == before


def test_fence_invalidates_without_claiming_a_newer_version(sink: RedisSink, r: redis.Redis) -> None:
    guard = FillGuard(r, sink.ks)
    full = sink.ks.entry("user:3")
    apply(sink, value(sink, "user:3", 500, b"v500"))
    res = apply(sink, tomb(sink, "user:3", 40, fence=True))  # a fence below the entry's version
    e = entry(r, full)
    assert (res.fences, res.applied) == (1, 1) and "d" not in e and e["v"] == "500"
    assert apply(sink, value(sink, "user:3", 400, b"older")).applied == 0  # older values stay out
    assert apply(sink, value(sink, "user:3", 600, b"v600")).applied == 1  # newer ones land
    # on an empty key: a tombstone at the fence's (lower-bound) version
    apply(sink, tomb(sink, "user:4", 40, fence=True))
    assert entry(r, sink.ks.entry("user:4"))["v"] == "40"
    # on a lease: the fill in flight fails
    token = guard.read("user:5")
    assert apply(sink, tomb(sink, "user:5", 40, fence=True)).fences == 1
    assert guard.fill(token, b"stale", ttl=300) is False


def test_a_fence_wins_over_earlier_writes_of_its_batch(sink: RedisSink, r: redis.Redis) -> None:
    """Replayed records before a restart, then the first record after it (a fence), in one batch."""
    b = Batch()
    b.put(value(sink, "user:6", 900, b"before-restart"))
    b.put(tomb(sink, "user:6", 50, fence=True))
    w = b.writes[sink.ks.entry("user:6")]
    assert w.fence and w.data is None and w.version == 900
    b.version = 900
    sink.apply(b)
    e = entry(r, sink.ks.entry("user:6"))
    assert "d" not in e and e["v"] == "900"


def test_a_fenced_transaction_plans_invalidations_only(sink: RedisSink, rules: Rules, r: redis.Redis) -> None:
    """An ``update`` rule's row from a fence writes no value: its version cannot order it against values."""
    row = {"id": 9, "email": "f@x", "name": "F", "tenant_id": 1, "updated_at": None}
    fenced = Transaction(version=70, changes=[Change(Op.UPDATE, "public", "users", dict(row), dict(row))],
                         position=0, invalidations=[Invalidation(["report:1"], ["dash"])], fence=True)
    apply(sink, value(sink, "user:9", 500, b"older-than-the-fenced-change"))
    batch = rules.plan([fenced])
    assert {k: (w.fence, w.data) for k, w in batch.writes.items()} == {
        sink.ks.entry(k): (True, None) for k in ("user:9", "user:email:f@x", "report:1")}
    assert {"tenant:1", "dash"} <= batch.tags
    res = sink.apply(batch)
    assert res.fences == 3
    e = entry(r, sink.ks.entry("user:9"))
    assert "d" not in e and e["v"] == "500"
