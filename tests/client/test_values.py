"""Values come back as they went in, from every tier, sync and async (issue 10, item 2).

Every round trip is run four ways: sync ``Cache`` and ``AsyncCache``, each read back from the writer's own
L1 and by a second cache with an empty L1 (so the value comes from Redis). Real Redis, no mocks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import decimal
import enum
import json
import math
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from zoneinfo import ZoneInfo

import pydantic
import pytest
import redis

from cdcd.client import AsyncCache, Cache, CacheOptions, EntryOptions, JsonSerializer, TypedSerializer
from cdcd.client.values import UnencodableValue
from cdcd.devservers import RedisServer
from cdcd.keyspace import SCRIPTS, Keyspace, run_script
from tests.client.support import FakeDaemon, fields

UTC = dt.UTC
VALUES: dict[str, Any] = {
    "true": True, "false": False, "zero": 0, "int": -42, "int64": 2**63 - 1, "uint64": 2**64 - 1,
    "bigint": 10**40, "negbigint": -(2**64) - 1, "float": 1.25, "inf": math.inf, "-inf": -math.inf, "-0.0": -0.0,
    "str": "Ada ✓", "empty-str": "", "bytes": b"\x00\xc1\xff", "decimal": decimal.Decimal("12.50"),
    "decimal-exp": decimal.Decimal("-1.0E+3"), "decimal-nan": decimal.Decimal("NaN"),
    "datetime-naive": dt.datetime(2024, 2, 29, 8, 11, 12, 345678),
    "datetime-utc": dt.datetime(2024, 2, 29, 8, 11, 12, tzinfo=UTC),
    "datetime-offset": dt.datetime(2024, 2, 29, 8, 11, tzinfo=dt.timezone(dt.timedelta(hours=-3, minutes=-30))),
    "datetime-zone-fold": dt.datetime(2024, 11, 3, 1, 30, tzinfo=ZoneInfo("America/New_York"), fold=1),
    "date": dt.date(1815, 12, 10), "time": dt.time(8, 1, 2, 3),
    "time-tz": dt.time(8, 1, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30))),
    "timedelta": dt.timedelta(days=-3, seconds=5, microseconds=7),
    "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
    "list": [1, "a", None], "empty-list": [], "tuple": (1, (2, 3), [4]), "empty-tuple": (),
    "dict": {"a": 1, "b": {"c": [1.5]}}, "dict-int-keys": {1: "a", 2: "b"},
    "dict-mixed-keys": {(1, "x"): 1, None: 2, 3: 3},
    "set": {1, 2, 3}, "frozenset": frozenset({"a", "b"}), "set-of-tuples": {(1, 2), (3, 4)},
    "row": {"id": 42, "email": "ada@example.com", "balance": decimal.Decimal("1234.50"),
            "created": dt.datetime(2024, 2, 29, 8, 11, 12, tzinfo=UTC), "uid": uuid.uuid4(), "deleted_at": None,
            "tags": {"a", "b"}, "photo": b"\x89PNG"},
    "rows": [{"id": i, "at": dt.date(2024, 1, i + 1), "amount": decimal.Decimal(f"{i}.10")} for i in range(20)],
}


def same(a: Any, b: Any) -> bool:
    """Equal, of the same type, all the way down (NaNs equal themselves; aware datetimes keep their tzinfo)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, decimal.Decimal) and a.is_nan():
        return b.is_nan()
    if isinstance(a, float) and a == 0:
        return math.copysign(1, a) == math.copysign(1, b)
    if isinstance(a, dt.datetime | dt.time):
        return a == b and a.tzinfo == b.tzinfo and a.fold == b.fold
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(v, b[k]) for k, v in a.items())
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, set | frozenset):
        return a == b and all(type(x) is type(next(y for y in b if y == x)) for x in a)
    return bool(a == b)


