"""``cdcd inspect --watch`` on real Postgres, Redis and the daemon: nines of a healthy stream, stale reads found."""

from __future__ import annotations

import io
import json
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
import yaml

from cdcd.inspect import EXIT_OK, EXIT_STALE
from cdcd.inspect.watch import Watcher, run_watch
from cdcd.inspect.watchmetrics import WatchMetrics
from cdcd.inspect.watchreport import WatchReport
from tests.helpers import ROOT, DaemonThread, entry, make_config, wait_until
from tests.test_inspect import (  # noqa: F401 - fixtures
    _caught_up,
    _daemon_with_users,
    _fill_orders,
    _populate,
    icfg,
    ts_pg,
)

BOUNDS = (0.01, 0.1, 1.0)


def watch(cfg: dict[str, Any], duration: float, **kw: Any) -> WatchReport:
    out = io.StringIO()
    report = run_watch(make_config(cfg), bounds=kw.pop("bounds", BOUNDS), rate=kw.pop("rate", 5000),
                       batch=kw.pop("batch", 100), settle_timeout=kw.pop("settle_timeout", 5.0), duration=duration,
                       check_bound=kw.pop("check_bound", 1.0), min_nines=kw.pop("min_nines", None), out=out,
                       log_interval=kw.pop("log_interval", 0.5), **kw)
    text = out.getvalue()
    assert "result:" in text and "nines" in text  # the final table was printed
    return report


def _poison_user(dsn: str, r: redis.Redis, p: str, uid: int) -> float:
    """A lost invalidation: rename the user, let the daemon apply it, put the old entry back; when was the rename."""
    old = entry(r, f"{p}user:{uid}")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE users SET name = 'renamed' WHERE id = %s", (uid,))
    changed = time.time()
    wait_until(lambda: json.loads(entry(r, f"{p}user:{uid}")["d"])["name"] == "renamed", what="rename applied")
    r.delete(f"{p}user:{uid}")
    r.hset(f"{p}user:{uid}", mapping=old)
    r.pexpire(f"{p}user:{uid}", 600_000)
    return changed


def test_healthy_stream_has_no_stale_read_beyond_the_bound(icfg: dict[str, Any], r: redis.Redis) -> None:  # noqa: F811
    p = icfg["keyspace"]["prefix"]
    dsn = icfg["source"]["dsn"]
    d = DaemonThread(make_config(icfg)).start()
    stop = threading.Event()
    writes = [0]

    def writer() -> None:  # renames users and re-fills orders through the guard, as fast as it can
        rng = random.Random(7)
        with psycopg.connect(dsn, autocommit=True) as conn:
            while not stop.is_set():
                i = rng.randrange(1, 30)
                conn.execute("UPDATE users SET name = %s WHERE id = %s", (f"n{writes[0]}", i))
                conn.execute("UPDATE orders SET status = %s WHERE id = %s", (f"s{writes[0]}", i))
                writes[0] += 1
                _fill_orders(dsn, r, p, range(i, i + 1))

    try:
        _populate(dsn, r, p, n=30)
        _caught_up(dsn, r, p)
        _fill_orders(dsn, r, p, range(1, 31))
        t = threading.Thread(target=writer, daemon=True)
        t.start()
        try:
            rep = watch(icfg, 3.0, batch=20, bounds=(*BOUNDS, 2.5), check_bound=2.5)
        finally:
            stop.set()
            t.join(10)
        c = rep.counter
        assert writes[0] > 50, "the writer kept the stream busy"
        assert c.reads > 200 and rep.rounds > 5 and rep.errors == 0
        assert rep.commit_timestamps
        # generous: the daemon shares two busy cores with this test; its usual lag is milliseconds
        assert c.stale_beyond(2.5) == 0, c.to_dict()["recent_stale"]
        assert c.unsettled == 0 and c.unknown_staleness == 0
        assert all(s.settled == "in_flight" for s in c.recent)  # any stale read was a change in flight
        assert rep.exit_code == EXIT_OK
        assert c.at(2.5).capped  # nothing inconsistent within the bound: ">= log10(reads)"
    finally:
        d.stop()


