"""What the sync and async caches share: commands, reply parsing, the daemon's registry, entry lifetimes,
TTL jitter, XFetch, key templates. No I/O here: each cache only sends what these build and parses what
comes back, so both obey exactly the same rules.
"""

from __future__ import annotations

import inspect
import json
import math
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cdcd.fillguard import Entry, FillGuard
from cdcd.keys import Template, check_name
from cdcd.keyspace import REPLICA_UNIVERSE, SCRIPTS, Keyspace, replica_slots

from .l1 import L1Entry, sized
from .link import Command, L2Unavailable, raise_errors
from .options import EntryOptions

READ, FILL, INVALIDATE = SCRIPTS["read"], SCRIPTS["fill"], SCRIPTS["invalidate"]
BUMP, ENSURE = SCRIPTS["bump_tag"], SCRIPTS["ensure_tag"]
_FIELDS = ("v", "g", "d", "n", "t", "s")


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
MISSING: Any = object()  # internal: "no value" where None is a value


# ------------------------------------------------------------------------------------------ registry


class Registry:
    """The daemon's rules (``<prefix>#cdcd:rules``): which table a key or tag name derives from.

    An entry records the table tag of every table its key and tags derive from, so one TRUNCATE
    (one counter bump) invalidates it without any scan. A template's placeholder matches any
    non-empty text, so a name two tables could produce records both table tags (one more
    invalidation, never one fewer).
    """

    def __init__(self) -> None:
        self.patterns: list[tuple[re.Pattern[str], str]] = []
        self._memo: dict[str, tuple[str, ...]] = {}
        self.found = False  # the key held a registry when last read (False: Redis lost it, or no daemon ran)
        # hot-key replicas (docs/hot-keys.md): key patterns of replicated rules and their copies' slots, and
        # the slots whose mirror counters a tag bump must move too
        self.replicated: list[tuple[re.Pattern[str], tuple[int, ...]]] = []
        self.mirror_slots: tuple[int, ...] = ()
        self._copies: dict[str, tuple[int, ...]] = {}

    def load(self, raw: bytes | str | None) -> None:
        self.found = bool(raw)
        patterns = []
        replicated: list[tuple[re.Pattern[str], tuple[int, ...]]] = []
        mirrors: tuple[int, ...] = ()
        if raw:
            doc = json.loads(raw)
            for rel, spec in doc.get("tables", {}).items():
                tag = Keyspace.table_tag(rel)
                for t in (*spec.get("keys", []), *spec.get("tags", [])):
                    patterns.append((Template.loose_regex(t), tag))
                n = spec.get("replicas")
                if isinstance(n, int) and 1 <= n <= REPLICA_UNIVERSE:
                    slots = replica_slots(n)
                    replicated.extend((Template.loose_regex(t), slots) for t in spec.get("keys", []))
            mirrors = tuple(int(x) for x in doc.get("mirror_slots", ()))
        self.patterns = patterns
        self.replicated, self.mirror_slots = replicated, mirrors
        self._memo = {}
        self._copies = {}

    def copies(self, name: str) -> tuple[int, ...]:
        """The replica slots of key ``name`` (empty: not replicated). Memoized like :meth:`implied_by`."""
        got = self._copies.get(name)
        if got is None:
            slots: set[int] = set()
            for rx, s in self.replicated:
                if rx.match(name):
                    slots.update(s)
            got = tuple(sorted(slots))
            if len(self._copies) > 65_536:
                self._copies = {}
            self._copies[name] = got
        return got

    def implied_by(self, name: str) -> tuple[str, ...]:
        got = self._memo.get(name)
        if got is None:
            got = tuple(dict.fromkeys(tag for rx, tag in self.patterns if rx.match(name)))
            if len(self._memo) > 65_536:
                self._memo = {}
            self._memo[name] = got
        return got

    def implied(self, names: Iterable[str]) -> list[str]:
        out: list[str] = []
        for name in names:
            for tag in self.implied_by(name):
                if tag not in out:
                    out.append(tag)
        return out


def check_names(key: str, tags: Iterable[str] = ()) -> list[str]:
    """Refuse a key or tags an application passes that could address cdcd's own keys (``#``)."""
    check_name(key)
    tag_list = list(tags)
    for t in tag_list:
        check_name(t, "tag")
    return tag_list


def all_tags(key: str, tags: Iterable[str], registry: Registry) -> list[str]:
    """The caller's tags plus the table tags the key and those tags imply."""
    given = list(dict.fromkeys(tags))
    if not registry.patterns:
        return given
    return given + [t for t in registry.implied([key, *given]) if t not in given]


# ------------------------------------------------------------------------------------------ reads


