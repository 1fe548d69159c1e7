"""The Redis key layout and the Lua scripts that guard it, shared by daemon and client.

Everything that touches a cache entry goes through one of these scripts, so the
invariants live in one place:

* an entry is one Redis hash (one key, so one hash slot: the same calls work on
  Redis Cluster) with fields ``v`` (version of the newest change applied to it),
  ``g`` (generation: changes on every mutation, never reused), ``d`` (the value,
  present iff the entry holds one), ``n`` (``1`` for a cached "not found"),
  ``t`` (JSON tag snapshot ``{tag: counter}`` the value was computed under) and
  ``s`` (who wrote it: ``cdc`` or ``app``);
* the daemon's writes only land when their version is newer than ``v``
  (re-delivery and out-of-order delivery are harmless); a refused *older*
  tombstone still moves ``g`` and drops an app-filled value, so a mis-ordered
  source costs a miss, never a stale fill (docs/versions.md);
* an application's fill only lands when ``g`` is exactly what it saw before it
  queried the database (the fill guard), and a read that finds nothing creates a
  *lease* (an entry with a fresh ``g`` and no value) so that "nothing" is never a
  token a fill can match: expiry or eviction between token and fill makes the
  fill fail instead of letting a stale value in (the ABA trap);
* a tag is a counter key, bumped in O(1); a counter that is lost restarts above
  every value it ever had (seeded from the server clock in microseconds), so an
  old snapshot can never match again.

Versions are decimal strings compared by (length, text), which is exact for any
size: Lua's doubles would silently round 64-bit LSNs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

# ---------------------------------------------------------------------------
# Lua. Each script touches KEYS[1] only (plus nothing else), so it is cluster-safe; APPLY_MANY touches
# several keys that the caller guarantees share one hash slot.

_HEAD = r"""
if redis.replicate_commands then pcall(redis.replicate_commands) end
local function newer(a, b)
  if not b then return true end
  if #a ~= #b then return #a > #b end
  return a > b
end
"""

_PRELUDE = _HEAD + r"""local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function nextgen(old)
  local n = now_us()
  local o = tonumber(old or '0') or 0
  if o >= n then n = o + 1 end
  return string.format('%.0f', n)
end
"""

# Daemon apply: one body (``_APPLY_BODY``) run inline by APPLY and as a function per entry by APPLY_MANY.
# Per entry: key, version, kind ('v' value | 't' tombstone | 'f' fence), ttl_ms, data, tagsnap.
# Returns 1 when applied, 0 when the entry already holds this version or a newer one, 2 when a tombstone
# older than the entry was refused but still fenced (new generation; an app-filled value dropped), 3 for
# a fence. A fence is a tombstone whose version is only a lower bound of its place in commit order
# (docs/versions.md): it always drops the value and moves the generation, and keeps the newer of the two
# versions, so it never lets an older value in nor claims to be newer than it is.
#
# What it leaves is exactly what a DEL + HSET + PEXPIRE of the new fields would leave in the fields readers
# read (v g d n t, plus s), without the DEL: the fields the new state must not have are deleted only when
# the entry can hold them (``n``/``t`` are read with ``v g s``; a tombstone deletes ``d n t``). That and one
# TIME per script call (not per entry) are what make it cheaper than the first version (BENCHMARKS.md).
# An error reply for the entry's key (WRONGTYPE: not a hash) is returned, not raised, so that in a
# many-entry call it is the answer for that entry alone and the others still apply. The generation is
# the Redis clock in microseconds (``cdcd inspect`` reads it as the time of the write), built from TIME's
# two fields as text: formatting a double with %.0f costs more than the rest of the arithmetic.
_APPLY_GEN = r"""
local now_s, now_n
local function gen(old)
  if not now_s then
    local t = redis.call('TIME')
    now_s = t[1] .. string.sub('00000' .. t[2], -6)
    now_n = tonumber(t[1]) * 1000000 + tonumber(t[2])
  end
  local o = tonumber(old or '0') or 0
  if o >= now_n then return string.format('%.0f', o + 1) end
  return now_s
