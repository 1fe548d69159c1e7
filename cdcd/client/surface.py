"""What both cache drivers expose the same way: construction of the core, its state under the names
applications and tests use, and the methods that neither wait nor do I/O."""

from __future__ import annotations

import contextlib
import functools
import random
from collections.abc import Callable
from typing import Any

from cdcd.backplane import Message
from cdcd.keys import render

from .consistency import Position, read_your_writes
from .core import CacheCore
from .hotkeys import HotKeys
from .options import CacheOptions
from .protocol import KeyTemplate
from .serializers import Serializer
from .typed import TypedSerializer


class CacheSurface:
    """The core and the public, I/O-free part of a cache; :class:`~.cache.Cache` and
    :class:`~.aio.AsyncCache` add the I/O and the concurrency primitives."""

    link: Any  # the driver's: a (cluster) link, sync or asyncio (:mod:`.link`, :mod:`.cluster_link`)

    def __init__(self, client: Any, options: CacheOptions | None, serializer: Serializer | None,
                 rng: random.Random | None, open_client: Callable[[Any], Any],
                 make_link: Callable[..., Any]) -> None:
        """``client``: a URL (``open_client`` makes the client: ``redis+cluster://`` a cluster) or a redis-py
        client whose settings the cache's own connections (``make_link``) use, with the cache's timeouts and
        no retries."""
        self.options = opts = options or CacheOptions()
        self.core = core = CacheCore(opts, serializer or TypedSerializer(), rng)
        self.keyspace = core.keyspace
        self.serializer: Serializer = core.serializer
        self._copy = opts.l1_copy
        self.stats = core.stats
        self.l1 = core.l1
        self._l1data = core.l1.data  # bound once: the hit path avoids an attribute hop
        self.breaker = core.breaker
        self.registry = core.registry
        self.rng = core.rng
        self.sequencer = core.sequencer
        self.watermark = core.watermark
        self.exists = core.exists  # docs/existence-filter.md
        self.redis: Any = open_client(client)
        self.link = make_link(self.redis, opts, self.breaker, self.stats)  # a cluster link on a cluster
        if self._copy:  # every public read hands out its own copy (see values.Frozen)
            self._bind_copies()
        # opt-in: wraps get/get_or_load (docs/hot-keys.md); the driver starts and stops its publisher
        self.hot_keys = HotKeys.attach(self, opts.hot_keys)

    def _bind_copies(self) -> None:
        """Put the driver's copying ``get`` and ``get_or_load`` over its own (``l1_copy``)."""
        raise NotImplementedError

    @property
    def run_id(self) -> str:
        """This process's backplane run id (its own messages are ignored by its listener)."""
        return self.core.run_id

    @property
    def unverifiable(self) -> bool:
        """See :attr:`CacheCore.unverifiable`."""
        return self.core.unverifiable

    def apply_message(self, msg: Message) -> None:
        """See :meth:`CacheCore.apply_message`."""
        self.core.apply_message(msg)

    def reset_l1(self, why: str) -> None:
        """The backplane may have lost messages: nothing in L1 can be trusted to be current."""
        self.core.reset_l1(why)

    @staticmethod
    def key(template: str, /, **values: Any) -> str | None:
        """``Cache.key("pair:{a}:{b}", a="x:y", b="z")`` -> ``pair:x%3Ay:z``: the key the daemon writes for a
        row with these column values (same rendering and escaping), or None when a value is None or empty."""
        return render(template, values)

    @staticmethod
    def read_your_writes(position: Position | None) -> contextlib.AbstractContextManager[int]:
        """``with cache.read_your_writes(pos):`` every read in the scope (this thread, or this asyncio task
        and the tasks it starts) is at least as new as the commit at ``pos`` (see
        :func:`cdcd.client.commit_position`)."""
        return read_your_writes(position)


def decorated(fn: Callable[..., Any], wrapper: Callable[..., Any], tpl: KeyTemplate,
              invalidate: Callable[..., Any]) -> Any:
    """``wrapper`` (a cached ``fn``) with ``.key(...)`` and ``.invalidate(...)`` taking ``fn``'s arguments."""

    def key_of(*a: Any, **kw: Any) -> str | None:
        return tpl.render(a, kw)[0]

    out: Any = functools.wraps(fn)(wrapper)
    out.key = key_of
    out.invalidate = invalidate
    return out
