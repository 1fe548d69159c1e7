"""Applying planned batches to Redis: versioned compare-and-set, tag bumps, backplane.

One batch is one pipeline (one round trip): an ``EVALSHA apply`` per entry (or one ``EVALSHA
apply_many`` for up to 64 entries whose keys share a hash slot), an ``EVALSHA bump_tag`` per tag,
the daemon's applied position, then the backplane message(s), then ``EXISTS`` of the registry
(the run marker: when Redis restarted empty, whoever reloaded the scripts first, the daemon notices
it here and restores the registry and table counters). Redis executes a connection's commands in
order, so subscribers hear of a change only after Redis holds it. A failed attempt is simply repeated:
writes are versioned (a repeat is refused as not newer), tag bumps and messages
are safe to repeat (one more invalidation, never one fewer).

Connection-level failures of any layer leave as :class:`~cdcd.redisfaults.RedisFault` (retried).
An error reply about one key that retrying cannot fix (``WRONGTYPE``, a script error) is not a
failure of the batch: the key is repaired, the refusal reported in :class:`ApplyResult` (the daemon
dead-letters it) and the rest of the batch stands.

Each script call touches one key, or several keys of one hash slot (computed here exactly as Redis
Cluster does, hash tags included), so the same calls work on Redis Cluster. Keys group when they carry a
hash tag (``{t7}:user:42``: see docs/apply.md); each entry still gets its own answer, so counts, refusals
and repairs are per entry whatever the grouping. On Redis Cluster a batch leaves in two steps, writes on
every master first, then the applied position and the backplane (:meth:`RedisSink._apply_cluster`,
docs/redis-cluster.md).

Table floors (TRUNCATE ordering): a value write of a table whose version is at or
below the table's floor (the version of its newest truncate or degraded
transaction) is sent as a tombstone instead. The sink knows the floors: it reads
the floors hash at start and after a Redis restart, and raises them itself, in
the same pipeline as the truncate's tag bump. The check costs one dict lookup per
value and nothing in Lua (see docs/huge-transactions-and-truncates.md).
"""

from __future__ import annotations

import json
import time
from binascii import crc_hqx
from dataclasses import dataclass, field
from typing import Any

import redis
import structlog
from redis.cluster import RedisCluster
from redis.exceptions import NoScriptError, ResponseError

from cdcd.backplane import Sequencer
from cdcd.change import Rejected
from cdcd.keyspace import SCRIPTS, Keyspace
from cdcd.keyspace import slot_tag as slot_tag  # re-exported: it lived here
from cdcd.lazycluster import LazyRedisCluster
from cdcd.redisfaults import REDIS_FAULTS, refusal_reason, translate
from cdcd.rules import Batch, Rules
from cdcd.sinks.epochs import TableEpochs
from cdcd.sinks.exists import ExistsWrites, pack_ints

log = structlog.get_logger("cdcd.sinks.redis")

_APPLY = SCRIPTS["apply"]
_MANY = SCRIPTS["apply_many"]
_BUMP = SCRIPTS["bump_tag"]
_ENSURE = SCRIPTS["ensure_tag"]
_FLOOR = SCRIPTS["raise_floor"]
# EVALSHA <apply sha> 1: the fixed head of every entry write, packed once
_APPLY_HEAD = b"*9\r\n$7\r\nEVALSHA\r\n$40\r\n" + _APPLY.sha.encode() + b"\r\n$1\r\n1\r\n"
_BUMP_HEAD = b"*4\r\n$7\r\nEVALSHA\r\n$40\r\n" + _BUMP.sha.encode() + b"\r\n$1\r\n1\r\n"
_MANY_HEAD = b"$7\r\nEVALSHA\r\n$40\r\n" + _MANY.sha.encode() + b"\r\n"
_CHUNK = 1024  # entry writes per socket write: Redis works on one chunk while the next is packed
GROUP_MAX = 64  # entries per apply_many call: ~0.4 ms of Redis time at most, and most of the gain (BENCHMARKS.md)
DLQ_MAXLEN = 100_000
DLQ_RAW_MAX = 65_536


@dataclass(frozen=True, slots=True)
class Refusal:
    """A write Redis refused for a reason retrying cannot fix; the key has been made safe."""

    key: str  # the Redis key (entry or tag counter)
    kind: str  # "entry" | "tag"
    reason: str  # metric label: wrongtype | script_error
    error: str
    version: int


@dataclass(slots=True)
class ApplyResult:
    applied: int
    refused: int
    tombstones: int
    values: int
    tags: int
    messages: int
    rtt: float
    floored: int = 0  # values sent as tombstones because their table was truncated at a newer version
    refusals: list[Refusal] = field(default_factory=list)
    restored: bool = False  # the run marker was gone: registry and table counters were restored
    fenced: int = 0  # tombstones older than the entry, refused but still fencing fills (APPLY returned 2)
    fences: int = 0  # fence writes applied (APPLY returned 3; docs/versions.md)


def key_slot(key: bytes) -> int:
    """Redis Cluster's hash slot of ``key``: CRC16 of its hash tag (the text between the first ``{`` and the
    first ``}`` after it, when not empty) or else of the whole key, mod 16384."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1:end]
    return crc_hqx(key, 0) & 16383


class _Redirected(Exception):
    """A write answered MOVED/ASK/TRYAGAIN/CLUSTERDOWN on the sink's own cluster connections."""


