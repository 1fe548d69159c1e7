"""The docs stay in sync with the code: links resolve, and every setting, metric and command is documented.

A reference page that silently misses a key is how ``daemon.heartbeat`` and the Kafka ``source``
block went undocumented; these checks read the names from the code itself (the pydantic models,
the metrics registry, the argument parser, the client's option dataclasses), so a new one fails
here until its page mentions it.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from cdcd.cli import build_parser
from cdcd.client import CacheOptions, EntryOptions
from cdcd.config import Config
from cdcd.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]

_FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.MULTILINE)


def _prose(text: str) -> str:
    """The page without fenced code blocks (a ``[x](y)`` inside code is not a link)."""
    return _FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading anchors on its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out: set[str] = set()
    for h in _HEADING.findall(_prose(page.read_text())):
        s = slug(h)
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def test_slug_follows_github() -> None:
    assert slug("Quickstart: the daemon") == "quickstart-the-daemon"
    assert slug("How `get_or_load` works") == "how-get_or_load-works"
    assert slug("`source` (Kafka: `type: kafka`)") == "source-kafka-type-kafka"
    assert slug("Dependencies, and why each") == "dependencies-and-why-each"


def _links() -> Iterator[tuple[Path, str]]:
    for page in PAGES:
        for target in _LINK.findall(_prose(page.read_text())):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            yield page, target


def test_there_are_pages_and_links() -> None:
    assert (DOCS / "README.md").exists(), "docs/README.md is the index"
    assert sum(1 for _ in _links()) > 50


@pytest.mark.parametrize(("page", "target"), list(_links()), ids=lambda v: v.name if isinstance(v, Path) else v)
def test_relative_link_resolves(page: Path, target: str) -> None:
    path, _, anchor = target.partition("#")
    dest = (page.parent / path).resolve() if path else page
    assert dest.exists(), f"{page.relative_to(ROOT)}: link to {target!r}: {dest} does not exist"
    if anchor:
        assert dest.suffix == ".md", f"{page.relative_to(ROOT)}: anchor into a non-markdown file: {target!r}"
        assert anchor in anchors(dest), (f"{page.relative_to(ROOT)}: link to {target!r}: no heading with anchor "
                                         f"{anchor!r} in {dest.relative_to(ROOT)}")


# ------------------------------------------------------------------------------ configuration

_PLACEHOLDER = {"tables": "<table>", "topic_options": "<topic>"}


def _models(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation can hold (unions, Optional and Annotated unwrapped)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _models(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [m for a in typing.get_args(annotation) for m in _models(a)]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return []


def config_keys(model: type[BaseModel] = Config, path: str = "") -> set[str]:
    """Every dotted key the configuration file accepts, e.g. ``source.topic_options.<topic>.columns``."""
    keys: set[str] = set()
    for name, field in model.model_fields.items():
        here = f"{path}.{name}" if path else name
        annotation = field.annotation
        if typing.get_origin(annotation) is dict:
            inner = typing.get_args(annotation)[1]
            for sub in _models(inner):
                keys |= config_keys(sub, f"{here}.{_PLACEHOLDER.get(name, '<name>')}")
            if not _models(inner):
                keys.add(here)
            if path:  # a section's map (topic_options) is a key of its own; top-level ones (tables) are sections
                keys.add(here)
            continue
        subs = _models(annotation)
        if subs:
            for sub in subs:
                keys |= config_keys(sub, here)
        else:
            keys.add(here)
    return keys


def test_every_configuration_key_is_in_the_reference() -> None:
    keys = config_keys()
    # the ones the issue found missing, so the walk itself cannot silently skip them
    assert {"daemon.heartbeat", "daemon.dead_letters", "source.bootstrap_servers", "source.dsn",
            "source.topic_options.<topic>.columns", "tables.<table>.keys"} <= keys
    page = (DOCS / "configuration.md").read_text()
    missing = sorted(k for k in keys if f"`{k}`" not in page)
    assert not missing, f"docs/configuration.md does not document: {missing}"


# ------------------------------------------------------------------------------ operations


def metric_names() -> set[str]:
    names = set()
    for family in Metrics().registry.collect():
        names.add(family.name + ("_total" if family.type == "counter" else ""))
    return names


def test_every_metric_is_in_the_operations_page() -> None:
    names = metric_names()
    assert "cdcd_changes_total" in names and "cdcd_lag_alarm" in names and len(names) >= 20
    page = (DOCS / "operations.md").read_text()
    missing = sorted(n for n in names if f"`{n}`" not in page)
    assert not missing, f"docs/operations.md does not document: {missing}"


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("cdcd has no subcommands")


def test_every_cli_subcommand_and_option_is_in_the_operations_page() -> None:
    page = (DOCS / "operations.md").read_text()
    commands = _subcommands()
    assert {"run", "check", "explain", "status", "warm", "inspect", "demo"} <= set(commands)
    missing = []
    for name, sub in commands.items():
        if f"`cdcd {name}" not in page:
            missing.append(f"cdcd {name}")
        for action in sub._actions:
            for opt in action.option_strings:
                if opt.startswith("--") and opt != "--help" and opt not in page:
                    missing.append(f"cdcd {name} {opt}")
    assert not missing, f"docs/operations.md does not document: {missing}"


# ------------------------------------------------------------------------------ client


def test_every_client_option_is_in_the_client_guide() -> None:
    page = (DOCS / "client.md").read_text()
    fields = [f.name for cls in (CacheOptions, EntryOptions) for f in dataclasses.fields(cls)]
    missing = sorted(f for f in fields if f"`{f}`" not in page)
    assert not missing, f"docs/client.md does not document: {missing}"


# ------------------------------------------------------------------------------ the quickstart runs


def _python_block_after(page: Path, heading: str) -> str:
    text = page.read_text()
    section = text[text.index(heading):]
    m = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert m, f"no python block after {heading!r}"
    return m.group(1)


def test_the_client_quickstart_runs(redis_server: Any) -> None:
    code = _python_block_after(ROOT / "README.md", "## Quickstart: the client")
    code = code.replace("redis://127.0.0.1:6379/0", redis_server.url)
    calls: list[int] = []

    class Db:
        def fetch_user(self, user_id: int) -> dict[str, Any]:
            calls.append(user_id)
            return {"id": user_id, "name": "Ada"}

    scope: dict[str, Any] = {"db": Db()}
    exec(compile(code, "README.md quickstart", "exec"), scope)
    try:
        assert scope["key"] == "user:42"
        assert scope["user"] == {"id": 42, "name": "Ada"} and calls == [42]
    finally:
        scope["cache"].close()