end
"""
# The entry's work, on the locals key, ver, kind, ttl, data, snap; it ends in ``return <answer>``.
_APPLY_BODY = r"""
  local cur = redis.pcall('HMGET', key, 'v', 'g', 's', 'n', 't')
  if cur.err then return cur end
  local v = cur[1]
  if v and not newer(ver, v) then
    if kind == 'v' or ver == v then return 0 end
    if kind == 't' and cur[3] ~= 'app' then
      redis.call('HSET', key, 'g', gen(cur[2]))
      return 2
    end
    redis.call('HDEL', key, 'd', 'n', 't')
    redis.call('HSET', key, 'v', v, 'g', gen(cur[2]), 's', 'cdc')
    redis.call('PEXPIRE', key, ttl)
    if kind == 'f' then return 3 end
    return 2
  end
  local g = gen(cur[2])
  if kind == 'v' then
    if snap == '' then
      if cur[4] or cur[5] then redis.call('HDEL', key, 'n', 't') end
      redis.call('HSET', key, 'v', ver, 'g', g, 's', 'cdc', 'd', data)
    else
      if cur[4] then redis.call('HDEL', key, 'n') end
      redis.call('HSET', key, 'v', ver, 'g', g, 's', 'cdc', 'd', data, 't', snap)
    end
  else
    redis.call('HDEL', key, 'd', 'n', 't')
    redis.call('HSET', key, 'v', ver, 'g', g, 's', 'cdc')
  end
  redis.call('PEXPIRE', key, ttl)
  if kind == 'f' then return 3 end
  return 1
"""

# One entry: KEYS[1], ARGV = version, kind, ttl_ms, data, tagsnap. Returns the entry's answer (an integer,
# or the key's error reply). The body runs inline, not as a function: a closure per call costs.
APPLY = _HEAD + _APPLY_GEN + r"""
local key, ver, kind, ttl, data, snap = KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
""" + _APPLY_BODY

# Many entries in one call: KEYS[1..n] and five ARGV per entry, in the same order. Every key must be in
# the same hash slot (the sink groups by slot), so the call is as cluster-safe as a one-key call. Returns
# the list of answers, one per key: an integer, or that key's error reply (WRONGTYPE) as an element.
APPLY_MANY = _HEAD + _APPLY_GEN + r"""
local function apply(key, ver, kind, ttl, data, snap)
""" + _APPLY_BODY + r"""end
local out = {}
for i = 1, #KEYS do
  local j = i * 5 - 4
  out[i] = apply(KEYS[i], ARGV[j], ARGV[j + 1], ARGV[j + 2], ARGV[j + 3], ARGV[j + 4])
end
return out
"""

# Client read + fill token in one round trip. ARGV: lease_ttl_ms, want_lease ('1'|'0').
# Returns {v, g, d, n, t, s}; d/n/t/s are false when absent (s, the writer, tells a client how d is
# encoded: JSON from the daemon, the client's own format from an app). When the key holds nothing and
# a lease is wanted, a lease entry (no value, fresh g) is created first: its g is the token.
READ = _PRELUDE + r"""
local r = redis.call('HMGET', KEYS[1], 'v', 'g', 'd', 'n', 't', 's')
if r[2] or ARGV[2] ~= '1' then return r end
local g = nextgen(nil)
redis.call('HSET', KEYS[1], 'v', '0', 'g', g, 's', 'lease')
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return {'0', g, false, false, false, 'lease'}
"""

# Client fill through the guard. ARGV: token_g, ttl_ms, data, neg ('1'|'0'), tagsnap[, version floor].
# The floor (hot-key replicas, docs/hot-keys.md) is the newest version of the key the filling process had
# seen before its loader ran: the loaded value is at least that new, so the copy may claim it (a daemon
# write at or below it is then refused as not newer, which is right: the value already reflects it).
# Returns the new generation when written, 0 when a newer change (or expiry) intervened.
FILL = _PRELUDE + r"""
local cur = redis.call('HMGET', KEYS[1], 'g', 'v')
if cur[1] ~= ARGV[1] then return 0 end
local g = nextgen(cur[1])
local v = cur[2] or '0'
if ARGV[6] and ARGV[6] ~= '' and newer(ARGV[6], v) then v = ARGV[6] end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'v', v, 'g', g, 's', 'app')
if ARGV[4] == '1' then
  redis.call('HSET', KEYS[1], 'n', '1')
