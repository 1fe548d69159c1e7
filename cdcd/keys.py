"""Key and tag templates: the one implementation the daemon, the client, explain, warm and inspect share.

Why one module: a key is only useful if every party computes the same one. The daemon writes
``user:{id}`` for a row, the application reads it through ``Cache.key`` or ``@cache.cached``, and
``cdcd inspect`` walks the other way (key -> row). Any divergence is a cache that is never
invalidated, so all of them call :meth:`Template.render` and :func:`escape` from here.

Rendering is injective and can never produce one of cdcd's own names, by construction:

* every rendered value is percent-escaped for ``%``, ``:``, ``#``, ``{`` and ``}`` (``a:b`` ->
  ``a%3Ab``), so a value can never introduce a separator, and
* a template may not contain ``#`` and the text between two placeholders must contain ``:``,
  so the first ``:`` after a value always ends it: two different rows render two different keys.

cdcd keeps its own keys under ``<prefix>#`` (see :class:`cdcd.keyspace.Keyspace`), a namespace no
rendered key can reach because rendered keys never contain a raw ``#``; names an application
supplies directly are refused when they contain ``#`` (:func:`check_name`).

A NULL or empty key column means the row has no such key: :meth:`Template.render` returns None.
This module is free of pydantic and of I/O: the client imports it.
"""

from __future__ import annotations

import functools
import json
import re
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any

from cdcd.change import UNAVAILABLE

SYSTEM = "#"  # cdcd's own names start with this after the prefix; rendered values escape it
SPECIAL = "%:#{}"  # escaped in every rendered value ('%' first: it is the escape character)
_ESCAPE = str.maketrans({c: f"%{ord(c):02X}" for c in SPECIAL})
_UNESCAPE = {f"%{ord(c):02X}": c for c in SPECIAL}
_ESCAPED = re.compile("|".join(re.escape(k) for k in _UNESCAPE))
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*$")


def escape(value: str) -> str:
    """``x:y`` -> ``x%3Ay``: the text of a value inside a key; the identity for most values."""
    if "%" in value or ":" in value or "#" in value or "{" in value or "}" in value:
        return value.translate(_ESCAPE)
    return value


def unescape(text: str) -> str:
    """The inverse of :func:`escape` (inspect's key -> row lookups)."""
    return _ESCAPED.sub(lambda m: _UNESCAPE[m.group(0)], text) if "%" in text else text


def check_name(name: str, what: str = "key") -> str:
    """Refuse a key or tag name an application supplies directly if it could address cdcd's own keys.

    Every internal name contains ``#`` and no rendered name does, so refusing ``#`` anywhere (not
    just at the start) keeps entries and internal keys apart whatever the keyspace prefixes sharing
    the Redis are.
    """
    if SYSTEM in name:
        raise ValueError(f"{what} {name!r}: '#' is reserved for cdcd's own keys (use a template, or escape it "
                         f"with cdcd.keys.escape)")
    return name


def render_value(v: Any) -> str:
    """The one canonical text of a column value inside a key, shared by every source (before escaping)."""
    t = type(v)
    if t is str:
        return str(v)
    if t is int:
        return str(v)
    if t is bool:
        return "true" if v else "false"
    if isinstance(v, Decimal):
        return str(v)
    if isinstance(v, datetime | date | time):
        return v.isoformat()
    if isinstance(v, bytes | bytearray | memoryview):
        return bytes(v).hex()
    if t is float:
        return repr(v)
    if isinstance(v, dict | list):
        return json.dumps(v, sort_keys=True, separators=(",", ":"))
    return str(v)


