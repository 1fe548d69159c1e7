"""Warm-up from a consistent snapshot: right content, and never over a newer change."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from cdcd.warm import warm
from tests.helpers import ROOT, DaemonThread, entry, make_config, wait_until


@pytest.mark.slow
def test_warm_100k_rows_without_overwriting_a_concurrent_change(cfg: dict[str, Any], r: redis.Redis,
                                                                 sql: Any) -> None:
    n = 100_000
    sql("INSERT INTO users (id, email, name, tenant_id) "
        "SELECT g, 'u' || g || '@x', 'name ' || g, g %% 10 FROM generate_series(1, %s) g", (n,))
    p = cfg["keyspace"]["prefix"]
    config = make_config(cfg)
    d = DaemonThread(config).start()  # its slot is created now: the 100k inserts are not streamed
    try:
        def change_during_warm(version: int) -> None:
            # committed after the snapshot: the daemon applies it at a version above the snapshot's
            sql("UPDATE users SET name = 'changed during warm-up' WHERE id = %s", (n,))
            wait_until(lambda: entry(r, f"{p}user:{n}").get("d"), what="daemon applied the concurrent change")
            assert int(entry(r, f"{p}user:{n}")["v"]) > version

        out = io.StringIO()
        report = warm(config, rate=0, on_snapshot=change_during_warm, progress_stream=out)
        (t,) = report.tables
        assert t.table == "public.users" and t.rows == n
        assert t.refused == 2  # user:<n> and user:email:u<n>@x already held the newer change
        assert t.written == 2 * n - 2
        assert "warm_progress" not in out.getvalue()  # not a terminal: progress went to the log
        # content: every row under both keys, exactly as the daemon would have written it
        pipe = r.pipeline(transaction=False)
        for i in range(1, n + 1):
            pipe.hget(f"{p}user:{i}", "d")
            pipe.hget(f"{p}user:email:u{i}@x", "d")
        values = pipe.execute()
        assert all(values), "a key was not written"
        first = json.loads(values[0])
        assert first["id"] == 1 and first["email"] == "u1@x" and first["name"] == "name 1" and first["tenant_id"] == 1
        assert first["updated_at"].endswith("+00:00")
        assert json.loads(values[-2])["name"] == "changed during warm-up"  # not overwritten by the snapshot
        # what warm-up wrote is byte-identical to what the daemon writes for the same row
        sql("UPDATE users SET name = name WHERE id = 2")
        warmed = values[2]
        wait_until(lambda: entry(r, f"{p}user:2").get("s") == "cdc" and int(entry(r, f"{p}user:2")["v"])
                   > report.version, what="daemon rewrote user:2")
        assert entry(r, f"{p}user:2")["d"].encode() == warmed
        # values record the table tag, so a TRUNCATE invalidates warmed entries too
        assert json.loads(entry(r, f"{p}user:3")["t"]) == {
            "#table:public.users": r.get(f"{p}#tag:#table:public.users").decode()}
        assert not r.exists(f"{p}order:1")  # invalidate rules are not warmed
    finally:
        d.stop()


def test_warm_cli_validates_tables(cfg: dict[str, Any], tmp_path: Path, sql: Any, r: redis.Redis) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = subprocess.run([sys.executable, "-m", "cdcd.cli", "warm", "-c", str(path), "--table", "orders"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 2 and "only action 'update' rules have values to warm" in res.stderr
    sql("INSERT INTO users (id, email, name, tenant_id) VALUES (1, 'a@x', 'a', 1)")
    res = subprocess.run([sys.executable, "-m", "cdcd.cli", "warm", "-c", str(path), "--table", "users",
                          "--rate", "500"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert "public.users: 1 rows, 2 entries written" in res.stdout
    assert entry(r, f"{cfg['keyspace']['prefix']}user:1").get("d")
