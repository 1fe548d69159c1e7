"""Shared test plumbing: real servers, a daemon in a thread or a process, waiting without sleeping blind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
import yaml

from cdcd.config import Config, parse_config
from cdcd.daemon import Daemon
from cdcd.multitarget import build_daemon

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_RULES = ROOT / "config" / "cdcd.example.yaml"
EXAMPLE_SCHEMA = ROOT / "config" / "example-schema.sql"


def wait_until(pred: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or pred}")
        time.sleep(interval)


def unique(prefix: str = "t") -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def config_dict(dsn: str, redis_url: str, slot: str, prefix: str, rules_file: Path = EXAMPLE_RULES) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(rules_file.read_text())
    data["source"].update({"dsn": dsn, "slot": slot, "publication": slot})
    data["redis"] = {"url": redis_url, "socket_timeout": 1.0, "connect_timeout": 0.5}
    data["keyspace"] = {"prefix": prefix}
    data["daemon"] = {"retry_initial": 0.05, "retry_max": 0.5, "heartbeat": 0}  # tests that want it turn it on
    data["log"] = {"format": "json", "level": "info"}
    data["http"] = {"port": 0}  # a free port: tests run several daemons at once
    return data


def make_config(data: dict[str, Any]) -> Config:
    return parse_config(yaml.safe_dump(data), "test.yaml")


class DaemonThread:
    """The daemon in-process: fast to start, and its metrics are inspectable."""

    def __init__(self, config: Config, source: Any = None) -> None:
        self.daemon: Daemon = build_daemon(config, source=source)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.daemon.run()
        except BaseException as exc:
            self.error = exc

    def start(self, wait: bool = True) -> DaemonThread:
        self.thread.start()
        if wait:
            assert self.daemon.ready.wait(30), f"daemon not ready: {self.daemon.last_error} {self.error}"
        return self

    def stop(self) -> None:
        self.daemon.stop()
        self.thread.join(15)
        assert not self.thread.is_alive(), "daemon did not stop"


class DaemonProcess:
    """``cdcd run`` as a real process, for SIGKILL / SIGTERM tests."""

    def __init__(self, data: dict[str, Any], workdir: Path) -> None:
        self.config_path = workdir / f"cdcd-{uuid.uuid4().hex[:6]}.yaml"
        self.config_path.write_text(yaml.safe_dump(data))
        self.log_path = workdir / (self.config_path.stem + ".log")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> DaemonProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cdcd.cli", "run", "--config", str(self.config_path)],
            stdout=log, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()
        return self

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def wait_ready(self, timeout: float = 30) -> None:
        wait_until(lambda: any(e.get("event") == "replication_started" for e in self.events()), timeout,
                   what=f"daemon start (log: {self.log_path})")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 15) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def entry(r: redis.Redis, key: str) -> dict[str, str]:
    """An entry's fields as text; a client-written ``d`` (binary, docs/client-values.md) survives as surrogates."""
    raw: dict[bytes, bytes] = r.hgetall(key)  # type: ignore[assignment]
    return {k.decode(): v.decode("utf-8", "surrogateescape") for k, v in raw.items()}


def db_users(dsn: str) -> dict[int, tuple[str, str]]:
    """The example schema's users as the database has them: id -> (email, name)."""
    import psycopg

    with psycopg.connect(dsn) as conn:
        return {row[0]: (row[1], row[2]) for row in conn.execute("SELECT id, email, name FROM users")}


def stale_users(r: redis.Redis, prefix: str, expected: dict[int, tuple[str, str]]) -> list[int]:
    """Users whose cached row (by id key and by e-mail key) differs from the database."""
    bad = []
    for uid, (email, name) in expected.items():
        for key in (f"{prefix}user:{uid}", f"{prefix}user:email:{email}"):
            d = entry(r, key).get("d")
            if d is None or json.loads(d)["name"] != name or json.loads(d)["email"] != email:
                bad.append(uid)
                break
    return bad


def entries(r: redis.Redis, prefix: str) -> dict[str, dict[str, str]]:
    """Every cache entry under a prefix (cdcd's own __ keys excluded)."""
    out = {}
    for k in r.scan_iter(match=f"{prefix}*", count=1000):
        name = k.decode()
        if name.startswith(prefix + "#"):
            continue
        out[name] = entry(r, name)
    return out


class Backplane:
    """Collects backplane messages in a thread."""

    def __init__(self, r: redis.Redis, channel: str) -> None:
        self.messages: list[dict[str, Any]] = []  # messages naming keys or tags: the changes
        self.received: list[dict[str, Any]] = []  # everything, with heartbeats and watermark announcements
        self.pubsub = r.pubsub()
        self.pubsub.subscribe(**{channel: self._on})
        self.thread = self.pubsub.run_in_thread(sleep_time=0.01, daemon=True)

    def _on(self, msg: dict[str, Any]) -> None:
        m = json.loads(msg["data"])
        self.received.append(m)
        if m["k"] or m["t"]:
            self.messages.append(m)

    def seqs(self) -> list[int]:
        return [m["s"] for m in self.received]

    def all_keys(self) -> set[str]:
        return {k for m in self.messages for k in m["k"]}

    def all_tags(self) -> set[str]:
        return {t for m in self.messages for t in m["t"]}

    def close(self) -> None:
        self.thread.stop()
