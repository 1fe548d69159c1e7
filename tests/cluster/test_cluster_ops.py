"""``cdcd warm``, ``cdcd inspect`` and ``cdcd status`` against a daemon on a real Redis Cluster."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from redis.cluster import RedisCluster

from cdcd.inspect import EXIT_OK, run_inspect
from tests.helpers import ROOT, DaemonThread, entry, make_config, wait_until


def test_warm_inspect_status_on_cluster(ccfg: dict[str, Any], rc: RedisCluster, sql: Any, tmp_path: Path) -> None:
    p = ccfg["keyspace"]["prefix"]
    sql("INSERT INTO users (id, email, name, tenant_id) SELECT g, 'u' || g || '@x', 'n' || g, g % 3 "
        "FROM generate_series(1, 300) g")  # before the daemon's slot exists: only warm-up writes these
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(ccfg))
    res = subprocess.run([sys.executable, "-m", "cdcd.cli", "warm", "-c", str(path), "--table", "users",
                          "--rate", "0"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert "public.users: 300 rows, 600 entries written" in res.stdout
    assert json.loads(entry(rc, f"{p}user:email:u77@x")["d"])["name"] == "n77"
    d = DaemonThread(make_config(ccfg)).start()
    try:
        sql("UPDATE users SET name = 'changed' WHERE id <= 10")
        sql("DELETE FROM users WHERE id = 300")
        wait_until(lambda: json.loads(entry(rc, f"{p}user:10").get("d", "{}")).get("name") == "changed"
                   and "d" not in entry(rc, f"{p}user:300"), what="changes applied")
        # inspect scans every master's keys and compares them with the rows
        out = io.StringIO()
        report = run_inspect(make_config(ccfg), None, True, 0, 0.0, 10.0, out)
        users = report.tables["public.users"]
        assert report.exit_code == EXIT_OK and report.stale == [], out.getvalue()
        assert users.rows == 299 and users.fresh == 598, out.getvalue()  # two keys per row, all checked
        # status: the daemon's own view (Redis connected through the cluster client)
        base = f"http://127.0.0.1:{d.daemon.http.port}"
        res = subprocess.run([sys.executable, "-m", "cdcd.cli", "status", "--url", base, "--json"],
                             capture_output=True, text=True, timeout=30, cwd=ROOT)
        assert res.returncode == 0, res.stderr
        status = json.loads(res.stdout)
        assert status["ready"] is True and status["redis_connected"] is True and status["changes"] >= 11
    finally:
        d.stop()