def read_commands(ks: Keyspace, key: str, tags: Sequence[str], lease_ttl_ms: int | None) -> list[Command]:
    """One round trip: the entry, its remaining TTL and the current counters of ``tags``.

    With a lease (``get_or_load``, ``set``) the READ script also creates the fill token when the key
    is empty, and ENSURE_TAG creates missing counters so the snapshot recorded with the fill is
    real (taken *before* the loader runs). A plain read (``get``) needs neither: HMGET and GET.
    """
    rk = ks.entry(key)
    if lease_ttl_ms is None:
        cmds: list[Command] = [("HMGET", rk, *_FIELDS), ("PTTL", rk)]
        cmds.extend(("GET", ks.tag(t)) for t in tags)
    else:
        cmds = [("EVALSHA", READ.sha, 1, rk, lease_ttl_ms, "1"), ("PTTL", rk)]
        cmds.extend(("EVALSHA", ENSURE.sha, 1, ks.tag(t)) for t in tags)
    return cmds


def decode_str(v: Any) -> str | None:
    if v is None or v is False:
        return None
    return v.decode() if isinstance(v, bytes) else str(v)


_TABLE_TAG = Keyspace.table_tag("")  # every table tag starts so


@dataclass(slots=True)
class Found:
    """What one read found: the entry (with its fill token), its L2 life left, the current tag counters."""

    entry: Entry
    remaining: float | None  # seconds until Redis expires it; None: no expiry
    current: dict[str, str | None]
    slot: int | None = None  # a hot-key replica's copy was read (its slot); None: the primary entry
    behind: bool = False  # the copy is older than a version of the key this process has seen: a miss
    floor: int = 0  # the newest version of the key seen when this read was made (a copy's fill may claim it)

    @property
    def usable(self) -> bool:
        """A value or a cached "not found" whose recorded tag counters are all still current, and which
        recorded a table tag when the key implies any (an entry filled while Redis had lost the registry
        recorded none: a TRUNCATE could not reach it, so it is a miss)."""
        entry = self.entry
        if not (entry.hit and tags_valid(entry, self.current)) or self.behind:
            return False
        implied = False  # the key implies a table tag: the entry must carry one of those
        for t in self.current:
            if t.startswith(_TABLE_TAG):
                if t in entry.tags:
                    return True
                implied = True
        return not implied

    def missing(self) -> list[str]:
        """Tags the entry recorded whose counters this read did not fetch (a second, rare round trip)."""
        return [t for t in self.entry.tags if t not in self.current]


def parse_found(key: str, tags: Sequence[str], replies: Sequence[Any]) -> Found:
    raise_errors(replies)
    entry = FillGuard.parse(key, list(replies[0]))
    pttl = replies[1]
    remaining = pttl / 1000.0 if isinstance(pttl, int) and pttl >= 0 else None
    current = {t: decode_str(v) for t, v in zip(tags, replies[2:], strict=True)}
    return Found(entry, remaining, current)


def read_replica_commands(ks: Keyspace, key: str, slot: int, tags: Sequence[str],
                          lease_ttl_ms: int | None) -> list[Command]:
    """The copy of ``key`` in ``slot`` and its tags' mirror counters in that slot: every key in one hash slot,
    so one round trip to one master. With a lease, as :func:`read_commands` (READ, PTTL, ENSURE_TAGs); a plain
    read is HMGET and the GETs only, without PTTL: one command less per hit on the hot path (the copy's L2
    age is then unknown and an L1 copy gets its full lifetimes, docs/hot-keys.md)."""
    rk = ks.replica(key, slot)
    if lease_ttl_ms is None:
        cmds: list[Command] = [("HMGET", rk, *_FIELDS)]
        cmds.extend(("GET", ks.mirror(t, slot)) for t in tags)
    else:
        cmds = [("EVALSHA", READ.sha, 1, rk, lease_ttl_ms, "1"), ("PTTL", rk)]
        cmds.extend(("EVALSHA", ENSURE.sha, 1, ks.mirror(t, slot)) for t in tags)
    return cmds


def parse_replica(key: str, tags: Sequence[str], slot: int, replies: Sequence[Any]) -> Found:
    """The answers of :func:`read_replica_commands` (with or without the PTTL a lease read has)."""
    raise_errors(replies)
    entry = FillGuard.parse(key, list(replies[0]))
    remaining: float | None = None
    counters = replies[1:]
    if len(counters) > len(tags):  # a lease read: its PTTL first
        pttl = counters[0]
        remaining = pttl / 1000.0 if isinstance(pttl, int) and pttl >= 0 else None
        counters = counters[1:]
    current = {t: decode_str(v) for t, v in zip(tags, counters, strict=True)}
    return Found(entry, remaining, current, slot)


def tags_valid(entry: Entry, current: Mapping[str, Any]) -> bool:
    """Every tag the entry recorded still has the counter it recorded (a lost counter never matches)."""
    for t, v in entry.tags.items():
        c = current.get(t)
        if c is None:
            return False
        if (c.decode() if isinstance(c, bytes) else c) != v:
            return False
    return True


