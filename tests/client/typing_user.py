"""A user's code against the public client API, checked with ``mypy --strict`` by test_typing.py (never run).

No ``type: ignore`` anywhere: a loader returning ``T`` gives ``T``, decorated functions keep their signature
and expose typed ``.key``/``.invalidate``, durations are seconds or strings as in the YAML rules.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from decimal import Decimal

from cdcd.client import AsyncCache, Cache, CacheOptions, EntryOptions, TypedSerializer


@dataclasses.dataclass
class User:
    id: int
    balance: Decimal
    created: dt.datetime


def load_user(uid: int) -> User | None:
    return User(uid, Decimal("1.00"), dt.datetime(2024, 1, 1, tzinfo=dt.UTC)) if uid else None


def user_from_projection(v: dict[str, str]) -> User:
    return User(int(v["id"]), Decimal(v["balance"]), dt.datetime.fromisoformat(v["created"]))


serializer = TypedSerializer().register(User, 64, dataclasses.astuple, lambda t: User(*t))
cache = Cache("redis://127.0.0.1:6379/0", CacheOptions(prefix="v1:", lease_ttl="10s",
                                                       entry=EntryOptions(ttl="10m", soft_ttl=240, negative_ttl="30s")),
              serializer=serializer)
acache = AsyncCache("redis://127.0.0.1:6379/0", CacheOptions(prefix="v1:"))


def balance(uid: int) -> Decimal | None:
    user = cache.get_or_load(f"user:{uid}", lambda: load_user(uid), ttl="1h", decode=user_from_projection)
    return user.balance if user is not None else None


@cache.cached(key="user:{uid}", tags=["tenant:{tenant}"], ttl="5m")
def get_user(uid: int, tenant: int = 0) -> User | None:
    return load_user(uid)


def use_decorated() -> tuple[User | None, str | None, bool]:
    return get_user(1, tenant=2), get_user.key(1), get_user.invalidate(1, 2)


@acache.cached(key="user:{uid}", ttl=60.0)
async def aget_user(uid: int) -> User | None:
    return load_user(uid)


async def use_async() -> tuple[User | None, User | None, int, str | None, bool]:
    async def fetch() -> User | None:
        return load_user(3)

    a = await acache.get_or_load("user:3", fetch, ttl="90s")
    b = await aget_user(3)
    n = await acache.get_or_load("n", lambda: 5)
    return a, b, n, aget_user.key(3), await aget_user.invalidate(3)