class Driver:
    """One interface over ``Cache`` and ``AsyncCache`` so every test runs against both."""

    def __init__(self, kind: str, url: str, prefix: str, loop: asyncio.AbstractEventLoop, **opts: Any) -> None:
        self.kind, self.loop = kind, loop
        serializer = opts.pop("serializer", None)
        entry = opts.pop("entry", EntryOptions(jitter=0.0))
        options = CacheOptions(prefix=prefix, subscribe=False, require_registry=False, entry=entry, **opts)
        if kind == "sync":
            self.cache: Any = Cache(url, options, serializer=serializer)
        else:
            self.cache = loop.run_until_complete(AsyncCache.create(url, options, serializer=serializer))

    def _run(self, out: Any) -> Any:
        return out if self.kind == "sync" else self.loop.run_until_complete(out)

    def get_or_load(self, key: str, loader: Callable[[], Any], **kw: Any) -> Any:
        return self._run(self.cache.get_or_load(key, loader, **kw))

    def get(self, key: str, default: Any = None, **kw: Any) -> Any:
        return self._run(self.cache.get(key, default, **kw))

    def set(self, key: str, value: Any, **kw: Any) -> bool:
        return bool(self._run(self.cache.set(key, value, **kw)))

    def close(self) -> None:
        self._run(self.cache.close())


@pytest.fixture(params=["sync", "async"])
def drivers(request: pytest.FixtureRequest, redis_srv: RedisServer, ks: Keyspace) -> Iterator[Callable[..., Driver]]:
    loop = asyncio.new_event_loop()
    made: list[Driver] = []

    def make(**opts: Any) -> Driver:
        d = Driver(request.param, redis_srv.url, ks.prefix, loop, **opts)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()
    loop.close()


def never() -> Any:
    raise AssertionError("the loader must not run: the value is cached")


@pytest.mark.parametrize("tier", ["L1", "L2"])
@pytest.mark.parametrize("name", list(VALUES))
def test_every_tier_returns_what_was_stored(drivers: Callable[..., Driver], tier: str, name: str) -> None:
    value = VALUES[name]
    writer = drivers()
    reader = writer if tier == "L1" else drivers()
    assert same(writer.get_or_load("loaded", lambda: value), value)  # the loader's own value
    assert writer.set("set", value) is True
    for key in ("loaded", "set"):
        assert same(reader.get_or_load(key, never), value), (tier, key)
        assert same(reader.get(key), value), (tier, key)


def test_float_nan_round_trips(drivers: Callable[..., Driver]) -> None:
    writer, reader = drivers(), drivers()
    writer.set("nan", [math.nan])
    got = reader.get("nan")
    assert type(got) is list and type(got[0]) is float and math.isnan(got[0])


class Color(enum.IntEnum):
    RED = 1


class Opaque:
    pass


@pytest.mark.parametrize("value, type_name", [({"c": Color.RED}, "Color"), ([Opaque()], "Opaque"),
                                              (dataclasses.make_dataclass("P", ["x"])(1), "P")])
def test_values_the_serializer_cannot_store_fail_loudly(drivers: Callable[..., Driver], rds: redis.Redis,
                                                         ks: Keyspace, value: Any, type_name: str) -> None:
    d = drivers()
    with pytest.raises(UnencodableValue, match=rf"'k'.*{type_name}") as err:
        d.set("k", value)
    assert isinstance(err.value, TypeError)
    with pytest.raises(TypeError, match=rf"'k2'.*{type_name}"):
        d.get_or_load("k2", lambda: value)
    assert "d" not in fields(rds, ks.entry("k2")) and "k2" not in d.cache.l1.data
    # A fail-safe fallback does not hide it: retrying cannot fix a value that cannot be stored.
    d.get_or_load("k3", lambda: 1)
    d.cache.l1.expire("k3")  # L1 keeps it as the fail-safe fallback...
    rds.delete(ks.entry("k3"))  # ...and L2 has nothing: the loader runs
    with pytest.raises(UnencodableValue):
        d.get_or_load("k3", lambda: value)


