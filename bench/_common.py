"""Plumbing shared by the benchmarks: throwaway servers, a daemon subprocess, percentiles, machine facts.

The benchmarks run against real servers started from the installed binaries
(:mod:`cdcd.devservers`), never against anything already running on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import redis
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cdcd.devservers import PostgresServer, RedisServer  # noqa: E402

EXAMPLE_RULES = ROOT / "config" / "cdcd.example.yaml"
EXAMPLE_SCHEMA = ROOT / "config" / "example-schema.sql"


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def servers(pg_conf: dict[str, str] | None = None) -> Iterator[tuple[PostgresServer, RedisServer]]:
    pg = PostgresServer(extra_conf=pg_conf or {})
    pg.start()
    rs = RedisServer()
    rs.start()
    try:
        yield pg, rs
    finally:
        rs.stop()
        pg.destroy()


def make_db(pg: PostgresServer, schema: Path = EXAMPLE_SCHEMA) -> str:
    name = unique("bench")
    dsn = pg.create_database(name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(schema.read_text())
    return dsn


def config_dict(dsn: str, redis_url: str, slot: str, prefix: str, **source: Any) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(EXAMPLE_RULES.read_text())
    data["source"].update({"dsn": dsn, "slot": slot, "publication": slot, **source})
    data["redis"] = {"url": redis_url}
    data["keyspace"] = {"prefix": prefix}
    data["daemon"] = {"retry_initial": 0.05, "retry_max": 0.5}
    data["log"] = {"format": "json", "level": "info"}
    data["http"] = {"port": 0}
    return data


def load(data: dict[str, Any]) -> Any:
    from cdcd.config import parse_config

    return parse_config(yaml.safe_dump(data), "bench.yaml")


class DaemonProcess:
    """``cdcd run`` in its own process: the honest setup on a 2-core machine (no GIL shared with the load)."""

    def __init__(self, data: dict[str, Any], workdir: Path | None = None, root: Path = ROOT) -> None:
        self.root = root  # the checkout whose cdcd runs (another worktree for before/after comparisons)
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="cdcd-bench-"))
        self.config_path = self.workdir / f"cdcd-{uuid.uuid4().hex[:6]}.yaml"
        self.config_path.write_text(yaml.safe_dump(data))
        self.log_path = self.workdir / (self.config_path.stem + ".log")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> DaemonProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(self.root)}
        self.proc = subprocess.Popen([sys.executable, "-m", "cdcd.cli", "run", "--config", str(self.config_path)],
                                     stdout=log, stderr=log, cwd=self.root, env=env)
        log.close()
        return self

    def events(self) -> list[dict[str, Any]]:
        out = []
        with contextlib.suppress(OSError):
            for line in self.log_path.read_text(errors="replace").splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    out.append(json.loads(line))
        return out

    def wait_ready(self, timeout: float = 30) -> None:
        wait_until(lambda: any(e.get("event") == "replication_started" for e in self.events()), timeout,
                   what=f"daemon start ({self.log_path})")

    def metrics(self, prefix: str = "cdcd_") -> dict[str, float]:
        """The daemon's Prometheus samples whose names start with ``prefix`` (label sets folded into the
        name), read from its /metrics (its port from the ``http_listening`` log line); {} if unreachable
        (a checkout without them, or http off)."""
        import urllib.request

        ports = [e["port"] for e in self.events() if e.get("event") == "http_listening" and "port" in e]
        if not ports:
            return {}
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{ports[-1]}/metrics", timeout=5) as resp:
                text = resp.read().decode()
        except OSError:
            return {}
        out = {}
        for line in text.splitlines():
            if line.startswith(prefix):
                name, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    out[name] = float(value)
        return out

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def batch_lines(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The daemon's ``batch`` log lines (one per batch, or one per ``log.batch_interval`` summing several:
    ``batches`` says how many, ``last_at`` when the newest was applied; see cdcd.batchlog)."""
    return [e for e in events if e.get("event") == "batch"]


def _line_time(e: dict[str, Any]) -> float:
    from datetime import datetime

    return datetime.fromisoformat(e.get("last_at") or e["timestamp"]).timestamp()


def steady_rate(events: list[dict[str, Any]]) -> tuple[float, int]:
    """(changes/s, batches) from the batch lines: the changes after the first line over the time from its batch
    to the newest batch of the last line. The first line is the first batch alone (nothing before it to sum)."""
    lines = batch_lines(events)
    batches = sum(int(e.get("batches", 1)) for e in lines)
    if len(lines) < 2:
        return 0.0, batches
    span = _line_time(lines[-1]) - _line_time(lines[0])
    changes = sum(int(e["changes"]) for e in lines[1:])
    return (changes / span if span > 0 else 0.0), batches


def wait_until(pred: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what or pred}")
        time.sleep(interval)


def applied_version(r: redis.Redis, prefix: str) -> int:
    v = r.hget(f"{prefix}#cdcd:applied", "version")
    return int(v) if v else 0


def insert_lsn(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::bigint").fetchone()
    assert row is not None
    return int(row[0])


def heartbeat(conn: psycopg.Connection[Any]) -> int:
    """An empty cdcd message past everything committed so far; returns a position the daemon will pass."""
    lsn = insert_lsn(conn)
    conn.execute("SELECT pg_logical_emit_message(false, 'cdcd', '{\"keys\":[],\"tags\":[]}')")
    return lsn


def pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    i = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[i]


def machine() -> str:
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    redis_v = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()[2]
    from cdcd.devservers import pg_bindir

    pg_v = subprocess.run([str(pg_bindir() / "postgres"), "--version"], capture_output=True, text=True).stdout.strip()
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "?"
    return (f"{cpu}, {os.cpu_count()} cores, Linux {platform.release()}, Python {platform.python_version()}, "
            f"{pg_v}, Redis {redis_v.removeprefix('v=')}; load average at start {load}")


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    return "\n".join([line, sep, *body])


def visibility_summary(daemon: DaemonProcess) -> str:
    """One line: how often the Postgres source held a delivered commit the server did not show yet."""
    m = daemon.metrics("cdcd_source_visibility")
    if not m:
        return "visibility check: no figures (a checkout without it, or /metrics unreachable)"
    waits = m.get("cdcd_source_visibility_waits_total", 0)
    count = m.get("cdcd_source_visibility_wait_seconds_count", 0)
    total = m.get("cdcd_source_visibility_wait_seconds_sum", 0)
    mean = f"{1000 * total / count:.2f} ms" if count else "-"
    return (f"visibility check: {m.get('cdcd_source_visibility_checks_total', 0):.0f} snapshot queries, "
            f"{waits:.0f} commits delivered before they were visible (held, mean wait {mean})")
