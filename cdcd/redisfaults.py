"""Which Redis errors are worth retrying, and which are a refusal retrying cannot fix.

Why one module: the daemon must treat every connection-level problem the same way (back off, retry
the same batch, keep the position), whatever layer noticed it: redis-py's connection code raises
``redis.ConnectionError``/``TimeoutError``, but the sink's hand-packed reply reader talks to the
parser directly, where a reset socket surfaces as a raw ``ConnectionResetError`` (an ``OSError``),
an EOF mid-reply as ``EOFError``/``ConnectionError`` and a garbled stream as a hiredis error. Before
this module such an ``OSError`` escaped the retry loop and ended ``cdcd run`` (issue 15, item 4).

A *refusal* is the other kind: Redis answered, and the answer concerns one key (``WRONGTYPE``: the
key holds a type cdcd's scripts do not write; a Lua error). Retrying the batch forever would block
the whole stream on one key, so such a reply is dead-lettered and the key repaired instead
(see :meth:`cdcd.sinks.redis.RedisSink._repair`). ``OOM``, ``LOADING``, ``BUSY``, ``READONLY`` and
the like are *not* refusals: they pass, so the batch is retried with backoff.
"""

from __future__ import annotations

import hiredis
import redis

# Connection-level failures, from any layer between the socket and the reply parser.
REDIS_FAULTS: tuple[type[BaseException], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.InvalidResponse,
    OSError,  # ConnectionResetError, BrokenPipeError, socket.timeout, ECONNREFUSED...
    EOFError,
    hiredis.HiredisError,
    hiredis.ProtocolError,
    # Redis Cluster: no node reachable, or a slot served by nobody for a moment (a failover, a resharding)
    redis.exceptions.RedisClusterException,
)

# Error replies that say "not now" rather than "never": the whole batch is retried.
_TRANSIENT = ("OOM", "LOADING", "BUSY", "READONLY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "MOVED", "ASK",
              "NOREPLICAS", "NOAUTH", "NOPERM", "WRONGPASS", "EXECABORT", "NOSCRIPT", "UNBLOCKED")


class RedisFault(redis.ConnectionError):
    """A connection-level Redis failure, whatever raised it: retry with backoff, keep the position.

    A subclass of ``redis.ConnectionError`` so every ``except redis.RedisError`` already handles it.
    """


def translate(exc: BaseException) -> BaseException:
    """``exc`` as the error the retry path handles: a fault becomes :class:`RedisFault`."""
    if isinstance(exc, redis.RedisError) and not isinstance(exc, (redis.ConnectionError, redis.TimeoutError,
                                                                   redis.exceptions.InvalidResponse)):
        return exc  # a reply (ResponseError...): already a RedisError the caller retries
    if isinstance(exc, REDIS_FAULTS):
        fault = RedisFault(f"{type(exc).__name__}: {exc}")
        fault.__cause__ = exc
        return fault
    return exc


def refusal_reason(exc: BaseException) -> str | None:
    """The metric label for an error reply retrying cannot fix, or None (transient: retry).

    redis-py turns the known transient codes (OOM, LOADING, NOSCRIPT, READONLY, MOVED...) into
    subclasses of ``ResponseError`` and strips the code from the message, so only a plain
    ``ResponseError`` can be a refusal; its message is then checked.
    """
    if type(exc) is not redis.ResponseError:
        return None
    msg = str(exc)
    if "WRONGTYPE" in msg:
        return "wrongtype"
    if msg.startswith(_TRANSIENT):
        return None
    if "script" in msg.lower():
        return "script_error"
    return None

