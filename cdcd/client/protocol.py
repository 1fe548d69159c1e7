"""What sync and async caches share: key names, the daemon's registry, entry validation, TTL jitter."""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Iterable, Mapping
from typing import Any

from cdcd.fillguard import Entry, FillGuard
from cdcd.keyspace import Keyspace


class _NotFound:
    """The loader's way to say "no such row": cached as a negative entry, returned as ``None``."""

    _instance: _NotFound | None = None

    def __new__(cls) -> _NotFound:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NOT_FOUND"


NOT_FOUND: Any = _NotFound()


def _template_regex(template: str) -> re.Pattern[str]:
    out, pos = "", 0
    for m in re.finditer(r"\{\{|\}\}|\{[A-Za-z_][A-Za-z0-9_$]*\}", template):
        out += re.escape(template[pos:m.start()])
        tok = m.group(0)
        out += re.escape(tok[0]) if tok in ("{{", "}}") else "(.+)"
        pos = m.end()
    return re.compile("^" + out + re.escape(template[pos:]) + "$")


class Registry:
    """The daemon's rules (``<prefix>__cdcd:rules``): which table a key or tag name derives from.

    An entry records the table tag of every table its key and tags derive from, so one TRUNCATE
    (one counter bump) invalidates it without any scan.
    """

    def __init__(self) -> None:
        self.patterns: list[tuple[re.Pattern[str], str]] = []

    def load(self, raw: bytes | str | None) -> None:
        patterns = []
        if raw:
            doc = json.loads(raw)
            for rel, spec in doc.get("tables", {}).items():
                tag = Keyspace.table_tag(rel)
                for t in (*spec.get("keys", []), *spec.get("tags", [])):
                    patterns.append((_template_regex(t), tag))
        self.patterns = patterns

    def implied(self, names: Iterable[str]) -> list[str]:
        out: list[str] = []
        for name in names:
            for rx, tag in self.patterns:
                if tag not in out and rx.match(name):
                    out.append(tag)
        return out


def all_tags(key: str, tags: Iterable[str], registry: Registry) -> list[str]:
    given = list(tags)
    return given + [t for t in registry.implied([key, *given]) if t not in given]


def tags_valid(entry: Entry, current: Mapping[str, bytes | str | None]) -> bool:
    for t, v in entry.tags.items():
        c = current.get(t)
        if c is None:
            return False
        if (c.decode() if isinstance(c, bytes) else c) != v:
            return False
    return True


XFETCH_HORIZON = 20.0  # in units of delta*beta: exp(-20) ~ 2e-9, not worth a random draw


def xfetch_due(delta: float, beta: float, remaining: float, u: float) -> bool:
    """XFetch (Vattani, Chierichetti, Lowenstein 2015): refresh now with probability exp(-remaining / (delta*beta)).

    ``delta`` is how long the last load took, ``remaining`` the time to expiry, ``u`` uniform in (0, 1]:
    slow-to-load and nearly expired entries refresh early, so one caller refreshes before the herd.
    """
    return -delta * beta * math.log(u or 1e-300) >= remaining


def jittered(ttl: float, jitter: float, rng: random.Random) -> float:
    if jitter <= 0:
        return ttl
    return ttl * (1.0 + rng.uniform(-jitter, jitter))


def parse_read(key: str, raw: Any) -> Entry:
    return FillGuard.parse(key, list(raw))


def snapshot_json(snap: Mapping[str, str]) -> str:
    return json.dumps(dict(snap), separators=(",", ":"), sort_keys=True) if snap else ""


def decode_str(v: Any) -> str | None:
    if v is None or v is False:
        return None
    return v.decode() if isinstance(v, bytes) else str(v)