else
  redis.call('HSET', KEYS[1], 'd', ARGV[3])
end
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 't', ARGV[5]) end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return g
"""

# Application-side invalidation: drop the value, keep the version, new generation
# (so fills in flight fail). ARGV: tombstone_ttl_ms. Returns 1.
INVALIDATE = _PRELUDE + r"""
local cur = redis.call('HMGET', KEYS[1], 'v', 'g')
local g = nextgen(cur[2])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'v', cur[1] or '0', 'g', g, 's', 'app')
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""

# Tag bump: strictly greater than any value the counter ever had. Returns the new value.
BUMP_TAG = _PRELUDE + r"""
local cur = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
local n = now_us()
if cur >= n then n = cur + 1 end
local s = string.format('%.0f', n)
redis.call('SET', KEYS[1], s)
return s
"""

# Read a tag counter, creating it when missing (so a snapshot always records a real value).
ENSURE_TAG = _PRELUDE + r"""
local cur = redis.call('GET', KEYS[1])
if cur then return cur end
local s = string.format('%.0f', now_us())
redis.call('SET', KEYS[1], s)
return s
"""

# Table floor: KEYS[1] is the floors hash, ARGV: relation, version. The floor only moves up
# (a replayed older truncate is a no-op). Returns the floor now in force. The floors hash is read by
# the daemon (once at start and after a Redis restart), never from inside the apply script: an apply
# call touches only its entry key, so it stays single-slot on Redis Cluster.
RAISE_FLOOR = _PRELUDE + r"""
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur and not newer(ARGV[2], cur) then return cur end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return ARGV[2]
"""


# ---------------------------------------------------------------------------
# Existence filters (docs/existence-filter.md). One filter is three keys sharing a hash tag (so one slot):
# KEYS[1] the meta hash, KEYS[2] and KEYS[3] the two bitmap strings (generation slots '0' and '1'). Meta
# fields: a (the active slot; absent: not seeded, every check answers "maybe"), ap (its parameters:
# "<m>:<k>:<key template>", so a filter is only ever used for the keys and size it was built for), v (the
# version it is current to), gen (switches so far), bits (bits set when it was built), built (when); b, bp,
# bid (the slot being built, its parameters, the build's id) while a build runs. A bitmap is allocated
# whole when a build begins, so a missing bitmap (evicted, flushed) is told apart from an empty one:
# every script then answers "maybe" or stops using it, never "absent".

_SETBITS = r"""
-- set the k bits of each (h1, h2) pair of ARGV[from..] (cdcd.bloom.positions: a running sum mod m), with
-- BITFIELD SET u1 in batches: one call per ~1000 bits instead of one SETBIT each
local function setbits(key, from, m, k)
  local ops, n = {}, 0
  for i = from, #ARGV, 2 do
    local p, step = tonumber(ARGV[i]), tonumber(ARGV[i + 1])
    for _ = 1, k do
      ops[n + 1] = 'SET'
      ops[n + 2] = 'u1'
      ops[n + 3] = p
      ops[n + 4] = 1
      n = n + 4
      p = p + step
      if p >= m then p = p - m end
    end
    if n >= 4000 then
      redis.call('BITFIELD', key, unpack(ops, 1, n))
      n = 0
    end
  end
  if n > 0 then redis.call('BITFIELD', key, unpack(ops, 1, n)) end
end
"""

