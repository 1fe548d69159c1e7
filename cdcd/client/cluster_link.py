"""The cache's link to a Redis Cluster: the same ``call(commands) -> replies`` as :mod:`.link`, per node.

A single node takes a batch (entry, its TTL, its tag counters, a publish) on one connection in one round
trip. On a cluster those keys live in different hash slots, so on different masters. The link groups a
batch per master by the cluster client's slot map, writes every master its group (packed, on an idle
connection of its own, as :mod:`.link` does) before reading any answer, so the masters work concurrently
and the wall time is about one round trip. Redirect answers (``MOVED``/``ASK``, ``TRYAGAIN``,
``CLUSTERDOWN``: a resharding or a failover) and batches hit by a dead connection go through redis-py's
``ClusterPipeline``, which follows redirects and refreshes the slot map. The pipeline alone was measured
~2x slower per call (bench/client_cluster.py, BENCHMARKS.md section 18).

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
from collections.abc import Callable, Sequence
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
from .link import CLIENT_SCRIPTS, L2Unavailable, connection_settings, pack, raise_errors
from .stats import Stats

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


class ClusterLink:
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

        self.breaker = breaker
        self.stats = stats
        self.sharded = pubsub == "sharded"
        self.publish_verb = "SPUBLISH" if self.sharded else "PUBLISH"
        def build() -> Any:  # on first use (LazyRedisCluster): a cluster down now is a Redis fault later
            app = client.resolve() if isinstance(client, LazyRedisCluster) else client
            return RedisCluster(startup_nodes=_seeds(app, ClusterNode), socket_timeout=timeout,
                                socket_connect_timeout=connect_timeout, retry=Retry(NoBackoff(), 1),
                                **_connection_kwargs(app))

        self.rc: Any = LazyRedisCluster(build)
        self._stale_map = False
        self.timeout, self.connect_timeout = timeout, connect_timeout
        self._no_retry = Retry(NoBackoff(), 0)
        self._idle: dict[str, collections.deque[Any]] = {}
        self._settings: dict[str, tuple[Any, dict[str, Any]]] = {}
        self.direct = True  # False: every batch through the ClusterPipeline (the bench compares the two)

    def _connection(self, node: Any) -> Any:
        idle = self._idle.get(node.name)
        if idle:
            try:
                return idle.pop()
            except IndexError:
                pass
        settings = self._settings.get(node.name)
        if settings is None:
            settings = self._settings[node.name] = connection_settings(
                node.redis_connection.connection_pool, self.timeout, self.connect_timeout, self._no_retry)
        cls, kwargs = settings
        return cls(**kwargs)

    def _direct(self, cmds: Sequence[Command]) -> list[Any]:
        groups = _by_node(cmds, self.rc.nodes_manager, self.rc.get_default_node)
        out: list[Any] = [None] * len(cmds)
        conns: list[tuple[str, Any, list[int]]] = []
        try:
            for name, (node, idx) in groups.items():
                conn = self._connection(node)
                conns.append((name, conn, idx))
                conn.send_packed_command([pack([cmds[i] for i in idx])], check_health=False)
            for _, conn, idx in conns:
                for i in idx:
                    try:
                        out[i] = conn.read_response()
                    except ResponseError as exc:  # an error reply: the connection is still in step
                        out[i] = exc
        except BaseException:
            for _, conn, _ in conns:
                conn.disconnect()
            raise
        for name, conn, _ in conns:
            self._idle.setdefault(name, collections.deque()).append(conn)
        moved = _redirected(out)
        if moved:  # the slot map is out of date (resharding, failover): redis-py follows the redirect
            for i, r in zip(moved, self._pipeline([cmds[i] for i in moved]), strict=True):
                out[i] = r
        return out

    def _send(self, cmds: Sequence[Command]) -> list[Any]:
        if not cmds:
            return []
        if not self.direct:
            return self._pipeline(cmds)
        try:
            return self._direct(cmds)
        except _CONNECTION_FAILURES:
            self._drop_idle()  # a node died or restarted: its siblings' connections likely too
            self.rc.nodes_manager.initialize()
            return self._pipeline(cmds)

    def _drop_idle(self) -> None:
        for idle in self._idle.values():
            while idle:
                try:
                    idle.pop().disconnect()
                except IndexError:
                    break
                except Exception:  # closing a dead socket may fail: nothing to do
                    continue

    def call(self, cmds: Sequence[Command]) -> list[Any]:
        if not self.breaker.allow():
            raise L2Unavailable("circuit breaker open")
        try:
            out = self._run(cmds)
            if any(isinstance(r, NoScriptError) for r in out):  # a promoted replica, a restarted node
                for s in CLIENT_SCRIPTS:
                    self.rc.script_load(s.source)  # every primary
                out = self._run(cmds)
        except _FAILURES as exc:
            self._stale_map = True
            self.stats.redis_errors += 1
            if self.breaker.failure():
                self.stats.breaker_open += 1
            raise L2Unavailable(f"{type(exc).__name__}: {exc}") from exc
        self.breaker.success()
        return out

    def call_checked(self, cmds: Sequence[Command]) -> list[Any]:
        out = self.call(cmds)
        raise_errors(out)
        return out

    def _pipeline(self, cmds: Sequence[Command]) -> list[Any]:
        if not cmds:
            return []
        pipe = self.rc.pipeline(transaction=False)
        for c in cmds:
            pipe.execute_command(*c)
        out: list[Any] = pipe.execute(raise_on_error=False)
        failed = _failed(out)
        if failed is not None:
            raise failed
        return out

    def _run(self, cmds: Sequence[Command]) -> list[Any]:
        if self._stale_map:  # the last call failed: a failover or a resharding may have moved slots
            self._stale_map = False
            self._drop_idle()
            self.rc.nodes_manager.initialize()
        first_i, first, pub_i, pubs = _split(cmds, self.publish_verb)
        done = self._send(first)
        failed = _failed(done)
        if failed is not None:
            raise failed
        return _merge(len(cmds), first_i, done, pub_i, self._send(pubs))

    def subscription(self, channel: str) -> tuple[Any, str]:
        """A new connection for the backplane listener and its subscribe verb: the channel's shard with
        ``SSUBSCRIBE``, or any node with ``SUBSCRIBE`` (classic pub/sub reaches every node)."""
        self.rc.nodes_manager.initialize()  # (re)subscribing: the shard may have failed over or moved
        node = (self.rc.nodes_manager.get_node_from_slot(self.rc.keyslot(channel)) if self.sharded
                else self.rc.get_random_node())
        pool = node.redis_connection.connection_pool
        return pool.make_connection(), "SSUBSCRIBE" if self.sharded else "SUBSCRIBE"

    def close(self) -> None:
        self._drop_idle()
        self.rc.close()


class AsyncClusterLink:
    """The same over ``redis.asyncio.cluster.RedisCluster``, with the same fast path (see :class:`ClusterLink`).
    A cancelled call closes the connections it was using."""

    def __init__(self, client: Any, timeout: float, connect_timeout: float, breaker: CircuitBreaker,
                 stats: Stats, pubsub: str = "sharded") -> None:
        from redis.asyncio.cluster import ClusterNode, RedisCluster
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.breaker = breaker
        self.stats = stats
        self.sharded = pubsub == "sharded"
        self.publish_verb = "SPUBLISH" if self.sharded else "PUBLISH"
        self.rc: Any = RedisCluster(startup_nodes=_seeds(client, ClusterNode), socket_timeout=timeout,
                                    socket_connect_timeout=connect_timeout, retry=Retry(NoBackoff(), 1),
                                    **_connection_kwargs(client))
        self._stale_map = False
        self.timeout, self.connect_timeout = timeout, connect_timeout
        self._no_retry = Retry(NoBackoff(), 0)
        self._idle: dict[str, collections.deque[Any]] = {}
        self._ready = False
        self.direct = True

    def _connection(self, node: Any) -> Any:
        idle = self._idle.get(node.name)
        if idle:
            try:
                return idle.pop()
            except IndexError:
                pass
        kwargs = dict(node.connection_kwargs)
        kwargs.update(socket_timeout=self.timeout, socket_connect_timeout=self.connect_timeout,
                      retry=self._no_retry, health_check_interval=0)
        return node.connection_class(**kwargs)

    async def _direct(self, cmds: Sequence[Command]) -> list[Any]:
        if not self._ready:
            await self.rc.initialize()
            self._ready = True
        groups = _by_node(cmds, self.rc.nodes_manager, self.rc.get_default_node)
        out: list[Any] = [None] * len(cmds)
        conns: list[tuple[str, Any, list[int]]] = []
        try:
            for name, (node, idx) in groups.items():
                conn = self._connection(node)
                conns.append((name, conn, idx))
                await conn.send_packed_command([pack([cmds[i] for i in idx])], check_health=False)
            for _, conn, idx in conns:
                for i in idx:
                    try:
                        out[i] = await conn.read_response()
                    except ResponseError as exc:
                        out[i] = exc
        except BaseException:
            for _, conn, _ in conns:
                await conn.disconnect(nowait=True)
            raise
        for name, conn, _ in conns:
            self._idle.setdefault(name, collections.deque()).append(conn)
        moved = _redirected(out)
        if moved:
            for i, r in zip(moved, await self._pipeline([cmds[i] for i in moved]), strict=True):
                out[i] = r
        return out

    async def _send(self, cmds: Sequence[Command]) -> list[Any]:
        if not cmds:
            return []
        if not self.direct:
            return await self._pipeline(cmds)
        try:
            return await self._direct(cmds)
        except _CONNECTION_FAILURES:
            await self._drop_idle()
            await self.rc.nodes_manager.initialize()
            return await self._pipeline(cmds)

    async def _drop_idle(self) -> None:
        for idle in self._idle.values():
            while idle:
                try:
                    conn = idle.pop()
                except IndexError:
                    break
                try:
                    await conn.disconnect(nowait=True)
                except Exception:  # closing a dead socket may fail
                    continue

    async def call(self, cmds: Sequence[Command]) -> list[Any]:
        if not self.breaker.allow():
            raise L2Unavailable("circuit breaker open")
        try:
            out = await self._run(cmds)
            if any(isinstance(r, NoScriptError) for r in out):
                for s in CLIENT_SCRIPTS:
                    await self.rc.script_load(s.source)
                out = await self._run(cmds)
        except _FAILURES as exc:
            self._stale_map = True
            self.stats.redis_errors += 1
            if self.breaker.failure():
                self.stats.breaker_open += 1
            raise L2Unavailable(f"{type(exc).__name__}: {exc}") from exc
        self.breaker.success()
        return out

    async def call_checked(self, cmds: Sequence[Command]) -> list[Any]:
        out = await self.call(cmds)
        raise_errors(out)
        return out

    async def _pipeline(self, cmds: Sequence[Command]) -> list[Any]:
        if not cmds:
            return []
        pipe = self.rc.pipeline(transaction=False)
        for c in cmds:
            pipe.execute_command(*c)
        out: list[Any] = await pipe.execute(raise_on_error=False)
        failed = _failed(out)
        if failed is not None:
            raise failed
        return out

    async def _run(self, cmds: Sequence[Command]) -> list[Any]:
        if self._stale_map:
            self._stale_map = False
            await self._drop_idle()
            await self.rc.initialize()  # the first time; then the slot map is read again below
            await self.rc.nodes_manager.initialize()
        first_i, first, pub_i, pubs = _split(cmds, self.publish_verb)
        done = await self._send(first)
        failed = _failed(done)
        if failed is not None:
            raise failed
        return _merge(len(cmds), first_i, done, pub_i, await self._send(pubs))

    async def subscription(self, channel: str) -> tuple[Any, str]:
        await self.rc.initialize()  # an initialized client does nothing here: a new one reads the slot map
        await self.rc.nodes_manager.initialize()
        node = (self.rc.nodes_manager.get_node_from_slot(self.rc.keyslot(channel)) if self.sharded
                else self.rc.get_random_node())
        return node.connection_class(**node.connection_kwargs), "SSUBSCRIBE" if self.sharded else "SUBSCRIBE"

    async def close(self) -> None:
        await self._drop_idle()
        await self.rc.aclose()