_REDIRECTS = (redis.exceptions.AskError, redis.exceptions.TryAgainError, redis.exceptions.ClusterDownError)
_REDIRECT_CODES = ("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN")
_DIRECT_FALLBACK: tuple[type[BaseException], ...] = (_Redirected, *REDIS_FAULTS)


def tag_groups(keys: list[bytes]) -> list[list[int]] | None:
    """Entry indexes of keys with the same hash tag (the same slot, by :func:`key_slot`'s rule, without
    computing it), in batch order, for tags more than one key carries; ``None`` when there is none.

    Keys without a tag share a slot only by chance (grouping them would save ~11% of the calls for 4 000
    random keys, mostly pairs), and so do different tags: finding those costs a CRC per key in the daemon,
    which measured more than the calls it saves in Redis. So the common case (no hash tags) costs one
    scan of the joined keys for ``{``.
    """
    if b"{" not in b"".join(keys):
        return None
    by_tag: dict[bytes, list[int]] = {}
    for i, k in enumerate(keys):
        _, brace, rest = k.partition(b"{")
        if brace:
            tag, close, _ = rest.partition(b"}")
            if close and tag:
                group = by_tag.get(tag)
                if group is None:
                    by_tag[tag] = [i]
                else:
                    group.append(i)
    return [g for g in by_tag.values() if len(g) > 1] or None


@dataclass(frozen=True, slots=True)
class Layout:
    """How a batch's entry writes became script calls when some keys share a hash slot: first one ``apply``
    per entry that is alone in its slot, in batch order, then one ``apply_many`` per group (entry indexes;
    the entries of one slot in batch order, at most :data:`GROUP_MAX` per call)."""

    entries: int
    groups: list[list[int]]

    @property
    def calls(self) -> int:
        return self.entries - sum(map(len, self.groups)) + len(self.groups)

    def replies(self, results: list[Any]) -> list[Any]:
        """One reply per entry, in call order (see :meth:`order`). An ``apply_many`` call answers with a
        list (an entry's own error reply is an element of it); when the call as a whole failed (NOSCRIPT,
        OOM...) its error is the answer of each of its entries."""
        singles = self.calls - len(self.groups)
        out = results[:singles]
        for group, r in zip(self.groups, results[singles:self.calls], strict=True):
            if isinstance(r, list) and len(r) == len(group):
                out.extend(r)
            else:
                out.extend([r if isinstance(r, Exception) else ResponseError(f"apply_many answered {r!r}")]
                           * len(group))
        return out

    def order(self) -> list[int]:
        """The entry index of each reply of :meth:`replies`."""
        grouped = {i for g in self.groups for i in g}
        return [i for i in range(self.entries) if i not in grouped] + [i for g in self.groups for i in g]


def layout(keys: list[bytes], limit: int = GROUP_MAX) -> Layout | None:
    """The calls for these keys (see :class:`Layout`); ``None``: one ``apply`` per entry, in batch order."""
    groups = tag_groups(keys)
    if groups is None:
        return None
    return Layout(len(keys), [g[j:j + limit] for g in groups for j in range(0, len(g), limit)])


def connect(url: str, socket_timeout: float = 5.0, connect_timeout: float = 2.0) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=socket_timeout, socket_connect_timeout=connect_timeout,
                                health_check_interval=30)


def sink_options(settings: Any) -> dict[str, Any]:
    """The sink's keyword arguments that come from a target's Redis settings (pub/sub kind, replica wait),
    so the single-target daemon and every target of ``targets:`` build their sinks alike."""
    return {"pubsub": settings.pubsub, "wait_replicas": settings.wait_replicas,
            "wait_timeout_ms": max(1, int(min(1.0, settings.socket_timeout / 2) * 1000))}