# Daemon, in the batch's pipeline before the applied position and the backplane: set the bits of the
# batch's new keys in the active filter and in the one being built. ARGV: version, parameters, m, k, then
# cdcd.bloom.hash_pair's two numbers per key.
# Bits are set only where the parameters match; an active filter of other parameters (the rules changed)
# is unseeded on the spot (it could no longer be kept current) and the daemon rebuilds it.
EXISTS_ADD = _HEAD + _SETBITS + r"""
local st = redis.call('HMGET', KEYS[1], 'a', 'ap', 'b', 'bp', 'v')
local m, k = tonumber(ARGV[3]), tonumber(ARGV[4])
local n = 0
if st[1] then
  if st[2] == ARGV[2] and redis.call('EXISTS', KEYS[2 + tonumber(st[1])]) == 1 then
    setbits(KEYS[2 + tonumber(st[1])], 5, m, k)
    n = n + 1
    if newer(ARGV[1], st[5]) then redis.call('HSET', KEYS[1], 'v', ARGV[1]) end
  else
    redis.call('HDEL', KEYS[1], 'a', 'ap')
  end
end
if st[3] and st[4] == ARGV[2] and redis.call('EXISTS', KEYS[2 + tonumber(st[3])]) == 1 then
  setbits(KEYS[2 + tonumber(st[3])], 5, m, k)
  n = n + 1
end
return n
"""

# Daemon, in the batch's pipeline: the batch lost track of inserts (a degraded transaction, a schema break,
# a lost slot): unseed the filter and cancel any build (its snapshot may predate them). Returns 1.
EXISTS_DROP = r"""
redis.call('HDEL', KEYS[1], 'a', 'ap', 'b', 'bp', 'bid')
return 1
"""

# Client: ARGV parameters, positions... 1 = maybe present, 0 = definitely absent, or the active filter's
# parameters when they are not the caller's (it asks again with those). Reads meta and bits in one atomic
# call, so a switch of generation can never be seen half-way.
EXISTS_CHECK = r"""
local st = redis.call('HMGET', KEYS[1], 'a', 'ap')
if not st[1] then return 1 end
if st[2] ~= ARGV[1] then return {st[2]} end
local key = KEYS[2 + tonumber(st[1])]
if redis.call('EXISTS', key) == 0 then return 1 end
for i = 2, #ARGV do
  if redis.call('GETBIT', key, ARGV[i]) == 0 then return 0 end
end
return 1
"""

# Builder: start a generation in the slot that is not active. ARGV: build id, m, parameters. The bitmap is
# created whole (SETBIT m-1 0) and marked as being built: from this call on, EXISTS_ADD sets new keys in it
# too. Returns the slot.
EXISTS_BEGIN = r"""
local a = redis.call('HGET', KEYS[1], 'a')
local slot = '0'
if a == '0' then slot = '1' end
local key = KEYS[2 + tonumber(slot)]
redis.call('DEL', key)
redis.call('SETBIT', key, tonumber(ARGV[2]) - 1, 0)
redis.call('HSET', KEYS[1], 'b', slot, 'bp', ARGV[3], 'bid', ARGV[1])
return slot
"""

# Builder: set a page of snapshot keys' bits in the generation being built. ARGV: build id, m, k, then
# cdcd.bloom.hash_pair's two numbers per key.
# Returns 0 when the build is no longer current (cancelled, replaced, or its bitmap lost): stop building.
EXISTS_FILL = _SETBITS + r"""
local st = redis.call('HMGET', KEYS[1], 'bid', 'b')
if st[1] ~= ARGV[1] then return 0 end
local key = KEYS[2 + tonumber(st[2])]
if redis.call('EXISTS', key) == 0 then return 0 end
setbits(key, 4, tonumber(ARGV[2]), tonumber(ARGV[3]))
return 1
"""