def fill_command(ks: Keyspace, entry: Entry, data: bytes, negative: bool, snap: Mapping[str, str],
                 ttl: float, slot: int | None = None, floor: int = 0) -> Command:
    """FILL through the guard; ``slot``: of that replica copy; ``floor``: the newest version of the key this
    process saw before loading (hot-key replicas), which the filled copy may then claim."""
    rk = ks.entry(entry.key) if slot is None else ks.replica(entry.key, slot)
    if floor:
        return ("EVALSHA", FILL.sha, 1, rk, entry.generation or "", max(1, int(ttl * 1000)), data,
                "1" if negative else "0", snapshot_json(snap), str(floor))
    return ("EVALSHA", FILL.sha, 1, rk, entry.generation or "", max(1, int(ttl * 1000)), data,
            "1" if negative else "0", snapshot_json(snap))


def fill_result(reply: Any) -> str | None:
    """The new generation when the fill landed, None when the guard refused it."""
    if isinstance(reply, Exception):
        raise L2Unavailable(f"Redis refused the fill: {reply}")
    if reply in (0, b"0", "0", None):
        return None
    return decode_str(reply)


def snapshot_json(snap: Mapping[str, str]) -> str:
    return json.dumps(dict(snap), separators=(",", ":"), sort_keys=True) if snap else ""


# ------------------------------------------------------------------------------------------ lifetimes

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


def make_entry(now: float, value: Any, negative: bool, opts: EntryOptions, remaining: float | None,
               tags: Sequence[str], size: int, delta: float, generation: str | None,
               rng: random.Random) -> L1Entry:
    """The L1 copy of a value with ``remaining`` seconds of L2 life left (its written TTL when just filled).

    The value keeps its age: an entry written ``a`` seconds ago is fresh for ``soft - a`` more
    seconds and served (stale) for ``remaining``, both capped by L1's own lifetime, after which L1
    re-reads L2. An entry this process never got from L2 (``remaining`` None) gets the full TTLs.
    """
    if negative:
        life = jittered(min(opts.negative_ttl, opts.l1_hard), opts.jitter, rng)
        if remaining is not None:
            life = min(life, remaining)
        soft = hard = now + life
    else:
        hard_left = jittered(opts.l1_hard, opts.jitter, rng)
        soft_left = jittered(opts.l1_soft, opts.jitter, rng)
        if remaining is not None:
            hard_left = min(hard_left, remaining)
            soft_left = min(soft_left, remaining - (opts.ttl - opts.soft))
        hard = now + hard_left
        soft = min(hard, now + soft_left)
    keep = hard + (opts.fail_safe_max_age if opts.fail_safe else 0.0)
    tag_tuple = tuple(tags)
    # ``size`` (the serialized length) only matters for values too big to walk; see cdcd.client.sizing
    e = L1Entry(value, soft, hard, keep, tag_tuple, sized(None if negative else value, tag_tuple, generation, size),
                negative, delta, generation)
    beta = opts.early_refresh_beta
    if beta > 0 and delta > 0:
        e.early = max(now, soft - XFETCH_HORIZON * delta * beta) if soft > now else soft
    return e


# ------------------------------------------------------------------------------------------ decorator


class KeyTemplate:
    """``user:{user_id}`` filled from a function's arguments by parameter name.

    Rendered by :class:`cdcd.keys.Template`, exactly as the daemon renders the row with the same
    values (escaping included); a None or empty argument means "no such key" (the daemon writes none
    either), and tags that render to nothing are left out.

    Binding arguments with ``inspect.Signature.bind`` costs microseconds; a call with exactly the
    positional parameters (the common case) is mapped with a ``zip`` instead.
    """

    def __init__(self, fn: Callable[..., Any], key: str, tags: Sequence[str]) -> None:
        self.key, self.tags = key, tuple(tags)
        self.template = Template.parse(key)
        self.tag_templates = tuple(Template.parse(t) for t in self.tags)
        self.sig = inspect.signature(fn)
        params = list(self.sig.parameters.values())
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            names = {p.name for p in params}
            for t in (self.template, *self.tag_templates):
                unknown = [c for c in t.columns if c not in names]
                if unknown:
                    raise TypeError(f"template {t.text!r} names {unknown}, which are not parameters of "
                                    f"{getattr(fn, '__qualname__', fn)!r}")
        simple = all(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)
        self._names = tuple(p.name for p in params) if simple else None

    def arguments(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        names = self._names
        if names is not None and not kwargs and len(args) == len(names):
            return dict(zip(names, args, strict=True))
        bound = self.sig.bind(*args, **kwargs)
        bound.apply_defaults()
        return dict(bound.arguments)

    def render(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str | None, list[str]]:
        """The key (None: no such key, do not cache) and the tags the call's arguments render."""
        a = self.arguments(args, kwargs)
        tags = [t for t in (tpl.render(a) for tpl in self.tag_templates) if t is not None]
        return self.template.render(a), tags
