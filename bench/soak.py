"""Fault-injection soak: SIGKILL the daemon again and again while writes, faults and garbage keep coming.

Usage::

    .venv/bin/python bench/soak.py [--kills 100] [--seed 1] [--ops 20000]

One run, against its own Postgres (``track_commit_timestamp`` on, so the inspector can date
application fills) and its own Redis:

* a writer commits a known, idempotent sequence (insert user, insert order, rename the user and
  change their e-mail -- a key change --, pay the order, delete an older user), reconnecting and
  repeating the statement whenever Postgres goes away;
* a reader fills ``order:<id>`` entries through the fill guard (errors while Redis or Postgres are
  away are counted and ignored);
* ``cdcd run`` is SIGKILLed ``--kills`` times at random moments (some before it finished starting)
  and restarted each time;
* on the way: Redis is restarted once (its memory is lost), paused (SIGSTOP) for two seconds,
  Postgres is restarted once, and malformed cdcd messages are emitted: not JSON, a 1 MiB one,
  wrong types, invalid UTF-8, transactional and not.

Afterwards the last daemon must still be running and caught up, ``cdcd inspect --all`` must find no
stale entry (and nothing unsettled), every user changed after the Redis restart must hold exactly
its row, and every malformed message must be in the dead-letter stream with its reason and position.

The test suite runs a short version (``tests/test_soak.py``); this script is the long one.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import redis

if __package__:  # imported as bench.soak (tests/test_soak.py runs the short soak) or run with -m bench.soak
    from bench._common import (
        EXAMPLE_SCHEMA,
        DaemonProcess,
        applied_version,
        config_dict,
        heartbeat,
        load,
        unique,
        wait_until,
    )
else:  # run as a file: python bench/soak.py
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import EXAMPLE_SCHEMA, DaemonProcess, applied_version, config_dict, heartbeat, load, unique, wait_until

from cdcd.devservers import PostgresServer, RedisServer
from cdcd.fillguard import FillGuard
from cdcd.inspect import InspectReport, run_inspect
from cdcd.keyspace import Keyspace

MALFORMED: list[tuple[bool, bytes]] = [
    (True, b"not json #{n}"),
    (False, b"not json either, not transactional #{n}"),
    (True, b'{"keys": "a string, not a list", "marker": "#{n}"}'),
    (True, b'[1, 2, 3, "#{n}"]'),
    (True, b'{"keys": [1, 2], "tags": ["#{n}"]}'),
    (True, b"#{n}" + b"\xff\xfe\xfd invalid utf-8"),
    (True, b"#{n} " + b"x" * (1 << 20)),  # 1 MiB: the dead letter keeps its first 64 KiB
]


@dataclass
class SoakResult:
    kills: int = 0
    restarts: dict[str, int] = field(default_factory=dict)
    ops: int = 0
    writer_retries: int = 0
    reader_fills: int = 0
    reader_errors: int = 0
    malformed_sent: list[str] = field(default_factory=list)
    dead_letters: list[dict[str, str]] = field(default_factory=list)
    missing_dead_letters: list[str] = field(default_factory=list)
    lost_changes: list[int] = field(default_factory=list)
    daemon_alive: bool = False
    report: InspectReport | None = None
    elapsed: float = 0.0

    def problems(self) -> list[str]:
        out = []
        if not self.daemon_alive:
            out.append("the daemon was not running at the end")
        if self.report is None:
            out.append("no inspector report")
        else:
            if self.report.stale:
                out.append(f"{len(self.report.stale)} stale entries: {[s.key for s in self.report.stale][:10]}")
            if self.report.unsettled:
                out.append(f"{len(self.report.unsettled)} unsettled entries")
        if self.missing_dead_letters:
            out.append(f"malformed messages missing from the dead-letter stream: {self.missing_dead_letters}")
        if self.lost_changes:
            out.append(f"users whose last change never reached Redis: {self.lost_changes[:20]}")
        return out


class Writer(threading.Thread):
    """The known sequence, op by op; every statement is idempotent, so a retry after a lost connection
    (was it committed or not?) is always safe."""

    def __init__(self, dsn: str, ops: int, pause: float) -> None:
        super().__init__(daemon=True)
        self.dsn, self.ops, self.pause = dsn, ops, pause
        self.done = 0
        self.retries = 0
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.mark: int | None = None  # op index at the moment the main thread asks for it
        self.op_of_user: dict[int, int] = {}  # user id -> index of the last op that changed it

    def statements(self, k: int) -> tuple[str, tuple[Any, ...], int | None]:
        i, step = k // 4 + 1, k % 4
        if step == 0:
            return ("INSERT INTO users (id, email, name, tenant_id) VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
                    (i, f"u{i}@x", f"n{i}", i % 5), i)
        if step == 1:
            return ("INSERT INTO orders VALUES (%s, %s, %s, %s, 'new') ON CONFLICT DO NOTHING",
                    (i, i, i % 5, i), None)
        if step == 2:
            return "UPDATE users SET name = %s, email = %s WHERE id = %s", (f"r{i}", f"w{i}@x", i), i
        if i % 10 == 0:
            return "DELETE FROM users WHERE id = %s", (i - 5,), i - 5
        return "UPDATE orders SET status = 'paid' WHERE id = %s", (i,), None

    def run(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        k = 0
        try:
            while k < self.ops and not self.stop.is_set():
                query, params, user = self.statements(k)
                try:
                    if conn is None or conn.closed:
                        conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=2)
                    conn.execute(query, params)
                except psycopg.OperationalError:
                    self.retries += 1
                    with contextlib.suppress(Exception):
                        if conn is not None:
                            conn.close()
                    conn = None
                    time.sleep(0.1)
                    continue  # the same statement again
                if user is not None:
                    self.op_of_user[user] = k
                k += 1
                self.done = k
                if self.pause:
                    time.sleep(self.pause)
        except BaseException as exc:
            self.error = exc
        finally:
            if conn is not None:
                conn.close()


class Reader(threading.Thread):
    """Cache-aside through the fill guard on orders, tolerating outages."""

    def __init__(self, dsn: str, url: str, prefix: str, writer: Writer, seed: int) -> None:
        super().__init__(daemon=True)
        self.dsn, self.url, self.prefix, self.writer = dsn, url, prefix, writer
        self.rng = random.Random(seed)
        self.fills = 0
        self.errors = 0
        self.stop = threading.Event()

    def run(self) -> None:
        r = redis.Redis.from_url(self.url, socket_timeout=0.5, socket_connect_timeout=0.5)
        guard = FillGuard(r, Keyspace(self.prefix))
        conn: psycopg.Connection[Any] | None = None
        while not self.stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=2)
                oid = self.rng.randint(1, max(1, self.writer.done // 4))
                e = guard.read(f"order:{oid}")
                if e.hit:
                    continue
                row = conn.execute("SELECT id, status FROM orders WHERE id = %s", (oid,)).fetchone()
                value = None if row is None else json.dumps({"id": row[0], "status": row[1]}).encode()
                self.fills += guard.fill(e, value, ttl=600, negative=row is None)
                time.sleep(0.002)
            except (redis.RedisError, psycopg.Error):
                self.errors += 1
                if conn is not None and conn.closed:
                    conn = None
                time.sleep(0.1)
        r.close()
        if conn is not None:
            conn.close()


def emit_malformed(dsn: str, n: int, result: SoakResult) -> None:
    transactional, template = MALFORMED[n % len(MALFORMED)]
    content = template.replace(b"{n}", str(n).encode())
    marker = f"#{n}"
    for _ in range(100):
        try:
            with psycopg.connect(dsn, autocommit=True, connect_timeout=2) as conn:
                if transactional:
                    with conn.transaction():
                        conn.execute("SELECT pg_logical_emit_message(true, 'cdcd', %s::bytea)", (content,))
                        conn.execute("UPDATE orders SET status = status WHERE id = 1")
                else:
                    conn.execute("SELECT pg_logical_emit_message(false, 'cdcd', %s::bytea)", (content,))
            result.malformed_sent.append(marker)
            return
        except psycopg.OperationalError:
            time.sleep(0.1)
    raise RuntimeError("could not emit a malformed message for 10 s")


def run_soak(kills: int = 20, seed: int = 1, ops: int = 6000, op_pause: float = 0.002,
             workdir: Path | None = None, log: Any = None) -> SoakResult:
    """The whole scenario; returns what happened (``result.problems()`` is empty when it passed)."""
    say = log or (lambda *_: None)
    rng = random.Random(seed)
    workdir = workdir or Path(tempfile.mkdtemp(prefix="cdcd-soak-"))
    result = SoakResult(restarts={"redis": 0, "postgres": 0, "redis_pause": 0})
    t0 = time.monotonic()
    pg = PostgresServer(extra_conf={"track_commit_timestamp": "on"})
    pg.start()
    rs = RedisServer()
    rs.start()
    daemon: DaemonProcess | None = None
    writer: Writer | None = None
    reader: Reader | None = None
    try:
        dsn = pg.create_database("soak")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(EXAMPLE_SCHEMA.read_text())
        prefix = unique("soak") + ":"
        data = config_dict(dsn, rs.url, "soak", prefix)
        data["redis"].update({"socket_timeout": 1.0, "connect_timeout": 0.5})
        r = redis.Redis.from_url(rs.url, socket_timeout=5)
        daemon = DaemonProcess(data, workdir).start()
        daemon.wait_ready(60)
        writer = Writer(dsn, ops, op_pause)
        writer.start()
        reader = Reader(dsn, rs.url, prefix, writer, seed)
        reader.start()
        # faults happen at these kill counts; malformed messages from the Redis restart on (a restart
        # wipes the dead-letter stream, which lives in Redis)
        at = {max(1, kills // 6): "redis_restart", max(2, kills // 3): "redis_pause",
              max(3, kills // 2): "postgres_restart"}
        malformed_from = max(1, kills // 6) + 1
        n_malformed = 0
        redis_restart_op = 0
        for k in range(1, kills + 1):
            # killed at a random moment: sometimes before it finished starting, mostly while streaming
            time.sleep(rng.choice([rng.uniform(0.05, 0.4), rng.uniform(0.4, 1.5), rng.uniform(0.8, 2.0)]))
            daemon.kill()
            result.kills += 1
            fault = at.get(k)
            if fault == "redis_restart":
                rs.restart()
                redis_restart_op = writer.done
                result.restarts["redis"] += 1
                say(f"kill {k}: restarted Redis at op {redis_restart_op}")
            elif fault == "redis_pause":
                daemon = DaemonProcess(data, workdir).start()
                time.sleep(1.0)
                rs.pause()
                time.sleep(2.0)
                rs.resume()
                result.restarts["redis_pause"] += 1
                say(f"kill {k}: paused Redis for 2 s under a running daemon")
                continue
            elif fault == "postgres_restart":
                pg.restart()
                result.restarts["postgres"] += 1
                say(f"kill {k}: restarted Postgres")
            if k >= malformed_from:
                emit_malformed(dsn, n_malformed, result)
                n_malformed += 1
            time.sleep(rng.uniform(0.0, 0.3))  # more commits while nobody consumes
            daemon = DaemonProcess(data, workdir).start()
        # every kind of malformed message at least once
        while n_malformed < len(MALFORMED):
            emit_malformed(dsn, n_malformed, result)
            n_malformed += 1
        writer.stop.set()
        writer.join(60)
        reader.stop.set()
        reader.join(30)
        if writer.error is not None:
            raise writer.error
        result.ops, result.writer_retries = writer.done, writer.retries
        result.reader_fills, result.reader_errors = reader.fills, reader.errors
        with psycopg.connect(dsn, autocommit=True) as conn:
            target = heartbeat(conn)
        wait_until(lambda: applied_version(r, prefix) >= target, 120, interval=0.1, what="the daemon to catch up")
        result.daemon_alive = daemon.alive
        out = io.StringIO()
        result.report = run_inspect(load(data), None, True, 1_000_000, 0.0, 30.0, out)
        say(out.getvalue())
        # No change lost: every user changed after Redis lost its memory holds exactly its row (or, if
        # deleted, holds no value).
        with psycopg.connect(dsn, autocommit=True) as conn:
            rows = {u: (e, n) for u, e, n in conn.execute("SELECT id, email, name FROM users")}
        for uid, op in writer.op_of_user.items():
            if op < redis_restart_op:
                continue
            d = r.hget(f"{prefix}user:{uid}", "d")
            want = rows.get(uid)
            if want is None:
                if d is not None:
                    result.lost_changes.append(uid)
            elif d is None or (json.loads(d)["email"], json.loads(d)["name"]) != want:
                result.lost_changes.append(uid)
        entries: Any = r.xrange(f"{prefix}#cdcd:dlq")
        for _id, fields in entries:
            result.dead_letters.append({k.decode(): v.decode(errors="replace") for k, v in fields.items()})
        for marker in result.malformed_sent:
            if not any(marker in d.get("raw", "") and d.get("reason") and d.get("position", "").isdigit()
                       and int(d["position"]) > 0 for d in result.dead_letters):
                result.missing_dead_letters.append(marker)
        result.elapsed = time.monotonic() - t0
        return result
    finally:
        if reader is not None:
            reader.stop.set()
        if writer is not None:
            writer.stop.set()
        if daemon is not None:
            daemon.stop()
        with contextlib.suppress(Exception):
            rs.resume()
        rs.stop()
        pg.destroy()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--ops", type=int, default=40000, help="writer operations at most")
    args = ap.parse_args()
    res = run_soak(args.kills, args.seed, args.ops, log=print)
    rep = res.report
    print(f"{res.elapsed:.0f}s: {res.kills} SIGKILLs, restarts {res.restarts}, writer ops {res.ops} "
          f"({res.writer_retries} retried), reader fills {res.reader_fills} ({res.reader_errors} errors tolerated), "
          f"{len(res.malformed_sent)} malformed messages -> {len(res.dead_letters)} dead letters")
    if rep is not None:
        print(f"inspector: {rep.keys_checked} keys, {rep.cached} cached, {rep.fresh} fresh, {len(rep.stale)} stale, "
              f"{rep.unverifiable} unverifiable, {len(rep.unsettled)} unsettled")
    problems = res.problems()
    for p in problems:
        print(f"PROBLEM: {p}")
    print("PASS" if not problems else "FAIL")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