class RedisSink:
    def __init__(self, client: redis.Redis | RedisCluster | LazyRedisCluster, rules: Rules, sequencer: Sequencer,
                 source_name: str = "",
                 pubsub: str = "sharded", wait_replicas: int = 0, wait_timeout_ms: int = 1000) -> None:
        self.client: Any = client
        # On Redis Cluster the batch goes through redis-py's ClusterPipeline (one connection per node, MOVED
        # and ASK followed) in two steps: writes first, then the applied position and the backplane, so no
        # subscriber hears of a change before every node acknowledged it (docs/redis-cluster.md).
        self.cluster = isinstance(client, (RedisCluster, LazyRedisCluster))
        self.publish_verb = "SPUBLISH" if self.cluster and pubsub == "sharded" else "PUBLISH"
        # WAIT for this many replicas on every master a batch wrote to, before acknowledging it: an
        # acknowledged write a master had not yet replicated is lost when it fails over.
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self.cluster_direct = True  # False: the first step through redis-py's ClusterPipeline too
        self._node_conns: dict[str, Any] = {}  # master name -> the sink's own connection (cluster_direct)
        self.rules = rules
        self.ks = rules.keyspace
        self.sequencer = sequencer
        self.source_name = source_name
        self.packed = True  # raw RESP on a connection of its own; False: a redis-py pipeline (any client)
        self._conn: Any = None
        # table tag -> floor version: values at or below it are refused (sent as tombstones)
        self.floors: dict[str, int] = {}
        self.epochs = TableEpochs()  # table tag -> counter: runtime state, read from and moved in Redis
        self._tag_relation = {r.table_tag: rel for rel, r in rules.by_relation.items()}
        self.exists = ExistsWrites(client, self.ks, rules.exists)  # existence filters (docs/existence-filter.md)

    def load_scripts(self) -> None:
        for script in SCRIPTS.values():
            self.client.script_load(script.source)

    def prepare(self) -> None:
        """Scripts, table epochs and the client registry; raises RedisError while Redis is down."""
        try:
            self._prepare()
        except REDIS_FAULTS as exc:
            raise translate(exc) from exc

    def _prepare(self) -> None:
        self.load_scripts()
        pipe: Any = self.client.pipeline(transaction=False)
        counters = [(rule.table_tag, slot) for rule in self.rules.by_relation.values()
                    for slot in (None, *self.rules.mirror_slots)]
        for tag, slot in counters:
            pipe.execute_command("EVALSHA", _ENSURE.sha, 1, self.ks.counter(tag, slot))
        self._registry(pipe)
        pipe.hgetall(self.ks.floors)
        res = pipe.execute()
        for (tag, slot), epoch in zip(counters, res, strict=False):
            self.epochs.set(tag, epoch, slot)
        for rel, version in res[-1].items():
            self._note_floor(rel.decode() if isinstance(rel, bytes) else str(rel), int(version))

    def _note_floor(self, relation: str, version: int) -> None:
        tag = Keyspace.table_tag(relation)
        if version > self.floors.get(tag, -1):
            self.floors[tag] = version

    def _registry(self, pipe: Any) -> None:
        pipe.set(self.ks.registry, json.dumps(self.rules.registry(), separators=(",", ":")))

    def restore(self) -> None:
        """After Redis lost its memory (restart, failover, flush): scripts, registry and table epochs back.

        Epochs are restored to the values this daemon knows (SET NX), not renewed, so values it writes
        keep matching; entries that recorded them were lost with the rest of Redis.
        """
        self.load_scripts()
        pipe: Any = self.client.pipeline(transaction=False)
        self._registry(pipe)
        for (tag, slot), epoch in self.epochs.items():
            pipe.set(self.ks.counter(tag, slot), epoch, nx=True)
        for tag, floor in self.floors.items():
            rel = self._tag_relation.get(tag)
            if rel is not None:
                pipe.execute_command("EVALSHA", _FLOOR.sha, 1, self.ks.floors, rel, str(floor))
        pipe.execute()

    def heartbeat(self, message: bytes) -> bool:
        """Publish an idle heartbeat and check the run marker; True when Redis had lost it (and it was
        restored). Raises RedisFault/RedisError when Redis cannot be reached."""
        try:
            pipe: Any = self.client.pipeline(transaction=False)
            pipe.execute_command(self.publish_verb, self.ks.channel, message)
            pipe.exists(self.ks.registry)
            if pipe.execute()[1]:
                return False
            self.restore()
            return True
        except REDIS_FAULTS as exc:
            raise translate(exc) from exc

    def applied_state(self) -> dict[str, str]:
        raw: dict[bytes, bytes] = self.client.hgetall(self.ks.applied)
        return {k.decode(): v.decode() for k, v in raw.items()}

    def apply(self, batch: Batch) -> ApplyResult:
        """One attempt; raises redis.RedisError when it did not fully succeed (the caller retries)."""
        try:
            try:
                return self._apply(batch)
            except NoScriptError:
                self.restore()  # Redis restarted or failed over: scripts (and likely data) are gone
                result = self._apply(batch)
                result.restored = True
                return result
        except REDIS_FAULTS as exc:
            raise translate(exc) from exc

    def begin(self, batch: Batch) -> PendingApply:
        """Send the batch and return at once; ``wait()`` on the result reads Redis's answers.

        For a loop that overlaps work with Redis executing the previous batch: the batch counts as
        applied (and may be acknowledged) only once ``wait()`` returned. If ``wait()`` raises, the batch
        must be applied again with :meth:`apply` (writes are versioned, so a repeat is harmless).
        """
        if self.packed and isinstance(self.client, redis.Redis):
            return self._send_packed(batch)
        return PendingApply(self, batch, None, [], 0, 0, 0, 0.0, done=self._apply_pipeline(batch))

    def drop_connection(self) -> None:
        """Close the sink's own connection (it reconnects on the next batch): after a failure in the middle of
        batches sent back to back, replies of later ones may still be on it."""
        if self._conn is not None:
            self._conn.disconnect()

    def _apply(self, batch: Batch) -> ApplyResult:
        if self.packed and isinstance(self.client, redis.Redis):
            return self._send_packed(batch).wait()
        return self._apply_pipeline(batch)

    def counters(self, tags: list[str]) -> list[tuple[str, int | None]]:
        """The counters a bump of ``tags`` moves: each tag's own, and its mirror in every replica slot of the
        rules (hot-key replicas: a copy records the mirror of its slot, docs/hot-keys.md)."""
        mirrors = self.rules.mirror_slots
        if not mirrors:
            return [(t, None) for t in tags]
        return [(t, slot) for t in tags for slot in (None, *mirrors)]

    def _tail(self, batch: Batch, snaps: dict[tuple[str, int | None], bytes],
              packed_bumps: bool = False) -> tuple[list[tuple[Any, ...]], list[tuple[str, int | None]], int, int]:
        """The commands after the entry writes: epoch restores, tag bumps (unless the caller packs them
        itself, right after the restores), applied position, backplane.

        Returns (commands, counters bumped, restored, messages).
        """
        ks = self.ks
        cmds: list[tuple[Any, ...]] = []
        # The counters those values record must exist (they would read as moved otherwise); only this
        # daemon writes table tags, so restoring its known value when missing is exact.
        restored = 0
        for tag, slot in snaps:
            epoch = self.epochs.get(tag, slot)
            if epoch is not None:
                cmds.append(("SET", ks.counter(tag, slot), epoch, "NX"))
                restored += 1
        tags = list(batch.tags)
        counters = self.counters(tags)
        if not packed_bumps:
            for tag, slot in counters:
                cmds.append(("EVALSHA", _BUMP.sha, 1, ks.counter(tag, slot)))
        if (batch.exists or batch.exists_reset) and not packed_bumps:
            # new keys' bits: before the applied position and the backplane, so a read that waited for the
            # watermark finds them (docs/existence-filter.md); the packed path packs them itself, after the bumps
            cmds.extend(self.exists.batch_commands(batch))
        for rel, floor in batch.floors.items():
            cmds.append(("EVALSHA", _FLOOR.sha, 1, ks.floors, rel, str(floor)))
        version = str(batch.version)
        keys: Any = batch.writes.keys()
        if self.rules.mirror_slots:  # a copy's change is announced by its primary's (L1 knows only that name)
            copies = ks.replica("", 0)[:len(ks.prefix) + 4]  # "<prefix>#re:"
            keys = [k for k in keys if not k.startswith(copies)]
        messages = list(self.sequencer.messages(keys, tags, version, batch.commit_ts or time.time()))
        cmds.append(("HSET", ks.applied, "run", self.sequencer.run, "seq", self.sequencer.seq, "version", version,
                     "ts", repr(time.time()), "source", self.source_name,
                     "watermark", self.sequencer.watermark or "0"))
        channel = ks.channel
        verb = self.publish_verb
        for m in messages:
            cmds.append((verb, channel, m.encode()))
        cmds.append(("EXISTS", ks.registry))  # the run marker: 0 after Redis lost its memory
        return cmds, counters, restored, len(messages)

    def _floor_of(self, batch: Batch) -> dict[str, int]:
        """The floors in force for this batch's values: known ones raised by the batch's own truncates."""
        for rel, version in batch.floors.items():
            self._note_floor(rel, version)
        return self.floors

    def _finish(self, batch: Batch, results: list[Any], tags: list[tuple[str, int | None]], restored: int,
                tombstones: int,
                messages: int, rtt: float, floored: int = 0, calls: Layout | None = None) -> ApplyResult:
        n = len(batch.writes)
        ncalls = n if calls is None else calls.calls
        replies = results[:n] if calls is None else calls.replies(results)  # one per entry, in call order
        order: list[int] | None = None  # the entry of each reply, when calls were grouped
        first_tag = ncalls + restored
        refusals: list[Refusal] = []
        writes: list[Any] | None = None
        for i, r in enumerate(replies):
            if isinstance(r, Exception):
                if isinstance(r, ResponseError) and str(r).startswith("NOSCRIPT"):
                    raise NoScriptError(str(r))
                reason = refusal_reason(r)
                if reason is None:
                    raise r
                if writes is None:
                    writes = list(batch.writes.values())
                    order = None if calls is None else calls.order()
                w = writes[i if order is None else order[i]]
                refusals.append(Refusal(w.key, "entry", reason, str(r), w.version))
        for i in range(ncalls, len(results)):
            r = results[i]
            if isinstance(r, Exception):
                if isinstance(r, ResponseError) and str(r).startswith("NOSCRIPT"):
                    raise NoScriptError(str(r))
                reason = refusal_reason(r)
                if reason is not None and first_tag <= i < first_tag + len(tags):
                    refusals.append(Refusal(self.ks.counter(*tags[i - first_tag]), "tag", reason, str(r),
                                            batch.version or 0))
                    results[i] = None  # the repair bumps it; the epoch is re-read below
                    continue
                raise r
        if refusals:
            self._repair(refusals, batch, {self.ks.counter(t, s): (t, s) for t, s in tags})
        fences = replies.count(3)
        applied = replies.count(1) + fences
        # table epochs moved by TRUNCATE: later values of that table must record the new counter
        for (tag, slot), new in zip(tags, results[first_tag:first_tag + len(tags)], strict=True):
            if new is not None:
                self.epochs.moved(tag, new, slot)
        marker_lost = results[-1] == 0
        if marker_lost:
            self.restore()  # Redis restarted empty (and somebody else may have reloaded the scripts)
        return ApplyResult(applied=applied, refused=n - applied, tombstones=tombstones, values=n - tombstones,
                           tags=sum(1 for _, s in tags if s is None), messages=messages, rtt=rtt, refusals=refusals,
                           restored=marker_lost,
                           floored=floored, fenced=replies.count(2), fences=fences)

    def _repair(self, refusals: list[Refusal], batch: Batch,
                counters: dict[str, tuple[str, int | None]] | None = None) -> None:
        """Make refused keys safe: an entry key is replaced by a tombstone at the change's version (readers
        see a miss, fills in flight fail), a tag counter is deleted and bumped past any value it had.

        Connection faults raise (the batch is retried: harmless, writes are versioned); a repair that
        Redis refuses again (a broken script) leaves the key deleted, which readers also see as a miss.
        """
        ttls = {w.key: w.ttl_ms for w in batch.writes.values()}
        pipe: Any = self.client.pipeline(transaction=False)
        for r in refusals:
            pipe.delete(r.key)
            if r.kind == "entry":
                pipe.execute_command("EVALSHA", _APPLY.sha, 1, r.key, r.version, "t", ttls.get(r.key, 60_000), b"", "")
            else:
                pipe.execute_command("EVALSHA", _BUMP.sha, 1, r.key)
        out = pipe.execute(raise_on_error=False)
        for r, (_, done) in zip(refusals, zip(out[0::2], out[1::2], strict=True), strict=True):
            if isinstance(done, Exception):
                log.error("repair_failed", key=r.key, error=str(done),
                          detail="the key was deleted but not tombstoned: readers miss, a fill may land")
            elif r.kind == "tag":
                tag, slot = (counters or {}).get(r.key, (r.key[len(self.ks.tag("")):], None))
                self.epochs.moved(tag, done, slot)

    def _send_packed(self, batch: Batch) -> PendingApply:
        """The batch as raw RESP on the sink's connection: the same commands, in the same order, as the
        redis-py pipeline, without its per-command Python overhead (which was most of the daemon's Redis
        time: ~10 us per command through Pipeline against ~1.5 us packed here).

        The apply calls are formatted straight into bytes; the rest goes through redis-py's own packer.
        Entries whose keys share a hash tag leave as ``apply_many`` calls after the others
        (:class:`Layout`). Commands leave in chunks so Redis starts executing while the rest is being
        packed. Any error while talking drops the connection (no half-read replies can leak into the next
        batch). The replies are read by :meth:`PendingApply.wait`.
        """
        apply_head = _APPLY_HEAD
        snaps: dict[tuple[str, int | None], bytes] = {}
        ttls: dict[int, bytes] = {}
        epochs = self.epochs
        parts: list[bytes] = []
        tombstones = 0
        floored = 0
        floors = self._floor_of(batch)
        tombstone_ttl = self.rules.tombstone_ttl_ms
        last_version = -1
        ver = b""
        conn = self._conn
        if conn is None:
            # The sink's own connection, outside the pool: no pool lock and no readability probe (a
            # syscall) per batch, which at thousands of small batches per second was measurable.
            conn = self._conn = self.client.connection_pool.make_connection()
        try:
            conn.connect()  # no-op while connected; after a drop it reconnects (AUTH, SELECT, ...)
            t0 = time.perf_counter()
            writes = list(batch.writes.values())
            keys = [w.key.encode() for w in writes]
            calls = layout(keys)
            grouped: dict[int, bytes] = {}  # entry -> its five arguments, for the entries sent in groups
            in_group = set() if calls is None else {i for g in calls.groups for i in g}
            for i, w in enumerate(writes):
                if w.version != last_version:
                    last_version = w.version
                    ver = b"%d" % w.version
                data = w.data
                ttl_ms = w.ttl_ms
                if floors and data is not None and w.table_tag is not None \
                        and w.version <= floors.get(w.table_tag, -1):
                    data, ttl_ms = None, tombstone_ttl  # older than its table's last truncate
                    floored += 1
                ttl = ttls.get(ttl_ms)
                if ttl is None:
                    ttl = ttls[ttl_ms] = b"$%d\r\n%d\r\n" % (len(str(ttl_ms)), ttl_ms)
                snap = b""
                if data is None:
                    tombstones += 1
                    kind = b"f" if w.fence else b"t"
                    data = b""
                else:
                    kind = b"v"
                    if w.table_tag is not None:
                        counter = (w.table_tag, w.slot)
                        got = snaps.get(counter)
                        if got is None:
                            got = snaps[counter] = epochs.snapshot(w.table_tag, w.slot).encode()
                        snap = got
                if in_group and i in in_group:  # sent with the other entries of its slot, below
                    grouped[i] = (b"$%d\r\n%b\r\n$1\r\n%b\r\n%b$%d\r\n%b\r\n$%d\r\n%b\r\n"
                                  % (len(ver), ver, kind, ttl, len(data), data, len(snap), snap))
                    continue
                key = keys[i]
                parts.append(b"%b$%d\r\n%b\r\n$%d\r\n%b\r\n$1\r\n%b\r\n%b$%d\r\n%b\r\n$%d\r\n%b\r\n"
                             % (apply_head, len(key), key, len(ver), ver, kind, ttl, len(data), data,
                                len(snap), snap))
                if len(parts) >= _CHUNK:
                    conn.send_packed_command([b"".join(parts)], check_health=False)
                    parts = []
            chunk = 0
            for g in calls.groups if calls is not None else ():
                parts.append(_many(g, keys, [grouped[i] for i in g]))
                chunk += len(g)
                if chunk >= _CHUNK:
                    conn.send_packed_command([b"".join(parts)], check_health=False)
                    parts, chunk = [], 0
            tail, tags, restored, messages = self._tail(batch, {t: s for t, s in snaps.items() if s}, True)
            head, rest = tail[:restored], tail[restored:]
            if head:
                parts.append(b"".join(conn.pack_commands(head)))
            tag_key = self.ks.counter
            for tag, slot in tags:
                k = tag_key(tag, slot).encode()
                parts.append(b"%b$%d\r\n%b\r\n" % (_BUMP_HEAD, len(k), k))
            exists = 0
            if batch.exists or batch.exists_reset:  # before the applied position and the backplane (see _tail)
                xf = self.exists.batch_commands(batch)
                exists = len(xf)
                parts.extend(pack_ints(c) for c in xf)
            parts.extend(conn.pack_commands(rest))
            conn.send_packed_command([b"".join(parts)], check_health=False)  # one write for a small batch
        except BaseException:
            conn.disconnect()
            raise
        return PendingApply(self, batch, conn, tags, restored, tombstones, messages, t0,
                            replies=(len(writes) if calls is None else calls.calls) + len(tail) + len(tags) + exists,
                            floored=floored, calls=calls)

    def _apply_pipeline(self, batch: Batch) -> ApplyResult:
        """The portable path (any redis-py client, e.g. a cluster client): one redis-py pipeline."""
        pipe: Any = self.client.pipeline(transaction=False)
        cmd = pipe.execute_command
        tombstones = 0
        floored = 0
        floors = self._floor_of(batch)
        snaps: dict[tuple[str, int | None], bytes] = {}
        entries: list[tuple[str, int, str, int, bytes, bytes]] = []  # key, version, kind, ttl_ms, data, snap
        for w in batch.writes.values():
            if w.data is not None and w.table_tag is not None and w.version <= floors.get(w.table_tag, -1):
                floored += 1  # older than its table's last truncate: a tombstone, never a value
                tombstones += 1
                entries.append((w.key, w.version, "t", self.rules.tombstone_ttl_ms, b"", b""))
                continue
            if w.data is None:
                tombstones += 1
                entries.append((w.key, w.version, "f" if w.fence else "t", w.ttl_ms, b"", b""))
                continue
            snap = b""
            if w.table_tag is not None:
                got = snaps.get((w.table_tag, w.slot))
                if got is None:
                    got = snaps[(w.table_tag, w.slot)] = self.epochs.snapshot(w.table_tag, w.slot).encode()
                snap = got
            entries.append((w.key, w.version, "v", w.ttl_ms, w.data, snap))
        calls = layout([e[0].encode() for e in entries])
        grouped = set() if calls is None else {i for g in calls.groups for i in g}
        step: list[tuple[Any, ...]] = [("EVALSHA", _APPLY.sha, 1, *e)
                                       for i, e in enumerate(entries) if i not in grouped]
        for g in calls.groups if calls is not None else []:
            step.append(("EVALSHA", _MANY.sha, len(g), *(entries[i][0] for i in g),
                         *(a for i in g for a in entries[i][1:])))
        tail, tags, restored, messages = self._tail(batch, {t: s for t, s in snaps.items() if s})
        if self.cluster:
            n_after = 2 + messages  # HSET applied, the messages, EXISTS registry: the end of ``tail``
            return self._apply_cluster(batch, step + tail[:-n_after], tail[-n_after:], tags, restored, tombstones,
                                       messages, floored, calls)
        for c in step:
            cmd(*c)
        for c in tail:
            cmd(*c)
        t0 = time.perf_counter()
        results = pipe.execute(raise_on_error=False)
        rtt = time.perf_counter() - t0
        return self._finish(batch, results, tags, restored, tombstones, messages, rtt, floored, calls)

    def _apply_cluster(self, batch: Batch, writes: list[tuple[Any, ...]], announce: list[tuple[Any, ...]],
                       tags: list[tuple[str, int | None]], restored: int, tombstones: int, messages: int, floored: int,
                       calls: Layout | None) -> ApplyResult:
        """The cluster batch in two steps. First the writes (entry writes, epoch restores, tag bumps, floors;
        and the ``WAIT`` of :meth:`_wait_commands` when asked), each master's on one connection, every master
        written before any answer is read; only when all of them were acknowledged, the applied position, the
        backplane and the run marker. A failure in the first step raises before anything is announced or
        recorded, and the daemon applies the whole batch again (versioned writes: the repeat is harmless).

        The first step takes the sink's own per-master connections (:meth:`_cluster_direct`); a redirect
        (the slot map is out of date: resharding, failover) or a dead connection sends it again through
        redis-py's ``ClusterPipeline``, which follows redirects and refreshes the slot map.
        """
        t0 = time.perf_counter()
        first: list[Any] | None = None
        if self.cluster_direct:
            try:
                first = self._cluster_direct(writes)
            except _DIRECT_FALLBACK as exc:
                self._drop_node_conns()
                log.debug("cluster_direct_fallback", error=str(exc))
                self.client.nodes_manager.initialize()  # before the pipeline picks the masters to WAIT on
        if first is None:
            first = self._cluster_pipeline(writes)
        for r in first:
            if isinstance(r, Exception) and refusal_reason(r) is None:
                if isinstance(r, ResponseError) and str(r).startswith("NOSCRIPT"):
                    raise NoScriptError(str(r))
                raise r
        second: Any = self.client.pipeline(transaction=False)
        for c in announce:
            second.execute_command(*c)
        results = first + second.execute(raise_on_error=False)
        rtt = time.perf_counter() - t0
        return self._finish(batch, results, tags, restored, tombstones, messages, rtt, floored, calls)

    def _wait_commands(self, slot: int) -> list[tuple[Any, ...]]:
        """A marker write on ``slot`` and ``WAIT``, sent last on the connection of the master serving it.

        ``WAIT`` waits for the replication offset of its connection's last write; the marker makes that the
        master's offset now, so it covers every earlier write to that master too, including those of an
        attempt that timed out (a repeat refused as not newer writes nothing, and a new connection has no
        offset of its own).
        """
        marker = self.ks.system("wait:{" + slot_tag(slot) + "}")
        return [("SET", marker, self.sequencer.run, "PX", 60_000),
                ("WAIT", self.wait_replicas, self.wait_timeout_ms)]

    def _check_wait(self, replies: list[Any]) -> None:
        """The marker's and WAIT's answers: WAIT must count ``wait_replicas`` replicas."""
        for r in replies:
            if isinstance(r, Exception):
                raise translate(r)
        acked = replies[-1]
        if int(acked) < self.wait_replicas:
            raise redis.ConnectionError(f"WAIT: {acked} of {self.wait_replicas} replicas acknowledged the batch")

    @staticmethod
    def _key_of(cmd: tuple[Any, ...]) -> bytes:
        key = cmd[3] if cmd[0] == "EVALSHA" else cmd[1]  # every write is keyed: a script's first key, or SET's
        return key if isinstance(key, bytes) else str(key).encode()

    def _cluster_direct(self, writes: list[tuple[Any, ...]]) -> list[Any]:
        """The writes on the sink's own connection to each master (by the cluster client's slot map), packed,
        every master written before any answer is read. Raises :class:`_Redirected` on a redirect answer."""
        manager = self.client.nodes_manager
        groups: dict[str, tuple[Any, list[int], int]] = {}
        for i, c in enumerate(writes):
            slot = key_slot(self._key_of(c))
            node = manager.get_node_from_slot(slot)
            group = groups.get(node.name)
            if group is None:
                groups[node.name] = (node, [i], slot)
            else:
                group[1].append(i)
        out: list[Any] = [None] * len(writes)
        sent: list[tuple[Any, list[int], int]] = []
        for name, (node, idx, slot) in groups.items():
            conn = self._node_conns.get(name)
            if conn is None:
                conn = self._node_conns[name] = node.redis_connection.connection_pool.make_connection()
            extra = self._wait_commands(slot) if self.wait_replicas > 0 else []
            try:
                conn.connect()
                conn.send_packed_command(conn.pack_commands([writes[i] for i in idx] + extra), check_health=False)
            except BaseException:
                conn.disconnect()
                raise
            sent.append((conn, idx, len(extra)))
        for conn, idx, n_extra in sent:
            try:
                replies = _read_replies(conn, len(idx) + n_extra)
            except BaseException:
                conn.disconnect()
                raise
            for r in replies:  # the WAIT marker's too: its slot moves with the others
                if isinstance(r, _REDIRECTS) or (isinstance(r, ResponseError) and str(r).startswith(_REDIRECT_CODES)):
                    raise _Redirected(str(r))
            if n_extra:
                self._check_wait(replies[len(idx):])
            for i, r in zip(idx, replies, strict=False):
                out[i] = r
        return out

    def _cluster_pipeline(self, writes: list[tuple[Any, ...]]) -> list[Any]:
        """The writes through redis-py's ``ClusterPipeline`` (redirects followed, slot map refreshed)."""
        pipe: Any = self.client.pipeline(transaction=False)
        for c in writes:
            pipe.execute_command(*c)
        manager = self.client.nodes_manager
        by_node: dict[str, int] = {}
        if self.wait_replicas > 0:
            for c in writes:
                slot = key_slot(self._key_of(c))
                by_node.setdefault(manager.get_node_from_slot(slot).name, slot)
        for slot in by_node.values():
            marker, wait = self._wait_commands(slot)
            pipe.execute_command(*marker)
            pipe.execute_command(*wait, target_nodes=manager.get_node_from_slot(slot))
        out: list[Any] = pipe.execute(raise_on_error=False)
        for j in range(len(writes), len(out), 2):
            self._check_wait(out[j:j + 2])
        return out[:len(writes)]

    def _drop_node_conns(self) -> None:
        """After a failure: the per-master connections go (a half-read reply must not reach the next batch)."""
        for conn in self._node_conns.values():
            conn.disconnect()
        self._node_conns.clear()

    # ------------------------------------------------------------------ writes outside a batch
    # Every Redis write the daemon makes goes through this sink (dead letters through their own
    # destination); these two are the daemon's writes that are not part of applying a batch.

    def idle_heartbeat(self, version: int) -> bool:
        """Number and publish an idle heartbeat (see :meth:`cdcd.backplane.Sequencer.heartbeat`) and check
        the run marker; True when Redis had lost it (and it was restored). Raises RedisFault/RedisError
        when Redis cannot be reached (the sequence number is spent anyway)."""
        return self.heartbeat(self.sequencer.heartbeat(str(version), time.time()).encode())

    def announce_watermark(self, version: int) -> None:
        """While idle, the applied watermark (already on the sequencer) moved: record it in the applied state
        and announce it in a numbered message of its own (read-your-writes waiters). Raises
        RedisFault/RedisError when Redis cannot be reached (the sequence number is spent anyway)."""
        message = self.sequencer.heartbeat(str(version), time.time())
        try:
            pipe: Any = self.client.pipeline(transaction=False)
            pipe.hset(self.ks.applied, "watermark", message.watermark)
            pipe.execute_command(self.publish_verb, self.ks.channel, message.encode())
            pipe.execute()
        except REDIS_FAULTS as exc:
            raise translate(exc) from exc

    def forget_source(self) -> None:
        """Clear the applied state's source after the daemon invalidated everything a lost slot's changes
        could have touched, so the next start does not see the loss again. Raises like :meth:`apply`."""
        try:
            self.client.hset(self.ks.applied, "source", "")
        except REDIS_FAULTS as exc:
            raise translate(exc) from exc


