"""Operating the daemon: metrics, health/readiness, status, lag alarm, secrets, high availability."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import redis

from cdcd.devservers import RedisServer, free_port
from tests.helpers import ROOT, DaemonProcess, DaemonThread, db_users, entry, make_config, stale_users, wait_until
from tests.test_faults import Writer


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metric(text: str, name: str, **labels: str) -> float | None:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        if head == name or (labels and head == f"{name}{{{want}}}"):
            return float(value)
    return None


def test_metrics_health_readiness_and_status(cfg: dict[str, Any], sql: Any, r: redis.Redis) -> None:
    cfg["monitor"] = {"interval": 0.2, "max_retained_wal": 1, "ready_max_lag": "1GB"}
    d = DaemonThread(make_config(cfg)).start()
    base = f"http://127.0.0.1:{d.daemon.http.port}"
    p = cfg["keyspace"]["prefix"]
    try:
        for i in range(3):
            sql("INSERT INTO users (id, email, name, tenant_id) VALUES (%s, %s, 'n', 1)", (i, f"{i}@x"))
        sql("INSERT INTO orders VALUES (1, 1, 1, 1.00, 'new')")
        sql("DELETE FROM orders")
        wait_until(lambda: entry(r, f"{p}order:1").get("v") and "d" not in entry(r, f"{p}order:1")
                   and d.daemon.applied_changes >= 5, what="changes applied")
        code, text = get(base + "/metrics")
        assert code == 200
        assert metric(text, "cdcd_changes_total", table="public.users", op="c") == 3
        assert metric(text, "cdcd_changes_total", table="public.orders", op="d") == 1
        assert (metric(text, "cdcd_batches_total") or 0) >= 1
        assert (metric(text, "cdcd_backplane_messages_total") or 0) >= 1
        assert (metric(text, "cdcd_redis_roundtrip_seconds_count") or 0) >= 1
        assert (metric(text, "cdcd_commit_to_apply_seconds_count") or 0) >= 1
        assert metric(text, "cdcd_writes_total", kind="value") == 6  # 3 users x 2 keys
        assert (metric(text, "cdcd_source_position") or 0) > 0
        # the monitor reads pg_replication_slots; the tiny bound trips the retained-WAL alarm
        wait_until(lambda: (metric(get(base + "/metrics")[1], "cdcd_slot_retained_wal_bytes") or 0) > 0,
                   what="slot gauges")
        wait_until(lambda: metric(get(base + "/metrics")[1], "cdcd_lag_alarm") == 1, what="lag alarm")
        assert get(base + "/healthz")[0] == 200
        code, body = get(base + "/readyz")
        assert code == 200 and json.loads(body) == {"ready": True, "reasons": []}
        code, body = get(base + "/status")
        status = json.loads(body)
        assert status["changes"] >= 5 and status["lag_alarm"] is True and status["ready"] is True
        assert status["position"]["acked_lsn"] != "0/0"
        # cdcd status, human and JSON
        res = subprocess.run([sys.executable, "-m", "cdcd.cli", "status", "--url", base], capture_output=True,
                             text=True, timeout=30, cwd=ROOT)
        assert res.returncode == 0, res.stderr
        assert "lag alarm" in res.stdout and "YES" in res.stdout and "applied version" in res.stdout
        res = subprocess.run([sys.executable, "-m", "cdcd.cli", "status", "--url", base, "--json"],
                             capture_output=True, text=True, timeout=30, cwd=ROOT)
        assert json.loads(res.stdout)["source"] == f"pg:{cfg['source']['slot']}"
        assert get(base + "/nope")[0] == 404
    finally:
        d.stop()
    res = subprocess.run([sys.executable, "-m", "cdcd.cli", "status", "--url", base], capture_output=True,
                         text=True, timeout=30, cwd=ROOT)
    assert res.returncode == 1 and "no daemon answering" in res.stderr


def test_readiness_follows_redis(cfg: dict[str, Any], private_redis: RedisServer, sql: Any) -> None:
    cfg["redis"]["url"] = private_redis.url
    cfg["monitor"] = {"interval": 0.2}
    d = DaemonThread(make_config(cfg)).start()
    base = f"http://127.0.0.1:{d.daemon.http.port}"
    try:
        wait_until(lambda: get(base + "/readyz")[0] == 200, what="ready")
        private_redis.stop()
        sql("INSERT INTO users (id, email, name, tenant_id) VALUES (1, 'a@x', 'a', 1)")
        wait_until(lambda: get(base + "/readyz")[0] == 503, what="not ready while Redis is down")
        body = json.loads(get(base + "/readyz")[1])
        assert body["ready"] is False and any("redis unavailable" in x for x in body["reasons"])
        assert get(base + "/healthz")[0] == 200  # alive: waiting for Redis is not a reason to be restarted
        private_redis.start()
        wait_until(lambda: get(base + "/readyz")[0] == 200, timeout=15, what="ready again")
        r = redis.Redis.from_url(private_redis.url)
        wait_until(lambda: entry(r, f"{cfg['keyspace']['prefix']}user:1").get("d"), what="the change applied")
    finally:
        d.stop()


def test_secrets_never_reach_the_log(cfg: dict[str, Any], workdir: Path) -> None:
    """A DSN password, a Redis password from a file, and the environment override: none is logged."""
    secret_pg, secret_redis = "pg-hunter2-XYZ", "redis-hunter2-XYZ"
    server = RedisServer(args=("--requirepass", secret_redis))
    server.start()
    try:
        pw_file = workdir / "redis.pw"
        pw_file.write_text(secret_redis + "\n")
        dead_port = free_port()
        cfg["source"]["dsn"] = f"postgresql://postgres:{secret_pg}@127.0.0.1:{dead_port}/nowhere"
        cfg["redis"] = {**cfg["redis"], "url": server.url, "password_file": str(pw_file)}
        cfg["log"]["level"] = "debug"
        daemon = DaemonProcess(cfg, workdir).start()
        wait_until(lambda: sum(e.get("event") == "source_unavailable" for e in daemon.events()) >= 2,
                   what="the daemon retrying the unreachable database")
        daemon.stop()
        log = daemon.log_path.read_text()
        assert "source_unavailable" in log and str(dead_port) in log  # it did say what failed...
        assert secret_pg not in log and secret_redis not in log  # ...without the secrets
        # and the Redis password from the file did authenticate (the daemon got past Redis to the source)
        assert any(e.get("event") == "source_unavailable" for e in daemon.events())
    finally:
        server.stop()


@pytest.mark.slow
def test_standby_takes_over_after_kill_9(cfg: dict[str, Any], r: redis.Redis, app_db: str, workdir: Path) -> None:
    """Two daemons on one slot: one streams, one waits; kill -9 the active one and changes keep flowing."""
    p = cfg["keyspace"]["prefix"]
    active = DaemonProcess(cfg, workdir).start()
    active.wait_ready()
    standby = DaemonProcess(cfg, workdir).start()
    wait_until(lambda: any("in use" in str(e.get("error", "")) for e in standby.events()), what="standby waiting")
    writer = Writer(app_db, 200, pause=0.003)
    writer.start()
    try:
        time.sleep(0.5)
        active.kill()
        t_kill = time.monotonic()
        standby.wait_ready(timeout=30)
        takeover = time.monotonic() - t_kill
        assert takeover < 10, f"standby took {takeover:.1f}s"
        writer.join(60)
        assert writer.error is None
        expected = db_users(app_db)
        wait_until(lambda: not stale_users(r, p, expected), timeout=30, interval=0.2,
                   what="every change applied after the takeover")
    finally:
        active.stop()
        standby.stop()
