"""TLS to Postgres (sslmode=verify-full) and Redis (rediss:// with a CA file), with real certificates."""

from __future__ import annotations

import os
import pwd
import subprocess
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from cdcd.devservers import PostgresServer, RedisServer
from tests.helpers import EXAMPLE_SCHEMA, DaemonThread, config_dict, entry, make_config, unique, wait_until


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture
def certs(tmp_path: Path) -> dict[str, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1."""
    d = tmp_path
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=cdcd-test-ca",
             "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"))
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
             "-keyout", str(d / "server.key"), "-out", str(d / "server.csr"))
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "ca.pem"), "-CAkey", str(d / "ca.key"),
             "-CAcreateserial", "-days", "1", "-extfile", str(d / "ext.cnf"), "-out", str(d / "server.pem"))
    return {"ca": d / "ca.pem", "cert": d / "server.pem", "key": d / "server.key"}


@pytest.mark.slow
def test_daemon_over_tls_to_postgres_and_redis(certs: dict[str, Path], tmp_path: Path) -> None:
    pg = PostgresServer()
    pg.init()
    data = pg.datadir / "data"
    for name in ("cert", "key"):  # the server wants its key private and owned by its user
        target = data / f"server.{name}"
        target.write_bytes(certs[name].read_bytes())
        os.chmod(target, 0o600)
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(target, pw.pw_uid, pw.pw_gid)
    pg.extra_conf = {"ssl": "on", "ssl_cert_file": "server.cert", "ssl_key_file": "server.key"}
    pg.start()
    rs = RedisServer()
    rs.args = ("--port", "0", "--tls-port", str(rs.port), "--tls-cert-file", str(certs["cert"]),
               "--tls-key-file", str(certs["key"]), "--tls-ca-cert-file", str(certs["ca"]),
               "--tls-auth-clients", "no")
    rs.start()
    try:
        dsn = pg.create_database("app")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(EXAMPLE_SCHEMA.read_text())
        prefix = unique("tls") + ":"
        cfg: dict[str, Any] = config_dict(dsn, f"rediss://127.0.0.1:{rs.port}/0", unique("s"), prefix)
        cfg["source"].update({"sslmode": "verify-full", "sslrootcert": str(certs["ca"])})
        cfg["redis"]["ssl_ca_certs"] = str(certs["ca"])
        d = DaemonThread(make_config(cfg)).start()
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("INSERT INTO users (id, email, name, tenant_id) VALUES (1, 'a@x', 'a', 1)")
                # the replication connection itself is encrypted
                ssl = conn.execute("SELECT s.ssl FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid)").fetchone()
                assert ssl == (True,)
            r = redis.Redis.from_url(f"rediss://127.0.0.1:{rs.port}/0", ssl_ca_certs=str(certs["ca"]))
            wait_until(lambda: entry(r, f"{prefix}user:1").get("d"), what="change applied over TLS")
        finally:
            d.stop()
        # a client that does not trust the CA is refused
        wrong = dict(cfg)
        wrong["source"] = {**cfg["source"], "sslrootcert": str(certs["cert"])}  # not a CA
        from cdcd.sources.base import SourceUnavailable
        from cdcd.sources.postgres import PostgresSource

        with pytest.raises(SourceUnavailable, match=r"certificate verify failed|SSL error"):
            c = make_config(wrong)
            PostgresSource(c.source, c.rules().source).sql()
    finally:
        rs.stop()
        pg.destroy()
