"""The in-memory TTL cache of fetched secret values.

Keys are ``(provider, plan.auth, identity.key(), source)`` (plus the volume id for dynamic
sources), so values are shared only between callers with the same identity. Semantics:

- fresh (younger than ``ttl``): served from memory;
- stale (older than ``ttl``, younger than ``max_stale``): served from memory while one background
  refresh runs (single-flight, with backoff after failures);
- gone (never fetched, or older than ``max_stale``): the caller waits for a fetch (single-flight,
  a few tries for transient errors) and gets FetchError if it fails.

A refresh that gets a permanent answer (not found, access denied) drops the value at once: a
deleted secret or revoked access takes effect within one TTL instead of lingering until
``max_stale``. Dynamic sources are fetched once and never refreshed.

Runs on the trio thread only; the loaders it calls do their blocking work in worker threads.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass

import trio

from providers.base import Fetched, FetchError
from secretfs.logs import log_unexpected

log = logging.getLogger(__name__)

Loader = Callable[[], Awaitable[Fetched]]

# Foreground loads retry transient failures this many times in all, with backoff in between.
FOREGROUND_TRIES = 3
# Background refresh backoff after consecutive failures: 1, 2, 4, ... seconds, at most this.
MAX_BACKOFF = 60.0


@dataclass
class _Entry:
    value: Fetched
    fetched_at: float
    expires: float = math.inf  # too old to serve from then on (fetched_at + max_stale)


@dataclass
class Stats:
    hits: int = 0
    stale_hits: int = 0
    misses: int = 0
    refreshes: int = 0
    fetch_errors: int = 0


class SecretCache:
    def __init__(
        self,
        ttl: float,
        max_stale: float,
        on_change: Callable[[Hashable], None] | None = None,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        if ttl <= 0 or max_stale < ttl:
            raise ValueError("need 0 < ttl <= max_stale")
        self.ttl = ttl
        self.max_stale = max_stale
        self._clock = clock
        self._on_change = on_change
        # Static values in order of expiry (every store moves its key to the end). A value at
        # max_stale is gone: lookups treat it as missing and drop it, and every store drops all
        # such values, so expired secret bytes do not linger. TTL restarts on every refresh.
        self._static: dict[Hashable, _Entry] = {}
        self._dynamic: dict[Hashable, _Entry] = {}
        self._inflight: dict[Hashable, trio.Event] = {}
        self._errors: dict[Hashable, FetchError] = {}
        self._failures: Counter[Hashable] = Counter()
        self._retry_at: dict[Hashable, float] = {}
        self._refs: Counter[Hashable] = Counter()
        # (version, sha256 of the bytes) last stored per key: tells a change from a re-fetch.
        self._seen: dict[Hashable, tuple[str, bytes]] = {}
        # The last loader each key was fetched with, for refreshes started by peek().
        self._loaders: dict[Hashable, Loader] = {}
        # Keys released while a fetch for them was in flight: its result is thrown away.
        self._discard: set[Hashable] = set()
        self._nursery: trio.Nursery | None = None
        self.stats = Stats()

    def start(self, nursery: trio.Nursery) -> None:
        """Background refreshes run in ``nursery`` (tied to the daemon's lifetime)."""
        self._nursery = nursery

    # --- lifetime of values -------------------------------------------------------------------

    def retain(self, keys: Iterable[Hashable]) -> None:
        for k in keys:
            self._refs[k] += 1
            self._discard.discard(k)

    def release(self, keys: Iterable[Hashable]) -> None:
        """Drop values no volume uses any more."""
        for k in keys:
            self._refs[k] -= 1
            if self._refs[k] <= 0:
                del self._refs[k]
                self._static.pop(k, None)
                self._dynamic.pop(k, None)
                self._errors.pop(k, None)
                self._failures.pop(k, None)
                self._retry_at.pop(k, None)
                self._loaders.pop(k, None)
                self._seen.pop(k, None)
                if k in self._inflight:
                    self._discard.add(k)

    def put(self, key: Hashable, value: Fetched, *, dynamic: bool = False) -> None:
        """Store a value fetched elsewhere (the batch fetch at mount time)."""
        self._store(key, value, dynamic)

    def fresh(self, key: Hashable) -> Fetched | None:
        """A static value younger than the TTL, or None (lets a publish skip the backend)."""
        now = self._clock()
        entry = self._live(key, now)
        if entry is None or now - entry.fetched_at >= self.ttl:
            return None
        return entry.value

    def __len__(self) -> int:
        self._expire(self._clock())
        return len(self._static) + len(self._dynamic)

    # --- reads --------------------------------------------------------------------------------

    def peek(self, key: Hashable, *, dynamic: bool = False) -> Fetched | None:
        """The servable value, without waiting; starts a refresh when it is stale."""
        if dynamic:
            entry = self._dynamic.get(key)
            return None if entry is None else entry.value
        now = self._clock()
        entry = self._live(key, now)
        if entry is None:
            return None
        if now - entry.fetched_at >= self.ttl:
            self._refresh_soon(key, None)
        return entry.value

    def get_nowait(self, key: Hashable, load: Loader, *, dynamic: bool = False) -> Fetched | None:
        """What ``get`` returns without waiting (a hit, fresh or stale), else None: the caller
        only needs a deadline when this is None."""
        if dynamic:
            entry = self._dynamic.get(key)
            if entry is None:
                return None
            self.stats.hits += 1
            return entry.value
        # The hit path of every open: one clock read, one dict lookup.
        now = self._clock()
        entry = self._live(key, now)
        if entry is None:
            return None
        if now - entry.fetched_at < self.ttl:
            self.stats.hits += 1
        else:
            self.stats.stale_hits += 1
            self._refresh_soon(key, load)
        return entry.value

    async def get(self, key: Hashable, load: Loader, *, dynamic: bool = False) -> Fetched:
        value = self.get_nowait(key, load, dynamic=dynamic)
        if value is not None:
            return value
        self.stats.misses += 1
        for attempt in range(FOREGROUND_TRIES):
            await self._wait_flight(key, load, dynamic)
            entry = self._dynamic.get(key) if dynamic else self._live(key, self._clock())
            if entry is not None:
                return entry.value
            err = self._errors.get(key)
            if err is None or not err.transient or attempt == FOREGROUND_TRIES - 1:
                break
            await trio.sleep(_backoff(attempt) / 4)
        raise self._errors.get(key) or FetchError("?", "no value", transient=True)

    # --- internals ----------------------------------------------------------------------------

    def _live(self, key: Hashable, now: float) -> _Entry | None:
        """The static entry of ``key`` if it is younger than max_stale; drops it if not."""
        entry = self._static.get(key)
        if entry is None or now < entry.expires:
            return entry
        del self._static[key]
        return None

    def _expire(self, now: float) -> None:
        """Drop every static value at max_stale (the oldest are first)."""
        static = self._static
        while static:
            key = next(iter(static))
            if now < static[key].expires:
                break
            del static[key]

    def _store(self, key: Hashable, value: Fetched, dynamic: bool) -> None:
        now = self._clock()
        if dynamic:
            self._dynamic[key] = _Entry(value, now)
        else:
            self._expire(now)
            self._static.pop(key, None)  # to the end: the order of expiry
            self._static[key] = _Entry(value, now, now + self.max_stale)
        self._errors.pop(key, None)
        self._failures.pop(key, None)
        self._retry_at.pop(key, None)
        # Compare with what was served last, even if that value has since expired past max_stale
        # or was dropped after a permanent error: the kernel may still cache its size and pages.
        # A digest, not the bytes, so nothing expired lingers in memory.
        seen = (value.version, hashlib.sha256(value.data).digest())
        old = self._seen.get(key)
        self._seen[key] = seen
        if old is not None and old != seen and self._on_change is not None:
            self._on_change(key)

    def _refresh_soon(self, key: Hashable, load: Loader | None) -> None:
        if key in self._inflight or self._nursery is None:
            return
        if self._clock() < self._retry_at.get(key, -math.inf):
            return
        loader = load or self._loaders.get(key)
        if loader is None:
            return
        self.stats.refreshes += 1
        self._start_flight(key, loader, False)

    async def _wait_flight(self, key: Hashable, load: Loader, dynamic: bool) -> None:
        """Wait for the one fetch of ``key``, starting it if none is running.

        The fetch runs in the cache's nursery, not in the caller, so a caller that gives up (its
        deadline passed) does not cancel the fetch for the others waiting on it.
        """
        ev = self._inflight.get(key)
        if ev is None:
            if self._nursery is None:
                ev = self._inflight[key] = trio.Event()
                await self._flight(key, load, dynamic, ev)
                return
            ev = self._start_flight(key, load, dynamic)
        await ev.wait()

    def _start_flight(self, key: Hashable, load: Loader, dynamic: bool) -> trio.Event:
        assert self._nursery is not None
        ev = self._inflight[key] = trio.Event()
        self._nursery.start_soon(self._flight, key, load, dynamic, ev)
        return ev

    async def _flight(self, key: Hashable, load: Loader, dynamic: bool, ev: trio.Event) -> None:
        self._loaders[key] = load
        try:
            value = await load()
        except FetchError as exc:
            self._record_failure(key, exc)
        except Exception as exc:  # a loader bug must not kill the daemon
            log_unexpected(log, "fetch failed unexpectedly")
            self._record_failure(
                key, FetchError("?", f"internal error ({type(exc).__name__})", transient=True)
            )
        else:
            if key in self._discard:
                self._discard.discard(key)
            else:
                self._store(key, value, dynamic)
        finally:
            del self._inflight[key]
            ev.set()

    def _record_failure(self, key: Hashable, exc: FetchError) -> None:
        self.stats.fetch_errors += 1
        self._errors[key] = exc
        n = self._failures[key] = self._failures[key] + 1
        self._retry_at[key] = self._clock() + _backoff(n - 1)
        if not exc.transient:
            # Deleted secret or revoked access: stop serving the old value now.
            self._static.pop(key, None)
        level = logging.INFO if n < 3 else logging.WARNING
        log.log(level, "fetch failed (%d in a row): %s", n, exc)


def _backoff(n: int) -> float:
    """Exponential backoff with full jitter on the upper half: n=0 -> 0.5..1 s."""
    base = min(MAX_BACKOFF, 2.0**n)
    return base / 2 + random.random() * base / 2