# Builder: the snapshot is in; make the built generation the active one, atomically, and free the old
# one. ARGV: build id, snapshot version, time. Returns the bits set, or -1 when the build is not current.
EXISTS_SWITCH = _HEAD + r"""
local st = redis.call('HMGET', KEYS[1], 'bid', 'b', 'bp', 'a', 'v', 'gen')
if st[1] ~= ARGV[1] then return -1 end
local key = KEYS[2 + tonumber(st[2])]
if redis.call('EXISTS', key) == 0 then return -1 end
if st[4] and st[4] ~= st[2] then redis.call('DEL', KEYS[2 + tonumber(st[4])]) end
local v = ARGV[2]
if st[5] and not newer(v, st[5]) then v = st[5] end
local bits = redis.call('BITCOUNT', key)
redis.call('HDEL', KEYS[1], 'b', 'bp', 'bid')
redis.call('HSET', KEYS[1], 'a', st[2], 'ap', st[3], 'v', v, 'gen', tonumber(st[6] or '0') + 1, 'bits', bits,
           'built', ARGV[3])
return bits
"""


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    source: str
    sha: str = field(init=False, compare=False)  # computed once: the sink sends it with every call

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())


SCRIPTS: dict[str, Script] = {
    s.name: s
    for s in (
        Script("apply", APPLY),
        Script("apply_many", APPLY_MANY),
        Script("read", READ),
        Script("fill", FILL),
        Script("invalidate", INVALIDATE),
        Script("bump_tag", BUMP_TAG),
        Script("ensure_tag", ENSURE_TAG),
        Script("raise_floor", RAISE_FLOOR),
        Script("exists_add", EXISTS_ADD),
        Script("exists_drop", EXISTS_DROP),
        Script("exists_check", EXISTS_CHECK),
        Script("exists_begin", EXISTS_BEGIN),
        Script("exists_fill", EXISTS_FILL),
        Script("exists_switch", EXISTS_SWITCH),
    )
}

# ---------------------------------------------------------------------------
# Hot-key replicas (docs/hot-keys.md). A replicated key keeps its primary entry where it always was and has
# N more copies at fixed hash slots, the same for every key: copy i of N sits in slot
# REPLICA_SLOTS[(2i + 1) * 8 // N], so the N copies are spread evenly over 0..16383 (on an evenly split
# cluster of N masters, one per master). The slots are fixed, not derived from the key, so each tag has one
# *mirror* counter per slot, next to the copies that record it: a replica read is one script call on one shard.

