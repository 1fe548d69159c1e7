"""``cdcd.client`` must import and work with nothing but its two dependencies, ``redis`` and ``msgpack`` (its value
format, docs/client-values.md), installed."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap

from cdcd.devservers import RedisServer

BLOCKED = ("pydantic", "pydantic_settings", "structlog", "psycopg", "psycopg2", "kafka", "yaml", "prometheus_client",
           "hiredis", "cdcd.rules", "cdcd.config", "cdcd.daemon")


def test_client_imports_and_runs_with_only_redis_and_msgpack(redis_srv: RedisServer) -> None:
    script = textwrap.dedent(f"""
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name in {BLOCKED!r} or name.split(".")[0] in {BLOCKED!r}:
                    raise ImportError(f"blocked: {{name}}")
                return None

        sys.meta_path.insert(0, Block())
        from cdcd.client import Cache, CacheOptions, AsyncCache
        with Cache({redis_srv.url!r}, CacheOptions(require_registry=False, prefix="imp:")) as c:
            assert c.get_or_load("k", lambda: {{"a": 1}}) == {{"a": 1}}
            assert c.get("k") == {{"a": 1}}
            assert c.invalidate_tag("t")
            assert c.wait_subscribed(2)  # the listener works with the pure-Python parser too
        loaded = {{m.split(".")[0] for m in sys.modules}}
        assert not loaded & {set(b.split(".")[0] for b in BLOCKED if "." not in b)!r}, loaded
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_the_core_does_no_io_and_the_listener_names_no_driver() -> None:
    """The sans-IO split (docs/client.md, "How the client is built"), checked on the import graph: the core and
    its steps import neither Redis, sockets, threads nor asyncio, and neither they nor the listener import a
    driver, so a rule written in the core is the same rule under both drivers."""
    from tests.test_import_cycles import ROOT

    def imported(module: str) -> set[str]:
        tree = ast.parse((ROOT / "client" / f"{module}.py").read_text())
        names: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                names.add("." * node.level + (node.module or ""))
        return names

    io = {"redis", "redis.asyncio", "socket", "threading", "asyncio", "concurrent.futures"}
    drivers = {".cache", ".aio", "cdcd.client.cache", "cdcd.client.aio"}
    for module in ("core", "steps", "existence"):
        got = imported(module)
        assert not got & (io | drivers), (module, got & (io | drivers))
    assert not imported("subscriber") & drivers