def _many(call: list[int], keys: list[bytes], args: list[bytes]) -> bytes:
    """``EVALSHA apply_many <n> <keys...> <five args per entry...>`` as RESP."""
    n = len(call)
    count = b"%d" % n
    return b"*%d\r\n%b$%d\r\n%b\r\n%b%b" % (3 + 6 * n, _MANY_HEAD, len(count), count,
                                               b"".join(b"$%d\r\n%b\r\n" % (len(keys[i]), keys[i]) for i in call),
                                               b"".join(args))


class PendingApply:
    """A batch sent to Redis whose replies have not been read yet (see :meth:`RedisSink.begin`).

    ``ApplyResult.rtt`` of a packed batch is the time the caller spent on Redis for it: formatting and
    sending the commands (``begin``) plus blocking in ``wait()`` until the last reply was read. Time
    between the two (a loop polling and planning the next batch while Redis executes this one) is not
    in it: Redis work hidden behind other work costs the loop nothing. Called back to back
    (``apply()``) it is the whole round trip. So a large figure means the loop waited for Redis; a
    small one under load means the overlap hid Redis. ``wait_s`` is the blocking part alone.
    """

    def __init__(self, sink: RedisSink, batch: Batch, conn: Any, tags: list[tuple[str, int | None]], restored: int,
                 tombstones: int, messages: int, t0: float, replies: int = 0, done: ApplyResult | None = None,
                 floored: int = 0, calls: Layout | None = None) -> None:
        self.sink, self.batch, self.conn, self.tags = sink, batch, conn, tags
        self.floored = floored
        self.calls = calls  # entry calls when some were grouped by hash slot (RedisSink._finish)
        self.restored, self.tombstones, self.messages, self.t0 = restored, tombstones, messages, t0
        # created right after the last byte was handed to the socket (or after the whole pipeline ran: done)
        self.send_s = time.perf_counter() - t0 if done is None else done.rtt
        self.wait_s = 0.0
        self.replies = replies
        self.done = done

    def wait(self) -> ApplyResult:
        """Read every reply; raises RedisError (NoScriptError after a Redis restart) like ``apply``."""
        if self.done is not None:
            return self.done
        t_wait = time.perf_counter()
        try:
            results = _read_replies(self.conn, self.replies)
        except BaseException as exc:
            self.conn.disconnect()
            fault = translate(exc)
            if fault is exc:
                raise
            raise fault from exc
        self.wait_s = time.perf_counter() - t_wait
        rtt = self.send_s + self.wait_s
        self.done = self.sink._finish(self.batch, results, self.tags, self.restored, self.tombstones,
                                      self.messages, rtt, self.floored, self.calls)
        return self.done


