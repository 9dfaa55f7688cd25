"""Prometheus metrics of the daemon (``secretfs daemon --metrics-addr``).

Three kinds, so that the FUSE open path pays nothing it did not pay before:

- **read at scrape time**: the cache's counters (``cache.Stats``: plain ints the trio thread bumps
  anyway) and gauges computed from the volumes (volumes, identities, leases, values past their
  TTL). A custom collector asks the trio thread for a snapshot once per scrape
  (``trio.from_thread.run_sync``): nothing in ``secretfs/`` is touched from another thread;
- **recorded per provider call** (``Volumes._fetch``): count and latency by provider and outcome;
- **recorded per refresh** (the cache's background and on-demand refreshes): refreshes and their
  errors by provider and error class, and upstream's ``rotation_reconcile_*`` families.

Everything lives in this module's own registry (not prometheus-client's global one), served by
prometheus-client's HTTP server in its own thread. Labels carry provider names, error classes and
codes (FetchError.code: short fixed reasons), never object names, secret bytes or tokens.

The registry and its families are made by the first :func:`serve` given an address; until then
(``--metrics-addr`` off: most standalone mounts) nothing is recorded, since nothing could read it,
and prometheus-client is not imported: it and its HTTP server are 28 of the 435 modules a
standalone AWS mount loads and ~6% of its instructions to the mount (bench/startup.py's mount
under callgrind; tests/test_startup_imports.py).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter as Tally
from collections.abc import Awaitable, Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from providers.base import Fetched, FetchError

if TYPE_CHECKING:
    from prometheus_client.core import Metric

    from secretfs.volumes import Volumes

log = logging.getLogger(__name__)

OS_TYPE = "linux"  # upstream's os_type label
TRANSIENT = "transient"
PERMANENT = "permanent"
# Outcomes of a provider call: every object fetched, the worst class of a failure (of the whole
# call or of one of its objects), or abandoned (deadline passed, volume gone).
OK = "ok"
CANCELLED = "cancelled"


class Families:
    """This module's registry and the families recorded into it (made by :func:`serve`)."""

    def __init__(self) -> None:
        # Imported here, not with this module: see the module's docstring.
        from prometheus_client import (
            GC_COLLECTOR,
            PLATFORM_COLLECTOR,
            PROCESS_COLLECTOR,
            CollectorRegistry,
            Counter,
            Histogram,
        )

        self.registry = CollectorRegistry(auto_describe=False)
        for c in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            # The standard process_*/python_* families, in this registry too.
            self.registry.register(c)
        self.provider_calls = Counter(
            "secretfs_provider_calls",
            "Provider fetch calls (one call fetches a volume's due objects), by outcome",
            ["provider", "outcome"],
            registry=self.registry,
        )
        self.provider_call_duration = Histogram(
            "secretfs_provider_call_duration_seconds",
            "Latency of provider fetch calls (worker thread, limiter wait included), by outcome",
            ["provider", "outcome"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.refreshes = Counter(
            "secretfs_refreshes",
            "Values fetched again by the cache after the publish (past their TTL, or reloaded on "
            "demand)",
            ["provider"],
            registry=self.registry,
        )
        self.refresh_errors = Counter(
            "secretfs_refresh_errors",
            "Values whose refresh failed, by error class (transient: served stale until "
            "max-stale; permanent: dropped at once)",
            ["provider", "error_class"],
            registry=self.registry,
        )
        # Upstream's names (secrets-store-csi-driver v1.6, see the README for where the meaning
        # differs).
        self.rotation_reconcile = Counter(
            "rotation_reconcile",
            "Refreshes (one provider call for a volume's due values) that succeeded",
            ["provider", "os_type", "rotated"],
            registry=self.registry,
        )
        self.rotation_reconcile_error = Counter(
            "rotation_reconcile_error",
            "Refreshes in which at least one value failed",
            ["provider", "error_type", "os_type", "rotated"],
            registry=self.registry,
        )
        self.rotation_reconcile_duration = Histogram(
            "rotation_reconcile_duration_sec",
            "Duration of refreshes in seconds",
            ["os_type"],
            buckets=tuple(0.1 * 2**i for i in range(12)),
            registry=self.registry,
        )


# None until the first serve() with an address; then kept for the process's life.
_families: Families | None = None


def error_class(exc: BaseException) -> str:
    return TRANSIENT if not isinstance(exc, FetchError) or exc.transient else PERMANENT


def provider_of(key: Hashable) -> str:
    """The provider of a cache key ``(provider, auth, identity, source, ...)``."""
    if isinstance(key, tuple) and key and isinstance(key[0], str):
        return key[0]
    return "unknown"


def provider_call(provider: str, seconds: float, outcome: object) -> None:
    """A provider fetch call ended (``Volumes._fetch``): ``outcome`` is its results (a mapping,
    whose values may be FetchErrors) or the exception it raised."""
    families = _families
    if families is None:
        return  # no /metrics: nothing could read it
    if isinstance(outcome, Mapping):
        errors = [r for r in outcome.values() if isinstance(r, FetchError)]
        if not errors:
            label = OK
        else:
            label = PERMANENT if any(not e.transient for e in errors) else TRANSIENT
    elif isinstance(outcome, Exception):
        label = error_class(outcome)
    else:  # trio.Cancelled, KeyboardInterrupt
        label = CANCELLED
    families.provider_calls.labels(provider, label).inc()
    families.provider_call_duration.labels(provider, label).observe(seconds)


BatchLoader = Callable[[Sequence[Hashable]], Awaitable[Mapping[Hashable, "Fetched | FetchError"]]]


def observed(
    load: BatchLoader, seen: Mapping[Hashable, tuple[str, bytes]]
) -> Callable[[Sequence[Hashable]], Awaitable[Mapping[Hashable, Fetched | FetchError]]]:
    """``load`` (a batch loader the cache refreshes with), recording each call as a refresh.
    ``seen`` is the cache's (version, sha256) of what it served last per key: a value that
    differs from it counts as rotated."""

    async def refresh(keys: Sequence[Hashable]) -> Mapping[Hashable, Fetched | FetchError]:
        started = time.perf_counter()
        try:
            results = await load(keys)
        except Exception as exc:  # not Cancelled: the daemon is stopping
            _refreshed(keys, time.perf_counter() - started, {}, exc, seen)
            raise
        _refreshed(keys, time.perf_counter() - started, results, None, seen)
        return results

    return refresh


def _refreshed(
    keys: Sequence[Hashable],
    seconds: float,
    results: Mapping[Hashable, Fetched | FetchError],
    failure: BaseException | None,
    seen: Mapping[Hashable, tuple[str, bytes]],
) -> None:
    families = _families
    if not keys or families is None:
        return
    provider = provider_of(keys[0])
    rotated = False
    first: BaseException | None = failure
    for k in keys:
        result = results.get(k) if failure is None else failure
        if isinstance(result, Fetched):
            old = seen.get(k)
            if old is not None and old != (result.version, hashlib.sha256(result.data).digest()):
                rotated = True
            continue
        if result is None:
            result = FetchError("?", "the provider returned nothing", transient=True)
        families.refresh_errors.labels(provider, error_class(result)).inc()
        first = first or result
    families.refreshes.labels(provider).inc(len(keys))
    flag = "true" if rotated else "false"
    if first is None:
        families.rotation_reconcile.labels(provider, OS_TYPE, flag).inc()
    else:
        code = first.code if isinstance(first, FetchError) else "ProviderError"
        families.rotation_reconcile_error.labels(provider, code, OS_TYPE, flag).inc()
    families.rotation_reconcile_duration.labels(OS_TYPE).observe(seconds)


# --- read at scrape time ----------------------------------------------------------------------


@dataclass
class Snapshot:
    hits: int = 0
    stale_hits: int = 0
    misses: int = 0
    fetch_errors: int = 0
    stale_publishes: int = 0
    static_values: int = 0
    dynamic_values: int = 0
    stale_values: Tally[str] = field(default_factory=Tally)
    volumes: Tally[str] = field(default_factory=Tally)
    identities: Tally[str] = field(default_factory=Tally)
    leases: Tally[str] = field(default_factory=Tally)


def snapshot(volumes: Volumes) -> Snapshot:
    """What a scrape reports, taken on the trio thread (between two awaits: consistent)."""
    cache = volumes.cache
    s = cache.stats
    snap = Snapshot(s.hits, s.stale_hits, s.misses, s.fetch_errors, s.stale_publishes)
    snap.static_values, snap.dynamic_values = cache.census()
    for key in cache.stale_keys():
        snap.stale_values[provider_of(key)] += 1
    identities: set[tuple[str, Hashable]] = set()
    for vol in volumes.volumes.values():
        name = vol.plan.provider
        snap.volumes[name] += 1
        snap.leases[name] += len(vol.leases)
        identities.add((name, vol.identity.key()))
    for name, _ in identities:
        snap.identities[name] += 1
    return snap


class DaemonCollector:
    """The scrape-time families: one hop to the trio thread per scrape. A prometheus-client
    ``Collector`` (a protocol: no base class, so that this module imports no prometheus-client)."""

    def __init__(self, volumes: Volumes, token: trio.lowlevel.TrioToken) -> None:
        self.volumes = volumes
        self.token = token

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        try:
            snap = trio.from_thread.run_sync(snapshot, self.volumes, trio_token=self.token)
        except (trio.RunFinishedError, trio.Cancelled):
            return  # the daemon is stopping
        counters = (
            ("secretfs_cache_hits", "Reads served from a fresh value", snap.hits),
            (
                "secretfs_cache_stale_hits",
                "Reads served from a value past its TTL (a refresh was started)",
                snap.stale_hits,
            ),
            (
                "secretfs_cache_misses",
                "Reads that waited for a fetch (no servable value)",
                snap.misses,
            ),
            (
                "secretfs_cache_fetch_errors",
                "Failed cache fetches of a value (refreshes and reads' fetches)",
                snap.fetch_errors,
            ),
            (
                "secretfs_stale_publishes",
                "Volumes published from values past their TTL because the backend failed",
                snap.stale_publishes,
            ),
        )
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=value)
        values = GaugeMetricFamily(
            "secretfs_cache_values", "Values held in memory", labels=["kind"]
        )
        values.add_metric(["static"], snap.static_values)
        values.add_metric(["dynamic"], snap.dynamic_values)
        yield values
        for name, doc, tally in (
            (
                "secretfs_cache_stale_values",
                "Values past their TTL still served (their backend has not answered a refresh)",
                snap.stale_values,
            ),
            ("secretfs_volumes", "Volumes served", snap.volumes),
            (
                "secretfs_identities",
                "Distinct pod identities of the volumes served",
                snap.identities,
            ),
            ("secretfs_leases", "Leases (Vault) the volumes hold and renew", snap.leases),
        ):
            g = GaugeMetricFamily(name, doc, labels=["provider"])
            for provider, n in sorted(tally.items()):
                g.add_metric([provider], n)
            yield g


_collector: DaemonCollector | None = None


def serve(addr: str, volumes: Volumes) -> bool:
    """Serve /metrics on ``addr`` (":8096" or "127.0.0.1:8096") from prometheus-client's own
    thread; empty means off. Call on the trio thread. A port that cannot be bound is logged and
    ignored: metrics are never worth an outage of the secrets."""
    if not addr:
        return False
    from prometheus_client import start_http_server

    global _collector, _families
    if _families is None:
        _families = Families()
    registry = _families.registry
    host, _, port = addr.rpartition(":")
    if _collector is not None:  # an earlier run in this process (tests)
        registry.unregister(_collector)
    _collector = DaemonCollector(volumes, trio.lowlevel.current_trio_token())
    registry.register(_collector)
    try:
        start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0", registry=registry)
    except (OSError, ValueError) as exc:
        log.error("metrics: cannot serve on %r (%s); running without metrics", addr, exc)
        return False
    log.info("metrics on %s", addr)
    return True
