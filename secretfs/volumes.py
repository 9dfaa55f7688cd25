"""Volumes: which files exist, for whom, and where their bytes come from.

Owns the tree, the cache and the provider calls. ``add`` fetches everything a volume needs before
its files appear, so a misconfiguration fails the mount (or the publish) with a clear message
instead of an EIO later. Runs on the trio thread; provider calls go to worker threads under one
``CapacityLimiter`` per provider.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import trio

from providers import get_provider
from providers.base import (
    Expanding,
    Fetched,
    FetchError,
    FileSpec,
    Identity,
    Lease,
    Plan,
    Provider,
)
from secretfs import metrics
from secretfs.cache import CHANGED, FAILED, SecretCache
from secretfs.logs import fields, log_unexpected
from secretfs.tree import ROOT_INODE, Node, Tree

log = logging.getLogger(__name__)

# How long a mount-time fetch of a whole volume may take. The kubelet gives NodePublishVolume two
# minutes; leave room for its retries and our own bookkeeping.
PREFETCH_DEADLINE = 60.0
# How long an open() waits for a value the cache does not have.
READ_DEADLINE = 30.0
# The lower bound of a SecretProviderClass's own TTL (secretfs.io/ttl) unless set (--min-ttl).
DEFAULT_MIN_TTL = 10.0
# An on-demand reload of a volume (``reload``, or reading the REFRESH_XATTR attribute of its
# directory) asked for while one is running or ended less than this many seconds ago shares that
# one's result: any reader of a mount may ask, and must not be able to hammer a backend.
RELOAD_COALESCE = 5.0
# Reading this extended attribute of a volume's directory reloads the volume. Never listed.
REFRESH_XATTR = b"user.secretfs.refresh"
# How long removing a volume may spend revoking its leases (an unpublish must not hang on Vault).
REVOKE_DEADLINE = 10.0
# Dynamic material whose lease cannot be renewed (not renewable, a renewal failed or was capped at
# the lease's max TTL) is issued anew at two thirds of what is left of the lease, no later than
# REISSUE_MARGIN before it ends and no sooner than REISSUE_MIN_DELAY from now. With revoke_leases,
# the old lease is revoked REISSUE_GRACE after the new material is served (an app still using the
# old credentials has that long to pick up the new ones). A failed re-issue is tried again after
# 1, 2, 4 ... seconds, at most REISSUE_MAX_BACKOFF.
REISSUE_GRACE = 60.0
REISSUE_MARGIN = 5.0
REISSUE_MIN_DELAY = 1.0
REISSUE_MAX_BACKOFF = 60.0
# Reasons of the Kubernetes Events csi records on a volume's pod (``on_event`` "event" payloads).
REFRESH_FAILED = "SecretRefreshFailed"
SERVING_STALE = "SecretServedStale"
VALUE_DROPPED = "SecretValueDropped"
LEASE_RENEWAL_FAILED = "SecretLeaseRenewalFailed"
REISSUE_FAILED = "SecretReissueFailed"


class VolumeError(Exception):
    """A volume could not be added; the message lists every object that failed."""

    def __init__(self, message: str, errors: Sequence[FetchError] = ()) -> None:
        super().__init__(message)
        self.errors = tuple(errors)


@dataclass
class Volume:
    id: str
    plan: Plan
    provider: Provider
    identity: Identity
    uid: int
    gid: int
    keys: dict[FileSpec, Hashable] = field(default_factory=dict)
    leases: dict[Hashable, Lease] = field(default_factory=dict)
    renew_at: dict[Hashable, float] = field(default_factory=dict)
    # Lease bookkeeping of the lease task (trio clock): where each lease ends (inf: no duration),
    # when a dynamic key is issued anew and how many re-issues of it failed in a row, and the
    # leases of replaced material with the time they are revoked at (only with revoke_leases).
    expires_at: dict[Hashable, float] = field(default_factory=dict)
    reissue_at: dict[Hashable, float] = field(default_factory=dict)
    reissue_failures: dict[Hashable, int] = field(default_factory=dict)
    retiring: list[tuple[float, Lease]] = field(default_factory=list, repr=False)
    # Set when a lease is recorded: the lease task looks at its schedule again.
    wake: trio.Event = field(default_factory=trio.Event, repr=False)
    lease_task: bool = False  # started (it runs until the volume goes)
    cancel: trio.CancelScope = field(default_factory=trio.CancelScope)
    # Static sources that came back with a lease and have been warned about (once each).
    warned: set[Hashable] = field(default_factory=set)
    # The inode of each path ("" is the volume's directory): the next daemon generation reuses
    # them, since the kernel keeps node ids across a takeover.
    inodes: dict[str, int] = field(default_factory=dict)
    # The request that added it, for the keeper (tokens and nodePublishSecretRef data: never log),
    # kept as compact JSON: decoded it took ~4.6 KiB a volume, and it is read only when the keeper
    # asks for it or the volume is re-keyed (``record`` decodes and replaces it whole).
    record_json: bytes = field(default=b"{}", repr=False)

    @property
    def record(self) -> dict[str, Any]:
        """A decoded copy: changing it changes nothing until it is assigned back."""
        out: dict[str, Any] = json.loads(self.record_json)
        return out

    @record.setter
    def record(self, value: dict[str, Any]) -> None:
        self.record_json = json.dumps(value, separators=(",", ":")).encode()


@dataclass(eq=False)
class _Reload:
    """The last on-demand reload of a volume: later requests within RELOAD_COALESCE share it."""

    done: trio.Event = field(default_factory=trio.Event)
    ended: float = math.inf
    outcomes: dict[Hashable, str] = field(default_factory=dict)


@dataclass(slots=True)
class Rendered:
    version: str
    data: bytes = field(repr=False)
    since_ns: int = 0  # when this version was first served: the file's mtime


class Volumes:
    def __init__(
        self,
        *,
        ttl: float,
        max_stale: float,
        revoke_leases: bool = False,
        min_ttl: float = DEFAULT_MIN_TTL,
        max_ttl: float | None = None,
    ) -> None:
        self.tree = Tree(mtime_ns=time.time_ns())
        self.cache = SecretCache(ttl, max_stale, on_change=self._changed)
        # Bounds of a class's own TTL: --min-ttl and --max-ttl (at most max_stale, its default;
        # the lower bound gives way to the upper one).
        self.max_ttl = max_stale if max_ttl is None else min(max_ttl, max_stale)
        self.min_ttl = min(min_ttl, self.max_ttl)
        self._reloads: dict[str, _Reload] = {}
        self.volumes: dict[str, Volume] = {}
        self.revoke_leases = revoke_leases
        self._limiters: dict[str, trio.CapacityLimiter] = {}
        self._rendered: dict[int, Rendered] = {}
        self._nursery: trio.Nursery | None = None
        # Called with the inodes whose content changed (the FUSE layer invalidates kernel caches).
        self.on_inodes_changed: list[Callable[[set[int]], None]] = []
        # Called with (kind, payload) for csi, never on a FUSE request's path: "versions"
        # ({volume_id, objects}: a volume's object versions changed) and "event" ({volume_id,
        # reason, message, type}: a Kubernetes Event for its pod). Payloads carry no secret.
        self.on_event: list[Callable[[str, dict[str, Any]], None]] = []

    def start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self.cache.start(nursery)

    # --- volume lifetime ----------------------------------------------------------------------

    async def add(
        self,
        volume_id: str,
        plan: Plan,
        identity: Identity,
        *,
        uid: int,
        gid: int,
        at_root: bool = False,
        restore: Mapping[str, int] | None = None,
        target: str = "",
        files: Any = None,
    ) -> Volume:
        """Fetch everything, then let the files appear. With ``restore`` (the inode map of the
        volume in an earlier daemon generation) the files appear at once with those numbers and
        their values are fetched when first used (or by ``warm``).

        A provider whose files are only known from its answer (base.Expanding: external provider
        plugins) expands the plan with one call first, whose values are the volume's first fetch;
        ``target`` is the path the volume is published at (sent to it), ``files`` the expanded
        files recorded by an earlier generation (a restore then makes no call)."""
        if volume_id in self.volumes:
            raise VolumeError(f"volume {volume_id!r} already exists")
        provider = get_provider(plan.provider)
        given: dict[Hashable, Fetched] = {}
        if hasattr(provider, "expand_sync"):
            plan, given = await self._expand(provider, plan, identity, target, files, restore)
        vol = Volume(volume_id, plan, provider, identity, uid, gid)
        for spec in plan.files:
            vol.keys[spec] = self._key(vol, spec)
        self._log_clamped_ttl(vol)
        if restore is None:
            await self._prefetch(vol, given)
        # Only now do the files appear.
        self.volumes[volume_id] = vol
        self._hold(vol)
        vol.inodes = self.tree.add_volume(
            volume_id,
            [(spec, key) for spec, key in vol.keys.items()],
            uid=uid,
            gid=gid,
            mtime_ns=time.time_ns(),
            at_root=at_root,
            inodes=restore,
        )
        if vol.leases and self._nursery is not None:
            self._nursery.start_soon(self._renew_leases, vol)
        return vol

    async def warm(self, volume_id: str) -> None:
        """Fetch the values of a restored volume before anyone asks (through the cache, so a
        reader asking at the same time shares the fetch; dynamic material is issued once)."""
        vol = self.volumes.get(volume_id)
        if vol is None:
            return
        failed = []
        for spec in vol.plan.files:
            ino = vol.inodes.get(spec.path)
            if ino is None or self.volumes.get(volume_id) is not vol:
                return
            try:
                await self.content(ino)
            except FetchError as exc:
                failed.append(exc)
        if vol.leases and self._nursery is not None:
            self._nursery.start_soon(self._renew_leases, vol)
        if failed:
            log.warning(
                "volume %s: %d of %d file(s) could not be fetched again after the takeover; "
                "they answer EIO until their backend does: %s",
                volume_id,
                len(failed),
                len(vol.plan.files),
                failed[0],
                extra=fields(vol, error=failed[0]),
            )

    def refresh_identity(self, volume_id: str, identity: Identity) -> None:
        """A republish brought fresh tokens; the identity key must not change (``rekey`` is for
        a key that does)."""
        vol = self.volumes[volume_id]
        if identity.key() != vol.identity.key():
            raise VolumeError(f"volume {volume_id!r} was published for another identity")
        vol.identity = identity

    async def rekey(self, volume_id: str, identity: Identity) -> int:
        """A republish brought other nodePublishSecretRef data (another ``identity.key()``):
        serve the volume under ``identity`` from now on; returns how many files changed.

        Every value is fetched under the new identity first, as ``add`` does: if that fails,
        VolumeError, and the volume goes on serving the old identity's values. Then, with no
        await in between, the files take the new cache keys (same inodes), the old keys are
        released and the files whose bytes differ are announced as changed. The volume becomes
        a new Volume object: loaders the cache keeps for the old keys (which other volumes of the
        old identity may share) go on fetching with the old identity. The old material's leases
        are left to expire, or with revoke_leases revoked after REISSUE_GRACE (the pod may still
        be using that material), as when dynamic material is issued anew."""
        old = self.volumes[volume_id]
        new = Volume(old.id, old.plan, old.provider, identity, old.uid, old.gid)
        new.warned = old.warned
        for spec in old.plan.files:
            new.keys[spec] = self._key(new, spec)
        await self._prefetch(new)
        if self.volumes.get(volume_id) is not old:
            # Removed while we fetched: what was stored for it goes too.
            self.cache.retain(new.keys.values())
            self.cache.release(new.keys.values())
            raise VolumeError(f"volume {volume_id!r} was removed while it changed identity")
        new.inodes, new.record_json = old.inodes, old.record_json
        keys: dict[int, Hashable] = {}
        changed: set[int] = set()
        for spec, key in new.keys.items():
            ino = old.inodes.get(spec.path)
            if ino is None:
                continue
            keys[ino] = key
            if self._differs(ino, new, spec, key):
                changed.add(ino)
        # The swap.
        self._hold(new)  # the cache's references, the class's TTL, the refresh group
        self.tree.rekey(keys)
        self.volumes[volume_id] = new
        old.cancel.cancel()  # the old identity's lease task
        self._unhold(old)
        for ino in changed:
            self._rendered.pop(ino, None)
        if changed:
            for cb in self.on_inodes_changed:
                cb(changed)
            self._emit("versions", {"volume_id": new.id, "objects": self.versions(new)})
        if self.revoke_leases:
            # The old material was replaced, as a re-issue replaces it: its leases are revoked
            # after the same grace (a lease on a value another volume still serves is kept).
            in_use = {k for other in self.volumes.values() for k in other.keys.values()}
            at = trio.current_time() + REISSUE_GRACE
            new.retiring = [*old.retiring]
            new.retiring += [(at, lease) for k, lease in old.leases.items() if k not in in_use]
        if (new.leases or new.retiring) and self._nursery is not None:
            self._nursery.start_soon(self._renew_leases, new)
        await self._release_identity(old)
        return len(changed)

    def _differs(self, inode: int, vol: Volume, spec: FileSpec, key: Hashable) -> bool:
        """Whether the bytes ``vol`` serves for ``inode`` under ``key`` differ from the last ones
        served (unknown counts as different)."""
        before = self._rendered.get(inode)
        value = self.cache.peek(key, dynamic=spec.dynamic)
        if before is None or value is None or value.version != before.version:
            return True
        try:
            return vol.provider.render(spec, value) != before.data
        except FetchError:
            return True

    async def remove(self, volume_id: str) -> bool:
        vol = self.volumes.pop(volume_id, None)
        if vol is None:
            return False
        vol.cancel.cancel()
        for ino in self.tree.remove_volume(volume_id):
            self._rendered.pop(ino, None)
        self._unhold(vol)
        if self.revoke_leases and (vol.leases or vol.retiring):
            await self._revoke(vol)
        await self._release_identity(vol)
        return True

    async def _release_identity(self, vol: Volume) -> None:
        """The last volume of an identity is gone: its credentials and clients go too."""
        release = getattr(vol.provider, "release_identity", None)
        key = vol.identity.key()
        if release is None or any(
            v.provider is vol.provider and v.identity.key() == key for v in self.volumes.values()
        ):
            return
        try:
            # Provider locks may be held by a fetch for a moment: not on the trio thread.
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(release, key)
        except Exception:
            log_unexpected(log, "provider %s: releasing an identity failed", vol.provider.name)

    # --- content ------------------------------------------------------------------------------

    async def content(self, inode: int) -> Rendered:
        """The current bytes of a file, fetching them if the cache has none (raises FetchError)."""
        node = self.tree[inode]
        assert node.spec is not None and node.volume is not None and node.key is not None
        vol = self.volumes[node.volume]
        spec = node.spec

        def load() -> Awaitable[Fetched]:
            return self._fetch_one(vol, spec)

        # A hit needs no deadline, and a cancel scope costs more than the rest of an open.
        value = self.cache.get_nowait(node.key, load, dynamic=spec.dynamic)
        if value is not None:
            return self._render(inode, vol, spec, value)
        try:
            with trio.fail_after(READ_DEADLINE):
                value = await self.cache.get(node.key, load, dynamic=spec.dynamic)
        except trio.TooSlowError:
            raise FetchError(
                spec.object_name, f"no answer within {READ_DEADLINE:.0f} s", transient=True
            ) from None
        return self._render(inode, vol, spec, value)

    def peek(self, inode: int, *, last_render: bool = True) -> Rendered | None:
        """The bytes a new open would most likely get, without waiting (for getattr). When the
        cache has nothing to serve (a value past max_stale), the last render, unless
        ``last_render`` is false (no-open mode: getattr is all that stands between a reader and
        the kernel's page cache, so it must fail as an open would)."""
        node = self.tree[inode]
        if node.spec is None or node.key is None or node.volume not in self.volumes:
            return None
        vol, spec = self.volumes[node.volume], node.spec

        def load() -> Awaitable[Fetched]:
            return self._fetch_one(vol, spec)

        # With the loader: a stat of a value past its TTL starts the refresh a read would (a
        # value stored by the mount-time batch has no loader of its own yet).
        value = self.cache.get_nowait(node.key, load, dynamic=spec.dynamic)
        if value is None:
            return self._rendered.get(inode) if last_render else None
        try:
            return self._render(inode, self.volumes[node.volume], node.spec, value)
        except FetchError:
            return None

    def current(self, inode: int) -> Rendered | None:
        """What ``peek`` answers, without a cache lookup while nothing changed: the last render of
        an inode is dropped whenever its value changes (``_changed``) or its volume goes, so a
        render still held is the version the cache serves (or served last, if it has none now).
        Only when it was dropped does this look in the cache (``peek``, which may start a
        refresh)."""
        cur = self._rendered.get(inode)
        return cur if cur is not None else self.peek(inode)

    # --- TTLs, refresh groups, on-demand reloads ----------------------------------------------

    def ttl_of(self, plan: Plan) -> float | None:
        """The TTL of a volume of ``plan``: its class's own (``plan.ttl``, from the annotation
        secretfs.io/ttl) within [min_ttl, max_ttl], or None (the cache's default)."""
        if plan.ttl is None:
            return None
        return min(self.max_ttl, max(self.min_ttl, plan.ttl))

    def _log_clamped_ttl(self, vol: Volume) -> None:
        asked, ttl = vol.plan.ttl, self.ttl_of(vol.plan)
        if asked is None or ttl is None or ttl == asked:
            return
        log.info(
            "volume %s: its SecretProviderClass asks for a TTL of %g s (secretfs.io/ttl); "
            "using %g s, the node's %s",
            vol.id,
            asked,
            ttl,
            "--min-ttl" if ttl > asked else "--max-ttl",
        )

    def _hold(self, vol: Volume) -> None:
        """Retain a volume's values, with its TTL; its static values are refreshed together."""
        self.cache.retain(vol.keys.values(), self.ttl_of(vol.plan))
        self._group(vol)

    def _unhold(self, vol: Volume) -> None:
        """Release the values of a volume that goes (``_hold`` undone). Values that other volumes
        still use are grouped with one of those: nothing is fetched with the identity of a
        volume that is gone."""
        self.cache.release(vol.keys.values(), self.ttl_of(vol.plan))
        self._reloads.pop(vol.id, None)
        gone = set(vol.keys.values())
        for other in self.volumes.values():
            if other is not vol and not gone.isdisjoint(other.keys.values()):
                self._group(other)

    def _group(self, vol: Volume) -> None:
        """The volume's static values are fetched together (``_fetch_keys``) when one of them is
        due: values fetched together at mount time expire together."""
        static = [key for spec, key in vol.keys.items() if not spec.dynamic]
        if static:
            self.cache.group(static, functools.partial(self._fetch_keys, vol))

    async def _fetch_keys(
        self, vol: Volume, keys: Sequence[Hashable]
    ) -> dict[Hashable, Fetched | FetchError]:
        """The cache's loader of a volume's static values: one provider call for ``keys`` (the
        provider splits it as it must: SSM GetParameters by 10), one result per key."""
        specs: dict[Hashable, FileSpec] = {}
        for spec, key in vol.keys.items():
            if not spec.dynamic:
                specs.setdefault(key, spec)
        wanted = {specs[k].source: k for k in keys if k in specs}
        if not wanted:
            return {}
        try:
            results = await self._fetch(vol, list(wanted))
        except FetchError as exc:
            self._refresh_failed(dict.fromkeys(wanted.values(), exc))
            raise
        except Exception as exc:
            log_unexpected(log, "provider %s failed", vol.provider.name)
            first = specs[next(iter(wanted.values()))].object_name
            err = FetchError(
                first if len(wanted) == 1 else f"{first} and {len(wanted) - 1} more",
                f"provider error ({type(exc).__name__})",
                transient=True,
            )
            self._refresh_failed(dict.fromkeys(wanted.values(), err))
            raise err from None
        out: dict[Hashable, Fetched | FetchError] = {}
        for source, key in wanted.items():
            result = results.get(source)
            if isinstance(result, Fetched):
                if result.lease is not None:
                    self._warn_static_lease(vol, source, False)
                    self._record_lease(vol, key, result.lease)
                out[key] = result
            elif isinstance(result, FetchError):
                out[key] = result
            else:
                out[key] = FetchError(
                    specs[key].object_name, "the provider returned nothing", transient=True
                )
        self._refresh_failed({k: r for k, r in out.items() if isinstance(r, FetchError)})
        return out

    async def reload(self, volume_id: str | None = None) -> dict[str, int]:
        """Fetch the static values of a volume (None: of every volume) now, whatever their TTL
        and failure backoff; a value already being fetched is waited for, not fetched twice.
        Dynamic material is left alone (its lease has its own schedule). A reload of a volume
        asked for while one is running, or ended less than RELOAD_COALESCE s ago, shares that
        one's result. Answers how many values were ``fetched`` (the ``changed`` ones included)
        and how many ``failed``; raises KeyError for an unknown volume."""
        if volume_id is not None and volume_id not in self.volumes:
            raise KeyError(volume_id)
        ids = list(self.volumes) if volume_id is None else [volume_id]
        outcomes: dict[Hashable, str] = {}  # per value: a value of two volumes counts once
        async with trio.open_nursery() as nursery:
            for vid in ids:
                nursery.start_soon(self._reload_volume, vid, outcomes)
        failed = sum(1 for o in outcomes.values() if o == FAILED)
        return {
            "fetched": len(outcomes) - failed,
            "changed": sum(1 for o in outcomes.values() if o == CHANGED),
            "failed": failed,
        }

    async def _reload_volume(self, volume_id: str, out: dict[Hashable, str]) -> None:
        last = self._reloads.get(volume_id)
        if last is not None and (
            not last.done.is_set() or trio.current_time() - last.ended < RELOAD_COALESCE
        ):
            await last.done.wait()
            _merge(out, last.outcomes)
            return
        vol = self.volumes.get(volume_id)
        if vol is None:
            return
        this = self._reloads[volume_id] = _Reload()
        try:
            this.outcomes = await self.cache.refresh(
                [key for spec, key in vol.keys.items() if not spec.dynamic],
                functools.partial(self._fetch_keys, vol),
                give_up_after=PREFETCH_DEADLINE,
            )
        finally:
            this.ended = trio.current_time()
            this.done.set()
        _merge(out, this.outcomes)
        log.info(
            "volume %s: reloaded on demand: %d value(s) fetched, %d changed, %d failed",
            volume_id,
            sum(1 for o in this.outcomes.values() if o != FAILED),
            sum(1 for o in this.outcomes.values() if o == CHANGED),
            sum(1 for o in this.outcomes.values() if o == FAILED),
        )

    async def xattr(self, node: Node, name: bytes) -> bytes | None:
        """The extended attribute ``name`` of ``node``, or None if it has none. There is one:
        REFRESH_XATTR of a volume's directory (the root in standalone mode) reloads the volume
        and answers b"fetched=N changed=N failed=N". No listing shows it, so copies and backups
        never trigger it."""
        if name != REFRESH_XATTR or not node.is_dir or node.volume is None:
            return None
        vol = self.volumes.get(node.volume)
        if vol is None or vol.inodes.get("", ROOT_INODE) != node.inode:
            return None
        n = await self.reload(vol.id)
        return f"fetched={n['fetched']} changed={n['changed']} failed={n['failed']}".encode()

    # --- internals ----------------------------------------------------------------------------

    def _key(self, vol: Volume, spec: FileSpec) -> Hashable:
        base = (vol.plan.provider, vol.plan.auth, vol.identity.key(), spec.source)
        # Dynamic material belongs to one volume: never shared, never re-issued for another.
        return (*base, "volume", vol.id) if spec.dynamic else self.tree.canonical(base)

    def _render(self, inode: int, vol: Volume, spec: FileSpec, value: Fetched) -> Rendered:
        cached = self._rendered.get(inode)
        if cached is not None and cached.version == value.version:
            return cached
        out = self._sibling_render(inode, spec, value.version) or Rendered(
            value.version, vol.provider.render(spec, value), time.time_ns()
        )
        self._rendered[inode] = out
        return out

    def _sibling_render(self, inode: int, spec: FileSpec, version: str) -> Rendered | None:
        """The rendering of ``version`` another inode of the same value and the same FileSpec
        (pods of one class and identity) already holds: shared, not made again (one per file per
        volume otherwise: ~1 KiB per volume of 10 files). Its mtime is when the node first served
        that version. A few siblings are looked at; most share the spec or none does."""
        node = self.tree.get(inode)
        if node is None or node.key is None:
            return None
        for sibling in itertools.islice(self.tree.inodes_for(node.key), 4):
            other = self._rendered.get(sibling) if sibling != inode else None
            if other is not None and other.version == version:
                twin = self.tree.get(sibling)
                if twin is not None and twin.spec is spec:
                    return other
        return None

    def _limiter(self, provider: Provider) -> trio.CapacityLimiter:
        lim = self._limiters.get(provider.name)
        if lim is None:
            lim = self._limiters[provider.name] = trio.CapacityLimiter(provider.max_concurrency)
        return lim

    async def _fetch(self, vol: Volume, sources: Sequence[Hashable]) -> dict[Hashable, object]:
        started = time.perf_counter()  # metrics: call count and latency by outcome
        outcome: object = None
        results: dict[Hashable, object]
        try:
            outcome = results = dict(
                await trio.to_thread.run_sync(
                    vol.provider.fetch_sync,
                    vol.plan,
                    vol.identity,
                    list(sources),
                    limiter=self._limiter(vol.provider),
                    abandon_on_cancel=True,
                )
            )
        except BaseException as exc:
            outcome = exc
            raise
        finally:
            metrics.provider_call(vol.plan.provider, time.perf_counter() - started, outcome)
        return results

    async def _fetch_source(self, vol: Volume, spec: FileSpec) -> Fetched:
        """The value of ``spec``'s source, or FetchError (a provider bug becomes a transient
        one: the message names the exception type only)."""
        try:
            result = (await self._fetch(vol, [spec.source])).get(spec.source)
        except FetchError:
            raise
        except Exception as exc:
            log_unexpected(log, "provider %s failed", vol.provider.name)
            raise FetchError(
                spec.object_name, f"provider error ({type(exc).__name__})", transient=True
            ) from None
        if isinstance(result, FetchError):
            raise result
        if not isinstance(result, Fetched):
            raise FetchError(spec.object_name, "the provider returned nothing", transient=True)
        return result

    async def _fetch_one(self, vol: Volume, spec: FileSpec) -> Fetched:
        result = await self._fetch_source(vol, spec)
        if result.lease is not None:
            self._warn_static_lease(vol, spec.source, spec.dynamic)
            self._record_lease(vol, vol.keys[spec], result.lease)
        return result

    async def _expand(
        self,
        provider: Provider,
        plan: Plan,
        identity: Identity,
        target: str,
        files: Any,
        restore: Mapping[str, int] | None,
    ) -> tuple[Plan, dict[Hashable, Fetched]]:
        """The plan of a base.Expanding provider with its files, and their values (none when a
        restore rebuilds it from the ``files`` an earlier generation recorded)."""
        expanding: Expanding = provider  # type: ignore[assignment]
        if restore is not None and files is not None:
            try:
                return expanding.replan(plan, files, target), {}
            except ValueError as exc:
                log.warning("provider %s: %s; asking the provider again", provider.name, exc)
        started = time.perf_counter()
        outcome: object = None
        try:
            with trio.fail_after(PREFETCH_DEADLINE):
                expanded, values = await trio.to_thread.run_sync(
                    expanding.expand_sync,
                    plan,
                    identity,
                    target,
                    limiter=self._limiter(provider),
                    abandon_on_cancel=True,
                )
            outcome = values
        except trio.TooSlowError as exc:
            outcome = exc
            raise VolumeError(
                f"the {plan.provider} provider did not answer within {PREFETCH_DEADLINE:.0f} s"
            ) from None
        except FetchError as exc:
            outcome = exc
            raise VolumeError(str(exc), [exc]) from None
        except Exception as exc:
            outcome = exc
            log_unexpected(log, "provider %s failed", provider.name)
            raise VolumeError(f"provider {plan.provider} failed ({type(exc).__name__})") from None
        finally:
            metrics.provider_call(plan.provider, time.perf_counter() - started, outcome)
        return expanded, values

    async def _prefetch(self, vol: Volume, given: Mapping[Hashable, Fetched] | None = None) -> None:
        """Fetch every value of a volume (``given``: values already fetched, by source)."""
        sources = vol.plan.sources()
        given = given or {}
        # Static values this identity already has fresh in the cache need no backend call: a pod
        # with the same identity and objects as a running one publishes without any provider call.
        ttl = self.ttl_of(vol.plan)
        cached: dict[Hashable, Fetched] = {}
        for spec, key in vol.keys.items():
            hit = None if spec.dynamic or spec.source in given else self.cache.fresh(key, ttl)
            if hit is not None:
                cached[spec.source] = hit
        errors: list[FetchError] = []
        missing = [s for s in sources if s not in cached and s not in given]
        results: dict[Hashable, object] = dict(given)
        failure: VolumeError | None = None
        if missing:
            try:
                with trio.fail_after(PREFETCH_DEADLINE):
                    results.update(await self._fetch(vol, missing))
            except trio.TooSlowError:
                failure = VolumeError(
                    f"the {vol.plan.provider} backend did not answer within "
                    f"{PREFETCH_DEADLINE:.0f} s"
                )
            except FetchError as exc:
                failure = VolumeError(str(exc), [exc])
            except Exception as exc:
                log_unexpected(log, "provider %s failed", vol.provider.name)
                raise VolumeError(
                    f"provider {vol.plan.provider} failed ({type(exc).__name__})"
                ) from None
        stale = self._stale_fallback(vol, missing, results, failure, cached)
        if failure is not None and any(s not in cached for s in missing):
            raise failure
        why = str(failure) if failure is not None else stale_reason(results)
        results.update(cached)
        by_source: dict[Hashable, FileSpec] = {}
        for spec in vol.plan.files:
            by_source.setdefault(spec.source, spec)
        for source in sources:
            result = results.get(source)
            spec = by_source[source]
            if isinstance(result, FetchError):
                errors.append(result)
            elif not isinstance(result, Fetched):
                errors.append(FetchError(spec.object_name, "no value returned", transient=True))
            else:
                if result.lease is not None:
                    dynamic = any(s.dynamic for s in vol.plan.files if s.source == source)
                    self._warn_static_lease(vol, source, dynamic)
                # Render every file now, so a bad JMESPath or key fails the mount, not a read.
                for s in vol.plan.files:
                    if s.source == source:
                        try:
                            vol.provider.render(s, result)
                        except FetchError as exc:
                            errors.append(exc)
        if errors:
            raise VolumeError("; ".join(str(e) for e in errors), errors)
        for spec, key in vol.keys.items():
            value = results[spec.source]
            assert isinstance(value, Fetched)
            if spec.source in cached:
                continue
            self.cache.put(key, value, dynamic=spec.dynamic)
            if value.lease is not None:
                self._record_lease(vol, key, value.lease)
        if stale:
            self.cache.stats.stale_publishes += 1
            log.warning(
                "volume %s: published from values %.0f s old because the backend failed: %s "
                "(%d of %d value(s) past their TTL; they are refreshed when the backend answers)",
                vol.id,
                max(stale.values()),
                why,
                len(stale),
                len(sources),
                extra=fields(vol, error=failure.errors[0] if failure and failure.errors else None),
            )

    def _stale_fallback(
        self,
        vol: Volume,
        missing: Sequence[Hashable],
        results: Mapping[Hashable, object],
        failure: VolumeError | None,
        cached: dict[Hashable, Fetched],
    ) -> dict[Hashable, float]:
        """A backend that failed transiently (outage, timeout, throttling) does not fail a
        publish whose static values the cache still serves (past their TTL, younger than
        max_stale): those go into ``cached``, as a running volume serves them. A permanent answer
        (not found, denied) is never papered over. Returns the age of each value used so."""
        whole = failure is not None and all(e.transient for e in failure.errors)
        stale: dict[Hashable, float] = {}
        for spec, key in vol.keys.items():
            source = spec.source
            if spec.dynamic or source in cached or source not in missing:
                continue
            result = results.get(source)
            if not (whole or (isinstance(result, FetchError) and result.transient)):
                continue
            hit = self.cache.stale(key)
            if hit is not None:
                cached[source], stale[source] = hit
        return stale

    def _changed(self, key: Hashable) -> None:
        inodes = set(self.tree.inodes_for(key))
        for ino in inodes:
            self._rendered.pop(ino, None)
        if inodes:
            for cb in self.on_inodes_changed:
                cb(inodes)
        if self.on_event:
            for vol in list(self.volumes.values()):
                if key in vol.keys.values():
                    self._emit("versions", {"volume_id": vol.id, "objects": self.versions(vol)})

    # --- what csi writes to the Kubernetes API (pod status objects, Events) --------------------

    def versions(self, vol: Volume) -> list[dict[str, str]]:
        """The version of each object ``vol`` serves now, as SecretProviderClassPodStatus lists
        them (id: the file's path; sorted by id). Starts no fetch; files without a value are left
        out."""
        out: dict[str, str] = {}
        for spec, key in vol.keys.items():
            if spec.dynamic:
                value = self.cache.peek(key, dynamic=True)
            else:
                hit = self.cache.stale(key)
                value = hit[0] if hit is not None else None
            if value is not None:
                out[spec.path] = value.version
        return [{"id": k, "version": out[k]} for k in sorted(out)]

    def _emit(self, kind: str, payload: dict[str, Any]) -> None:
        for cb in self.on_event:
            cb(kind, payload)

    def _warn(self, volume_id: str, reason: str, message: str) -> None:
        if self.on_event:
            payload = {"volume_id": volume_id, "reason": reason, "message": message}
            self._emit("event", {**payload, "type": "Warning"})

    def _refresh_failed(self, errors: Mapping[Hashable, FetchError]) -> None:
        """A refresh failed: a Warning Event for each volume serving those keys (csi rate-limits
        them). The messages are FetchError texts, which carry no secret or token."""
        if not self.on_event:
            return
        for vol in list(self.volumes.values()):
            failed = [(spec, key) for spec, key in vol.keys.items() if key in errors]
            if not failed:
                continue
            spec, key = failed[0]
            exc = errors[key]
            names = ", ".join(sorted({repr(s.object_name) for s, _ in failed}))
            hit = None if spec.dynamic else self.cache.stale(key)
            if not exc.transient:
                reason = VALUE_DROPPED
                then = "the value is no longer served (the backend says it is gone or denied)"
            elif hit is not None:
                reason = SERVING_STALE
                then = f"serving the value fetched {hit[1]:.0f} s ago until a refresh succeeds"
            else:
                reason = REFRESH_FAILED
                then = "readers get EIO until a fetch succeeds"
            self._warn(vol.id, reason, f"refreshing {names} failed: {exc}; {then}")

    @staticmethod
    def _warn_static_lease(vol: Volume, source: Hashable, dynamic: bool) -> None:
        """A static source is refreshed every TTL: if it is leased material, each refresh issues
        new material and a new lease. Say so once per source, naming the objects."""
        if dynamic or source in vol.warned:
            return
        vol.warned.add(source)
        names = sorted({repr(s.object_name) for s in vol.plan.files if s.source == source})
        what = f"object {names[0]} is" if len(names) == 1 else f"objects {', '.join(names)} are"
        log.warning(
            "volume %s: %s classed as static but the %s backend answered with a lease: each "
            "refresh issues new material and old leases are left to expire. If it is issued per "
            "request, add `dynamic: true` to the object",
            vol.id,
            what,
            vol.plan.provider,
        )

    @staticmethod
    def _record_lease(vol: Volume, key: Hashable, lease: Lease) -> None:
        """A lease issued (or renewed) just now: schedule its renewal or, for dynamic material
        whose lease cannot be renewed, its re-issue."""
        now = trio.current_time()
        vol.leases[key] = lease
        # Renew at two thirds of the lease, as Vault's own agent does.
        vol.renew_at[key] = now + max(1.0, lease.duration * 2 / 3)
        vol.expires_at[key] = now + lease.duration if lease.duration > 0 else math.inf
        vol.reissue_at.pop(key, None)
        vol.reissue_failures.pop(key, None)
        if not (lease.renewable and hasattr(vol.provider, "renew_sync")):
            Volumes._schedule_reissue(vol, key, now)
        vol.wake.set()

    @staticmethod
    def _schedule_reissue(vol: Volume, key: Hashable, now: float, *, soon: bool = False) -> None:
        """Issue new material for ``key`` before its lease ends: at two thirds of what is left,
        no later than REISSUE_MARGIN before the end, no sooner than REISSUE_MIN_DELAY (``soon``:
        the lease is gone already). Static values are fetched anew every TTL: nothing to do."""
        if not any(spec.dynamic and k == key for spec, k in vol.keys.items()):
            return
        left = vol.expires_at.get(key, math.inf) - now
        if soon:
            delay = REISSUE_MIN_DELAY
        elif left == math.inf:
            return  # a lease without an end
        else:
            delay = max(REISSUE_MIN_DELAY, min(left * 2 / 3, left - REISSUE_MARGIN))
        vol.reissue_at[key] = now + delay

    async def _renew_leases(self, vol: Volume) -> None:
        """The lease task of a volume: renews renewable leases at two thirds of their duration,
        issues new dynamic material before a lease that cannot be renewed ends, and revokes the
        leases of replaced material after REISSUE_GRACE. Runs until the volume goes
        (``vol.cancel``); one per volume; never raises."""
        if vol.lease_task:
            return
        vol.lease_task = True
        with vol.cancel:
            while True:
                when, job = self._next_lease_job(vol)
                if job is None or when > trio.current_time():
                    vol.wake = trio.Event()
                    with trio.move_on_at(when):
                        await vol.wake.wait()
                    continue
                try:
                    await job()
                except Exception:  # a bug here must not take the daemon's nursery down
                    log_unexpected(log, "volume %s: lease bookkeeping failed", vol.id)
                    await trio.sleep(REISSUE_MIN_DELAY)

    def _next_lease_job(self, vol: Volume) -> tuple[float, Callable[[], Awaitable[None]] | None]:
        best: tuple[float, Callable[[], Awaitable[None]] | None] = (math.inf, None)
        if hasattr(vol.provider, "renew_sync"):
            for key, lease in vol.leases.items():
                if lease.renewable and vol.renew_at[key] < best[0]:
                    best = (vol.renew_at[key], functools.partial(self._renew_lease, vol, key))
        for key, at in vol.reissue_at.items():
            if at < best[0]:
                best = (at, functools.partial(self._reissue, vol, key))
        if vol.retiring:
            at = min(t for t, _ in vol.retiring)
            if at < best[0]:
                best = (at, functools.partial(self._retire_due, vol))
        return best

    async def _renew_lease(self, vol: Volume, key: Hashable) -> None:
        lease = vol.leases[key]
        try:
            new = await trio.to_thread.run_sync(
                vol.provider.renew_sync,  # type: ignore[attr-defined]
                vol.plan,
                vol.identity,
                lease,
                limiter=self._limiter(vol.provider),
                abandon_on_cancel=True,  # a volume going away does not wait for it
            )
        except Exception as exc:
            if vol.leases.get(key) is not lease:
                return  # replaced meanwhile (a static value fetched again)
            # The material stays valid until the lease ends; dynamic material is issued anew
            # before that, at once if the backend says the lease is gone.
            log.warning(
                "volume %s: lease renewal failed: %s",
                vol.id,
                _why(exc),
                extra=fields(vol, error=exc, obj=_object(vol, key)),
            )
            self._warn(vol.id, LEASE_RENEWAL_FAILED, f"lease renewal failed: {_why(exc)}")
            vol.leases[key] = replace(lease, renewable=False)
            gone = isinstance(exc, FetchError) and exc.code == "LeaseInvalid"
            self._schedule_reissue(vol, key, trio.current_time(), soon=gone)
            return
        if vol.leases.get(key) is not lease:
            return
        if new.renewable and new.duration >= math.floor(lease.duration):
            self._record_lease(vol, key, new)
            return
        # Less than asked for: the lease's max TTL caps it, renewing cannot take it further.
        self._record_lease(vol, key, replace(new, renewable=False))
        if new.duration <= 0:
            self._schedule_reissue(vol, key, trio.current_time(), soon=True)
        if key in vol.reissue_at:
            log.info(
                "volume %s: the lease of %s ends in %.0f s and cannot be extended (max TTL); "
                "new material is issued in %.0f s",
                vol.id,
                _names(vol, key),
                max(0.0, new.duration),
                vol.reissue_at[key] - trio.current_time(),
            )

    async def _reissue(self, vol: Volume, key: Hashable) -> None:
        """Issue new material for a dynamic key, serve it (new opens get it; the change callback
        invalidates the kernel's caches), renew its lease from now on and retire the old lease.
        A failure is tried again with backoff while the old material is still served."""
        old = vol.leases.get(key)
        try:
            value = await self._issue(vol, key)
        except FetchError as exc:
            self._reissue_failed(vol, key, str(exc), exc)
            return
        if self.volumes.get(vol.id) is not vol:
            # Removed while the answer came back: nothing serves the new material.
            if value.lease is not None and self.revoke_leases:
                await self._revoke_all(vol, [value.lease])
            return
        self.cache.put(key, value, dynamic=True)
        if value.lease is not None:
            self._record_lease(vol, key, value.lease)
        else:
            for book in (vol.leases, vol.renew_at, vol.expires_at, vol.reissue_at):
                book.pop(key, None)
            vol.reissue_failures.pop(key, None)
        if old is not None and self.revoke_leases:
            vol.retiring.append((trio.current_time() + REISSUE_GRACE, old))
        log.info(
            "volume %s: new %s issued before the lease ended; the old lease %s",
            vol.id,
            _names(vol, key),
            f"is revoked in {REISSUE_GRACE:.0f} s" if self.revoke_leases else "is left to expire",
        )

    async def _issue(self, vol: Volume, key: Hashable) -> Fetched:
        """New material for ``key``, the way ``_fetch_one`` fetches it; every file of the key
        must render from it (else FetchError, and its lease is revoked with revoke_leases)."""
        specs = [spec for spec, k in vol.keys.items() if k == key]
        spec = specs[0]
        result = await self._fetch_source(vol, spec)
        try:
            for s in specs:
                vol.provider.render(s, result)
        except Exception as exc:
            if result.lease is not None and self.revoke_leases:
                vol.retiring.append((trio.current_time(), result.lease))  # unused: revoke now
            if isinstance(exc, FetchError):
                raise
            log_unexpected(log, "provider %s failed to render", vol.provider.name)
            raise FetchError(
                spec.object_name, f"provider error ({type(exc).__name__})", transient=True
            ) from None
        return result

    def _reissue_failed(
        self, vol: Volume, key: Hashable, why: str, error: FetchError | None = None
    ) -> None:
        now = trio.current_time()
        n = vol.reissue_failures[key] = vol.reissue_failures.get(key, 0) + 1
        delay = min(REISSUE_MAX_BACKOFF, 2.0 ** (n - 1))
        vol.reissue_at[key] = now + delay
        left = vol.expires_at.get(key, math.inf) - now
        if left == math.inf:
            served = "the current material is still served"
        elif left > 0:
            served = f"the current material is still served; its lease ends in {left:.0f} s"
        else:
            served = "its lease has ended; the old material is still served"
        log.warning(
            "volume %s: issuing new %s failed (%d in a row; next try in %.0f s; %s): %s",
            vol.id,
            _names(vol, key),
            n,
            delay,
            served,
            why,
            extra=fields(vol, obj=_object(vol, key), error=error),
        )
        self._warn(
            vol.id,
            REISSUE_FAILED,
            f"issuing new {_names(vol, key)} failed ({n} in a row; next try in {delay:.0f} s; "
            f"{served}): {why}",
        )

    async def _retire_due(self, vol: Volume) -> None:
        """Revoke the leases of replaced material whose grace period is over. Each leaves the list
        only once done: if the volume goes meanwhile, ``_revoke`` still has it."""
        now = trio.current_time()
        for entry in [e for e in vol.retiring if e[0] <= now]:
            await self._revoke_one(vol, entry[1])
            if entry in vol.retiring:  # not if the volume went (``_revoke`` empties it)
                vol.retiring.remove(entry)

    async def _revoke_one(self, vol: Volume, lease: Lease) -> None:
        revoke = getattr(vol.provider, "revoke_sync", None)
        if revoke is None:
            return
        try:
            await trio.to_thread.run_sync(
                revoke,
                vol.plan,
                vol.identity,
                lease,
                limiter=self._limiter(vol.provider),
                abandon_on_cancel=True,
            )
        except Exception as exc:
            log.warning(
                "volume %s: lease revocation failed: %s",
                vol.id,
                _why(exc),
                extra=fields(vol, error=exc),
            )

    async def _revoke(self, vol: Volume) -> None:
        revoke = getattr(vol.provider, "revoke_sync", None)
        if revoke is None:
            return
        # A static key another volume still uses may be serving this very lease's material.
        in_use = {k for other in self.volumes.values() for k in other.keys.values()}
        leases = [lease for key, lease in vol.leases.items() if key not in in_use]
        # Replaced material still in its grace period goes too.
        leases += [lease for _, lease in vol.retiring]
        vol.retiring.clear()
        await self._revoke_all(vol, leases)

    async def _revoke_all(self, vol: Volume, leases: Sequence[Lease]) -> None:
        # The deadline belongs to the shielded scope itself: a deadline on an enclosing scope
        # cannot reach through a shield. abandon_on_cancel lets it end a blocked call.
        with trio.CancelScope(shield=True, deadline=trio.current_time() + REVOKE_DEADLINE) as scope:
            for lease in leases:
                await self._revoke_one(vol, lease)
        if scope.cancelled_caught:
            log.warning(
                "volume %s: lease revocation did not finish within %.0f s; the rest of its "
                "leases are left to expire",
                vol.id,
                REVOKE_DEADLINE,
                extra=fields(vol, error_type="Timeout"),
            )


def ttl_problem(ttl: float, max_stale: float, min_ttl: float, max_ttl: float | None) -> str | None:
    """What is wrong with a node's TTL options (--ttl, --max-stale, --min-ttl, --max-ttl)."""
    if not ttl > 0:
        return f"--ttl must be more than 0 seconds (got {ttl:g})"
    if not max_stale >= ttl:
        return f"--max-stale ({max_stale:g} s) must be at least --ttl ({ttl:g} s)"
    if not min_ttl > 0:
        return f"--min-ttl must be more than 0 seconds (got {min_ttl:g})"
    if max_ttl is not None:
        if not 0 < max_ttl <= max_stale:
            return f"--max-ttl ({max_ttl:g} s) must be more than 0 and at most --max-stale"
        if min_ttl > max_ttl:
            return f"--min-ttl ({min_ttl:g} s) must be at most --max-ttl ({max_ttl:g} s)"
    return None


def _merge(out: dict[Hashable, str], outcomes: Mapping[Hashable, str]) -> None:
    """Outcomes of a value reloaded for two volumes: a change or a success wins over a failure
    (a value two volumes share counts once)."""
    rank = {CHANGED: 2, FAILED: 0}
    for key, outcome in outcomes.items():
        if rank.get(outcome, 1) >= rank.get(out.get(key, FAILED), 1):
            out[key] = outcome


def stale_reason(results: Mapping[Hashable, object]) -> str:
    """The first transient failure among a fetch's results (for the log)."""
    return next(
        (str(r) for r in results.values() if isinstance(r, FetchError) and r.transient), "?"
    )


def _why(exc: Exception) -> str:
    """What may be logged about a failed provider call: a FetchError's message (written to carry
    no secret, token or lease id), else only the exception's type (an SDK's text could quote
    data)."""
    return str(exc) if isinstance(exc, FetchError) else f"provider error ({type(exc).__name__})"


def _object(vol: Volume, key: Hashable) -> str | None:
    """The first object served from ``key`` (the ``object`` log field)."""
    return min((s.object_name for s, k in vol.keys.items() if k == key), default=None)


def _names(vol: Volume, key: Hashable) -> str:
    """The objects served from ``key``, for log lines."""
    names = sorted({repr(s.object_name) for s, k in vol.keys.items() if k == key})
    return f"object {names[0]}" if len(names) == 1 else f"objects {', '.join(names)}"
