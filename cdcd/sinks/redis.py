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

    def _apply(self, batch: Batch) -> ApplyResult:
        ks = self.ks
        pipe: Any = self.client.pipeline(transaction=False)
        cmd = pipe.execute_command
        apply_sha = _APPLY.sha
        tombstones = 0
        snaps: dict[str, str] = {}
        for w in batch.writes.values():
            if w.data is None:
                tombstones += 1
                cmd("EVALSHA", apply_sha, 1, w.key, w.version, "t", w.ttl_ms, b"", "")
                continue
            snap = ""
            if w.table_tag is not None:
                snap = snaps.get(w.table_tag, "")
                if not snap:
                    snap = snaps[w.table_tag] = self.rules.snapshot(w.table_tag)
            cmd("EVALSHA", apply_sha, 1, w.key, w.version, "v", w.ttl_ms, w.data, snap)
        # The counters those values record must exist (they would read as moved otherwise); only this
        # daemon writes table tags, so restoring its known value when missing is exact.
        restored = 0
        for tag in snaps:
            epoch = self.rules.table_epochs.get(tag)
            if epoch is not None:
                pipe.set(ks.tag(tag), epoch, nx=True)
                restored += 1
        tags = list(batch.tags)
        for tag in tags:
            cmd("EVALSHA", _BUMP.sha, 1, ks.tag(tag))
        version = str(batch.version)
        messages = list(self.sequencer.messages(batch.writes.keys(), tags, version, batch.commit_ts or time.time()))
        pipe.hset(ks.applied, mapping={
            "run": self.sequencer.run, "seq": self.sequencer.seq, "version": version,
            "ts": repr(time.time()), "source": self.source_name,
        })
        for m in messages:
            pipe.publish(ks.channel, m.encode())
        t0 = time.perf_counter()
        results = pipe.execute(raise_on_error=False)
        rtt = time.perf_counter() - t0
        for r in results:
            if isinstance(r, Exception):
                if isinstance(r, ResponseError) and str(r).startswith("NOSCRIPT"):
                    raise NoScriptError(str(r))
                raise r
        n = len(batch.writes)
        applied = sum(1 for r in results[:n] if r == 1)
        # table epochs moved by TRUNCATE: later values of that table must record the new counter
        first_tag = n + restored
        for tag, new in zip(tags, results[first_tag:first_tag + len(tags)], strict=True):
            if tag in self.rules.table_epochs:
                self.rules.table_epochs[tag] = new.decode() if isinstance(new, bytes) else str(new)
        return ApplyResult(applied=applied, refused=n - applied, tombstones=tombstones, values=n - tombstones,
                           tags=len(tags), messages=len(messages), rtt=rtt)


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
