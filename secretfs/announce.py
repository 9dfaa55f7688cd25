"""Change announcements: make a rotation visible to inotify/fanotify watchers.

Measured on Linux 6.18 (see docs/INTERNALS.md, "Change announcements"): no FUSE notification
(``invalidate_inode``, ``invalidate_entry``, ``notify_store``) produces an inotify event. Only
``invalidate_entry`` with ``deleted=`` does (``IN_DELETE_SELF``), and only by giving the name a
new inode, which strands a ``subPath`` bind on the old one and fires once. What reaches every
watcher, repeatedly, through any bind of the file or its directory, is a ``utimensat`` through
the VFS: the kernel sends SETATTR, the filesystem answers with the new version's attributes, and
``fsnotify_change`` raises ``IN_ATTRIB`` on the file (and on its directory's watches, with the
name).

Every mount anyone else can reach stays read-only. Announcements go through a private, detached,
writable clone of the mount (``open_tree(OPEN_TREE_CLONE)``): no path leads to it, only the fd.
The filesystem accepts a SETATTR that changes times only and answers it with its own attributes
(it never stores the times it is given); everything else stays EROFS.

Who may touch: never a thread of the daemon itself. A daemon killed between reading its own
SETATTR and answering it would wait for that answer forever, holding the connection (a thread
in an uninterruptible wait keeps the whole process and its fds). The csi process (the keeper)
touches for the node daemon; a standalone daemon runs ``touch`` in a child process, which holds
no ``/dev/fuse`` fd, so the daemon's death aborts the connection and frees the child.

Stdlib only: the csi process imports this.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os

# x86_64 and aarch64 share these numbers (syscalls added after the unified table).
_SYS_OPEN_TREE = 428
_SYS_MOUNT_SETATTR = 442
OPEN_TREE_CLONE = 1
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REMOUNT = 0x20
MS_BIND = 0x1000

_libc = ctypes.CDLL(None, use_errno=True)  # the process's own symbols: libc, no ldconfig run
_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _fail(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


def writable_clone(path: str) -> int:
    """A private, detached, writable clone of the mount at ``path`` (an fd; the caller closes
    it). The superblock must be writable: a mount made with ``ro`` cannot announce anything."""
    fd = _libc.syscall(
        _SYS_OPEN_TREE,
        ctypes.c_int(-100),  # AT_FDCWD
        ctypes.c_char_p(os.fsencode(path)),
        ctypes.c_uint(OPEN_TREE_CLONE | os.O_CLOEXEC),
    )
    if fd < 0:
        raise _fail(f"open_tree {path}")
    attr = _MountAttr(0, MOUNT_ATTR_RDONLY, 0, 0)
    ret = _libc.syscall(
        _SYS_MOUNT_SETATTR,
        ctypes.c_int(fd),
        ctypes.c_char_p(b""),
        ctypes.c_uint(AT_EMPTY_PATH),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    if ret < 0:
        exc = _fail("mount_setattr")
        os.close(fd)
        raise exc
    return int(fd)


def announcing(path: str) -> tuple[int | None, str | None]:
    """Set up the mount at ``path`` for announcements: (the clone's fd, or None and why not).

    The superblock is made writable first (a plain remount: a node root that an earlier release
    mounted ``ro`` gets it back; FUSE allows it and sends nothing), then cloned, then the mount
    itself is made read-only again. Every other mount of the filesystem keeps its own read-only
    flag (volume binds are made ``ro`` one by one). Raises OSError only if the mount cannot be
    made read-only at the end."""
    flags = MS_REMOUNT | MS_NOSUID | MS_NODEV
    # A failure is not fatal: the clone then answers EROFS, which the toucher reports once.
    _libc.mount(None, os.fsencode(path), None, flags, None)
    fd, why = None, None
    try:
        fd = writable_clone(path)
    except OSError as exc:
        why = exc.strerror
    try:
        remount_readonly(path)
    except OSError:
        if fd is not None:
            os.close(fd)
        raise
    return fd, why


class Clone:
    """An fd of a private writable clone, closed once (the number may be reused after)."""

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


def remount_readonly(path: str) -> None:
    """Make the mount at ``path`` read-only (the mount only: a clone made before keeps its own
    flags, and the superblock stays writable for it)."""
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV
    if _libc.mount(None, os.fsencode(path), None, flags, None) != 0:
        raise _fail(f"remount {path} read-only")


def touch(dir_fd: int, paths: list[str]) -> list[tuple[str, int]]:
    """``utimensat(now)`` each path (relative to ``dir_fd``); returns the failures as
    (path, errno). ENOENT is not a failure: the volume went away meanwhile."""
    failed = []
    for rel in paths:
        try:
            os.utime(rel, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                failed.append((rel, exc.errno or 0))
    return failed


def touch_command(dir_fd: int, paths: list[str]) -> list[str]:
    """The ``touch`` command line that announces ``paths`` from a child process that inherits
    ``dir_fd`` (and nothing else: ``pass_fds``)."""
    return ["touch", "-c", "--", *(f"/proc/self/fd/{dir_fd}/{rel}" for rel in paths)]