@pytest.mark.slow
def test_poisoned_entry_is_stale_with_its_staleness_and_fails(icfg: dict[str, Any], r: redis.Redis,  # noqa: F811
                                                              tmp_path: Path) -> None:
    p = icfg["keyspace"]["prefix"]
    dsn = icfg["source"]["dsn"]
    d = _daemon_with_users(icfg, r)
    try:
        _fill_orders(dsn, r, p, range(1, 10))
        changed = _poison_user(dsn, r, p, 2)
        time.sleep(0.5)
        metrics = WatchMetrics()
        port = metrics.serve(0)
        try:
            t0 = time.time()
            rep = watch(icfg, 2.0, check_bound=0.1, metrics=metrics)
            scraped = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        finally:
            metrics.close()
        c = rep.counter
        assert c.stale >= 1 and {s.key for s in c.recent} == {f"{p}user:2"}  # only the poisoned key
        assert all(s.settled == "lost" for s in c.recent)  # the daemon was past the change: not in flight
        for s in c.recent:  # staleness: time since the rename committed, as seen at the read
            assert s.staleness is not None
            assert 0.4 <= s.staleness <= time.time() - changed + 0.2
            assert s.staleness >= t0 - changed - 0.2
        assert c.stale_beyond(0.01) == c.stale_beyond(0.1) == c.stale  # >= 0.5 s old when first read
        assert 0 < c.stale_beyond(1.0) < c.stale  # ... and older than 1 s from half a second into the watch
        assert c.consistent > 10 * c.stale  # the other keys were read and found equal
        assert rep.exit_code == EXIT_STALE
        assert f'cdcd_watch_reads_total{{outcome="stale"}} {float(c.stale)}' in scraped
        assert f'cdcd_watch_stale_beyond{{bound="100ms"}} {float(c.stale)}' in scraped

        # the command line: default (any stale read beyond the bound fails) exits 1; a tolerated
        # number of nines passes; the JSON and the periodic log line say the same
        cfg_file = tmp_path / "cdcd.yaml"
        cfg_file.write_text(yaml.safe_dump(icfg))
        base = [sys.executable, "-m", "cdcd.cli", "inspect", "--config", str(cfg_file), "--watch", "--duration",
                "1.5", "--rate", "5000", "--bounds", "10ms,100ms,1s", "--log-interval", "0.5"]
        res = subprocess.run([*base, "--json"], capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert res.returncode == 1, res.stderr
        out = json.loads(res.stdout)
        assert out["stale"] >= 1 and out["exit_code"] == 1 and out["check_bound"] == 1.0
        assert {s["key"] for s in out["recent_stale"]} == {f"{p}user:2"}
        assert out["bounds"][2]["nines"] < 2.0 and not out["bounds"][2]["capped"]
        logs = [json.loads(line) for line in res.stderr.splitlines() if line.startswith("{")]
        assert any(e.get("event") == "watch" and e["stale"] >= 1 and "nines_1s" in e for e in logs)
        res = subprocess.run([*base, "--min-nines", "0.5", "--nines-bound", "100ms"], capture_output=True,
                             text=True, timeout=60, cwd=ROOT)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "STALE READ" in res.stdout and "result: OK" in res.stdout
        # without --duration it runs until SIGTERM, then prints the table and exits with the verdict
        proc = subprocess.Popen([*base[:6], "--watch", "--rate", "5000", "--log-interval", "0.3",
                                 "--metrics-port", "0"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        assert proc.stderr is not None
        url = ""
        for line in proc.stderr:  # where the metrics are, then the first periodic log line: it is sampling
            if line.startswith("metrics on "):
                url = line.split()[-1]
            if '"event": "watch"' in line:
                break
        scraped = urllib.request.urlopen(url, timeout=5).read().decode()
        assert 'cdcd_watch_nines{bound="1s"}' in scraped and 'cdcd_watch_reads_total{outcome="stale"}' in scraped
        proc.send_signal(signal.SIGTERM)
        out_text, _ = proc.communicate(timeout=30)
        assert proc.returncode == 1 and "result: BELOW THE REQUIRED NINES" in out_text
    finally:
        d.stop()


def test_daemon_down_while_rows_change_is_stale_behind(icfg: dict[str, Any], r: redis.Redis) -> None:  # noqa: F811
    p = icfg["keyspace"]["prefix"]
    dsn = icfg["source"]["dsn"]
    d = _daemon_with_users(icfg, r)
    d.stop()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE users SET name = 'while the daemon is down' WHERE id = 4")
    changed = time.time()
    rep = watch(icfg, 1.0, settle_timeout=0.3, check_bound=0.01)
    c = rep.counter
    assert c.stale >= 2 and {s.key for s in c.recent} == {f"{p}user:4", f"{p}user:email:v4@x"}
    assert all(s.settled == "behind" for s in c.recent)
    assert all(s.staleness is not None and 0 < s.staleness <= time.time() - changed + 0.2 for s in c.recent)
    assert c.stale_beyond(0.01) == c.stale  # every one older than 10 ms by the time it was read
    assert c.unsettled == 0  # known staleness: counted, not left out
    assert rep.exit_code == EXIT_STALE


def test_database_session_killed_mid_watch_is_counted_and_the_watch_goes_on(icfg: dict[str, Any],  # noqa: F811
                                                                           r: redis.Redis) -> None:
    dsn = icfg["source"]["dsn"]
    d = _daemon_with_users(icfg, r)
    try:
        watcher = Watcher(make_config(icfg), bounds=BOUNDS, rate=500, batch=10, settle_timeout=5.0, check_bound=1.0,
                          min_nines=None)
        result: list[WatchReport] = []
        t = threading.Thread(target=lambda: result.append(watcher.run(3.0, threading.Event(), 0.5)), daemon=True)
        t.start()
        wait_until(lambda: watcher.report.rounds >= 3, what="the watch under way")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE application_name = 'cdcd-inspect'")
        rounds_before = watcher.report.rounds
        t.join(30)
        watcher.close()
        assert result, "the watch ended with an exception"
        rep = result[0]
        assert rep.errors >= 1  # the failed round was counted (and logged), not raised
        assert rep.rounds > rounds_before + 5  # rounds after the kill: it reconnected
        assert rep.counter.stale == 0 and rep.exit_code == EXIT_OK  # it reconnected and kept reading
        assert rep.counter.reads > 100
    finally:
        d.stop()


def test_watch_flags_are_checked_before_anything_connects(capsys: pytest.CaptureFixture[str]) -> None:
    import structlog

    from cdcd.cli import build_parser

    factory = structlog.get_config()["logger_factory"]

    def run(*argv: str) -> int:
        args = build_parser().parse_args(["inspect", "-c", str(ROOT / "config" / "cdcd.example.yaml"), *argv])
        return int(args.fn(args))

    assert run("--duration", "5") == 2  # a watch flag without --watch is a mistake, not ignored
    assert "only meaningful with --watch" in capsys.readouterr().err
    assert run("--watch", "--bounds", "10ms,1s", "--nines-bound", "100ms") == 2
    assert "not one of --bounds" in capsys.readouterr().err
    assert run("--watch", "--batch", "0") == 2
    with pytest.raises(SystemExit) as exc:
        run("--watch", "--bounds", "10 parsecs")
    assert exc.value.code == 2 and "not a duration" in capsys.readouterr().err
    # logging was not set up on the way to those errors (it would write to this test's captured stderr
    # after the capture closed, and break every later daemon in the process)
    assert structlog.get_config()["logger_factory"] is factory
