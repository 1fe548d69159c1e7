"""The cache's link to a Redis Cluster: the same ``call(commands) -> replies`` as :mod:`.link`, per node.

A single node takes a batch (entry, its TTL, its tag counters, a publish) on one connection in one round
trip. On a cluster those keys live in different hash slots, so on different masters. The link groups a
batch per master by the cluster client's slot map, writes every master its group (packed, on an idle
connection of its own, as :mod:`.link` does) before reading any answer, so the masters work concurrently
and the wall time is about one round trip. Redirect answers (``MOVED``/``ASK``, ``TRYAGAIN``,
``CLUSTERDOWN``: a resharding or a failover) and batches hit by a dead connection go through redis-py's
``ClusterPipeline``, which follows redirects and refreshes the slot map. The pipeline alone was measured
~2x slower per call (bench/client_cluster.py, BENCHMARKS.md section 23).

Two differences from a single node, both for the same invariant as the daemon's (a subscriber hears of a
change only after Redis holds it): publish commands leave in a second step, after every master
acknowledged the rest of the batch; and on ``pubsub="sharded"`` they are ``SPUBLISH`` to the channel's
shard (the daemon's choice must match: docs/redis-cluster.md).

The cache's timeouts apply: the link builds its own cluster client from the application's (its nodes, auth
and TLS) with the cache's socket timeouts and one retry, and its own connections without retries, so a dead
node costs a bounded time before the circuit breaker opens.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any

from redis.exceptions import (
    AskError,
    ClusterDownError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from cdcd.lazycluster import LazyRedisCluster

from .breaker import CircuitBreaker
from .link import CLIENT_SCRIPTS, AsyncCalls, Breakered, L2Unavailable, SyncCalls, connection_settings, pack
from .stats import Stats
from .steps import arun, run

Command = tuple[Any, ...]
# connection arguments the link sets itself, or that belong to the application's client object
_OWN = frozenset({"socket_timeout", "socket_connect_timeout", "retry", "db", "host", "port", "redis_connect_func",
                  "oss_cluster_maint_notifications_handler", "health_check_interval", "himport_registry",
                  "maint_notifications_config", "orig_host_address", "orig_socket_timeout",
                  "orig_socket_connect_timeout", "decode_responses"})


def _connection_kwargs(client: Any) -> dict[str, Any]:
    """Auth, TLS and the like of the application's cluster client, without what the link sets itself."""
    import inspect

    from redis.asyncio.cluster import RedisCluster

    manager = client.nodes_manager
    if not isinstance(client, RedisCluster):  # redis.cluster: passed through to every node's connections as is
        return {k: v for k, v in manager.connection_kwargs.items() if k not in _OWN}
    # redis.asyncio.cluster: the nodes carry them, and the client takes only its named arguments (TLS as ssl=True)
    node = next(iter(manager.startup_nodes.values()))
    accepted = inspect.signature(RedisCluster.__init__).parameters
    out = {k: v for k, v in node.connection_kwargs.items() if k not in _OWN and k in accepted}
    if "SSL" in node.connection_class.__name__:
        out["ssl"] = True
    return out


def _seeds(client: Any, node_class: Any) -> list[Any]:
    """The application client's known nodes (its seeds, and the whole cluster once it has connected)."""
    manager = client.nodes_manager
    known = {**manager.startup_nodes, **manager.nodes_cache}
    return [node_class(n.host, n.port) for n in known.values()]


def _split(cmds: Sequence[Command], verb: str) -> tuple[list[int], list[Command], list[int], list[Command]]:
    """Commands before publishing, and the publishes (renamed to ``verb``), each with their batch index."""
    first_i: list[int] = []
    first: list[Command] = []
    pub_i: list[int] = []
    pubs: list[Command] = []
    for i, c in enumerate(cmds):
        if c[0] == "PUBLISH":
            pub_i.append(i)
            pubs.append((verb, *c[1:]))
        else:
            first_i.append(i)
            first.append(c)
    return first_i, first, pub_i, pubs


def _merge(n: int, first_i: list[int], first: list[Any], pub_i: list[int], pubs: list[Any]) -> list[Any]:
    out: list[Any] = [None] * n
    for i, r in zip(first_i, first, strict=True):
        out[i] = r
    for i, r in zip(pub_i, pubs, strict=True):
        out[i] = r
    return out