@dataclass(frozen=True, slots=True)
class Template:
    """``user:email:{email}`` parsed once into literal/column pieces.

    ``{{`` and ``}}`` are literal braces (``str.format`` syntax); format specs and conversions are
    refused. ``render`` is on the daemon's hot path: it is compiled once per template into a closure
    over its literals and columns, and one-column templates with int or plain-text values take a branch
    that allocates only the result.
    """

    text: str
    literals: tuple[str, ...]
    columns: tuple[str, ...]
    _regex: list[re.Pattern[str]] = field(default_factory=list, compare=False, repr=False)
    # ``render(row)``: the key, or None when a column is NULL, empty or not in ``row`` (the row has no such
    # key). A function compiled for this template (see :func:`_compile`), not a method: the planner calls
    # it for every key and tag of every change.
    render: Callable[[Mapping[str, Any]], str | None] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "render", _compile(self.literals, self.columns))

    @classmethod
    def parse(cls, text: str) -> Template:
        """Compile ``text``; ValueError (a precise message, shown by pydantic at load) when invalid."""
        literals: list[str] = []
        columns: list[str] = []
        pending = ""
        try:
            parsed = list(string.Formatter().parse(text))
        except ValueError as exc:
            raise ValueError(f"template {text!r}: {exc}") from None
        for literal, name, spec, conv in parsed:
            pending += literal
            if name is None:
                continue
            if spec or conv:
                raise ValueError(f"template {text!r}: format specs and conversions are not supported ({{{name}}})")
            if not _IDENT.match(name):
                raise ValueError(f"template {text!r}: {{{name}}} is not a column name")
            if columns and ":" not in pending:
                raise ValueError(
                    f"template {text!r}: the text between {{{columns[-1]}}} and {{{name}}} must contain ':' "
                    f"(e.g. '{{{columns[-1]}}}:{{{name}}}'), otherwise two different rows can render the same key")
            literals.append(pending)
            columns.append(name)
            pending = ""
        literals.append(pending)
        if SYSTEM in text:
            raise ValueError(f"template {text!r}: '#' is reserved for cdcd's own keys")
        if not text.strip():
            raise ValueError("empty template")
        return cls(text, tuple(literals), tuple(columns))

    def unresolvable(self, row: Mapping[str, Any]) -> list[str]:
        """Columns the template needs that ``row`` does not carry (unsent by the source)."""
        return [c for c in self.columns if row.get(c, UNAVAILABLE) is UNAVAILABLE]

    def regex(self) -> re.Pattern[str]:
        """Matches exactly the keys this template renders; groups are the escaped values."""
        if not self._regex:
            parts = [re.escape(self.literals[0])]
            for lit in self.literals[1:]:
                parts.append("([^:#]+)")
                parts.append(re.escape(lit))
            self._regex.append(re.compile("^" + "".join(parts) + "$", re.DOTALL))
        return self._regex[0]

    @staticmethod
    def loose_regex(text: str) -> re.Pattern[str]:
        """The template ``text`` (parsed as the daemon parses it), each placeholder matching any non-empty text.

        Looser than :meth:`regex` on purpose (the client's registry uses it to find the tables a name
        derives from): a key an application formatted by hand (unescaped) still records the table tag,
        so the cost of a doubtful match is one more invalidation. Text that is not a template cdcd
        accepts is assumed to produce anything.
        """
        try:
            lits = Template.parse(text).literals
        except ValueError:
            return re.compile(".+", re.DOTALL)
        return re.compile("^" + "(.+)".join(re.escape(lit) for lit in lits) + "$", re.DOTALL)

    def match(self, key: str) -> dict[str, str] | None:
        """Reverse lookup: the column texts (unescaped) that render ``key``, or None.

        A column named twice must carry the same value in both places.
        """
        m = self.regex().match(key)
        if m is None:
            return None
        values: dict[str, str] = {}
        for col, text in zip(self.columns, m.groups(), strict=True):
            if values.setdefault(col, unescape(text)) != unescape(text):
                return None
        return values


def _compile(literals: tuple[str, ...], columns: tuple[str, ...]) -> Callable[[Mapping[str, Any]], str | None]:
    """The render function of one template: its pieces bound as closure cells, not looked up per call."""
    if len(columns) == 1:  # most templates, and the planner's hottest call
        pre, col, post = literals[0], columns[0], literals[1]

        def render1(row: Mapping[str, Any]) -> str | None:
            v = row.get(col, UNAVAILABLE)
            t = type(v)
            if t is int:
                return f"{pre}{v}{post}"
            if t is str:
                if not v:
                    return None
                if "%" in v or ":" in v or "#" in v or "{" in v or "}" in v:
                    v = v.translate(_ESCAPE)
                return f"{pre}{v}{post}"
            if v is None or v is UNAVAILABLE:
                return None
            s = render_value(v)
            if "%" in s or ":" in s or "#" in s or "{" in s or "}" in s:
                s = s.translate(_ESCAPE)
            return pre + s + post if s else None

        return render1
    first = literals[0]
    pieces = tuple(zip(columns, literals[1:], strict=True))

    def render(row: Mapping[str, Any]) -> str | None:
        out = first
        for col, lit in pieces:  # the cases above, inlined: no escape() call per column
            v = row.get(col, UNAVAILABLE)
            if type(v) is not str:
                if v is None or v is UNAVAILABLE:
                    return None
                v = render_value(v)
            if not v:
                return None
            if "%" in v or ":" in v or "#" in v or "{" in v or "}" in v:
                v = v.translate(_ESCAPE)
            out += v + lit
        return out

    return render


@functools.lru_cache(maxsize=1024)
def template(text: str) -> Template:
    """A parsed template, cached (for callers that hold template text, e.g. ``Cache.key``)."""
    return Template.parse(text)


def render(text: str, values: Mapping[str, Any]) -> str | None:
    """``render("pair:{a}:{b}", {"a": "x:y", "b": "z"})`` -> ``pair:x%3Ay:z``, as the daemon renders it."""
    return template(text).render(values)