REPLICA_UNIVERSE = 16  # the most copies a key may have; the fixed slots are this many, evenly spaced
REPLICA_SLOTS = tuple((2 * j + 1) * 16384 // (2 * REPLICA_UNIVERSE) for j in range(REPLICA_UNIVERSE))

_SLOT_TAGS: list[str] = []


def slot_tag(slot: int) -> str:
    """A short hash tag whose slot is ``slot``: ``{<it>}`` places a key on that slot (the table is built once,
    on first use, by trying decimal strings; ~0.2 s)."""
    if not _SLOT_TAGS:
        from binascii import crc_hqx

        table: list[str | None] = [None] * 16384
        missing, n = 16384, 0
        while missing:
            s = str(n)
            i = crc_hqx(s.encode(), 0) & 16383
            if table[i] is None:
                table[i] = s
                missing -= 1
            n += 1
        _SLOT_TAGS.extend(t for t in table if t is not None)
    return _SLOT_TAGS[slot]


def replica_slots(n: int) -> tuple[int, ...]:
    """The hash slots of the ``n`` copies of a key replicated ``n`` times (1 <= n <= REPLICA_UNIVERSE)."""
    if not 1 <= n <= REPLICA_UNIVERSE:
        raise ValueError(f"replicas must be between 1 and {REPLICA_UNIVERSE}, not {n}")
    return tuple(REPLICA_SLOTS[(2 * i + 1) * REPLICA_UNIVERSE // (2 * n)] for i in range(n))


@dataclass(frozen=True, slots=True)
class Keyspace:
    """Names of everything cdcd keeps in Redis, under one version prefix (``v3:``).

    Bumping the prefix in the rules moves the whole cache to a fresh keyspace,
    which is how a schema change that alters cached shapes is rolled out.

    cdcd's own keys live under ``<prefix>#``: rendered keys and tags escape ``#``
    (:mod:`cdcd.keys`) and names applications pass directly may not contain it,
    so no row value and no caller can name them.
    """

    prefix: str = ""
    channel_name: str | None = None

    def entry(self, key: str) -> str:
        return self.prefix + key

    def tag(self, tag: str) -> str:
        return f"{self.prefix}#tag:{tag}"

    def system(self, name: str) -> str:
        """An internal key: ``<prefix>#cdcd:<name>``."""
        return f"{self.prefix}#cdcd:{name}"

    def is_system(self, key: str) -> bool:
        """Whether a full Redis key is one of cdcd's own (tag counters included), not an entry."""
        return key.startswith(self.prefix + "#")

    def replica(self, key: str, slot: int) -> str:
        """The copy of entry ``key`` in hash slot ``slot`` (hot-key replicas). Under ``<prefix>#``: no row and
        no caller can name it."""
        return f"{self.prefix}#re:{{{slot_tag(slot)}}}:{key}"

    def mirror(self, tag: str, slot: int) -> str:
        """The mirror of tag counter ``tag`` in hash slot ``slot``: bumped with the tag, read with the copies
        in that slot."""
        return f"{self.prefix}#mt:{{{slot_tag(slot)}}}:{tag}"

    def counter(self, tag: str, slot: int | None) -> str:
        """The counter of ``tag`` a copy in ``slot`` records (None: the primary entry, the tag's own key)."""
        return self.tag(tag) if slot is None else self.mirror(tag, slot)

    @staticmethod
    def table_tag(relation: str) -> str:
        """The tag every entry derived from a table implicitly carries; a TRUNCATE bumps it."""
        return f"#table:{relation}"

    @staticmethod
    def is_table_tag(tag: str) -> bool:
        return tag.startswith("#table:")

    @property
    def channel(self) -> str:
        return self.channel_name or self.system("bp")

    @property
    def applied(self) -> str:
        """Hash with the daemon's last applied version/seq/run, for the inspector and status."""
        return self.system("applied")

    @property
    def registry(self) -> str:
        """JSON of the rules' key and tag templates per table, so clients can derive table tags."""
        return self.system("rules")

    @property
    def floors(self) -> str:
        """Hash relation -> version of its newest TRUNCATE (or degraded transaction): older values are refused."""
        return self.system("floors")

    @property
    def dead_letters(self) -> str:
        return self.system("dlq")

    def exists_filter(self, relation: str) -> tuple[str, str, str]:
        """The existence filter of a table (``users`` is ``public.users``): its meta hash and its two bitmaps
        (generation slots 0 and 1), under one hash tag so every script on them is single-slot."""
        rel = relation if "." in relation else f"public.{relation}"
        base = self.system(f"xf:{{{rel}}}:")
        return base + "meta", base + "b0", base + "b1"


def run_script(client: object, script: Script, keys: list[str], args: list[object]) -> object:
    """EVALSHA, loading the script on NOSCRIPT (after a Redis restart or failover)."""
    from redis.exceptions import NoScriptError

    execute = client.execute_command  # type: ignore[attr-defined]
    try:
        return execute("EVALSHA", script.sha, len(keys), *keys, *args)
    except NoScriptError:
        execute("SCRIPT", "LOAD", script.source)
        return execute("EVALSHA", script.sha, len(keys), *keys, *args)
