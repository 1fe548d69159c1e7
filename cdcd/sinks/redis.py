"""Applying planned batches to Redis: versioned compare-and-set, tag bumps, backplane.

One batch is one pipeline (one round trip): an ``EVALSHA apply`` per entry, an
``EVALSHA bump_tag`` per tag, the daemon's applied position, then the backplane
message(s). Redis executes a connection's commands in order, so subscribers hear
of a change only after Redis holds it. A failed attempt is simply repeated:
writes are versioned (a repeat is refused as not newer), tag bumps and messages
are safe to repeat (one more invalidation, never one fewer).

Each script call touches one key, so the same calls work on Redis Cluster.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import redis
from redis.exceptions import NoScriptError, ResponseError

from cdcd.backplane import Sequencer
from cdcd.change import Rejected
from cdcd.keyspace import SCRIPTS
from cdcd.rules import Batch, Rules

_APPLY = SCRIPTS["apply"]
_BUMP = SCRIPTS["bump_tag"]
_ENSURE = SCRIPTS["ensure_tag"]
# EVALSHA <apply sha> 1: the fixed head of every entry write, packed once
_APPLY_HEAD = b"*9\r\n$7\r\nEVALSHA\r\n$40\r\n" + _APPLY.sha.encode() + b"\r\n$1\r\n1\r\n"
_BUMP_HEAD = b"*4\r\n$7\r\nEVALSHA\r\n$40\r\n" + _BUMP.sha.encode() + b"\r\n$1\r\n1\r\n"
_CHUNK = 1024  # entry writes per socket write: Redis works on one chunk while the next is packed
DLQ_MAXLEN = 100_000
DLQ_RAW_MAX = 65_536


@dataclass(slots=True)
class ApplyResult:
    applied: int
    refused: int
    tombstones: int
    values: int
    tags: int
    messages: int
    rtt: float
    fenced: int = 0  # tombstones older than the entry, refused but still fencing fills (APPLY returned 2)
    fences: int = 0  # fence writes applied (APPLY returned 3; docs/versions.md)


def connect(url: str, socket_timeout: float = 5.0, connect_timeout: float = 2.0) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=socket_timeout, socket_connect_timeout=connect_timeout,
                                health_check_interval=30)


class RedisSink:
    def __init__(self, client: redis.Redis, rules: Rules, sequencer: Sequencer, source_name: str = "") -> None:
        self.client = client
        self.rules = rules
        self.ks = rules.keyspace
        self.sequencer = sequencer
        self.source_name = source_name
        self.packed = True  # raw RESP on a connection of its own; False: a redis-py pipeline (any client)
        self._conn: Any = None

    def load_scripts(self) -> None:
        for script in SCRIPTS.values():
            self.client.script_load(script.source)

    def prepare(self) -> None:
        """Scripts, table epochs and the client registry; raises RedisError while Redis is down."""
        self.load_scripts()
        pipe: Any = self.client.pipeline(transaction=False)
        rels = list(self.rules.by_relation.values())
        for rule in rels:
            pipe.execute_command("EVALSHA", _ENSURE.sha, 1, self.ks.tag(rule.table_tag))
        self._registry(pipe)
        res = pipe.execute()
        for rule, epoch in zip(rels, res, strict=False):
            self.rules.table_epochs[rule.table_tag] = epoch.decode() if isinstance(epoch, bytes) else str(epoch)

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
        for tag, epoch in self.rules.table_epochs.items():
            pipe.set(self.ks.tag(tag), epoch, nx=True)
        pipe.execute()

    def applied_state(self) -> dict[str, str]:
        raw: dict[bytes, bytes] = self.client.hgetall(self.ks.applied)  # type: ignore[assignment]
        return {k.decode(): v.decode() for k, v in raw.items()}

    def apply(self, batch: Batch) -> ApplyResult:
        """One attempt; raises redis.RedisError when it did not fully succeed (the caller retries)."""
        try:
            return self._apply(batch)
        except NoScriptError:
            self.restore()  # Redis restarted or failed over: scripts (and likely data) are gone
            return self._apply(batch)

    def begin(self, batch: Batch) -> PendingApply:
        """Send the batch and return at once; ``wait()`` on the result reads Redis's answers.

        For a loop that overlaps work with Redis executing the previous batch: the batch counts as
        applied (and may be acknowledged) only once ``wait()`` returned. If ``wait()`` raises, the batch
        must be applied again with :meth:`apply` (writes are versioned, so a repeat is harmless).
        """
        if self.packed and isinstance(self.client, redis.Redis):
            return self._send_packed(batch)
        return PendingApply(self, batch, None, [], 0, 0, 0, 0.0, done=self._apply_pipeline(batch))

    def _apply(self, batch: Batch) -> ApplyResult:
        if self.packed and isinstance(self.client, redis.Redis):
            return self._send_packed(batch).wait()
        return self._apply_pipeline(batch)

    def _tail(self, batch: Batch, snaps: dict[str, bytes],
              packed_bumps: bool = False) -> tuple[list[tuple[Any, ...]], list[str], int, int]:
        """The commands after the entry writes: epoch restores, tag bumps (unless the caller packs them
        itself, right after the restores), applied position, backplane.

        Returns (commands, tags, restored, messages).
        """
        ks = self.ks
        cmds: list[tuple[Any, ...]] = []
        # The counters those values record must exist (they would read as moved otherwise); only this
        # daemon writes table tags, so restoring its known value when missing is exact.
        restored = 0
        for tag in snaps:
            epoch = self.rules.table_epochs.get(tag)
            if epoch is not None:
                cmds.append(("SET", ks.tag(tag), epoch, "NX"))
                restored += 1
        tags = list(batch.tags)
        if not packed_bumps:
            for tag in tags:
                cmds.append(("EVALSHA", _BUMP.sha, 1, ks.tag(tag)))
        version = str(batch.version)
        messages = list(self.sequencer.messages(batch.writes.keys(), tags, version, batch.commit_ts or time.time()))
        cmds.append(("HSET", ks.applied, "run", self.sequencer.run, "seq", self.sequencer.seq, "version", version,
                     "ts", repr(time.time()), "source", self.source_name))
        channel = ks.channel
        for m in messages:
            cmds.append(("PUBLISH", channel, m.encode()))
        return cmds, tags, restored, len(messages)

    def _finish(self, batch: Batch, results: list[Any], tags: list[str], restored: int, tombstones: int,
                messages: int, rtt: float) -> ApplyResult:
        for r in results:
            if isinstance(r, Exception):
                if isinstance(r, ResponseError) and str(r).startswith("NOSCRIPT"):
                    raise NoScriptError(str(r))
                raise r
        n = len(batch.writes)
        replies = results[:n]
        fences = replies.count(3)
        applied = replies.count(1) + fences
        # table epochs moved by TRUNCATE: later values of that table must record the new counter
        first_tag = n + restored
        for tag, new in zip(tags, results[first_tag:first_tag + len(tags)], strict=True):
            if tag in self.rules.table_epochs:
                self.rules.table_epochs[tag] = new.decode() if isinstance(new, bytes) else str(new)
        return ApplyResult(applied=applied, refused=n - applied, tombstones=tombstones, values=n - tombstones,
                           tags=len(tags), messages=messages, rtt=rtt, fenced=replies.count(2), fences=fences)

    def _send_packed(self, batch: Batch) -> PendingApply:
        """The batch as raw RESP on the sink's connection: the same commands, in the same order, as the
        redis-py pipeline, without its per-command Python overhead (which was most of the daemon's Redis
        time: ~10 us per command through Pipeline against ~1.5 us packed here).

        The apply calls are formatted straight into bytes; the rest goes through redis-py's own packer.
        Commands leave in chunks so Redis starts executing while the rest is being packed. Any error
        while talking drops the connection (no half-read replies can leak into the next batch). The
        replies are read by :meth:`PendingApply.wait`.
        """
        apply_head = _APPLY_HEAD
        snaps: dict[str, bytes] = {}
        ttls: dict[int, bytes] = {}
        rules = self.rules
        parts: list[bytes] = []
        tombstones = 0
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
            for w in batch.writes.values():
                if w.version != last_version:
                    last_version = w.version
                    ver = b"%d" % w.version
                ttl = ttls.get(w.ttl_ms)
                if ttl is None:
                    ttl = ttls[w.ttl_ms] = b"$%d\r\n%d\r\n" % (len(str(w.ttl_ms)), w.ttl_ms)
                key = w.key.encode()
                data = w.data
                if data is None:
                    tombstones += 1
                    parts.append(b"%b$%d\r\n%b\r\n$%d\r\n%b\r\n$1\r\n%b\r\n%b$0\r\n\r\n$0\r\n\r\n"
                                 % (apply_head, len(key), key, len(ver), ver, b"f" if w.fence else b"t", ttl))
                else:
                    snap = b""
                    if w.table_tag is not None:
                        got = snaps.get(w.table_tag)
                        if got is None:
                            got = snaps[w.table_tag] = rules.snapshot(w.table_tag).encode()
                        snap = got
                    parts.append(b"%b$%d\r\n%b\r\n$%d\r\n%b\r\n$1\r\nv\r\n%b$%d\r\n%b\r\n$%d\r\n%b\r\n"
                                 % (apply_head, len(key), key, len(ver), ver, ttl, len(data), data, len(snap), snap))
                if len(parts) >= _CHUNK:
                    conn.send_packed_command([b"".join(parts)], check_health=False)
                    parts = []
            tail, tags, restored, messages = self._tail(batch, {t: s for t, s in snaps.items() if s}, True)
            head, rest = tail[:restored], tail[restored:]
            if head:
                parts.append(b"".join(conn.pack_commands(head)))
            tag_key = self.ks.tag
            for tag in tags:
                k = tag_key(tag).encode()
                parts.append(b"%b$%d\r\n%b\r\n" % (_BUMP_HEAD, len(k), k))
            parts.extend(conn.pack_commands(rest))
            conn.send_packed_command([b"".join(parts)], check_health=False)  # one write for a small batch
        except BaseException:
            conn.disconnect()
            raise
        return PendingApply(self, batch, conn, tags, restored, tombstones, messages, t0,
                            replies=len(batch.writes) + len(tail) + len(tags))

    def _apply_pipeline(self, batch: Batch) -> ApplyResult:
        """The portable path (any redis-py client, e.g. a cluster client): one redis-py pipeline."""
        pipe: Any = self.client.pipeline(transaction=False)
        cmd = pipe.execute_command
        apply_sha = _APPLY.sha
        tombstones = 0
        snaps: dict[str, bytes] = {}
        for w in batch.writes.values():
            if w.data is None:
                tombstones += 1
                cmd("EVALSHA", apply_sha, 1, w.key, w.version, "f" if w.fence else "t", w.ttl_ms, b"", "")
                continue
            snap = b""
            if w.table_tag is not None:
                got = snaps.get(w.table_tag)
                if got is None:
                    got = snaps[w.table_tag] = self.rules.snapshot(w.table_tag).encode()
                snap = got
            cmd("EVALSHA", apply_sha, 1, w.key, w.version, "v", w.ttl_ms, w.data, snap)
        tail, tags, restored, messages = self._tail(batch, {t: s for t, s in snaps.items() if s})
        for c in tail:
            cmd(*c)
        t0 = time.perf_counter()
        results = pipe.execute(raise_on_error=False)
        rtt = time.perf_counter() - t0
        return self._finish(batch, results, tags, restored, tombstones, messages, rtt)


class PendingApply:
    """A batch sent to Redis whose replies have not been read yet (see :meth:`RedisSink.begin`)."""

    def __init__(self, sink: RedisSink, batch: Batch, conn: Any, tags: list[str], restored: int, tombstones: int,
                 messages: int, t0: float, replies: int = 0, done: ApplyResult | None = None) -> None:
        self.sink, self.batch, self.conn, self.tags = sink, batch, conn, tags
        self.restored, self.tombstones, self.messages, self.t0 = restored, tombstones, messages, t0
        self.replies = replies
        self.done = done

    def wait(self) -> ApplyResult:
        """Read every reply; raises RedisError (NoScriptError after a Redis restart) like ``apply``."""
        if self.done is not None:
            return self.done
        try:
            results = _read_replies(self.conn, self.replies)
        except BaseException:
            self.conn.disconnect()
            raise
        rtt = time.perf_counter() - self.t0
        self.done = self.sink._finish(self.batch, results, self.tags, self.restored, self.tombstones,
                                      self.messages, rtt)
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
        self.client.xadd(self.stream, {
            "reason": rejected.reason, "position": str(rejected.position), "origin": rejected.origin,
            "raw": raw[:DLQ_RAW_MAX], "ts": repr(time.time()),
        }, maxlen=DLQ_MAXLEN, approximate=True)
