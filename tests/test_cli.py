"""The command line against real files and a real database: errors say where and what, exit code 2."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.helpers import EXAMPLE_RULES, ROOT


def cdcd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cdcd.cli", *args], capture_output=True, text=True, timeout=60,
                          cwd=ROOT)


def test_check_accepts_the_example(tmp_path: Path) -> None:
    res = cdcd("check", "--offline", str(EXAMPLE_RULES))
    assert res.returncode == 0, res.stderr
    assert "2 table rule(s)" in res.stdout


def test_broken_yaml_names_file_line_and_column(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("source:\n  dsn: x\ntables:\n  users:\n    keys: [user:{id}\n")
    res = cdcd("check", "--offline", str(bad))
    assert res.returncode == 2
    assert f"{bad}:6:1: not valid YAML" in res.stderr


def test_invalid_rule_names_the_path_inside_the_file(tmp_path: Path) -> None:
    data = yaml.safe_load(EXAMPLE_RULES.read_text())
    data["tables"]["users"]["keys"][1] = "user:email:{email"
    data["tables"]["orders"]["action"] = "upsert"
    data["tables"]["orders"]["tll"] = 5
    bad = tmp_path / "rules.yaml"
    bad.write_text(yaml.safe_dump(data, sort_keys=False))
    res = cdcd("check", "--offline", str(bad))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    text = bad.read_text().splitlines()
    parsed = [re.match(r"^(?:cdcd: )?(.+?):(\d+): (\S+): (.*)$", ln) for ln in lines]
    assert all(parsed), lines
    by_msg = {m.group(3): m.group(4) for m in parsed if m}
    line_of = {m.group(3): int(m.group(2)) for m in parsed if m}
    assert {m.group(1) for m in parsed if m} == {str(bad)}
    assert "tables.users.keys" in by_msg and "expected '}' before end of string" in by_msg["tables.users.keys"]
    assert "tables.orders.action" in by_msg and "'invalidate' or 'update'" in by_msg["tables.orders.action"]
    assert "tables.orders.tll" in by_msg and "Extra inputs are not permitted" in by_msg["tables.orders.tll"]
    # and the line numbers point at the offending lines
    assert text[line_of["tables.orders.action"] - 1].strip() == "action: upsert"
    assert text[line_of["tables.orders.tll"] - 1].strip() == "tll: 5"


def test_missing_column_is_reported_against_the_live_schema(cfg: dict[str, Any], tmp_path: Path) -> None:
    cfg["tables"]["users"]["keys"].append("user:phone:{phone}")
    path = tmp_path / "live.yaml"
    path.write_text(yaml.safe_dump(cfg))
    for args in (("check", str(path)), ("run", "--config", str(path))):
        res = cdcd(*args)
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        assert "template 'user:phone:{phone}' names column 'phone', which public.users does not have" in res.stderr


def test_missing_table_and_replica_identity_warning(cfg: dict[str, Any], sql: Any, tmp_path: Path) -> None:
    sql("ALTER TABLE orders REPLICA IDENTITY DEFAULT")
    path = tmp_path / "w.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = cdcd("check", str(path))
    assert res.returncode == 0, res.stderr
    assert "public.orders has REPLICA IDENTITY DEFAULT" in res.stdout
    assert "ALTER TABLE \"public\".\"orders\" REPLICA IDENTITY FULL" in res.stdout
    cfg["tables"]["nope"] = {"keys": ["nope:{id}"]}
    path.write_text(yaml.safe_dump(cfg))
    res = cdcd("check", str(path))
    assert res.returncode == 2 and "table public.nope does not exist" in res.stderr


def test_explain_prints_keys_and_tags() -> None:
    res = cdcd("explain", str(EXAMPLE_RULES), "--table", "users",
               "--row", '{"id": 42, "email": "a@b.c", "tenant_id": 7}')
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"keys": ["v1:user:42", "v1:user:email:a@b.c"], "tags": ["tenant:7"],
                                      "unresolved": []}
    res = cdcd("explain", str(EXAMPLE_RULES), "--table", "nope", "--row", "{}")
    assert res.returncode == 2 and "no rule for table public.nope" in res.stderr


def test_run_with_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    res = cdcd("run", "--config", str(tmp_path / "absent.yaml"))
    assert res.returncode == 2 and "cannot read" in res.stderr


def test_demo_runs_end_to_end() -> None:
    res = subprocess.run([sys.executable, "-m", "cdcd.cli", "demo"], capture_output=True, text=True, timeout=120,
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    assert "app A writes back its old row: refused" in out
    assert "fills the fresh row: accepted" in out
    assert "tombstone" in out and "backplane after" in out
    assert "no backplane message" not in out
    assert "valid now? no" in out


def test_explain_offline_keeps_numbers_as_written() -> None:
    """Without a database, a number renders with the digits it was written with (12.50, not 12.5)."""
    res = cdcd("explain", str(EXAMPLE_RULES), "--offline", "--table", "orders",
               "--row", '{"id": 7, "user_id": 3.10, "tenant_id": 12.50}')
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["tags"] == ["user-orders:3.10", "tenant:12.50"]
    assert "rendered from the JSON values as given" in res.stderr


# The daemon renders keys from the text Postgres sends; explain must print the same keys for the same row.
_TYPED = """
CREATE TABLE typed (
    id bigint PRIMARY KEY, price numeric(10, 2), at timestamptz, local_at timestamp, day date, flag boolean,
    u uuid, b bytea, c char(4), f float8, j jsonb, label text
);
ALTER TABLE typed REPLICA IDENTITY FULL;
"""
_TYPED_COLUMNS = ["price", "at", "local_at", "day", "flag", "u", "b", "c", "f", "j", "label"]


def test_explain_renders_the_keys_the_daemon_writes(cfg: dict[str, Any], sql: Any, r: Any,
                                                     tmp_path: Path) -> None:
    from tests.helpers import DaemonThread, make_config, wait_until

    sql(_TYPED)
    # server defaults that print values differently: the daemon and explain must both ignore them
    db = sql("SELECT current_database()").fetchone()[0]
    sql(f"ALTER DATABASE \"{db}\" SET timezone = 'Asia/Kolkata'")
    sql(f"ALTER DATABASE \"{db}\" SET datestyle = 'SQL, DMY'")
    sql(f"ALTER DATABASE \"{db}\" SET extra_float_digits = 0")
    cfg["tables"] = {"typed": {"keys": [f"{c}:{{{c}}}" for c in _TYPED_COLUMNS],
                               "tags": ["pair:{id}:{price}"], "action": "invalidate"}}
    path = tmp_path / "typed.yaml"
    path.write_text(yaml.safe_dump(cfg))
    # what a person types: JSON numbers and strings, not the text Postgres prints
    row = {"id": 1, "price": 12.5, "at": "2024-02-29 10:11:12.5+02", "local_at": "2024-02-29 10:11:12",
           "day": "2024-02-29", "flag": True, "u": "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11", "b": "\\x01ff",
           "c": "ab", "f": 0.1, "j": {"b": 1, "a": [1, 2]}, "label": "x:y#z"}
    prefix = cfg["keyspace"]["prefix"]
    daemon = DaemonThread(make_config(cfg)).start()
    try:
        sql("INSERT INTO typed SELECT * FROM jsonb_populate_record(NULL::typed, %s::jsonb)", (json.dumps(row),))

        def entries() -> list[str] | None:
            found = sorted(k.decode() for k in r.scan_iter(f"{prefix}*") if b"#" not in k)
            return found if len(found) == len(_TYPED_COLUMNS) else None

        keys = wait_until(entries, what="the daemon's keys")
        tag = wait_until(lambda: [k.decode() for k in r.scan_iter(f"{prefix}#tag:pair*")], what="the tag bump")
    finally:
        daemon.stop()
    res = cdcd("explain", str(path), "--table", "typed", "--row", json.dumps(row))
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert sorted(out["keys"]) == keys
    assert [f"{prefix}#tag:{t}" for t in out["tags"]] == tag
    assert out["unresolved"] == []
    # and these are the daemon's renderings, not the JSON ones
    assert f"{prefix}price:12.50" in keys and f"{prefix}at:2024-02-29T08%3A11%3A12.500000+00%3A00" in keys
    assert f"{prefix}c:ab  " in keys and f"{prefix}flag:true" in keys
    assert f"{prefix}u:a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11" in keys and f"{prefix}b:01ff" in keys
    assert f"{prefix}day:2024-02-29" in keys and f"{prefix}f:0.1" in keys


def test_explain_reports_a_value_that_does_not_fit(cfg: dict[str, Any], sql: Any, tmp_path: Path) -> None:
    sql(_TYPED)
    cfg["tables"] = {"typed": {"keys": ["t:{id}:{price}"]}}
    path = tmp_path / "typed.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = cdcd("explain", str(path), "--table", "typed", "--row", '{"id": "x", "price": 1}')
    assert res.returncode == 2 and "does not fit public.typed" in res.stderr
    res = cdcd("explain", str(path), "--table", "typed", "--row", '{"id": 1, "nope": 1}')
    assert res.returncode == 0, res.stderr
    assert "public.typed has no column(s) nope" in res.stderr
    assert json.loads(res.stdout)["keys"] == []
    assert json.loads(res.stdout)["unresolved"] == ["t:{id}:{price}"]


def test_kafka_dead_letters_need_the_kafka_source(tmp_path: Path) -> None:
    """A setting that cannot work with the source is a configuration error (exit 2), not a traceback."""
    data = yaml.safe_load(EXAMPLE_RULES.read_text())
    data["daemon"] = {"dead_letters": "kafka"}
    path = tmp_path / "dlq.yaml"
    path.write_text(yaml.safe_dump(data))
    res = cdcd("run", "--config", str(path))
    assert res.returncode == 2, res.stderr
    assert "daemon.dead_letters: kafka needs source type kafka" in res.stderr
    assert "Traceback" not in res.stderr
