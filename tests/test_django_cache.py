"""The Django cache backend on cdcd's client (issue 10 item 4): Django's cache API against real Redis,
and Django ORM writes -> Postgres -> cdcd -> the backend's entries invalidated in every process."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
import redis

from cdcd.client.django_cache import CdcdCache, cdcd_key
from cdcd.devservers import RedisServer
from tests import djangoenv
from tests.helpers import DaemonThread, entry, make_config, unique, wait_until


def backend(url: str, prefix: str, **options: Any) -> CdcdCache:
    djangoenv.setup()
    return CdcdCache(url, {"TIMEOUT": 60, "OPTIONS": {"prefix": prefix, **options}})


@pytest.fixture
def standalone(redis_server: RedisServer) -> Iterator[tuple[CdcdCache, CdcdCache]]:
    """Two backends ("two processes") on one Redis, no daemon: the app fills and invalidates alone."""
    prefix = unique("dj") + ":"
    a = backend(redis_server.url, prefix, require_registry=False)
    b = backend(redis_server.url, prefix, require_registry=False)
    assert a.cache.wait_subscribed() and b.cache.wait_subscribed()
    yield a, b
    a.shutdown()
    b.shutdown()


def test_django_cache_api(standalone: tuple[CdcdCache, CdcdCache], r: redis.Redis) -> None:
    a, b = standalone
    missing = object()
    assert a.get("k", missing) is missing and a.get("k") is None and not a.has_key("k")
    a.set("k", {"n": 1})
    assert a.get("k") == {"n": 1} and b.get("k") == {"n": 1} and a.has_key("k") and "k" in b
    a.set("none", None)  # None is a value, as in Django's own backends
    assert b.get("none", missing) is None
    # add: only when nothing is cached
    assert a.add("k", "other") is False and b.get("k") == {"n": 1}
    assert a.add("fresh", 5) is True and b.get("fresh") == 5
    # incr / decr (ValueError when missing, as Django)
    assert b.incr("fresh") == 6 and a.decr("fresh", 2) == 4
    wait_until(lambda: a.get("fresh") == 4, what="a's L1 copy of 'fresh' dropped by b's write")
    with pytest.raises(ValueError):
        a.incr("absent")
    # many
    a.set_many({"m1": 1, "m2": [1, 2]})
    assert b.get_many(["m1", "m2", "m3"]) == {"m1": 1, "m2": [1, 2]}
    # delete: a tombstone everywhere; b's L1 copy dropped via the backplane
    assert b.get("m1") == 1
    assert a.delete("m1") is True and a.delete("m1") is False
    wait_until(lambda: b.get("m1", missing) is missing, what="b's L1 copy dropped")
    b.delete_many(["m2"])
    assert b.get("m2") is None
    wait_until(lambda: a.get("m2") is None, what="a's L1 copy of m2 dropped")
    # timeouts: 0 means "do not keep it", None means "no expiry" (a long TTL in Redis)
    a.set("t0", 1, timeout=0)
    assert b.get("t0", missing) is missing
    a.set("forever", 1, timeout=None)
    assert r.pttl(f"{a.cache.keyspace.prefix}forever") > 86400 * 1000
    a.set("short", 1, timeout=30)
    short = r.pttl(f"{a.cache.keyspace.prefix}short")  # the timeout +- cdcd's TTL jitter
    assert 0 < short < 3000 * 1000
    assert a.touch("short", 3000) and r.pttl(f"{a.cache.keyspace.prefix}short") > 2 * short
    assert a.touch("absent") is False
    # get_or_set: the default runs once, through the fill guard
    calls = []
    assert a.get_or_set("gos", lambda: calls.append(1) or "v") == "v"
    assert b.get_or_set("gos", lambda: calls.append(1) or "w") == "v" and calls == [1]
    # versions, as Django's BaseCache implements them on top of get/set/delete
    a.set("ver", "one")
    assert a.incr_version("ver") == 2
    assert a.get("ver") is None and a.get("ver", version=2) == "one"
    # a '#' in a Django key is not cdcd's namespace
    a.set("odd#key", 1)
    assert b.get("odd#key") == 1 and r.exists(f"{a.cache.keyspace.prefix}odd%23key")
    # clear: every entry under the prefix dropped, in every process; cdcd's own keys stay
    a.set("c1", 1)
    assert b.get("c1") == 1
    r.set(f"{a.cache.keyspace.prefix}#cdcd:keep", "x")
    a.clear()
    wait_until(lambda: b.get("c1", missing) is missing and b.get("k", missing) is missing, what="clear everywhere")
    assert r.get(f"{a.cache.keyspace.prefix}#cdcd:keep") == b"x"


def test_key_function() -> None:
    assert cdcd_key("user:42", "", 1) == "user:42"  # the daemon's rule keys, as they are
    assert cdcd_key("user:42", "site", 1) == "site:1:user:42"  # Django's layout otherwise
    assert cdcd_key("user:42", "", 3) == ":3:user:42"
    assert cdcd_key("a#b", "", 1) == "a%23b"


def test_cache_page_and_fragments_use_the_backend(standalone: tuple[CdcdCache, CdcdCache]) -> None:
    from django.http import HttpResponse
    from django.test import RequestFactory
    from django.views.decorators.cache import cache_page

    a, b = standalone
    hits = []

    def view(request: Any) -> HttpResponse:
        hits.append(1)
        return HttpResponse(f"page {len(hits)}")

    from django.core.cache import caches
    from django.test.utils import override_settings

    alias = unique("cdcd")
    with override_settings(CACHES={"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
                                   alias: {"BACKEND": "cdcd.client.django_cache.CdcdCache",
                                           "LOCATION": a._location,
                                           "OPTIONS": {"prefix": a.cache.keyspace.prefix,
                                                       "require_registry": False}}}):
        cached = cache_page(60, cache=alias)(view)
        rf = RequestFactory()
        first = cached(rf.get("/p"))
        second = cached(rf.get("/p"))
        assert first.content == second.content == b"page 1" and hits == [1]
        # the page lives in Redis: another process (backend b) sees Django's page-cache keys
        assert any(k.startswith("views.decorators.cache.cache_page") for k in _keys(b))
        caches[alias].shutdown()  # type: ignore[attr-defined]


def _keys(c: CdcdCache) -> list[str]:
    p = c.cache.keyspace.prefix
    return [k.decode()[len(p):] for k in c.cache.redis.scan_iter(match=p + "*") if b"#" not in k]


def test_django_orm_writes_invalidate_the_backends_entries(
        cfg: dict[str, Any], r: redis.Redis, redis_server: RedisServer, app_db: str) -> None:
    from django.db import transaction

    Order = djangoenv.order_model()
    alias = unique("orm")
    djangoenv.use_database(alias, app_db)
    orders = Order.objects.using(alias)
    p = cfg["keyspace"]["prefix"]
    d = DaemonThread(make_config(cfg)).start()
    web1, web2 = backend(redis_server.url, p), backend(redis_server.url, p)
    try:
        orders.create(id=7, user_id=1, tenant_id=3, total=Decimal("9.50"), status="new")
        wait_until(lambda: entry(r, f"{p}order:7"), what="the insert's tombstone (action: invalidate)")

        def load() -> dict[str, Any]:
            o = orders.get(pk=7)
            return {"id": o.id, "status": o.status, "total": str(o.total)}

        assert web1.get_or_set("order:7", load)["status"] == "new"
        assert web2.get("order:7")["status"] == "new"  # from Redis
        with transaction.atomic(using=alias):
            orders.filter(pk=7).update(status="paid")
        # the daemon wrote a tombstone at the commit version and the backplane dropped both L1 copies
        wait_until(lambda: web1.get("order:7") is None and web2.get("order:7") is None,
                   what="the ORM update invalidated every process's copy")
        assert web2.get_or_set("order:7", load)["status"] == "paid"

        # the stale write-back race through Django's API: a slow request read the row before a commit
        # and fills after the daemon applied it; the fill is refused, nobody is served the old row
        web1.delete("order:7")
        before = int(entry(r, f"{p}order:7")["v"])

        def slow_load() -> dict[str, Any]:
            row = load()
            with transaction.atomic(using=alias):
                orders.filter(pk=7).update(status="shipped")
            wait_until(lambda: int(entry(r, f"{p}order:7")["v"]) > before,
                       what="the daemon's tombstone for the update")
            return row

        stale = web1.get_or_set("order:7", slow_load)
        assert stale["status"] == "paid"  # the caller gets what it loaded...
        assert "d" not in entry(r, f"{p}order:7"), "...but the old row never reached Redis"
        assert web2.get("order:7") is None
        assert web2.get_or_set("order:7", load)["status"] == "shipped"
    finally:
        web1.shutdown()
        web2.shutdown()
        d.stop()
