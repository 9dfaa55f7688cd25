"""The in-memory TTL cache of fetched secret values.

Keys are ``(provider, plan.auth, identity.key(), source)`` (plus the volume id for dynamic
sources), so values are shared only between callers with the same identity. Semantics:

- fresh (younger than the key's TTL): served from memory;
- stale (older than the TTL, younger than ``max_stale``): served from memory while one background
  refresh runs (single-flight, with backoff after failures);
- gone (never fetched, or older than ``max_stale``): the caller waits for a fetch (single-flight,
  a few tries for transient errors) and gets FetchError if it fails.

Each key has its own TTL: the shortest asked for by the holders that retained it (a volume whose
SecretProviderClass sets one), else the cache's default.

Keys fetched together (a volume's static values) can be registered as a *group* with a loader
for many keys at once: a refresh of one of them then fetches, in one loader call, every key of the
group that is due (past its TTL, not in flight, not backing off after a failure). Every key of
such a batch is in flight until it returns, so a reader of any of them waits for that one fetch.

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
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import trio

from providers.base import Fetched, FetchError
from secretfs import metrics
from secretfs.logs import fields, log_unexpected

log = logging.getLogger(__name__)

Loader = Callable[[], Awaitable[Fetched]]
# Fetches many keys in one call; one result per key (a FetchError for a key that failed).
BatchLoader = Callable[[Sequence[Hashable]], Awaitable[Mapping[Hashable, Fetched | FetchError]]]

# Foreground loads retry transient failures this many times in all, with backoff in between.
FOREGROUND_TRIES = 3
# Background refresh backoff after consecutive failures: 1, 2, 4, ... seconds, at most this.
MAX_BACKOFF = 60.0

# Outcomes of an on-demand refresh (SecretCache.refresh), per key.
FETCHED = "fetched"  # fetched, same version and bytes as before
CHANGED = "changed"  # fetched, and it differs from what was served before
FAILED = "failed"  # the fetch failed (or did not finish in time)


@dataclass
class _Entry:
    value: Fetched
    fetched_at: float
    expires: float = math.inf  # too old to serve from then on (fetched_at + max_stale)


@dataclass(eq=False)
class _Group:
    """Keys fetched together, and the loader that fetches any of them in one call."""

    keys: tuple[Hashable, ...]
    load: BatchLoader


@dataclass
class Stats:
    hits: int = 0
    stale_hits: int = 0
    misses: int = 0
    refreshes: int = 0
    fetch_errors: int = 0
    # Volumes published from values past their TTL because the backend failed (Volumes).
    stale_publishes: int = 0


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
        # The TTL each holder of a key asked for (a multiset), and the shortest of them: the
        # key's TTL while they share it. Keys without an entry use the default ``ttl``.
        self._holder_ttls: dict[Hashable, Counter[float]] = {}
        self._ttls: dict[Hashable, float] = {}
        # (version, sha256 of the bytes) last stored per key: tells a change from a re-fetch.
        self._seen: dict[Hashable, tuple[str, bytes]] = {}
        # The last loader each key was fetched with, for refreshes started by peek().
        self._loaders: dict[Hashable, Loader] = {}
        # The group of each static key that has one (its refreshes are batched).
        self._groups: dict[Hashable, _Group] = {}
        # Keys released while a fetch for them was in flight: its result is thrown away.
        self._discard: set[Hashable] = set()
        self._nursery: trio.Nursery | None = None
        self.stats = Stats()

    def start(self, nursery: trio.Nursery) -> None:
        """Background refreshes run in ``nursery`` (tied to the daemon's lifetime)."""
        self._nursery = nursery

    # --- lifetime of values -------------------------------------------------------------------

    def retain(self, keys: Iterable[Hashable], ttl: float | None = None) -> None:
        """Hold ``keys``; ``ttl`` is this holder's TTL for them (None: the default). Release
        with the same ``ttl``."""
        t = self._bounded(ttl)
        for k in keys:
            self._refs[k] += 1
            self._discard.discard(k)
            held = self._holder_ttls.get(k)
            if held is None:
                held = self._holder_ttls[k] = Counter()
            held[t] += 1
            self._ttls[k] = min(held)

    def release(self, keys: Iterable[Hashable], ttl: float | None = None) -> None:
        """Drop values no holder uses any more."""
        t = self._bounded(ttl)
        for k in keys:
            held = self._holder_ttls.get(k)
            if held is not None:
                held[t] -= 1
                if held[t] <= 0:
                    del held[t]
                if held:
                    self._ttls[k] = min(held)
                else:
                    del self._holder_ttls[k]
                    self._ttls.pop(k, None)
            self._refs[k] -= 1
            if self._refs[k] <= 0:
                del self._refs[k]
                self._static.pop(k, None)
                self._dynamic.pop(k, None)
                self._errors.pop(k, None)
                self._failures.pop(k, None)
                self._retry_at.pop(k, None)
                self._loaders.pop(k, None)
                self._groups.pop(k, None)
                self._seen.pop(k, None)
                self._holder_ttls.pop(k, None)
                self._ttls.pop(k, None)
                if k in self._inflight:
                    self._discard.add(k)

    def group(self, keys: Iterable[Hashable], load: BatchLoader) -> None:
        """Refresh ``keys`` (static, retained) together with ``load`` from now on. A key is in
        one group at a time: the last registration wins."""
        g = _Group(tuple(dict.fromkeys(keys)), load)
        for k in g.keys:
            self._groups[k] = g
            self._loaders.pop(k, None)

    def ttl_of(self, key: Hashable) -> float:
        """The TTL of ``key``: the shortest its holders asked for, else the default."""
        return self._ttls.get(key, self.ttl)

    def put(self, key: Hashable, value: Fetched, *, dynamic: bool = False) -> None:
        """Store a value fetched elsewhere (the batch fetch at mount time)."""
        self._store(key, value, dynamic)

    def fresh(self, key: Hashable, ttl: float | None = None) -> Fetched | None:
        """A static value younger than the key's TTL (and than ``ttl`` if given), or None (lets
        a publish skip the backend)."""
        now = self._clock()
        entry = self._live(key, now)
        limit = self.ttl_of(key) if ttl is None else min(ttl, self.ttl_of(key))
        if entry is None or now - entry.fetched_at >= limit:
            return None
        return entry.value

    def stale(self, key: Hashable) -> tuple[Fetched, float] | None:
        """A static value still servable (younger than max_stale) and its age in seconds, or
        None: what a publish may use when the backend fails transiently."""
        now = self._clock()
        entry = self._live(key, now)
        return None if entry is None else (entry.value, now - entry.fetched_at)

    def __len__(self) -> int:
        self._expire(self._clock())
        return len(self._static) + len(self._dynamic)

    def census(self) -> tuple[int, int]:
        """How many static and dynamic values are in memory (metrics, at scrape time)."""
        self._expire(self._clock())
        return len(self._static), len(self._dynamic)

    def stale_keys(self) -> list[Hashable]:
        """The static values past their TTL that are still served (metrics)."""
        now = self._clock()
        return [
            k
            for k, e in self._static.items()
            if now < e.expires and now - e.fetched_at >= self._ttls.get(k, self.ttl)
        ]

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
        if now - entry.fetched_at >= self._ttls.get(key, self.ttl):
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
        # The hit path of every open: one clock read, two dict lookups.
        now = self._clock()
        entry = self._live(key, now)
        if entry is None:
            return None
        if now - entry.fetched_at < self._ttls.get(key, self.ttl):
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

    async def refresh(
        self,
        keys: Iterable[Hashable],
        load: BatchLoader | None = None,
        *,
        give_up_after: float = math.inf,
    ) -> dict[Hashable, str]:
        """Fetch the static ``keys`` held now, whatever their age and backoff; returns each
        key's outcome (FETCHED, CHANGED or FAILED). A key already in flight is waited for, not
        fetched twice. The others go in one call of ``load`` if given, else one call of each
        key's group loader. Dynamic keys (issued once, leased) and keys never fetched through
        a loader are skipped. A key whose fetch has not returned after ``give_up_after``
        seconds is FAILED (the fetch goes on in the background)."""
        wanted = [k for k in dict.fromkeys(keys) if k in self._refs and k not in self._dynamic]
        before = {k: self._seen.get(k) for k in wanted}
        waits: dict[Hashable, trio.Event] = {}  # the fetch each key waits for
        batches: dict[int, tuple[BatchLoader, list[Hashable]]] = {}
        singles: list[tuple[Hashable, Loader]] = []
        skipped: set[Hashable] = set()
        for k in wanted:
            ev = self._inflight.get(k)
            if ev is not None:
                waits[k] = ev
                continue
            group = self._groups.get(k)
            batch_load = load or (group.load if group is not None else None)
            if batch_load is not None:
                batches.setdefault(id(batch_load), (batch_load, []))[1].append(k)
            elif (single := self._loaders.get(k)) is not None:
                singles.append((k, single))
            else:
                skipped.add(k)
        self.stats.refreshes += sum(len(b) for _, b in batches.values()) + len(singles)
        if self._nursery is None:
            # No background nursery (unit tests): fetch here, one after the other.
            for batch_load, batch in batches.values():
                ev = trio.Event()
                for k in batch:
                    self._inflight[k] = waits[k] = ev
                await self._batch_flight(tuple(batch), metrics.observed(batch_load, self._seen), ev)
            for k, single in singles:
                ev = self._inflight[k] = waits[k] = trio.Event()
                await self._flight(k, single, False, ev)
        else:
            for batch_load, batch in batches.values():
                ev = self._start_batch(batch, metrics.observed(batch_load, self._seen))
                waits.update(dict.fromkeys(batch, ev))
            for k, single in singles:
                waits[k] = self._start_flight(k, single, False)
        with trio.move_on_after(give_up_after):
            for ev in {id(ev): ev for ev in waits.values()}.values():
                await ev.wait()
        out: dict[Hashable, str] = {}
        for k in wanted:
            if k in skipped or k not in self._refs:
                continue
            if not waits[k].is_set() or k in self._errors:
                out[k] = FAILED
            else:
                seen = self._seen.get(k)
                old = before[k]
                out[k] = CHANGED if old is not None and seen != old else FETCHED
        return out

    # --- internals ----------------------------------------------------------------------------

    def _bounded(self, ttl: float | None) -> float:
        return self.ttl if ttl is None else min(max(ttl, 1e-3), self.max_stale)

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

    def _due(self, group: _Group, first: Hashable) -> list[Hashable]:
        """``first`` and every other key of ``group`` that needs a fetch now: held, not in
        flight, not backing off after a failure, and past its TTL (or without a value)."""
        now = self._clock()
        due = [first]
        for k in group.keys:
            if k == first or k not in self._refs or k in self._inflight or k in self._dynamic:
                continue
            if now < self._retry_at.get(k, -math.inf):
                continue
            entry = self._static.get(k)
            if (
                entry is None
                or now >= entry.expires
                or now - entry.fetched_at >= self._ttls.get(k, self.ttl)
            ):
                due.append(k)
        return due

    def _refresh_soon(self, key: Hashable, load: Loader | None) -> None:
        if key in self._inflight or self._nursery is None:
            return
        if self._clock() < self._retry_at.get(key, -math.inf):
            return
        group = self._groups.get(key)
        if group is not None:
            keys = self._due(group, key)
            self.stats.refreshes += len(keys)
            self._start_batch(keys, metrics.observed(group.load, self._seen))
            return
        loader = load or self._loaders.get(key)
        if loader is None:
            return
        self.stats.refreshes += 1
        self._start_flight(key, loader, False)

    async def _wait_flight(self, key: Hashable, load: Loader, dynamic: bool) -> None:
        """Wait for the one fetch of ``key``, starting it if none is running (with the other
        due keys of its group, if it has one).

        The fetch runs in the cache's nursery, not in the caller, so a caller that gives up (its
        deadline passed) does not cancel the fetch for the others waiting on it.
        """
        ev = self._inflight.get(key)
        if ev is None:
            group = None if dynamic else self._groups.get(key)
            if group is not None:
                keys = self._due(group, key)
                if self._nursery is None:
                    ev = trio.Event()
                    for k in keys:
                        self._inflight[k] = ev
                    await self._batch_flight(tuple(keys), group.load, ev)
                    return
                ev = self._start_batch(keys, group.load)
            elif self._nursery is None:
                ev = self._inflight[key] = trio.Event()
                await self._flight(key, load, dynamic, ev)
                return
            else:
                ev = self._start_flight(key, load, dynamic)
        await ev.wait()

    def _start_flight(self, key: Hashable, load: Loader, dynamic: bool) -> trio.Event:
        assert self._nursery is not None
        ev = self._inflight[key] = trio.Event()
        self._nursery.start_soon(self._flight, key, load, dynamic, ev)
        return ev

    def _start_batch(self, keys: Sequence[Hashable], load: BatchLoader) -> trio.Event:
        """Mark ``keys`` in flight under one event and fetch them in the nursery."""
        assert self._nursery is not None
        ev = trio.Event()
        for k in keys:
            self._inflight[k] = ev
        self._nursery.start_soon(self._batch_flight, tuple(keys), load, ev)
        return ev

    async def _flight(self, key: Hashable, load: Loader, dynamic: bool, ev: trio.Event) -> None:
        self._loaders[key] = load
        try:
            value = await load()
        except Exception as exc:
            if not isinstance(exc, FetchError):  # a loader bug must not kill the daemon
                log_unexpected(log, "fetch failed unexpectedly")
                exc = FetchError("?", f"internal error ({type(exc).__name__})", transient=True)
            if key in self._discard:  # released meanwhile: nobody wants it
                self._discard.discard(key)
            else:
                self._record_failure(key, exc)
        else:
            if key in self._discard:
                self._discard.discard(key)
            else:
                self._store(key, value, dynamic)
        finally:
            del self._inflight[key]
            ev.set()

    async def _batch_flight(
        self, keys: tuple[Hashable, ...], load: BatchLoader, ev: trio.Event
    ) -> None:
        results: Mapping[Hashable, Fetched | FetchError] = {}
        failure: FetchError | None = None
        try:
            results = await load(keys)
        except FetchError as exc:
            failure = exc
        except Exception as exc:  # a loader bug must not kill the daemon
            log_unexpected(log, "fetch failed unexpectedly")
            failure = FetchError("?", f"internal error ({type(exc).__name__})", transient=True)
        finally:
            for k in keys:
                if self._inflight.get(k) is ev:
                    del self._inflight[k]
            ev.set()
        first: FetchError | None = None
        failed = worst = 0
        for k in keys:
            result = failure or results.get(k)
            if k in self._discard:  # released meanwhile: nobody wants it
                self._discard.discard(k)
                continue
            if isinstance(result, Fetched):
                self._store(k, result, False)
                continue
            if not isinstance(result, FetchError):
                result = FetchError("?", "the provider returned nothing", transient=True)
            worst = max(worst, self._record_failure(k, result, quiet=True))
            failed += 1
            first = first or result
        if first is not None:
            level = logging.INFO if worst < 3 else logging.WARNING
            log.log(
                level,
                "fetch of %d of %d value(s) failed (%d in a row): %s",
                failed,
                len(keys),
                worst,
                first,
                extra=fields(key=keys[0], error=first),
            )

    def _record_failure(self, key: Hashable, exc: FetchError, *, quiet: bool = False) -> int:
        self.stats.fetch_errors += 1
        self._errors[key] = exc
        n = self._failures[key] = self._failures[key] + 1
        self._retry_at[key] = self._clock() + _backoff(n - 1)
        if not exc.transient:
            # Deleted secret or revoked access: stop serving the old value now.
            self._static.pop(key, None)
        if not quiet:
            level = logging.INFO if n < 3 else logging.WARNING
            log.log(
                level, "fetch failed (%d in a row): %s", n, exc, extra=fields(key=key, error=exc)
            )
        return n


def _backoff(n: int) -> float:
    """Exponential backoff with full jitter on the upper half: n=0 -> 0.5..1 s."""
    base = min(MAX_BACKOFF, 2.0**n)
    return base / 2 + random.random() * base / 2
