"""The public client API is typed (issue 10, item 3): mypy --strict on a user's code, reveal_type, durations."""

from __future__ import annotations

import ast
import dataclasses
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cdcd.client import Cache, CacheOptions, EntryOptions
from cdcd.client import options as options_module
from cdcd.devservers import RedisServer
from cdcd.durations import parse_duration

ROOT = Path(__file__).resolve().parents[2]

REVEAL = textwrap.dedent('''
    from cdcd.client import AsyncCache, Cache

    cache = Cache()
    acache = AsyncCache()

    def load() -> dict[str, int]:
        return {"a": 1}

    async def aload() -> list[str] | None:
        return None

    @cache.cached(key="user:{uid}")
    def get_user(uid: int, full: bool = False) -> dict[str, int]:
        return {}

    @acache.cached(key="user:{uid}")
    async def aget_user(uid: int) -> tuple[int, str]:
        return 1, ""

    async def main() -> None:
        reveal_type(cache.get_or_load("k", load))
        reveal_type(cache.get_or_load("k", lambda: 5, ttl="10m"))
        reveal_type(await acache.get_or_load("k", aload))
        reveal_type(await acache.get_or_load("k", load))
        reveal_type(get_user(1, full=True))
        reveal_type(get_user.key(1))
        reveal_type(get_user.invalidate(1))
        reveal_type(await aget_user(1))
        reveal_type(await aget_user.invalidate(1))
        get_user.key("one")
        cache.get_or_load("k", load, ttl=[1])
''')
REVEALED = ["dict[str, int]", "int", "list[str] | None", "dict[str, int]", "dict[str, int]", "str | None", "bool",
            "tuple[int, str]", "bool"]


def mypy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-error-summary", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_a_users_code_is_mypy_strict_clean() -> None:
    out = mypy("tests/client/typing_user.py")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == "", out.stdout


def test_reveal_types_and_signatures_are_kept(tmp_path: Path) -> None:
    src = tmp_path / "reveal.py"
    src.write_text(REVEAL)
    out = mypy(str(src))
    lines = out.stdout.splitlines()
    revealed = [m.group(1).replace("builtins.", "")  # older mypy versions qualify builtins
                for m in (re.search(r'Revealed type is "(.*)"', ln) for ln in lines) if m]
    assert revealed == REVEALED, out.stdout
    errors = [ln for ln in lines if ": error:" in ln]
    # The decorated function's parameters carry over to .key(), and a TTL is seconds or a duration string.
    assert len(errors) == 2, out.stdout
    assert 'Argument 1 to "key" of "CachedFunction" has incompatible type "str"; expected "int"' in errors[0]
    assert ('Argument "ttl" to "get_or_load" of "Cache" has incompatible type "list[int]"; '
            'expected "float | str | None"') in errors[1]


def test_typing_only_init_signatures_list_every_field() -> None:
    """EntryOptions/CacheOptions declare their constructors for type checkers by hand (durations as strings):
    they must name exactly the dataclass fields, in order."""
    tree = ast.parse(Path(options_module.__file__).read_text())
    for cls in (EntryOptions, CacheOptions):
        node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
        init = next(f for s in node.body if isinstance(s, ast.If) for f in s.body
                    if isinstance(f, ast.FunctionDef) and f.name == "__init__")
        assert [a.arg for a in init.args.args[1:]] == [f.name for f in dataclasses.fields(cls)], cls


@pytest.mark.parametrize("text, seconds", [("90", 90.0), ("90s", 90.0), ("10m", 600.0), ("2h", 7200.0),
                                           ("1d", 86400.0), ("250ms", 0.25), (" 1.5m ", 90.0), (42, 42.0)])
def test_durations_parse_like_the_yaml(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_options_take_duration_strings() -> None:
    e = EntryOptions(ttl="10m", soft_ttl="5m", l1_ttl="30s", negative_ttl="250ms", lock_ttl="2s",
                     loader_hard_timeout="1s")
    assert (e.ttl, e.soft_ttl, e.l1_ttl, e.negative_ttl, e.lock_ttl, e.loader_hard_timeout) == (
        600.0, 300.0, 30.0, 0.25, 2.0, 1.0)
    assert e.merged(ttl="1h").ttl == 3600.0 and e.merged(ttl="1h").soft_ttl == 300.0
    c = CacheOptions(lease_ttl="10s", tombstone_ttl="1m", redis_timeout="500ms", registry_refresh="1h")
    assert (c.lease_ttl, c.tombstone_ttl, c.redis_timeout, c.registry_refresh) == (10.0, 60.0, 0.5, 3600.0)
    for bad in ("10 minutes", "m", "-5s"):
        with pytest.raises(ValueError, match="not a duration"):
            EntryOptions(ttl=bad)


def test_get_or_load_and_set_take_duration_strings(redis_srv: RedisServer) -> None:
    with Cache(redis_srv.url, CacheOptions(prefix="typing:", subscribe=False, require_registry=False,
                                           entry=EntryOptions(jitter=0.0))) as cache:
        assert cache.get_or_load("a", lambda: 1, ttl="2m") == 1
        assert cache.set("b", 2, ttl="1h")
        pttl_a, pttl_b = cache.redis.pttl("typing:a"), cache.redis.pttl("typing:b")
        assert 110_000 < pttl_a <= 120_000 and 3_590_000 < pttl_b <= 3_600_000

        @cache.cached(key="c:{n}", ttl="30s")
        def c(n: int) -> int:
            return n * 2

        assert c(4) == 8 and c.key(4) == "c:4" and 25_000 < cache.redis.pttl("typing:c:4") <= 30_000
        assert c.invalidate(4) is True
