"""Standalone mode: one SecretProviderClass mounted directly, with the process's own credentials."""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

import pyfuse3
import trio

from providers.base import AMBIENT, DEFAULT_MODE, ParameterError
from secretfs import announce, metrics
from secretfs import spc as spc_mod
from secretfs.fs import ATTR_TIMEOUT, SecretFS
from secretfs.hardening import describe, harden
from secretfs.readpath import describe_read_path
from secretfs.volumes import DEFAULT_MIN_TTL, VolumeError, Volumes, ttl_problem

log = logging.getLogger(__name__)

STANDALONE_VOLUME = "standalone"
# How often a mount with a private clone checks that it is still mounted (seconds).
UNMOUNT_POLL = 0.5


@dataclass(frozen=True)
class MountOptions:
    ttl: float = 120.0
    max_stale: float = 86400.0
    uid: int = 0
    gid: int = 0
    default_mode: int = DEFAULT_MODE
    allow_other: bool = True
    attr_timeout: float = ATTR_TIMEOUT
    lock_memory: bool = True
    revoke_leases: bool = False
    # Bounds of the class's own TTL (secretfs.io/ttl); max_ttl None: max_stale.
    min_ttl: float = DEFAULT_MIN_TTL
    max_ttl: float | None = None
    metrics_addr: str = ""  # Prometheus /metrics (secretfs/metrics.py); empty: off
    no_open: bool = False  # serve opens and warm reads without OPEN (fs.choose_no_open)

    def check(self) -> None:
        problem = ttl_problem(self.ttl, self.max_stale, self.min_ttl, self.max_ttl)
        if problem:
            raise MountError(problem)


class MountError(Exception):
    """The mount did not happen; the message tells the user why."""


def mount_hint(privileged: bool, allow_other: bool) -> str:
    """What to check when the kernel or fusermount3 refused the mount (libfuse's own message,
    "fuse_session_mount failed", names no cause)."""
    if privileged:
        return (
            "is /dev/fuse there? in a container it must be passed in (--device /dev/fuse) with "
            "CAP_SYS_ADMIN"
        )
    hint = (
        "as a user, mounting needs fusermount3 (Debian/Ubuntu package fuse3) and read-write "
        "access to /dev/fuse"
    )
    if allow_other:
        hint += (
            "; --allow-other also needs 'user_allow_other' in /etc/fuse.conf (or use "
            "--no-allow-other)"
        )
    return hint + "; or run as root"


def fuse_options(allow_other: bool, fsname: str = "secretfs", *, ro: bool = True) -> set[str]:
    """Options of a secretfs mount. ``ro=False`` only for a mount that is made read-only right
    after, once a private writable clone for change announcements exists (``announce``)."""
    opts = {f"fsname={fsname}", "subtype=secretfs", "nosuid", "nodev"}
    if ro:
        opts.add("ro")
    opts |= set(pyfuse3.default_options)  # default_permissions: the kernel enforces modes
    if allow_other:
        opts.add("allow_other")
    return opts


