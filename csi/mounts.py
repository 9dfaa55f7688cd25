"""Mount plumbing of the csi process: mount(2)/umount2(2) through libc, and /proc/self/mountinfo.

The kernel's mount table is the source of truth (it survives a restart of this process): the
node root is the ``fuse.secretfs`` mount at ``--mount-root``; a published volume is a mount at
its target path whose device is the node root's and whose root is ``/<volume_id>``.
"""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass
from pathlib import Path

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

FSTYPE = "fuse.secretfs"
SOURCE = "secretfs"

_libc = ctypes.CDLL(None, use_errno=True)  # the process's own symbols: libc, no ldconfig run
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class MountError(OSError):
    pass


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise MountError(err, f"{what}: {os.strerror(err)}")


def mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    _check(
        _libc.mount(
            source.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            flags,
            data.encode() if data else None,
        ),
        f"mount {target}",
    )


def umount(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(target.encode(), flags | UMOUNT_NOFOLLOW), f"umount {target}")


@dataclass(frozen=True)
class MountInfo:
    mount_id: int
    device: str  # major:minor
    root: str  # the path inside the filesystem that is mounted here
    mountpoint: str
    options: str
    fstype: str
    source: str


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[MountInfo]:
    mounts = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 10 or "-" not in parts[6:]:
            continue
        sep = parts.index("-", 6)
        mounts.append(
            MountInfo(
                mount_id=int(parts[0]),
                device=parts[2],
                root=_unescape(parts[3]),
                mountpoint=_unescape(parts[4]),
                options=parts[5],
                fstype=parts[sep + 1],
                source=_unescape(parts[sep + 2]),
            )
        )
    return mounts


def read_mountinfo() -> list[MountInfo]:
    return parse_mountinfo(Path("/proc/self/mountinfo").read_text(encoding="utf-8"))


def at(mounts: list[MountInfo], path: str) -> MountInfo | None:
    """The topmost mount at ``path`` (the last one listed)."""
    found = None
    for m in mounts:
        if m.mountpoint == path:
            found = m
    return found


def node_root(mounts: list[MountInfo], root_dir: str) -> MountInfo | None:
    m = at(mounts, root_dir)
    return m if m is not None and m.fstype == FSTYPE else None


def volume_of(m: MountInfo | None, root: MountInfo | None) -> str | None:
    """The volume id a mount shows, if it is a bind of the node root's volume directory."""
    if m is None or root is None or m.fstype != FSTYPE or m.device != root.device:
        return None
    name = m.root.strip("/")
    return name if name and "/" not in name else None


def mount_fuse_root(root_dir: str, fuse_fd: int, uid: int, gid: int) -> None:
    """Mount the node's secretfs root at ``root_dir``, served by whoever reads ``fuse_fd``.

    The superblock is writable so that a private clone can announce changes
    (secretfs/announce.py); the caller makes this mount read-only right after (Keeper)."""
    data = (
        f"fd={fuse_fd},rootmode=40000,user_id={uid},group_id={gid},allow_other,default_permissions"
    )
    mount(SOURCE, root_dir, FSTYPE, MS_NOSUID | MS_NODEV, data)


def bind_readonly(source: str, target: str) -> None:
    mount(source, target, None, MS_BIND, None)
    try:
        # A bind mount takes MS_RDONLY only on a remount.
        flags = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV
        mount(source, target, None, flags, None)
    except OSError:
        umount(target, MNT_DETACH)
        raise


def unmount_all(target: str) -> int:
    """Unmount everything stacked at ``target``; a dead FUSE connection is detached lazily."""
    count = 0
    while at(read_mountinfo(), target) is not None:
        try:
            umount(target)
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # not a mount point (any more)
                break
            # EBUSY (a process still has it open) or a dead connection: detach it now; the kernel
            # drops it when the last user goes away.
            umount(target, MNT_DETACH)
        count += 1
        if count > 16:
            raise MountError(errno.ELOOP, f"umount {target}: mounts keep reappearing")
    return count
