"""Entries of one hash slot applied in one ``apply_many`` call, answered per entry (issue 9).

The sink groups a batch's entry writes by Redis Cluster hash slot; the counts, the refusals (dead
letters) and the repairs must be per entry exactly as with one call per entry, in both the packed and
the redis-py pipeline paths, against real Redis.
"""

from __future__ import annotations

import pytest
import redis
from redis.crc import key_slot as redis_py_key_slot

from cdcd.backplane import Sequencer
from cdcd.devservers import RedisServer
from cdcd.fillguard import FillGuard
from cdcd.rules import Batch, Rules, Write
from cdcd.sinks.redis import GROUP_MAX, ApplyResult, Layout, RedisSink, key_slot, layout, tag_groups
from tests.helpers import config_dict, entry, make_config, unique

TTL = 60_000


# ------------------------------------------------------------------------------------ slots (pure)


def test_key_slot_is_redis_clusters() -> None:
    # CRC16/XMODEM of "123456789" is 0x31C3 (Redis Cluster spec); 0x31C3 % 16384 = 12739
    assert key_slot(b"123456789") == 12739
    assert key_slot(b"{user1000}.following") == key_slot(b"{user1000}.followers") == key_slot(b"user1000")
    assert key_slot(b"foo{}{bar}") == key_slot(b"foo{}{bar}")  # empty tag: the whole key
    assert key_slot(b"foo{}{bar}") != key_slot(b"bar")
    assert key_slot(b"foo{{bar}}zap") == key_slot(b"{bar")
    assert key_slot(b"foo{bar}{zap}") == key_slot(b"bar")
    for k in (b"", b"a", b"{", b"}", b"{}", b"}{a}", b"a{b", b"v1:user:42", b"v1:{t:7}:order:1",
              "v1:user:\u00e9\u4e2d".encode(), b"x{%7B}y", b"{a}{b}", b"{{}}"):
        assert key_slot(k) == redis_py_key_slot(k), k


def test_layout_groups_only_keys_of_one_slot() -> None:
    assert layout([b"user:1", b"user:2", b"order:1"]) is None  # distinct slots: one call each, in order
    keys = [b"{a}:1", b"user:1", b"{a}:2", b"{b}:1", b"{a}:3", b"{b}:2"]
    got = layout(keys)
    assert got == Layout(6, [[0, 2, 4], [3, 5]]) and got.calls == 3
    assert got.order() == [1, 0, 2, 4, 3, 5]  # the singles first, in batch order, then the groups
    err = redis.exceptions.NoScriptError("NOSCRIPT")
    assert got.replies([1, [0, 2, 3], err, "tail"]) == [1, 0, 2, 3, err, err]
    many = [b"{t}:%d" % i for i in range(GROUP_MAX * 2 + 5)]
    calls = layout(many)
    assert calls is not None and [len(c) for c in calls.groups] == [GROUP_MAX, GROUP_MAX, 5]
    assert calls.order() == list(range(len(many)))
    # only keys with the same hash tag group (provably one slot, no CRC computed): keys without a tag and
    # different tags that collide by chance are not looked for (a CRC per key costs more than it saves)
    pair = _colliding_pair()
    assert layout([pair[0], b"{x}", pair[1]]) is None
    assert layout([b"{" + pair[0] + b"}:a", b"{x}", b"{" + pair[1] + b"}:b"]) is None
    assert layout([b"{x}:1", b"y{}", b"{x}:2", b"{}x", b"z{x", b"a{x}b"]) == Layout(6, [[0, 2, 5]])


def test_tag_groups_are_single_slots() -> None:
    keys = [b"p:{t%d}:user:%d" % (i % 7, i) for i in range(100)] + [b"{a}{b}", b"x{a}", b"{{a}}", b"{{a}"]
    groups = tag_groups(keys)
    assert groups is not None and len(groups) == 9
    for g in groups:
        assert len({key_slot(keys[i]) for i in g}) == 1 == len({redis_py_key_slot(keys[i]) for i in g})


def _colliding_pair() -> list[bytes]:
    by_slot: dict[int, list[bytes]] = {}
    n = 0
    while True:
        k = b"k%d" % n
        by_slot.setdefault(key_slot(k), []).append(k)
        if len(by_slot[key_slot(k)]) == 2:
            return by_slot[key_slot(k)]
        n += 1


# ------------------------------------------------------------------------------ the sink (real Redis)


@pytest.fixture
def rules(redis_server: RedisServer) -> Rules:
    return make_config(config_dict("postgresql://unused/none", redis_server.url, "unused", unique("g") + ":")).rules()


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


def evalsha_calls(r: redis.Redis) -> int:
    return int(r.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))


def value(sink: RedisSink, key: str, version: int, data: bytes) -> Write:
    return Write(sink.ks.entry(key), version, data, TTL)


def tomb(sink: RedisSink, key: str, version: int, fence: bool = False) -> Write:
    return Write(sink.ks.entry(key), version, None, TTL, fence=fence)