def _mount_type(path: str) -> str | None:
    """The filesystem type mounted at ``path`` (the topmost), from /proc/self/mounts."""
    found = None
    try:
        with open("/proc/self/mounts", encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 2 and parts[1].replace("\\040", " ") == path:
                    found = parts[2]
    except OSError:
        pass
    return found


def check_mountpoint(path: str) -> None:
    path = os.path.abspath(path)
    kind = _mount_type(path)
    if kind is not None and kind.startswith("fuse"):
        try:
            # statfs always reaches the server (stat may be answered from the kernel's cache).
            os.statvfs(path)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                raise MountError(f"{path}: {exc.strerror}") from None
            if kind != "fuse.secretfs":
                raise MountError(
                    f"{path} is a dead FUSE mount ({kind}) whose server is gone; unmount it "
                    f"first: fusermount3 -u -z {path}"
                ) from None
            # Ours, left by a secretfs daemon that was killed: nothing can use it any more.
            log.warning("%s: detaching the dead mount of a previous secretfs daemon", path)
            subprocess.run(["fusermount3", "-u", "-z", path], check=False, capture_output=True)
            if _mount_type(path) == kind:
                raise MountError(
                    f"{path} is a dead secretfs mount and could not be detached; run: "
                    f"secretfs umount {path}"
                ) from None
    if not os.path.isdir(path):
        raise MountError(f"mount point {path} does not exist or is not a directory")
    if os.path.ismount(path):
        raise MountError(f"{path} is already a mount point; unmount it first")


async def _close_when_unmounted(mountpoint: str, clone: announce.Clone) -> None:
    """The clone keeps the filesystem alive: once someone unmounts ``mountpoint`` (``secretfs
    umount``, ``umount``), close it, so the kernel ends the session and ``main()`` returns."""
    while True:
        await trio.sleep(UNMOUNT_POLL)
        if _mount_type(mountpoint) != "fuse.secretfs":
            break
    log.info("%s was unmounted", mountpoint)
    clone.close()


def _child_announcer(nursery: trio.Nursery, clone: announce.Clone) -> Callable[[list[str]], None]:
    """Announce through ``touch`` in a child process that holds only the clone's fd (never a
    thread of this process: see secretfs/announce.py)."""
    limiter = trio.CapacityLimiter(1)

    async def run_touch(paths: list[str]) -> None:
        async with limiter:
            fd = clone.fd
            if fd is None:
                return
            with trio.move_on_after(30):
                result = await trio.run_process(
                    announce.touch_command(fd, paths),
                    pass_fds=(fd,),
                    check=False,
                    capture_stdout=True,
                    capture_stderr=True,
                )
                if result.returncode != 0:
                    log.warning("announcing %d changed file(s) failed", len(paths))

    def announcer(paths: list[str]) -> None:
        nursery.start_soon(run_touch, paths)

    return announcer


async def run(
    spc_path: str,
    mountpoint: str,
    opts: MountOptions,
    ready: Callable[[str | None], None],
    fs_factory: Callable[[Volumes], SecretFS] = SecretFS,
) -> int:
    """Mount, report readiness (None) or the reason for failure, and serve until unmounted."""
    try:
        opts.check()
        check_mountpoint(mountpoint)
        plan = spc_mod.plan(spc_mod.load(spc_path), default_mode=opts.default_mode)
    except (MountError, spc_mod.SpcError, ParameterError) as exc:
        ready(str(exc))
        return 1
    hardened = harden(opts.lock_memory)
    log.info("process hardening: %s", describe(hardened))
    volumes = Volumes(
        ttl=opts.ttl,
        max_stale=opts.max_stale,
        revoke_leases=opts.revoke_leases,
        min_ttl=opts.min_ttl,
        max_ttl=opts.max_ttl,
    )
    terminated = False
    async with trio.open_nursery() as nursery:
        volumes.start(nursery)
        metrics.serve(opts.metrics_addr, volumes)
        try:
            vol = await volumes.add(
                STANDALONE_VOLUME,
                plan,
                AMBIENT,
                uid=opts.uid,
                gid=opts.gid,
                at_root=True,
                target=os.path.abspath(mountpoint),  # noqa: ASYNC240 (getcwd, no file I/O)
            )
        except VolumeError as exc:
            ready(f"cannot mount: {exc}")
            nursery.cancel_scope.cancel()
            return 1
        fs = fs_factory(volumes)
        fs.attr_timeout = opts.attr_timeout
        fs.no_open = opts.no_open
        log.info("read path: %s", describe_read_path(opts.no_open))
        # As root, mount writable, keep a private writable clone for change announcements and
        # make the mount itself read-only; without privilege, a plain read-only mount.
        privileged = os.geteuid() == 0
        try:
            pyfuse3.init(fs, mountpoint, fuse_options(opts.allow_other, ro=not privileged))
        except RuntimeError as exc:
            ready(f"cannot mount {mountpoint}: {exc} ({mount_hint(privileged, opts.allow_other)})")
            nursery.cancel_scope.cancel()
            return 1
        clone = None
        if privileged:
            try:
                fd, why = announce.announcing(mountpoint)
            except OSError as exc:
                ready(f"cannot mount {mountpoint}: {exc.strerror}")
                nursery.cancel_scope.cancel()
                pyfuse3.close(unmount=True)
                return 1
            if fd is None:
                log.warning("no change announcements (inotify events): %s", why)
            else:
                clone = announce.Clone(fd)
        else:
            log.info("no change announcements (inotify events): they need a mount made by root")
        if clone is not None:
            fs.announcer = _child_announcer(nursery, clone)
        fs.start(nursery)
        log.info("mounted %s (%d files)", mountpoint, len(vol.plan.files))
        ready(None)

        async def on_signal() -> None:
            nonlocal terminated
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    terminated = True
                    pyfuse3.terminate()
                    return

        nursery.start_soon(on_signal)
        if clone is not None:
            where = os.path.abspath(mountpoint)  # noqa: ASYNC240 (getcwd, no file I/O)
            nursery.start_soon(_close_when_unmounted, where, clone)
        try:
            await pyfuse3.main()
        finally:
            # Each step of the way out is timed in the debug log: an exit after an unmount once
            # took over 20 s on a loaded machine (tests/test_e2e_vault.py, --revoke-leases).
            log.debug("the FUSE session ended; closing")
            nursery.cancel_scope.cancel()
            if clone is not None:
                clone.close()
            # After an external umount the kernel side is already gone.
            pyfuse3.close(unmount=terminated)
            log.debug("FUSE closed; removing the volume (revoking leases if asked)")
            with trio.CancelScope(shield=True):
                await volumes.remove(STANDALONE_VOLUME)
    log.info("unmounted %s", mountpoint)
    return 0
