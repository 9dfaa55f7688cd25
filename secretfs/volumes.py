"""Volumes: which files exist, for whom, and where their bytes come from.

Owns the tree, the cache and the provider calls. ``add`` fetches everything a volume needs before
its files appear, so a misconfiguration fails the mount (or the publish) with a clear message
instead of an EIO later. Runs on the trio thread; provider calls go to worker threads under one
``CapacityLimiter`` per provider.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import trio

from providers import get_provider
from providers.base import Fetched, FetchError, FileSpec, Identity, Lease, Plan, Provider
from secretfs.cache import SecretCache
from secretfs.logs import log_unexpected
from secretfs.tree import Tree

log = logging.getLogger(__name__)

# How long a mount-time fetch of a whole volume may take. The kubelet gives NodePublishVolume two
# minutes; leave room for its retries and our own bookkeeping.
PREFETCH_DEADLINE = 60.0
# How long an open() waits for a value the cache does not have.
READ_DEADLINE = 30.0
# How long removing a volume may spend revoking its leases (an unpublish must not hang on Vault).
REVOKE_DEADLINE = 10.0


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
    cancel: trio.CancelScope = field(default_factory=trio.CancelScope)
    # Static sources that came back with a lease and have been warned about (once each).
    warned: set[Hashable] = field(default_factory=set)
    # The inode of each path ("" is the volume's directory): the next daemon generation reuses
    # them, since the kernel keeps node ids across a takeover.
    inodes: dict[str, int] = field(default_factory=dict)
    # The request that added it, for the keeper (tokens and nodePublishSecretRef data: never log).
    record: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
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
    ) -> None:
        self.tree = Tree(mtime_ns=time.time_ns())
        self.cache = SecretCache(ttl, max_stale, on_change=self._changed)
        self.volumes: dict[str, Volume] = {}
        self.revoke_leases = revoke_leases
        self._limiters: dict[str, trio.CapacityLimiter] = {}
        self._rendered: dict[int, Rendered] = {}
        self._nursery: trio.Nursery | None = None
        # Called with the inodes whose content changed (the FUSE layer invalidates kernel caches).
        self.on_inodes_changed: list[Callable[[set[int]], None]] = []

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
    ) -> Volume:
        """Fetch everything, then let the files appear. With ``restore`` (the inode map of the
        volume in an earlier daemon generation) the files appear at once with those numbers and
        their values are fetched when first used (or by ``warm``)."""
        if volume_id in self.volumes:
            raise VolumeError(f"volume {volume_id!r} already exists")
        provider = get_provider(plan.provider)
        vol = Volume(volume_id, plan, provider, identity, uid, gid)
        for spec in plan.files:
            vol.keys[spec] = self._key(vol, spec)
        if restore is None:
            await self._prefetch(vol)
        # Only now do the files appear.
        self.volumes[volume_id] = vol
        self.cache.retain(vol.keys.values())
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
            )

    def refresh_identity(self, volume_id: str, identity: Identity) -> None:
        """A republish brought fresh tokens; the identity key must not change."""
        vol = self.volumes[volume_id]
        if identity.key() != vol.identity.key():
            raise VolumeError(f"volume {volume_id!r} was published for another identity")
        vol.identity = identity

    async def remove(self, volume_id: str) -> bool:
        vol = self.volumes.pop(volume_id, None)
        if vol is None:
            return False
        vol.cancel.cancel()
        for ino in self.tree.remove_volume(volume_id):
            self._rendered.pop(ino, None)
        self.cache.release(vol.keys.values())
        if self.revoke_leases and vol.leases:
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

    def peek(self, inode: int) -> Rendered | None:
        """The bytes a new open would most likely get, without waiting (for getattr)."""
        node = self.tree[inode]
        if node.spec is None or node.key is None or node.volume not in self.volumes:
            return None
        value = self.cache.peek(node.key, dynamic=node.spec.dynamic)
        if value is None:
            return self._rendered.get(inode)
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

    # --- internals ----------------------------------------------------------------------------

    def _key(self, vol: Volume, spec: FileSpec) -> Hashable:
        base = (vol.plan.provider, vol.plan.auth, vol.identity.key(), spec.source)
        # Dynamic material belongs to one volume: never shared, never re-issued for another.
        return (*base, "volume", vol.id) if spec.dynamic else base

    def _render(self, inode: int, vol: Volume, spec: FileSpec, value: Fetched) -> Rendered:
        cached = self._rendered.get(inode)
        if cached is not None and cached.version == value.version:
            return cached
        out = Rendered(value.version, vol.provider.render(spec, value), time.time_ns())
        self._rendered[inode] = out
        return out

    def _limiter(self, provider: Provider) -> trio.CapacityLimiter:
        lim = self._limiters.get(provider.name)
        if lim is None:
            lim = self._limiters[provider.name] = trio.CapacityLimiter(provider.max_concurrency)
        return lim

    async def _fetch(self, vol: Volume, sources: Sequence[Hashable]) -> dict[Hashable, object]:
        results = await trio.to_thread.run_sync(
            vol.provider.fetch_sync,
            vol.plan,
            vol.identity,
            list(sources),
            limiter=self._limiter(vol.provider),
            abandon_on_cancel=True,
        )
        return dict(results)

    async def _fetch_one(self, vol: Volume, spec: FileSpec) -> Fetched:
        try:
            result = (await self._fetch(vol, [spec.source])).get(spec.source)
        except FetchError:
            raise
        except Exception as exc:
            log_unexpected(log, "provider %s failed", vol.provider.name)
            raise FetchError(
                spec.object_name, f"provider error ({type(exc).__name__})", transient=True
            ) from None
        if isinstance(result, Fetched):
            if result.lease is not None:
                self._warn_static_lease(vol, spec.source, spec.dynamic)
                self._record_lease(vol, vol.keys[spec], result.lease)
            return result
        if isinstance(result, FetchError):
            raise result
        raise FetchError(spec.object_name, "the provider returned nothing", transient=True)

    async def _prefetch(self, vol: Volume) -> None:
        sources = vol.plan.sources()
        # Static values this identity already has fresh in the cache need no backend call: a pod
        # with the same identity and objects as a running one publishes without any provider call.
        cached: dict[Hashable, Fetched] = {}
        for spec, key in vol.keys.items():
            hit = None if spec.dynamic else self.cache.fresh(key)
            if hit is not None:
                cached[spec.source] = hit
        errors: list[FetchError] = []
        try:
            with trio.fail_after(PREFETCH_DEADLINE):
                missing = [s for s in sources if s not in cached]
                results = {**(await self._fetch(vol, missing) if missing else {}), **cached}
        except trio.TooSlowError:
            raise VolumeError(
                f"the {vol.plan.provider} backend did not answer within {PREFETCH_DEADLINE:.0f} s"
            ) from None
        except FetchError as exc:
            raise VolumeError(str(exc), [exc]) from None
        except Exception as exc:
            log_unexpected(log, "provider %s failed", vol.provider.name)
            raise VolumeError(
                f"provider {vol.plan.provider} failed ({type(exc).__name__})"
            ) from None
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

    def _changed(self, key: Hashable) -> None:
        inodes = set(self.tree.inodes_for(key))
        for ino in inodes:
            self._rendered.pop(ino, None)
        if inodes:
            for cb in self.on_inodes_changed:
                cb(inodes)

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
        vol.leases[key] = lease
        # Renew at two thirds of the lease, as Vault's own agent does.
        vol.renew_at[key] = trio.current_time() + max(1.0, lease.duration * 2 / 3)

    async def _renew_leases(self, vol: Volume) -> None:
        renew = getattr(vol.provider, "renew_sync", None)
        if renew is None:
            return
        with vol.cancel:
            while True:
                due = [k for k, lease in vol.leases.items() if lease.renewable]
                if not due:
                    return
                key = min(due, key=lambda k: vol.renew_at[k])
                await trio.sleep_until(vol.renew_at[key])
                lease = vol.leases[key]
                try:
                    new = await trio.to_thread.run_sync(
                        renew,
                        vol.plan,
                        vol.identity,
                        lease,
                        limiter=self._limiter(vol.provider),
                        abandon_on_cancel=True,  # a volume going away does not wait for it
                    )
                except Exception as exc:
                    # The material stays valid until the lease ends; we just stop renewing it.
                    log.warning("volume %s: lease renewal failed: %s", vol.id, exc)
                    vol.leases[key] = replace(lease, renewable=False)
                else:
                    self._record_lease(vol, key, new)

    async def _revoke(self, vol: Volume) -> None:
        revoke = getattr(vol.provider, "revoke_sync", None)
        if revoke is None:
            return
        # A static key another volume still uses may be serving this very lease's material.
        in_use = {k for other in self.volumes.values() for k in other.keys.values()}
        leases = [lease for key, lease in vol.leases.items() if key not in in_use]
        # The deadline belongs to the shielded scope itself: a deadline on an enclosing scope
        # cannot reach through a shield. abandon_on_cancel lets it end a blocked call.
        with trio.CancelScope(shield=True, deadline=trio.current_time() + REVOKE_DEADLINE) as scope:
            for lease in leases:
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
                    log.warning("volume %s: lease revocation failed: %s", vol.id, exc)
        if scope.cancelled_caught:
            log.warning(
                "volume %s: lease revocation did not finish within %.0f s; the rest of its "
                "leases are left to expire",
                vol.id,
                REVOKE_DEADLINE,
            )