def _read_replies(conn: Any, n: int) -> list[Any]:
    """``n`` replies; error replies come back as exception objects (as in a pipeline), not raised."""
    parser = getattr(conn, "_parser", None)
    read = getattr(parser, "read_response", None)
    if read is not None:
        # The parser returns error replies as ResponseError objects and raises only on connection
        # problems (timeouts, resets): exactly what a pipeline does, minus its per-reply bookkeeping.
        return [read() for _ in range(n)]
    out = []
    for _ in range(n):
        try:
            out.append(conn.read_response())
        except ResponseError as exc:
            out.append(exc)
    return out


class RedisDeadLetters:
    """Rejected records go to a capped Redis stream with the reason and their position."""

    def __init__(self, client: redis.Redis, stream: str) -> None:
        self.client = client
        self.stream = stream

    def send(self, rejected: Rejected) -> None:
        raw: Any = rejected.raw if rejected.raw is not None else b""
        if isinstance(raw, str):
            raw = raw.encode()
        fields = {
            "reason": rejected.reason, "position": str(rejected.position), "origin": rejected.origin,
            "raw": raw[:DLQ_RAW_MAX], "ts": repr(time.time()),
        }
        if rejected.key is not None:
            fields["key"] = rejected.key
        try:
            self.client.xadd(self.stream, fields, maxlen=DLQ_MAXLEN, approximate=True)  # type: ignore[arg-type]
        except REDIS_FAULTS as exc:
            raise translate(exc) from exc

    def close(self) -> None:
        """Nothing to release: the client is the daemon's, shared with the sink."""