def _failed(replies: Sequence[Any]) -> BaseException | None:
    """A reply that is a failure of the call, not of one command (a node unreachable, the cluster down)."""
    for r in replies:
        if isinstance(r, RedisError) and not (type(r) is ResponseError or isinstance(r, NoScriptError)):
            return r
    return None


def _all_answered(replies: list[Any]) -> list[Any]:
    """``replies``, unless one of them is a failure of the whole call (raised)."""
    failed = _failed(replies)
    if failed is not None:
        raise failed
    return replies


_FAILURES = (RedisError, RedisClusterException, OSError)
_CONNECTION_FAILURES = (RedisConnectionError, RedisTimeoutError, OSError)


_REDIRECTS = (AskError, TryAgainError, ClusterDownError)  # MovedError is an AskError


def _key_of(cmd: Command) -> Any:
    """The key a command is routed by; None for keyless ones (PING), which any primary answers."""
    name = cmd[0]
    if name in ("EVALSHA", "EVAL"):
        return cmd[3] if int(cmd[2]) > 0 else None
    if name in ("PING", "SCRIPT"):
        return None
    return cmd[1]


def _slot(key: Any) -> int:
    from redis.crc import key_slot

    return int(key_slot(key if isinstance(key, bytes) else str(key).encode()))


def _by_node(cmds: Sequence[Command], manager: Any, default: Callable[[], Any]) -> dict[str, tuple[Any, list[int]]]:
    """Batch indexes per master, by the slot map (keyless commands to ``default()``)."""
    groups: dict[str, tuple[Any, list[int]]] = {}
    for i, c in enumerate(cmds):
        key = _key_of(c)
        node = manager.get_node_from_slot(_slot(key)) if key is not None else default()
        group = groups.get(node.name)
        if group is None:
            groups[node.name] = (node, [i])
        else:
            group[1].append(i)
    return groups


def _redirected(out: Sequence[Any]) -> list[int]:
    """Indexes of the answers that say the slot map is out of date."""
    return [i for i, r in enumerate(out) if isinstance(r, _REDIRECTS)]


# What a cluster link's batch flow asks its driver to do (``(op, arg)``; see :meth:`_ClusterLinkBase._batch`).
Op = tuple[str, Any]


