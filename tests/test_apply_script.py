"""The ``apply`` scripts against their first version, on real Redis (issue 9).

The first ``apply`` rewrote an entry with DEL + HSET + PEXPIRE, which is obviously right and costly. The
current ``apply`` and ``apply_many`` skip the DEL (deleting only the fields the new state must not hold)
and read the clock once per call. Readers must not be able to tell: for every state an entry can be in
(nothing, a lease, daemon values and tombstones, app values, negative entries and tombstones, with and
without tags or a TTL) and every write (older, equal, newer, longer version; value with and without tag
snapshot, tombstone, fence), the answer, the fields and the TTL must be what the first version leaves,
and the generation must move exactly when it moved.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import redis

from cdcd.keyspace import _PRELUDE, APPLY, APPLY_MANY
from tests.helpers import unique

# The first version of the script (main before issue 9), kept as the oracle.
REFERENCE_APPLY = _PRELUDE + r"""
local cur = redis.call('HMGET', KEYS[1], 'v', 'g', 's')
if cur[1] and not newer(ARGV[1], cur[1]) then
  if ARGV[2] == 'v' or ARGV[1] == cur[1] then return 0 end
  local g = nextgen(cur[2])
  if ARGV[2] == 't' and cur[3] ~= 'app' then
    redis.call('HSET', KEYS[1], 'g', g)
    return 2
  end
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'v', cur[1], 'g', g, 's', 'cdc')
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  if ARGV[2] == 'f' then return 3 end
  return 2
end
local g = nextgen(cur[2])
redis.call('DEL', KEYS[1])
if ARGV[2] == 'v' then
  if ARGV[5] ~= '' then
    redis.call('HSET', KEYS[1], 'v', ARGV[1], 'g', g, 's', 'cdc', 'd', ARGV[4], 't', ARGV[5])
  else
    redis.call('HSET', KEYS[1], 'v', ARGV[1], 'g', g, 's', 'cdc', 'd', ARGV[4])
  end
