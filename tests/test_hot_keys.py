"""Hot keys end to end: clients publish what they read, ``cdcd status`` shows it, ``cdcd warm --hot`` fills it.

Real Postgres, Redis and daemon. The clients' reads after the first load are all L1 hits (no
backplane listener to reset L1), so after FLUSHALL nothing but ``warm --hot`` can put entries back.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
import yaml

from cdcd.client import Cache, CacheOptions, HotKeyOptions
from cdcd.devservers import RedisServer
from cdcd.hotset import read_fleet
from cdcd.warm_hot import warm_hot
from tests.helpers import ROOT, DaemonThread, entry, make_config, wait_until

HOT = [f"user:{i}" for i in range(1, 6)]
ODD = ["order:1", "nosuch:1", "user:99999", "user:abc"]  # invalidate rule, no rule, no row, not a bigint


def _users(sql: Any, n: int) -> None:
    sql("INSERT INTO users (id, email, name, tenant_id) "
        "SELECT g, 'u' || g || '@x', 'name ' || g, g %% 10 FROM generate_series(1, %s) g", (n,))


def _row(dsn: str, uid: int) -> dict[str, Any]:
    with psycopg.connect(dsn) as conn:
        rec = conn.execute("SELECT id, email, name, tenant_id FROM users WHERE id = %s", (uid,)).fetchone()
    assert rec is not None
    return dict(zip(("id", "email", "name", "tenant_id"), rec, strict=True))


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cdcd.cli", *args], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)


def _entries(r: redis.Redis, prefix: str) -> set[str]:
    return {k.decode()[len(prefix):] for k in r.scan_iter(match=f"{prefix}*", count=1000)
            if b"#" not in k}


@pytest.mark.slow
def test_clients_publish_status_shows_and_warm_hot_refills_after_flushall(
        cfg: dict[str, Any], r: redis.Redis, sql: Any, app_db: str, tmp_path: Path) -> None:
    _users(sql, 200)
    p = cfg["keyspace"]["prefix"]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    d = DaemonThread(make_config(cfg)).start()
    opts = CacheOptions(prefix=p, subscribe=False, hot_keys=HotKeyOptions(sample=1, top=9, publish_every=0.2))
    clients = [Cache(cfg["redis"]["url"], opts) for _ in range(2)]
    stop = threading.Event()

    def load(key: str) -> Any:
        return {"loaded": key}

    def reader(c: Cache) -> None:  # skewed: 9 hot keys read 20x as often as each of 195 cold ones
        cold = [f"user:{i}" for i in range(6, 201)]
        while not stop.is_set():
            for j, key in enumerate(cold):
                c.get_or_load(key, lambda key=key: load(key))
                if j % 4 == 0:
                    for h in HOT + ODD:
                        c.get_or_load(h, lambda h=h: load(h))
                    stop.wait(0.001)  # leave the CPU to the CLI subprocesses

    try:
        wait_until(lambda: [c.get_or_load("user:1", lambda: load("user:1")) for c in clients]
                   and not any(c.unverifiable for c in clients), what="the clients found the daemon's registry")
        threads = [threading.Thread(target=reader, args=(c,), daemon=True) for c in clients]
        for t in threads:
            t.start()
        ks = make_config(cfg).rules().keyspace
        fleet = wait_until(lambda: (f := read_fleet(r, ks)) and len(f.processes) == 2
                           and {k for k, _ in f.keys} == set(HOT + ODD) and f, what="both clients published")
        assert all(s > 0 for _, s in fleet.keys)

        res = _cli("status", "--url", "http://127.0.0.1:9", "-c", str(path), "--json")  # no daemon there: exit 1
        hot = json.loads(res.stdout)["hot_keys"]
        assert res.returncode == 1 and hot["processes"] == 2
        assert {k["key"] for k in hot["keys"]} == set(HOT + ODD) and all(k["score"] > 0 for k in hot["keys"])
        text = _cli("status", "--url", "http://127.0.0.1:9", "-c", str(path), "--hot", "3").stdout
        assert "hot keys: 3 from 2 client process(es)" in text

        r.flushall()  # a new, empty Redis; the clients keep reading (L1 hits) and publish again
        wait_until(lambda: {k for k, _ in read_fleet(r, ks).keys} == set(HOT + ODD), what="republished")
        assert _entries(r, p) == set()  # nothing but the hot set (system keys) came back by itself

        res = _cli("warm", "-c", str(path), "--hot", "--top", "9", "--json")
        assert res.returncode == 0, res.stderr
        rep = json.loads(res.stdout)
        assert rep["hot_keys"] == 9 and rep["written"] == 5 and rep["refused"] == 0
        assert rep["unmatched"] == ["nosuch:1"]
        assert [x["key"] for x in rep["not_warmable"]] == ["order:1"]
        assert sorted(rep["missing_rows"]) == ["user:99999", "user:abc"]
        assert _entries(r, p) == set(HOT)  # exactly the hot keys: cold ones are not warmed
        stop.set()
        for t in threads:
            t.join()
        for key in HOT:
            got = json.loads(entry(r, p + key)["d"])
            want = _row(app_db, int(key.split(":")[1]))
            assert {k: got[k] for k in want} == want
            assert int(entry(r, p + key)["v"]) == rep["version"]
        res = _cli("warm", "-c", str(path), "--hot", "--table", "users")
        assert res.returncode == 2 and "drop --table" in res.stderr
    finally:
        stop.set()
        for c in clients:
            c.close()
        d.stop()


def test_warm_hot_into_a_new_redis_never_overwrites_a_newer_change(
        cfg: dict[str, Any], r: redis.Redis, sql: Any, private_redis: RedisServer) -> None:
    _users(sql, 50)
    p = cfg["keyspace"]["prefix"]
    old = Cache(cfg["redis"]["url"], CacheOptions(prefix=p, subscribe=False, require_registry=False,
                                                   hot_keys=HotKeyOptions(sample=1, publish_every=3600)))
    for _ in range(10):
        for key in ("user:1", "user:2", "user:email:u3@x"):
            old.get_or_load(key, lambda: {"app": 1})
    assert old.hot_keys is not None and old.hot_keys.publish_now(old.link.call_checked)
    old.close()
    # hostile members (anyone who can write to Redis can write these): never written, each reported
    hostile = {"user:1\n": "missing", " user:2": "unmatched", "user: 2": "missing", "user:#cdcd:x": "unmatched",
               "user:" + "9" * 5000: "missing", "#cdcd:rules": "unmatched"}
    r.zadd(f"{p}#cdcd:hot:{old.run_id}", {k: 0.5 for k in hostile})

    new_cfg = {**cfg, "redis": {**cfg["redis"], "url": private_redis.url}}
    config = make_config(new_cfg)
    new = redis.Redis.from_url(private_redis.url)
    d = DaemonThread(config).start()  # the daemon already serves the new Redis
    try:
        def change_during_warm(version: int) -> None:
            sql("UPDATE users SET name = 'changed during warm-up' WHERE id = 1")
            wait_until(lambda: entry(new, f"{p}user:1").get("d"), what="daemon applied the change")
            assert int(entry(new, f"{p}user:1")["v"]) > version

        rep = warm_hot(config, hot_from=cfg["redis"]["url"], rate=0, on_snapshot=change_during_warm)
        assert rep.hot_keys == 3 + len(hostile) and rep.written == 2 and rep.refused == 1
        assert sorted(rep.unmatched) == sorted(k for k, v in hostile.items() if v == "unmatched")
        assert sorted(rep.missing_rows) == sorted(k for k, v in hostile.items() if v == "missing")
        assert {k.decode() for k in new.scan_iter(f"{p}*") if b"#" not in k} == {
            f"{p}user:1", f"{p}user:2", f"{p}user:email:u3@x", f"{p}user:email:u1@x"}  # u1@x: the daemon's write
        assert json.loads(entry(new, f"{p}user:1")["d"])["name"] == "changed during warm-up"
        assert json.loads(entry(new, f"{p}user:email:u3@x")["d"])["id"] == 3
        assert int(entry(new, f"{p}user:2")["v"]) == rep.version
        assert not new.exists(f"{p}user:4") and not new.exists(f"{p}user:email:u2@x")  # cold, or not the hot key
        assert not r.exists(f"{p}user:email:u3@x") or r.hget(f"{p}user:email:u3@x", "s") == b"app"  # old untouched
    finally:
        d.stop()
        new.close()


def test_warm_hot_fails_clearly_when_the_hot_set_cannot_be_read(cfg: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = _cli("warm", "-c", str(path), "--hot", "--hot-from", "redis://127.0.0.1:9/0")  # nothing listens there
    assert res.returncode == 1 and "warm --hot failed" in res.stderr and "Traceback" not in res.stderr