class _ClusterLinkBase(Breakered):
    """A cluster link's state and its batch flow, written once without I/O for :class:`ClusterLink` and
    :class:`AsyncClusterLink` (each only performs the flow's steps: :meth:`_batch`)."""

    failures = (RedisError, RedisClusterException, OSError)

    def __init__(self, rc: Any, timeout: float, connect_timeout: float, breaker: CircuitBreaker, stats: Stats,
                 pubsub: str, no_retry: Any) -> None:
        super().__init__(breaker, stats)
        self.rc = rc
        self.sharded = pubsub == "sharded"
        self.publish_verb = "SPUBLISH" if self.sharded else "PUBLISH"
        self.timeout, self.connect_timeout = timeout, connect_timeout
        self._no_retry = no_retry
        self._stale_map = False
        self._ready = False  # the cluster client has read its slot map
        self._idle: dict[str, collections.deque[Any]] = {}
        self.direct = True  # False: every batch through the ClusterPipeline (the bench compares the two)

    def _failed(self, exc: BaseException) -> L2Unavailable:
        self._stale_map = True  # a failover or a resharding may have moved slots: re-read the map next call
        return super()._failed(exc)

    def _connection(self, node: Any) -> Any:
        """An idle connection of ours to ``node``, or a new one."""
        idle = self._idle.get(node.name)
        if idle:
            with contextlib.suppress(IndexError):  # another thread took the last one
                return idle.pop()
        return self._new_connection(node)

    def _new_connection(self, node: Any) -> Any:
        raise NotImplementedError

    def _batch(self, cmds: Sequence[Command]) -> Generator[Op, Any, list[Any]]:
        """One batch: the commands, then (after every master took them) the publishes. Steps: ``remap``
        (drop idle connections, re-read the slot map), ``ready`` (read it the first time), ``send`` packed
        commands on a connection, ``read`` one reply, ``disconnect`` a connection, ``pipeline`` commands
        through redis-py's ``ClusterPipeline`` (it follows redirects; gives the checked replies)."""
        if self._stale_map:  # the last call failed: a failover or a resharding may have moved slots
            self._stale_map = False
            yield "remap", None
        first_i, first, pub_i, pubs = _split(cmds, self.publish_verb)
        done = _all_answered((yield from self._send(first)))
        return _merge(len(cmds), first_i, done, pub_i, (yield from self._send(pubs)))

    def _send(self, cmds: Sequence[Command]) -> Generator[Op, Any, list[Any]]:
        if not cmds:
            return []
        if not self.direct:
            return (yield "pipeline", cmds)  # type: ignore[no-any-return]
        try:
            return (yield from self._direct(cmds))
        except _CONNECTION_FAILURES:
            yield "remap", None  # a node died or restarted: its siblings' connections likely too
            return (yield "pipeline", cmds)  # type: ignore[no-any-return]

    def _direct(self, cmds: Sequence[Command]) -> Generator[Op, Any, list[Any]]:
        if not self._ready:
            yield "ready", None
            self._ready = True
        groups = _by_node(cmds, self.rc.nodes_manager, self.rc.get_default_node)
        out: list[Any] = [None] * len(cmds)
        conns: list[tuple[str, Any, list[int]]] = []
        try:
            for name, (node, idx) in groups.items():
                conn = self._connection(node)
                conns.append((name, conn, idx))
                yield "send", (conn, [pack([cmds[i] for i in idx])])
            for _, conn, idx in conns:
                for i in idx:
                    try:
                        out[i] = yield "read", conn
                    except ResponseError as exc:  # an error reply: the connection is still in step
                        out[i] = exc
        except BaseException:
            for _, conn, _ in conns:
                yield "disconnect", conn
            raise
        for name, conn, _ in conns:
            self._idle.setdefault(name, collections.deque()).append(conn)
        moved = _redirected(out)
        if moved:  # the slot map is out of date (resharding, failover): redis-py follows the redirect
            for i, r in zip(moved, (yield "pipeline", [cmds[i] for i in moved]), strict=True):
                out[i] = r
        return out

    def _pipe(self, cmds: Sequence[Command]) -> Any:
        pipe = self.rc.pipeline(transaction=False)
        for c in cmds:
            pipe.execute_command(*c)
        return pipe

    def _taken_idle(self) -> Iterator[Any]:
        """Every idle connection, each taken out (other threads may be taking them too)."""
        for idle in self._idle.values():
            while idle:
                try:
                    yield idle.pop()
                except IndexError:
                    break

    def _shard(self, channel: str) -> tuple[Any, str]:
        """The node the backplane listener subscribes on (slot map read), and its verb: the channel's shard
        with ``SSUBSCRIBE``, or any node with ``SUBSCRIBE`` (classic pub/sub reaches every node)."""
        if self.sharded:
            return self.rc.nodes_manager.get_node_from_slot(self.rc.keyslot(channel)), "SSUBSCRIBE"
        return self.rc.get_random_node(), "SUBSCRIBE"


class ClusterLink(_ClusterLinkBase, SyncCalls):
    """Sync command batches over a ``redis.cluster.RedisCluster``, with the breaker. Thread-safe.

    The common case takes a fast path (``_direct``): commands grouped per master by the client's slot map,
    packed and written to each master on an idle connection of our own (as :class:`.link.Link` does for
    one node), then every master's answers read. A redirect answer (``MOVED``/``ASK``: the slot moved;
    ``TRYAGAIN``, ``CLUSTERDOWN``) sends just those commands again through redis-py's ``ClusterPipeline``,
    which follows it; a connection failure drops the idle connections, refreshes the slot map and runs the
    batch once through the pipeline (every batch is safe to repeat: see :mod:`.link`).
    """

    def __init__(self, client: Any, timeout: float, connect_timeout: float, breaker: CircuitBreaker,
                 stats: Stats, pubsub: str = "sharded") -> None:
        from redis.backoff import NoBackoff
        from redis.cluster import ClusterNode, RedisCluster
        from redis.retry import Retry

        def build() -> Any:  # on first use (LazyRedisCluster): a cluster down now is a Redis fault later
            app = client.resolve() if isinstance(client, LazyRedisCluster) else client
            return RedisCluster(startup_nodes=_seeds(app, ClusterNode), socket_timeout=timeout,
                                socket_connect_timeout=connect_timeout, retry=Retry(NoBackoff(), 1),
                                **_connection_kwargs(app))

        super().__init__(LazyRedisCluster(build), timeout, connect_timeout, breaker, stats, pubsub,
                         Retry(NoBackoff(), 0))
        self._ready = True  # the lazy client reads its slot map on first use
        self._settings: dict[str, tuple[Any, dict[str, Any]]] = {}

    def _new_connection(self, node: Any) -> Any:
        settings = self._settings.get(node.name)
        if settings is None:
            settings = self._settings[node.name] = connection_settings(
                node.redis_connection.connection_pool, self.timeout, self.connect_timeout, self._no_retry)
        cls, kwargs = settings
        return cls(**kwargs)

    def _run(self, cmds: Sequence[Command]) -> list[Any]:
        return run(self._batch(cmds), self._do)

    def _do(self, step: Op) -> Any:
        """One step of :meth:`_batch`, blocking."""
        op, arg = step
        if op == "read":
            return arg.read_response()
        if op == "send":
            return arg[0].send_packed_command(arg[1], check_health=False)
        if op == "pipeline":
            return _all_answered(self._pipe(arg).execute(raise_on_error=False)) if arg else []
        if op == "disconnect":
            return arg.disconnect()
        if op == "remap":
            self._drop_idle()
            return self.rc.nodes_manager.initialize()
        raise TypeError(f"unknown step {step!r}")

    def _load_scripts(self) -> None:
        for s in CLIENT_SCRIPTS:  # a promoted replica, a restarted node: every primary
            self.rc.script_load(s.source)

    def _drop_idle(self) -> None:
        for conn in self._taken_idle():
            with contextlib.suppress(Exception):  # closing a dead socket may fail: nothing to do
                conn.disconnect()

    def subscription(self, channel: str) -> tuple[Any, str]:
        """A new connection for the backplane listener and its subscribe verb (see :meth:`_shard`)."""
        self.rc.nodes_manager.initialize()  # (re)subscribing: the shard may have failed over or moved
        node, verb = self._shard(channel)
        return node.redis_connection.connection_pool.make_connection(), verb

    def close(self) -> None:
        self._drop_idle()
        self.rc.close()