def test_daemon_projections_are_json_and_a_decode_hook_types_them(drivers: Callable[..., Driver],
                                                                   daemon: FakeDaemon) -> None:
    class User(pydantic.BaseModel):
        id: int
        balance: decimal.Decimal
        created: dt.datetime

    projection = {"id": 7, "balance": "12.50", "created": "2024-02-29T08:11:12+00:00"}
    daemon.apply("user:7", json.dumps(projection).encode(), publish=False)
    plain, typed = drivers(), drivers()
    assert plain.get("user:7") == projection  # JSON as the daemon wrote it (other languages read it too)
    want = User(id=7, balance=decimal.Decimal("12.50"), created=dt.datetime(2024, 2, 29, 8, 11, 12, tzinfo=UTC))
    got = typed.get_or_load("user:7", never, decode=User.model_validate)
    assert type(got) is User and got == want
    assert typed.get_or_load("user:7", never, decode=User.model_validate) is got  # from L1 now
    by_default = drivers(entry=EntryOptions(jitter=0.0, decode=User.model_validate))  # a cache-wide hook
    assert by_default.get("user:7") == want and type(by_default.get("user:7")) is User
    if plain.kind == "sync":
        @plain.cache.cached(key="user:{uid}", decode=User.model_validate)
        def get_user(uid: int) -> User:
            raise AssertionError("cached")
    else:
        @plain.cache.cached(key="user:{uid}", decode=User.model_validate)
        async def get_user(uid: int) -> User:
            raise AssertionError("cached")
    plain.cache.l1.clear()
    assert plain._run(get_user(7)) == want


def test_an_older_clients_json_entry_is_a_clean_miss(drivers: Callable[..., Driver], rds: redis.Redis,
                                                     ks: Keyspace) -> None:
    """A value an older client wrote (JSON, ``default=str``: its datetime is a str) is never served: it is
    reloaded and overwritten in the typed format."""
    token = run_script(rds, SCRIPTS["read"], [ks.entry("old")], [10_000, "1"])[1]  # type: ignore[index]
    run_script(rds, SCRIPTS["fill"], [ks.entry("old")], [token, 60_000, b'{"at":"2024-01-01"}', "0", ""])
    assert fields(rds, ks.entry("old"))["s"] == "app"
    d = drivers()
    assert d.get("old", "miss") == "miss"
    want = {"at": dt.date(2024, 1, 1)}
    assert same(d.get_or_load("old", lambda: want), want)
    assert same(drivers().get("old"), want)  # L2 now holds the typed value


def test_an_unknown_format_version_is_a_clean_miss(drivers: Callable[..., Driver], rds: redis.Redis,
                                                   ks: Keyspace) -> None:
    token = run_script(rds, SCRIPTS["read"], [ks.entry("v9")], [10_000, "1"])[1]  # type: ignore[index]
    run_script(rds, SCRIPTS["fill"], [ks.entry("v9")], [token, 60_000, b"\xc1\x09whatever", "0", ""])
    d = drivers()
    assert d.get("v9", "miss") == "miss"
    assert d.get_or_load("v9", lambda: 5) == 5 and d.cache.stats.loader_calls == 1


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    at: dt.datetime


class Account(pydantic.BaseModel):
    id: int
    balance: decimal.Decimal
    points: list[Point]


def registered() -> TypedSerializer:
    return (TypedSerializer()
            .register(Point, 64, dataclasses.astuple, lambda t: Point(*t))
            .register(Account, 65, lambda a: a.model_dump(), Account.model_validate))


