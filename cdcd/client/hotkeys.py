"""Hot-key detection for a cache: sample its reads into a top-K sketch, publish the top to Redis.

Opt-in (``CacheOptions(hot_keys=HotKeyOptions())``) because it cannot be free on the L1 hit path:
when on, :meth:`HotKeys.attach` wraps the instance's ``get`` and ``get_or_load`` with a function
that counts down a randomly drawn gap and offers the key to the sketch when it reaches zero (one
read in ``sample`` on average), then calls the real method. Off, nothing is wrapped and the read
path is byte-for-byte the same. The cost measured both ways is in BENCHMARKS.md (hot keys section).

Every ``publish_every`` seconds the window's sketch is swapped for a fresh one and the top keys are
written to Redis (:mod:`cdcd.hotset`) with scores in estimated reads per second, averaged over the
last few windows (:meth:`HotKeys.rotate`). The sync cache publishes from a daemon thread; the
async cache from a task started by :meth:`AsyncCache.start`. A failed publish is counted and
retried at the next window; it never reaches a reader.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import random
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from operator import itemgetter
from typing import Any

from cdcd.hotset import Command, publish_commands
from cdcd.keyspace import Keyspace

from ._log import log
from .options import HotKeyOptions
from .sketch import TopK

_GAPS = 1024  # precomputed sampling gaps, cycled: no RNG call on the read path
_FADED = 0.001  # reads/s below which a fading key is no longer published


def sampling_gaps(sample: int, rng: random.Random, n: int = _GAPS) -> tuple[int, ...]:
    """Geometric gaps with mean ``sample``: each read is counted with probability ``1/sample``."""
    if sample <= 1:
        return (1,)
    q = math.log(1.0 - 1.0 / sample)
    return tuple(1 + int(math.log(1.0 - rng.random()) / q) for _ in range(n))


class HotKeys:
    """The sketch of one cache, its windows and its publisher. ``top()`` reads it in process."""

    def __init__(self, options: HotKeyOptions, keyspace: Keyspace, run: str, rng: random.Random | None = None) -> None:
        self.options = options
        self.keyspace = keyspace
        self.run = run
        self.gaps = sampling_gaps(options.sample, rng or random.Random())
        self.sketch = TopK(options.capacity)
        self.window_started = time.monotonic()
        self.last_window: list[tuple[str, float]] = []
        self.published = 0
        self.publish_errors = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ the read path

    @classmethod
    def attach(cls, cache: Any, options: HotKeyOptions | None) -> HotKeys | None:
        """Wrap ``cache.get`` and ``cache.get_or_load`` (the instance's current ones, ``l1_copy`` included)."""
        if options is None:
            return None
        hot = cls(options, cache.keyspace, cache.run_id, cache.rng)
        get, get_or_load = cache.get, cache.get_or_load
        gaps, n_gaps, limit = hot.gaps, len(hot.gaps), options.max_key_length
        left, i = gaps[0], 0

        def offer(key: str) -> int:
            nonlocal i
            if type(key) is str and len(key) <= limit and "#" not in key:  # '#': refused by the cache anyway
                hot.sketch.offer(key)
            i = (i + 1) % n_gaps
            return gaps[i]

        def hooked_get(key: str, default: Any = None, **kw: Any) -> Any:
            nonlocal left
            left -= 1
            if left <= 0:  # '<=': a racing thread may step past zero
                left = offer(key)
            if kw:  # a call without keywords is the common case: no **-call for it (measured ~50 ns)
                return get(key, default, **kw)
            return get(key, default)

        def hooked_get_or_load(key: str, loader: Any, **kw: Any) -> Any:
            nonlocal left
            left -= 1
            if left <= 0:
                left = offer(key)
            if kw:
                return get_or_load(key, loader, **kw)
            return get_or_load(key, loader)

        hooked_get.__doc__, hooked_get_or_load.__doc__ = get.__doc__, get_or_load.__doc__
        cache.get, cache.get_or_load = hooked_get, hooked_get_or_load
        return hot

    # ------------------------------------------------------------------ windows

    def _scale(self, counts: Sequence[tuple[str, int]], seconds: float) -> list[tuple[str, float]]:
        f = self.options.sample / max(seconds, 1e-3)
        return [(k, round(c * f, 3)) for k, c in counts]

    def top(self, n: int | None = None) -> list[tuple[str, float]]:
        """This window's heaviest keys so far, with estimated reads per second."""
        return self._scale(self.sketch.top(n or self.options.top), time.monotonic() - self.window_started)

    def rotate(self) -> list[tuple[str, float]]:
        """End the window: a fresh sketch for the next one, and the published scores.

        A score is the average of the key's per-window rates weighted by half at every window
        (``score = (rate_this_window + previous_score) / 2``), over at most ``top`` keys: a key whose
        reads stop fades over a few windows instead of vanishing at once, so a quiet minute does not
        erase the hot set that ``warm --hot`` needs, and a key that became hot shows up in one window.
        """
        now = time.monotonic()
        sketch, self.sketch = self.sketch, TopK(self.options.capacity)
        seconds, self.window_started = now - self.window_started, now
        scores = {k: s / 2 for k, s in self.last_window}
        for k, rate in self._scale(sketch.top(self.options.top), seconds):
            scores[k] = scores.get(k, 0.0) + rate / 2
        ranked = heapq.nlargest(self.options.top, scores.items(), key=itemgetter(1))
        self.last_window = [(k, round(s, 3)) for k, s in ranked if s >= _FADED]
        return self.last_window

    def publish_batch(self) -> list[Command]:
        """Rotate and build the Redis batch that replaces this process's published set."""
        top = self.rotate()
        return publish_commands(self.keyspace, self.run, top, time.time(), 3 * self.options.publish_every)

    # ------------------------------------------------------------------ publishing

    def _done(self, ok: bool, error: Exception | None = None) -> None:
        if ok:
            self.published += 1
        else:
            self.publish_errors += 1
            log.debug("hot_keys_publish_failed", error=str(error))

    def publish_now(self, call: Callable[[list[Command]], Any]) -> bool:
        try:
            call(self.publish_batch())
        except Exception as exc:  # Redis down, breaker open: the next window tries again
            self._done(False, exc)
            return False
        self._done(True)
        return True

    def start_thread(self, call: Callable[[list[Command]], Any]) -> None:
        if not self.options.publish or self._thread is not None:
            return

        def loop() -> None:
            while not self._stop.wait(self.options.publish_every):
                self.publish_now(call)

        self._thread = threading.Thread(target=loop, name="cdcd-hot-keys", daemon=True)
        self._thread.start()

    def start_task(self, call: Callable[[list[Command]], Awaitable[Any]]) -> asyncio.Task[None] | None:
        """The async publisher; the caller owns (and cancels) the task."""
        if not self.options.publish:
            return None

        async def loop() -> None:
            while True:
                await asyncio.sleep(self.options.publish_every)
                try:
                    await call(self.publish_batch())
                except Exception as exc:
                    self._done(False, exc)
                else:
                    self._done(True)

        return asyncio.get_running_loop().create_task(loop())

    def stop(self) -> None:
        self._stop.set()

    # ------------------------------------------------------------------ metrics

    def register_prometheus(self, registry: Any = None, prefix: str = "cdcd_client") -> Any:
        """``<prefix>_hot_key_reads_per_second{key=...}`` for the last window's top keys (at most ``top``
        label values), and ``<prefix>_hot_keys_publish_errors_total``. prometheus_client is optional."""
        from prometheus_client import REGISTRY
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        hot = self

        class _Collector:
            def collect(self) -> Iterator[Any]:
                g = GaugeMetricFamily(f"{prefix}_hot_key_reads_per_second",
                                      "estimated reads per second of this process's hottest keys (last window)",
                                      labels=["key"])
                for k, score in hot.last_window:
                    g.add_metric([k], score)
                yield g
                yield CounterMetricFamily(f"{prefix}_hot_keys_publish_errors", "hot-key publishes that failed",
                                          value=hot.publish_errors)

        collector = _Collector()
        (registry if registry is not None else REGISTRY).register(collector)
        return collector
