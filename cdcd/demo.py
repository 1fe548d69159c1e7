"""``cdcd demo``: the whole data path on throwaway servers, printed as it happens.

Starts a private Postgres (``wal_level=logical``) and Redis on free ports from
the installed binaries, loads the example schema and rules, runs the daemon,
makes a few writes and shows what landed in Redis and on the backplane,
including the stale write-back race being refused by the fill guard.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent


def _find(path: Path | None, default: str) -> Path:
    if path is not None:
        return path
    for base in (Path.cwd(), ROOT):
        if (base / default).exists():
            return base / default
    raise FileNotFoundError(f"{default} not found (run from the repository, or pass it explicitly)")


def _show_entry(r: redis.Redis, key: str) -> str:
    raw: dict[bytes, bytes] = r.hgetall(key)  # type: ignore[assignment]
    h = {k.decode(): v.decode() for k, v in raw.items()}
    if not h:
        return f"  {key:32} (absent)"
    state = "value" if "d" in h else ("negative" if "n" in h else "tombstone")
    text = f"  {key:32} {state:9} version={h.get('v')} by={h.get('s')}"
    if "d" in h:
        text += f" value={h['d']}"
    return text


def _next_message(sub: Any) -> dict[str, Any] | None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        msg = sub.get_message(timeout=max(0.0, deadline - time.monotonic()))
        if msg is not None and msg["type"] == "message":
            return dict(msg)
    return None


def run_demo(config_path: Path | None, schema_path: Path | None, keep_running: bool = False) -> int:
    import psycopg

    from cdcd.config import PostgresSourceSettings, load_config
    from cdcd.daemon import Daemon
    from cdcd.devservers import PostgresServer, RedisServer
    from cdcd.fillguard import FillGuard
    from cdcd.logs import configure

    cfg_file = _find(config_path, "config/cdcd.example.yaml")
    schema_file = _find(schema_path, "config/example-schema.sql")
    configure("console", "warning")
    print("== starting throwaway Postgres (wal_level=logical) and Redis on free ports")
    pg, rs = PostgresServer(), RedisServer()
    pg.start()
    rs.start()
    daemon: Daemon | None = None
    thread: threading.Thread | None = None
    try:
        dsn = pg.create_database("app")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(schema_file.read_text())
        config = load_config(cfg_file)
        if not isinstance(config.source, PostgresSourceSettings):
            raise SystemExit(f"{cfg_file}: the demo needs a postgres source")
        config.source.dsn = dsn
        config.redis.url = rs.url
        config.http.port = 0
        print(f"   postgres {dsn}\n   redis    {rs.url}\n   rules    {cfg_file}")
        rules = config.rules()
        ks = rules.keyspace
        r = redis.Redis.from_url(rs.url)
        sub: Any = r.pubsub()  # type: ignore[no-untyped-call,unused-ignore]  # typed from redis-py 8
        sub.subscribe(ks.channel)
        sub.get_message(timeout=5)  # the subscription confirmation
        daemon = Daemon(config, rules=rules)
        thread = threading.Thread(target=daemon.run, name="cdcd-daemon", daemon=True)
        thread.start()
        if not daemon.ready.wait(30):
            print("daemon did not become ready:", daemon.last_error)
            return 1
        print(f"== daemon running: slot {config.source.slot!r}, backplane channel {ks.channel!r}\n")

        def step(title: str, sql: str, *params: Any) -> None:
            print(f"-- {title}\n   SQL: {sql}")
            t0 = time.perf_counter()
            with psycopg.connect(dsn, autocommit=True) as c:
                c.execute(sql, params or None)
            msg = _next_message(sub)
            dt = (time.perf_counter() - t0) * 1000
            if msg is None:
                print("   (no backplane message within 5 s)")
            else:
                body = json.loads(msg["data"])
                print(f"   backplane after {dt:.1f} ms: seq={body['s']} version={body['v']} keys={body['k']} "
                      f"tags={body['t']}")
            for key in ("user:1", "user:email:ada@example.com", "user:email:ada@lovelace.dev", "order:10"):
                print(_show_entry(r, ks.entry(key)))
            print()

        step("insert a user (rule: update -> the row is written to Redis)",
             "INSERT INTO users (id, email, name, tenant_id) VALUES (1, 'ada@example.com', 'Ada', 7)")
        step("change the e-mail (a key column): the old e-mail key gets a tombstone",
             "UPDATE users SET email = 'ada@lovelace.dev' WHERE id = 1")
        step("insert an order (rule: invalidate -> versioned tombstone, tags bumped)",
             "INSERT INTO orders (id, user_id, tenant_id, total, status) VALUES (10, 1, 7, 42.50, 'new')")

        print("-- the stale write-back race, refused by the fill guard")
        guard = FillGuard(r, ks)
        table_tag = ks.table_tag("public.orders")
        entry = guard.read("order:10")
        tags = guard.tag_versions([table_tag])
        print(f"   app A takes a fill token for order:10 (generation {entry.generation}) and reads the row: "
              "status='new'")
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute("UPDATE orders SET status = 'paid' WHERE id = 10")
        _next_message(sub)
        ok = guard.fill(entry, b'{"id":10,"status":"new"}', ttl=300, tags=tags)
        print(f"   app B commits status='paid'; the daemon applies it; app A writes back its old row: "
              f"{'ACCEPTED (bug!)' if ok else 'refused'}")
        fresh = guard.read("order:10")
        tags = guard.tag_versions([table_tag])
        ok2 = guard.fill(fresh, b'{"id":10,"status":"paid"}', ttl=300, tags=tags)
        print(f"   a new token taken after the change fills the fresh row: {'accepted' if ok2 else 'refused'}")
        print(_show_entry(r, ks.entry("order:10")))
        print()
        step("truncate orders: one tag bump invalidates everything derived from the table (O(1))",
             "TRUNCATE orders")
        after = guard.read("order:10", lease=False)
        print(f"   order:10 still holds the app's value, but it recorded {table_tag}: valid now? "
              f"{'yes' if guard.tags_valid(after) else 'no, a read treats it as a miss'}\n")
        print(f"== the daemon applied {daemon.applied_batches} batches")
        if keep_running:
            print("== running; make writes with: psql", dsn, " (Ctrl-C to stop)")
            while True:
                msg = sub.get_message(timeout=1.0)
                if msg:
                    print("   backplane:", msg["data"].decode())
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        if daemon is not None:
            daemon.stop()
        if thread is not None:
            thread.join(10)
        rs.stop()
        pg.destroy()