else
  redis.call('HSET', KEYS[1], 'v', ARGV[1], 'g', g, 's', 'cdc')
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if ARGV[2] == 'f' then return 3 end
return 1
"""

SNAP = '{"#table:public.users":"7"}'
# The states an entry can be in (fields, TTL in ms or None for none); g far above the clock: the +1 path.
STATES: dict[str, tuple[dict[str, str], int | None]] = {
    "absent": ({}, None),
    "lease": ({"v": "0", "g": "1000", "s": "lease"}, 10_000),
    "cdc value, tags": ({"v": "100", "g": "1000", "s": "cdc", "d": "old", "t": SNAP}, 30_000),
    "cdc value": ({"v": "100", "g": "1000", "s": "cdc", "d": "old"}, 30_000),
    "cdc value, no ttl": ({"v": "100", "g": "1000", "s": "cdc", "d": "old", "t": SNAP}, None),
    "cdc tombstone": ({"v": "100", "g": "1000", "s": "cdc"}, 30_000),
    "app value, tags": ({"v": "100", "g": "1000", "s": "app", "d": "old", "t": SNAP}, 30_000),
    "app value": ({"v": "100", "g": "1000", "s": "app", "d": "old"}, 30_000),
    "app negative, tags": ({"v": "100", "g": "1000", "s": "app", "n": "1", "t": SNAP}, 30_000),
    "app negative": ({"v": "100", "g": "1000", "s": "app", "n": "1"}, 30_000),
    "app tombstone": ({"v": "100", "g": "1000", "s": "app"}, 30_000),
    "generation ahead of the clock": ({"v": "100", "g": "5000000000000000", "s": "cdc", "d": "old"}, 30_000),
    "a hash with a value only": ({"d": "old"}, None),
}
# (version, kind, data, snap)
WRITES = [(ver, kind, data, snap)
          for ver in ("50", "100", "150", "1000")
          for kind, data, snap in (("v", "new", SNAP), ("v", "new", ""), ("t", "", ""), ("f", "", ""))]
CASES = list(itertools.product(STATES, WRITES))
READER_FIELDS = ("v", "g", "s", "d", "n", "t")


def _setup(r: redis.Redis, key: str, state: str) -> None:
    fields, ttl = STATES[state]
    r.delete(key)
    if fields:
        r.hset(key, mapping=fields)  # type: ignore[arg-type]
        if ttl is not None:
            r.pexpire(key, ttl)


def _state(r: redis.Redis, key: str) -> tuple[dict[str, str], int]:
    raw: dict[bytes, bytes] = r.hgetall(key)  # type: ignore[assignment]
    fields = {k.decode(): v.decode() for k, v in raw.items() if k.decode() in READER_FIELDS}
    return fields, int(r.pttl(key))  # type: ignore[arg-type]


def _compare(before: dict[str, str], ref: tuple[dict[str, str], int], got: tuple[dict[str, str], int],
             case: Any) -> None:
    (rf, rttl), (gf, gttl) = ref, got
    assert {k: v for k, v in gf.items() if k != "g"} == {k: v for k, v in rf.items() if k != "g"}, case
    moved_ref, moved_got = rf.get("g") != before.get("g"), gf.get("g") != before.get("g")
    assert moved_ref == moved_got, case
    if moved_got and before.get("g"):
        assert int(gf["g"]) > int(before["g"]), case
    if before.get("g") == "5000000000000000" and moved_got:
        assert gf["g"] == rf["g"] == "5000000000000001", case
    elif moved_got:  # the Redis clock in microseconds, as the first version wrote it (cdcd inspect reads it)
        assert gf["g"] == str(int(gf["g"])) and abs(int(gf["g"]) - int(rf["g"])) < 10_000_000, case
    assert (rttl < 0) == (gttl < 0), case
    if rttl >= 0:
        assert abs(rttl - gttl) < 5_000, case


@pytest.fixture
def shas(r: redis.Redis) -> dict[str, str]:
    return {name: str(r.script_load(src)) for name, src in
            (("reference", REFERENCE_APPLY), ("apply", APPLY), ("apply_many", APPLY_MANY))}


def test_apply_leaves_what_the_first_version_left(r: redis.Redis, shas: dict[str, str]) -> None:
    p = unique("eq") + ":"
    for n, (state, (ver, kind, data, snap)) in enumerate(CASES):
        case = (state, ver, kind, data, snap)
        ref_key, key = f"{p}ref:{n}", f"{p}new:{n}"
        _setup(r, ref_key, state)
        _setup(r, key, state)
        want = r.evalsha(shas["reference"], 1, ref_key, ver, kind, 60_000, data, snap)
        got = r.evalsha(shas["apply"], 1, key, ver, kind, 60_000, data, snap)
        assert got == want, case
        _compare(STATES[state][0], _state(r, ref_key), _state(r, key), case)


def test_apply_many_answers_each_entry_as_the_first_version_did(r: redis.Redis, shas: dict[str, str]) -> None:
    """Every case in one call (the keys share a hash tag, as the sink guarantees), in two orders."""
    p = unique("{eqm}") + ":"
    for order in (CASES, CASES[::-1]):
        keys, args, want = [], [], []
        for n, (state, (ver, kind, data, snap)) in enumerate(order):
            ref_key, key = f"{p}ref:{n}", f"{p}many:{n}"
            _setup(r, ref_key, state)
            _setup(r, key, state)
            want.append(r.evalsha(shas["reference"], 1, ref_key, ver, kind, 60_000, data, snap))
            keys.append(key)
            args += [ver, kind, 60_000, data, snap]
        got = r.evalsha(shas["apply_many"], len(keys), *keys, *args)
        assert got == want
        for n, (state, (ver, kind, data, snap)) in enumerate(order):
            _compare(STATES[state][0], _state(r, f"{p}ref:{n}"), _state(r, f"{p}many:{n}"),
                     (state, ver, kind, data, snap))


def test_apply_many_answers_a_wrongtype_key_alone(r: redis.Redis, shas: dict[str, str]) -> None:
    p = unique("{wt}") + ":"
    r.rpush(f"{p}list", "not an entry")
    r.set(f"{p}string", "not an entry either")
    keys = [f"{p}a", f"{p}list", f"{p}b", f"{p}string"]
    args = [a for _ in keys for a in ("200", "v", 60_000, "x", "")]
    out = r.evalsha(shas["apply_many"], len(keys), *keys, *args)
    assert out[0] == 1 and out[2] == 1
    for bad in (out[1], out[3]):
        assert isinstance(bad, redis.ResponseError) and "WRONGTYPE" in str(bad)
    assert r.hget(f"{p}a", "d") == b"x" and r.hget(f"{p}b", "d") == b"x"
    assert r.type(f"{p}list") == b"list" and r.get(f"{p}string") == b"not an entry either"
    # the one-entry script answers the same error (a reply, as before: the sink dead-letters it)
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        r.evalsha(shas["apply"], 1, f"{p}list", "200", "v", 60_000, "x", "")