def test_one_call_for_a_slot_mixed_outcomes_each_answered(sink: RedisSink, r: redis.Redis) -> None:
    """Applied value, refused older value, refused-but-fencing older tombstone, fence, newer tombstone and a
    WRONGTYPE key, all of hash tag {g}: one apply_many call, six answers, one dead letter and repair."""
    ks = sink.ks
    guard = FillGuard(r, ks)
    apply(sink, value(sink, "{g}:stale", 300, b"kept"), value(sink, "{g}:fenced", 300, b"kept too"),
          value(sink, "{g}:fence", 300, b"dropped"), value(sink, "{g}:tomb", 100, b"gone"))
    r.rpush(ks.entry("{g}:wrong"), "not a cdcd entry")
    token = guard.read("{g}:fenced")  # a fill in flight on the entry the older tombstone fences
    before = {k: entry(r, ks.entry(k)) for k in ("{g}:stale", "{g}:fenced")}
    r.config_resetstat()
    res = apply(sink, value(sink, "{g}:new", 200, b"new"), value(sink, "{g}:stale", 200, b"older"),
                tomb(sink, "{g}:fenced", 200), tomb(sink, "{g}:fence", 50, fence=True),
                tomb(sink, "{g}:tomb", 200), value(sink, "{g}:wrong", 200, b"w"))
    # one call for the six entries (+ the repair of the wrongtype key), nothing else: no tags in the batch
    assert evalsha_calls(r) == 2
    assert (res.applied, res.refused, res.fenced, res.fences) == (3, 3, 1, 1)
    assert (res.tombstones, res.values) == (3, 3)
    assert [(f.key, f.kind, f.reason, f.version) for f in res.refusals] == [
        (ks.entry("{g}:wrong"), "entry", "wrongtype", 200)]
    assert "WRONGTYPE" in res.refusals[0].error
    assert entry(r, ks.entry("{g}:new"))["d"] == "new"
    assert entry(r, ks.entry("{g}:stale")) == before["{g}:stale"]  # refused: untouched
    fenced = entry(r, ks.entry("{g}:fenced"))
    assert fenced["d"] == "kept too" and fenced["v"] == "300" and fenced["g"] != before["{g}:fenced"]["g"]
    assert guard.fill(token, b"stale", ttl=300) is False
    fence = entry(r, ks.entry("{g}:fence"))
    assert "d" not in fence and fence["v"] == "300"
    t = entry(r, ks.entry("{g}:tomb"))
    assert "d" not in t and t["v"] == "200"
    # the wrongtype key was repaired as today: a tombstone hash at the change's version
    assert r.type(ks.entry("{g}:wrong")) == b"hash"
    w = entry(r, ks.entry("{g}:wrong"))
    assert "d" not in w and w["v"] == "200"
    for k in ("{g}:new", "{g}:fence", "{g}:tomb", "{g}:wrong"):
        assert 0 < int(r.pttl(ks.entry(k))) <= TTL  # type: ignore[arg-type]


def test_grouped_and_single_calls_in_one_batch_map_answers_to_their_entries(sink: RedisSink, r: redis.Redis) -> None:
    """Groups leave when their last entry is packed, singles at once: the answers must still find their
    entries. Every third key of tag {m} already holds a newer version; one key of it is a list."""
    ks = sink.ks
    names = [f"{{m}}:{i}" if i % 2 else f"solo:{i}" for i in range(200)]
    newer = [n for i, n in enumerate(names) if i % 3 == 0]
    apply(sink, *(value(sink, n, 900, b"newer") for n in newer))
    r.delete(ks.entry("{m}:7"))
    r.rpush(ks.entry("{m}:7"), "x")
    calls = layout([ks.entry(n).encode() for n in names])
    assert calls is not None and calls.groups and calls.calls < len(names)
    res = apply(sink, *(value(sink, n, 500, f"v{i}".encode()) for i, n in enumerate(names)))
    assert [f.key for f in res.refusals] == [ks.entry("{m}:7")]
    assert (res.applied, res.refused) == (200 - len(newer) - 1, len(newer) + 1)
    for i, n in enumerate(names):
        e = entry(r, ks.entry(n))
        if n in newer:
            assert (e["v"], e["d"]) == ("900", "newer"), n
        elif n == "{m}:7":
            assert "d" not in e and e["v"] == "500"
        else:
            assert (e["v"], e["d"]) == ("500", f"v{i}"), n


def test_a_slot_with_more_entries_than_a_call_takes(sink: RedisSink, r: redis.Redis) -> None:
    n = GROUP_MAX * 2 + 3
    r.config_resetstat()
    res = apply(sink, *(value(sink, f"{{big}}:{i}", 10, b"x") for i in range(n)))
    assert res.applied == n and evalsha_calls(r) == 3
    assert apply(sink, *(value(sink, f"{{big}}:{i}", 10, b"y") for i in range(n))).refused == n


def test_grouped_calls_survive_a_script_flush(sink: RedisSink, r: redis.Redis) -> None:
    """NOSCRIPT answers a whole apply_many call: the sink reloads the scripts and applies the batch again."""
    r.script_flush()
    res = apply(sink, *(value(sink, f"{{nos}}:{i}", 10, b"x") for i in range(5)))
    assert res.restored and res.applied == 5
    assert all(entry(r, sink.ks.entry(f"{{nos}}:{i}"))["d"] == "x" for i in range(5))


def test_groups_of_a_big_batch_leave_in_chunks_and_all_land(sink: RedisSink, r: redis.Redis) -> None:
    """More grouped entries than one socket write takes (1 024): every answer still finds its entry."""
    names = [f"{{c{i % 40}}}:{i}" for i in range(2500)] + [f"plain:{i}" for i in range(300)]
    apply(sink, *(value(sink, n, 900, b"newer") for n in names[::7]))
    res = apply(sink, *(value(sink, n, 500, n.encode()) for n in names))
    assert (res.applied, res.refused) == (len(names) - len(names[::7]), len(names[::7]))
    stale = set(names[::7])
    for n in names[::97]:
        assert entry(r, sink.ks.entry(n))["d"] == ("newer" if n in stale else n), n
