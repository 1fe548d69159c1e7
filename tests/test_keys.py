"""Issue 15 items 1-2: rendered keys are injective and can never name cdcd's own keys.

Unit tests of :mod:`cdcd.keys` (render / escape / match round trip with hostile values), then the
daemon against real Postgres and Redis: rows whose values look like cdcd's internal names (old and
new layout) neither break the stream nor touch the daemon's state, and ``pair:{a}:{b}`` renders two
rows that used to collide into two keys; the client, ``explain``, ``warm`` and ``inspect`` agree.
"""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from typing import Any

import pytest
import redis

from cdcd.change import UNAVAILABLE
from cdcd.client import Cache, CacheOptions
from cdcd.inspect import EXIT_OK, EXIT_STALE, run_inspect
from cdcd.keys import Template, check_name, escape, render, unescape
from cdcd.keyspace import Keyspace
from cdcd.pg.pgoutput import parse_invalidation
from cdcd.rules import KeyspaceSettings
from cdcd.warm import warm
from tests.helpers import DaemonThread, entry, make_config, unique, wait_until

HOSTILE = ["x:y", "a#b", "100%", "{id}", "}{", "%3A", "%%", "é:ü/ß", "#cdcd:rules", "__tag:t", " ", "a b", "\n"]


# ------------------------------------------------------------------------------------------ pure logic


@pytest.mark.parametrize("value", HOSTILE)
def test_escape_round_trip_and_no_separator(value: str) -> None:
    e = escape(value)
    assert unescape(e) == value
    assert not any(c in e for c in ":#{}")  # a value can never introduce a separator or a system name
    assert ("%" in e) == any(c in value for c in "%:#{}")


def test_render_is_injective_and_matches_back() -> None:
    t = Template.parse("pair:{a}:{b}")
    k1, k2 = t.render({"a": "x:y", "b": "z"}), t.render({"a": "x", "b": "y:z"})
    assert k1 == "pair:x%3Ay:z" and k2 == "pair:x:y%3Az" and k1 != k2
    assert t.match(k1) == {"a": "x:y", "b": "z"} and t.match(k2) == {"a": "x", "b": "y:z"}
    seen: dict[str, tuple[str, str]] = {}
    for a in HOSTILE:
        for b in HOSTILE:
            k = t.render({"a": a, "b": b})
            assert k is not None and "#" not in k
            assert seen.setdefault(k, (a, b)) == (a, b), f"{(a, b)} and {seen[k]} share {k!r}"
            assert t.match(k) == {"a": a, "b": b}
    assert Template.parse("user:{id}").match("user:") is None  # an empty value renders no key


def test_null_empty_and_unsent_mean_no_key() -> None:
    t = Template.parse("u:{a}:{b}")
    assert t.render({"a": None, "b": "x"}) is None
    assert t.render({"a": "", "b": "x"}) is None
    assert t.render({"a": "x", "b": UNAVAILABLE}) is None and t.unresolvable({"a": "x", "b": UNAVAILABLE}) == ["b"]
    one = Template.parse("{name}")
    assert one.render({"name": ""}) is None and one.render({"name": None}) is None and one.render({}) is None
    assert one.render({"name": 0}) == "0" and one.render({"name": False}) == "false"


def test_non_text_values_render_canonically_and_escaped() -> None:
    ts = datetime(2024, 2, 29, 8, 11, 12, tzinfo=UTC)
    assert render("e:{t}", {"t": ts}) == "e:2024-02-29T08%3A11%3A12+00%3A00"
    assert render("j:{j}", {"j": {"b": 1, "a": "#"}}) == 'j:%7B"a"%3A"%23","b"%3A1%7D'
    assert render("h:{b}", {"b": b"\x01\xff"}) == "h:01ff"
    assert render("n:{i}", {"i": 42}) == "n:42"