class AsyncClusterLink(_ClusterLinkBase, AsyncCalls):
    """The same over ``redis.asyncio.cluster.RedisCluster``, with the same fast path (see :class:`ClusterLink`).
    A cancelled call closes the connections it was using."""

    def __init__(self, client: Any, timeout: float, connect_timeout: float, breaker: CircuitBreaker,
                 stats: Stats, pubsub: str = "sharded") -> None:
        from redis.asyncio.cluster import ClusterNode, RedisCluster
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        rc = RedisCluster(startup_nodes=_seeds(client, ClusterNode), socket_timeout=timeout,
                          socket_connect_timeout=connect_timeout, retry=Retry(NoBackoff(), 1),
                          **_connection_kwargs(client))
        super().__init__(rc, timeout, connect_timeout, breaker, stats, pubsub, Retry(NoBackoff(), 0))

    def _new_connection(self, node: Any) -> Any:
        kwargs = dict(node.connection_kwargs)
        kwargs.update(socket_timeout=self.timeout, socket_connect_timeout=self.connect_timeout,
                      retry=self._no_retry, health_check_interval=0)
        return node.connection_class(**kwargs)

    async def _run(self, cmds: Sequence[Command]) -> list[Any]:
        return await arun(self._batch(cmds), self._do)

    async def _do(self, step: Op) -> Any:
        """One step of :meth:`_batch` (a cancellation is raised in the flow too: it closes its connections)."""
        op, arg = step
        if op == "read":
            return await arg.read_response()
        if op == "send":
            return await arg[0].send_packed_command(arg[1], check_health=False)
        if op == "disconnect":
            return await arg.disconnect(nowait=True)
        if op == "pipeline":
            return _all_answered(await self._pipe(arg).execute(raise_on_error=False)) if arg else []
        if op == "ready":
            return await self.rc.initialize()
        if op == "remap":
            await self._drop_idle()
            await self.rc.initialize()  # the first time; then the slot map is read again below
            return await self.rc.nodes_manager.initialize()
        raise TypeError(f"unknown step {step!r}")

    async def _load_scripts(self) -> None:
        for s in CLIENT_SCRIPTS:
            await self.rc.script_load(s.source)

    async def _drop_idle(self) -> None:
        for conn in self._taken_idle():
            with contextlib.suppress(Exception):  # closing a dead socket may fail
                await conn.disconnect(nowait=True)

    async def subscription(self, channel: str) -> tuple[Any, str]:
        await self.rc.initialize()  # an initialized client does nothing here: a new one reads the slot map
        await self.rc.nodes_manager.initialize()
        node, verb = self._shard(channel)
        return node.connection_class(**node.connection_kwargs), verb

    async def close(self) -> None:
        await self._drop_idle()
        await self.rc.aclose()