def test_registered_types_round_trip_and_unregistered_readers_miss(drivers: Callable[..., Driver]) -> None:
    when = dt.datetime(2024, 1, 1, tzinfo=UTC)
    value = {"acct": Account(id=1, balance=decimal.Decimal("9.99"), points=[Point(1, when)]),
             "p": Point(2, dt.datetime(2020, 1, 1))}
    writer = drivers(serializer=registered())
    assert writer.set("acct", value)
    got = drivers(serializer=registered()).get("acct")
    assert got == value and type(got["acct"]) is Account and type(got["acct"].points[0]) is Point
    assert type(got["acct"].points[0].at) is dt.datetime and type(got["p"]) is Point
    assert drivers().get("acct", "miss") == "miss"  # a reader without the registrations: a miss, never garbage


def test_a_custom_serializer_plugs_in(drivers: Callable[..., Driver]) -> None:
    """Anything with ``dumps``/``loads`` (the Serializer protocol); the old JSON one is still there."""
    writer, reader = drivers(serializer=JsonSerializer()), drivers(serializer=JsonSerializer())
    writer.set("j", {"a": [1, 2]})
    assert reader.get("j") == {"a": [1, 2]}


def test_l1_shares_one_object_by_default(drivers: Callable[..., Driver]) -> None:
    d = drivers()
    first = d.get_or_load("k", lambda: {"n": [1]})
    assert d.get_or_load("k", never) is first and d.get("k") is first


@pytest.mark.parametrize("tier", ["L1", "L2"])
def test_l1_copy_gives_every_caller_its_own_copy(drivers: Callable[..., Driver], tier: str) -> None:
    original = {"n": [1], "at": dt.date(2024, 1, 1)}
    writer = drivers(l1_copy=True)
    reader = writer if tier == "L1" else drivers(l1_copy=True)
    got = writer.get_or_load("k", lambda: original)
    assert got == original
    original["n"].append(2)  # the loader's object changes after it was cached
    got["n"].append(3)  # and so does what a caller got
    a = reader.get_or_load("k", never)
    b = reader.get("k")
    assert same(a, {"n": [1], "at": dt.date(2024, 1, 1)}) and same(b, a) and a is not b
    a["n"].clear()
    assert reader.get_or_load("k", never) == {"n": [1], "at": dt.date(2024, 1, 1)}
    assert writer.set("s", original) and writer.get("s") is not writer.get("s")


def test_l1_copy_with_daemon_projections(drivers: Callable[..., Driver], daemon: FakeDaemon) -> None:
    daemon.apply("user:1", b'{"id": 1, "at": "2024-01-01"}', publish=False)
    d = drivers(l1_copy=True)
    hook: Callable[[Any], Any] = lambda v: {**v, "at": dt.date.fromisoformat(v["at"])}  # noqa: E731
    a = d.get_or_load("user:1", never, decode=hook)
    a["id"] = 99
    b = d.get_or_load("user:1", never, decode=hook)
    assert b == {"id": 1, "at": dt.date(2024, 1, 1)} and a is not b


def test_typed_serializer_unit_rules() -> None:
    """Pure logic: the header, a packer left clean by a refused value, registration codes, unknown codes."""
    s = TypedSerializer()
    ok = s.dumps({"a": 1})
    assert ok[:2] == b"\xc1\x01"
    with pytest.raises(TypeError, match=r"builtins\.object"):
        s.dumps({"a": [1, 2, object()]})
    assert s.dumps({"a": 1}) == ok  # the thread's packer holds nothing of the failed value
    with pytest.raises(ValueError, match="not cdcd's typed format"):
        s.loads(b'{"a": 1}')
    with pytest.raises(ValueError, match="outside 64-127"):
        s.register(Point, 10, dataclasses.astuple, lambda t: Point(*t))
    s.register(Point, 64, dataclasses.astuple, lambda t: Point(*t))
    with pytest.raises(ValueError, match="already registered"):
        s.register(Account, 64, lambda a: a.model_dump(), Account.model_validate)
    data = s.dumps(Point(1, dt.datetime(2024, 1, 1)))
    with pytest.raises(ValueError, match="unknown extension type 64"):
        TypedSerializer().loads(data)