@pytest.mark.parametrize("text, message", [
    ("{a}{b}", "between {a} and {b} must contain ':'"),
    ("{a}-{b}", "between {a} and {b} must contain ':'"),
    ("#x:{a}", "'#' is reserved"),
    ("x:{a!r}", "format specs"),
    ("x:{1a}", "is not a column name"),
    ("  ", "empty template"),
])
def test_ambiguous_or_reserved_templates_are_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}")):
        Template.parse(text)
    assert Template.parse("{a}:{b}").columns == ("a", "b")
    assert Template.parse("x{{lit}}:{a}").render({"a": "v"}) == "x{lit}:v"


def test_internal_names_are_out_of_reach() -> None:
    ks = Keyspace("v1:")
    internal = [ks.tag("t"), ks.channel, ks.applied, ks.registry, ks.dead_letters, ks.system("lock:k"),
                ks.tag(Keyspace.table_tag("public.t"))]
    assert all(ks.is_system(k) and "#" in k for k in internal)
    assert not ks.is_system(ks.entry(render("{n}", {"n": "#cdcd:rules"}) or ""))
    for name in ("#cdcd:rules", "x#y", "#table:public.t"):
        with pytest.raises(ValueError, match="reserved"):
            check_name(name)
    with pytest.raises(ValueError, match="reserved"):
        parse_invalidation('{"keys": ["#cdcd:applied"]}')  # a message naming an internal key: dead-lettered
    with pytest.raises(ValueError, match="reserved"):
        parse_invalidation('{"tags": ["#table:public.users"]}')
    assert parse_invalidation('{"keys": ["user:1"], "tags": ["t"]}').keys == ["user:1"]


# ------------------------------------------------------------------------------------------ end to end


SCHEMA = """
CREATE TABLE names (id int PRIMARY KEY, name text);
ALTER TABLE names REPLICA IDENTITY FULL;
CREATE TABLE pairs (id int PRIMARY KEY, a text, b text);
ALTER TABLE pairs REPLICA IDENTITY FULL;
"""


@pytest.fixture
def kcfg(cfg: dict[str, Any], sql: Any) -> dict[str, Any]:
    sql(SCHEMA)
    cfg["tables"]["names"] = {"keys": ["{name}"], "tags": ["{name}"], "action": "update"}
    cfg["tables"]["pairs"] = {"keys": ["pair:{a}:{b}"], "action": "update", "columns": ["id", "a", "b"]}
    return cfg


HOSTILE_NAMES = ["__cdcd:rules", "__cdcd:applied", "__cdcd:dlq", "__tag:tenant:7", "__tag:__table:public.users",
                 "#cdcd:rules", "#cdcd:applied", "#cdcd:dlq", "#cdcd:bp", "#tag:tenant:7", "#tag:#table:public.users",
                 "#table:public.users", "%23cdcd%3Arules"]


def _daemon_state(r: redis.Redis, ks: Keyspace) -> tuple[Any, ...]:
    return (r.type(ks.registry), json.loads(r.get(ks.registry) or b"null"), r.type(ks.applied),
            set(r.hkeys(ks.applied)))


def test_row_values_never_reach_internal_keys_and_the_stream_goes_on(kcfg: dict[str, Any], r: redis.Redis,
                                                                     sql: Any) -> None:
    """Old code: a row named ``__cdcd:rules`` rendered onto the registry key -> WRONGTYPE on every batch,
    retried forever, nothing later applied; ``__cdcd:applied`` merged into the daemon's state hash."""
    p = kcfg["keyspace"]["prefix"]
    ks = Keyspace(p)
    d = DaemonThread(make_config(kcfg)).start()
    try:
        sql("INSERT INTO users (id, email, name, tenant_id) VALUES (1, 'a@x', 'A', 7)")
        wait_until(lambda: entry(r, f"{p}user:1").get("d"), what="first user applied")
        state = _daemon_state(r, ks)
        assert state[0] == b"string" and state[2] == b"hash"
        for i, name in enumerate(HOSTILE_NAMES):
            sql("INSERT INTO names VALUES (%s, %s)", (i, name))
        sql("UPDATE names SET name = name || ':v2' WHERE id = 0")
        sql("DELETE FROM names WHERE id = 1")
        # later changes to another table are still applied
        sql("UPDATE users SET name = 'B' WHERE id = 1")
        wait_until(lambda: json.loads(entry(r, f"{p}user:1").get("d", "{}")).get("name") == "B", timeout=15,
                   what="a later change to another table applied")
        assert d.error is None and d.daemon.ready.is_set()
        assert _daemon_state(r, ks) == state  # registry and applied hash untouched (same fields, same rules)
        assert r.type(ks.dead_letters) in (b"none", b"stream")
        for i, name in enumerate(HOSTILE_NAMES):
            key = ks.entry(escape(name))
            assert not ks.is_system(key)
            if i == 0:
                assert "d" not in entry(r, key)  # the update moved the row to another key: tombstone
                key = ks.entry(escape(name + ":v2"))
            if i == 1:
                assert "d" not in entry(r, key)  # deleted: tombstone
                continue
            assert json.loads(entry(r, key)["d"])["id"] == i, name
            assert r.exists(ks.tag(escape(name)))  # the tag counter lives under its escaped name
        assert r.type(ks.tag("tenant:7")) == b"string"
        # explain agrees with what the daemon wrote
        rules = make_config(kcfg).rules()
        assert rules.explain("names", {"id": 5, "name": "#cdcd:rules"})["keys"] == [f"{p}%23cdcd%3Arules"]
    finally:
        d.stop()


def test_pair_rows_get_distinct_keys_everywhere(kcfg: dict[str, Any], r: redis.Redis, sql: Any) -> None:
    """Old code: ('x:y','z') and ('x','y:z') both rendered ``pair:x:y:z``; the second row's projection
    overwrote the first's, so a reader of one row got the other."""
    p = kcfg["keyspace"]["prefix"]
    ks = Keyspace(p)
    rows = [(1, "x:y", "z"), (2, "x", "y:z"), (3, "50%", "{b}"), (4, "é#1", "ü"), (5, "", "z"), (6, None, "z")]
    d = DaemonThread(make_config(kcfg)).start()
    try:
        for row in rows:
            sql("INSERT INTO pairs VALUES (%s, %s, %s)", row)
        keys = {i: Cache.key("pair:{a}:{b}", a=a, b=b) for i, a, b in rows}
        assert keys[1] == "pair:x%3Ay:z" and keys[2] == "pair:x:y%3Az"
        assert keys[5] is None and keys[6] is None  # empty and NULL: no such key
        for i in (1, 2, 3, 4):
            e = wait_until(lambda i=i: entry(r, ks.entry(keys[i] or "")).get("d"), what=f"pair {i}")
            assert json.loads(e)["id"] == i  # each row its own projection
        daemon_keys = {k.decode() for k in r.scan_iter(match=f"{p}pair:*")}
        assert daemon_keys == {ks.entry(keys[i] or "") for i in (1, 2, 3, 4)}  # nothing for '' or NULL
        # explain renders the same keys
        rules = make_config(kcfg).rules()
        for i, a, b in rows:
            assert rules.explain("pairs", {"id": i, "a": a, "b": b})["keys"] == (
                [ks.entry(keys[i])] if keys[i] else [])
        # the client's decorator builds the daemon's key and serves the daemon's value
        with Cache(kcfg["redis"]["url"], CacheOptions(prefix=p, subscribe=False)) as cache:

            @cache.cached(key="pair:{a}:{b}")
            def load(a: str, b: str) -> Any:
                raise AssertionError("the daemon's value should have been served")

            for i, a, b in rows[:4]:
                assert load.key(a, b) == keys[i]  # type: ignore[attr-defined]
                assert load(a, b)["id"] == i
            with pytest.raises(ValueError, match="reserved"):
                cache.delete("#cdcd:applied")
            with pytest.raises(ValueError, match="reserved"):
                cache.invalidate_tag("#table:public.pairs")
            with pytest.raises(ValueError, match="reserved"):
                cache.get_or_load("k", lambda: 1, tags=["#tag:x"])
        # warm (a fresh keyspace) writes the same keys
        wcfg = {**kcfg, "keyspace": {"prefix": unique("w") + ":"}}
        wp = wcfg["keyspace"]["prefix"]
        warm(make_config(wcfg), tables=["public.pairs"])
        assert {k.decode()[len(wp):] for k in r.scan_iter(match=f"{wp}pair:*")} == {keys[i] for i in (1, 2, 3, 4)}
        # inspect: everything fresh; then a lost delete of ('x:y','z') is found through its escaped key
        out = io.StringIO()
        rep = run_inspect(make_config(kcfg), None, True, 100000, 0.0, 10, out)
        assert rep.exit_code == EXIT_OK and not rep.stale and rep.unmapped_keys == 0, out.getvalue()
        k1 = ks.entry(keys[1] or "")
        old = entry(r, k1)
        sql("DELETE FROM pairs WHERE id = 1")
        wait_until(lambda: "d" not in entry(r, k1), what="delete applied")
        assert json.loads(entry(r, ks.entry(keys[2] or ""))["d"])["id"] == 2  # the other row is untouched
        r.delete(k1)
        r.hset(k1, mapping=old)
        r.pexpire(k1, 600_000)
        rep = run_inspect(make_config(kcfg), None, True, 100000, 0.0, 10, out)
        assert [s.key for s in rep.stale] == [k1] and rep.exit_code == EXIT_STALE
    finally:
        d.stop()


def test_explicit_message_naming_an_internal_key_is_dead_lettered(kcfg: dict[str, Any], r: redis.Redis,
                                                                  sql: Any) -> None:
    p = kcfg["keyspace"]["prefix"]
    ks = Keyspace(p)
    d = DaemonThread(make_config(kcfg)).start()
    try:
        sql("SELECT pg_logical_emit_message(true, 'cdcd', '{\"keys\": [\"#cdcd:rules\"]}')")
        sql("INSERT INTO pairs VALUES (1, 'a', 'b')")
        wait_until(lambda: entry(r, f"{p}pair:a:b").get("d"), what="later change applied")
        dl = r.xrange(ks.dead_letters)
        assert len(dl) == 1 and b"reserved" in dl[0][1][b"reason"]
        assert r.type(ks.registry) == b"string"
    finally:
        d.stop()


def test_prefix_with_hash_is_refused() -> None:
    with pytest.raises(ValueError, match="prefix"):
        CacheOptions(prefix="v1#")
    with pytest.raises(ValueError, match="prefix may not contain"):
        KeyspaceSettings(prefix="a#")


def test_client_key_builders_render_like_the_daemon() -> None:
    from cdcd.client import AsyncCache
    from cdcd.client.protocol import KeyTemplate

    def fn(a: Any, b: Any = "z", tenant: Any = None) -> None: ...

    tpl = KeyTemplate(fn, "pair:{a}:{b}", ["tenant:{tenant}"])
    rules = make_config_rules()
    for a, b in (("x:y", "z"), ("x", "y:z"), ("#cdcd:rules", "%7B"), ("é", "{b}"), (7, True)):
        want = rules.explain("pairs", {"a": a, "b": b})["keys"][0][len("v9:"):]
        assert tpl.render((a, b), {}) == (want, []) and Cache.key("pair:{a}:{b}", a=a, b=b) == want
        assert AsyncCache.key("pair:{a}:{b}", a=a, b=b) == want
    assert tpl.render(("", "z", 3), {}) == (None, ["tenant:3"])  # empty: no key, the call is not cached
    assert tpl.render((None,), {"tenant": "t:1"}) == (None, ["tenant:t%3A1"])
    with pytest.raises(TypeError, match="not parameters"):
        KeyTemplate(fn, "x:{nope}", [])


def make_config_rules() -> Any:
    from cdcd.rules import Defaults, Rules, TableRule

    return Rules({"pairs": TableRule(keys=["pair:{a}:{b}"])}, KeyspaceSettings(prefix="v9:"), Defaults())
