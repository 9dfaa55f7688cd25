"""The read-only FUSE filesystem: a thin translation from kernel requests to :class:`Volumes`.

Consistency rules (see docs/INTERNALS.md for the why):

- ``open`` binds a handle to the version the cache serves at that moment; ``read`` slices that
  snapshot, so an open file sees one version from open to close.
- The kernel page cache is used (``keep_cache``) when it can only hold the handle's own version:
  the inode has no open handle of another version and the kernel was last told this version's
  size. Otherwise the handle is opened ``direct_io``, which bypasses the page cache and the cached
  file size, so handles of two versions never see each other's bytes.
- When a value changes, the inode's cached attributes are invalidated from a worker thread
  (``pyfuse3.invalidate_inode`` on the trio thread deadlocks against an in-flight READ). Only the
  attributes: dropping pages waits for the page locks of READs in flight, and a daemon killed
  during that wait can never exit (measured: a thread stuck in ``__folio_lock``, the process a
  zombie holding the connection, so no next generation ever starts). Pages of an old version
  are dropped by the next open instead (``keep_cache`` false), in the opener's context.
- File handles carry their inode (``fh >> 32``), and nothing the kernel holds depends on one
  process's tables: after a takeover (secretfs/takeover.py) the new daemon generation serves
  reads and releases of handles an earlier one issued, adopting such a handle with the version it
  serves now (one version from then on), and answers getattr of a file whose value it has not
  fetched yet by fetching it (the reader stalls; it never sees size 0).
- No-open mode (``no_open``, on where the pyfuse3 in use passes the inode to ``read``; see
  docs/INTERNALS.md "No-open reads"): the first OPEN is answered ENOSYS, after which the kernel
  sends no OPEN or RELEASE on the connection and warm reads come from the page cache without the
  daemon. A READ (file handle 0, so pyfuse3 passes the inode) is answered from the version whose
  size and mtime the kernel was last told (``served``), so the bytes match the size the kernel
  clips at (but for a moment around a change). A change invalidates the attributes only; the
  kernel (FUSE_AUTO_INVAL_DATA) re-reads them at the next read, sees the new mtime or size and
  drops the pages itself, in the reader's context. The guarantee is one version per READ (a
  file of up to 128 KiB read with one ``read`` of its size), not per open: a reader reading a
  bigger file in small pieces while it changes can get the old version's start and the new
  one's end, and so, rarely, can a read that overlaps the moment the kernel learns of a change
  (docs/INTERNALS.md).
- Every write-ish request fails with EROFS. No handler lets anything but FUSEError escape: one
  stray exception would end ``pyfuse3.main`` and leave every mount dead.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pyfuse3
import trio

from providers.base import FetchError
from secretfs.logs import AUDIT, log_unexpected
from secretfs.tree import ROOT_INODE, Node
from secretfs.volumes import Rendered, Volumes

log = logging.getLogger(__name__)
audit = logging.getLogger("secretfs.audit")

# The kernel may cache names and directory attributes this long (they change only with volumes).
ATTR_TIMEOUT = 60.0
# A file's attributes are cached this long: a stat poller reaches the daemon at least this often,
# and a getattr of a value past its TTL starts its refresh, so a poller that never reads sees a
# new version (size, mtime) within TTL + this + the fetch. Changes are also pushed to the kernel
# (invalidation, and the announcement's SETATTR answer).
FILE_ATTR_TIMEOUT = 1.0
# fh = inode << FH_SHIFT | a per-open counter: any generation can tell a handle's inode. A READ
# with a smaller number is a no-open READ whose "handle" is the inode itself.
FH_SHIFT = 32
_FIRST_FH = 1 << FH_SHIFT
_FH_MASK = (1 << FH_SHIFT) - 1
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def guarded(fn: F) -> F:
    """Turn any exception but FUSEError into EIO after logging it (type and frames only: an
    exception message could quote data)."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Exception:
            log_unexpected(log, "%s failed; answering EIO", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


async def _erofs(*_: Any, **__: Any) -> Any:
    raise pyfuse3.FUSEError(errno.EROFS)


_NONE_OPEN: dict[str, int] = {}  # shared by every state without open handles; never changed


@dataclass(slots=True)
class _InodeState:
    """What the kernel may hold for one inode (one per inode it looked up: slots, and the
    open-handle maps only while a handle is open)."""

    open_versions: dict[str, int] = field(default_factory=lambda: _NONE_OPEN)
    open_sizes: dict[str, int] = field(default_factory=lambda: _NONE_OPEN)
    page_version: str | None = None  # version the page cache may hold
    reported: str | None = None  # version whose size the kernel was told last (None: mixed)
    served: Rendered | None = None  # no-open mode: that version's bytes, what READs answer


@dataclass(slots=True)
class _Handle:
    inode: int
    content: Rendered


class SecretFS(pyfuse3.Operations):
    def __init__(
        self,
        volumes: Volumes,
        *,
        attr_timeout: float = ATTR_TIMEOUT,
        file_attr_timeout: float = FILE_ATTR_TIMEOUT,
        no_open: bool = False,
    ) -> None:
        super().__init__()
        # Answer OPEN with ENOSYS so the kernel serves opens and warm reads without the daemon
        # (only with a pyfuse3 that passes the inode to read: no_open_supported()).
        self.no_open = no_open
        self.no_open_reads = 0  # READs answered by inode (no-open mode)
        self._said_no_open = False  # warned that an earlier generation chose no-open mode
        self.volumes = volumes
        self.tree = volumes.tree
        self.attr_timeout = attr_timeout
        self.file_attr_timeout = file_attr_timeout
        # Told the paths (relative to the root) of files whose content changed; it makes the
        # kernel send a time-only SETATTR for each (secretfs/announce.py). None: no announcements.
        self.announcer: Callable[[list[str]], None] | None = None
        self.announced = 0  # SETATTRs of announcements answered
        self._handles: dict[int, _Handle] = {}
        self._next_fh = 1
        self.adopted = 0  # handles of an earlier daemon generation served by this one
        self._states: dict[int, _InodeState] = {}
        self._nursery: trio.Nursery | None = None
        self._inval_limiter = trio.CapacityLimiter(1)
        volumes.on_inodes_changed.append(self.invalidate)
        volumes.on_inodes_changed.append(self.announce)

    def start(self, nursery: trio.Nursery, generation: int = 1) -> None:
        """Kernel invalidations are sent from ``nursery`` (only once the filesystem is mounted).
        Handles of each connection ``generation`` count from their own range of 2**24, so a
        handle number an earlier generation left open is not soon issued again."""
        self._nursery = nursery
        self._next_fh = ((generation & 0xFF) << 24) | 1

    # --- names and attributes -----------------------------------------------------------------

    def _node(self, inode: int) -> Node:
        node = self.tree.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    async def _entry(self, node: Node) -> pyfuse3.EntryAttributes:
        """Attributes of ``node``; for a file whose value this generation never had (after a
        takeover), fetch it first: a size of 0 would stay in the kernel's attribute cache. In
        no-open mode also for a value the cache can no longer serve (past max_stale): the fetch
        fails with EIO as an open would, and the kernel fails reads of its cached pages too."""
        if (
            node.spec is not None
            and self.volumes.peek(node.inode, last_render=not self.no_open) is None
        ):
            try:
                await self.volumes.content(node.inode)
            except FetchError as exc:
                log.warning("stat %s/%s: %s", node.volume, node.spec.path, exc)
                raise pyfuse3.FUSEError(errno.EIO) from None
        return self._attrs(node)

    def _attrs(self, node: Node, told: Rendered | None = None) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.inode
        a.generation = 0
        a.entry_timeout = self.attr_timeout
        a.attr_timeout = self.attr_timeout
        a.st_mode = node.mode
        a.st_uid = node.uid
        a.st_gid = node.gid
        a.st_blksize = 4096
        mtime = node.mtime_ns
        if node.is_dir:
            a.st_nlink = 2
            a.st_size = 0
        else:
            a.st_nlink = 1
            a.attr_timeout = min(self.attr_timeout, self.file_attr_timeout)
            if told is not None:  # the version the kernel was told last, not to be kept
                a.st_size, mtime, a.attr_timeout = len(told.data), told.since_ns, 0
            else:
                a.st_size, mtime = self._size(node)
            if told is None and self._state(node.inode).reported is None:
                # A size covering an older version still open: do not let the kernel keep it,
                # so a stat soon after that handle's (asynchronous) RELEASE sees the new size.
                a.attr_timeout = 0
        a.st_blocks = (a.st_size + 511) // 512
        a.st_atime_ns = a.st_ctime_ns = a.st_mtime_ns = mtime
        return a

    def _size(self, node: Node) -> tuple[int, int]:
        """Size to report and mtime: the current version's, but never less than what an open
        handle of another version may still read (the kernel clips page-cache reads at it)."""
        cur = self.volumes.peek(node.inode)
        st = self._state(node.inode)
        size = len(cur.data) if cur is not None else 0
        versions = set(st.open_versions)
        if cur is not None:
            versions.discard(cur.version)
        if versions:
            size = max([size, *(st.open_sizes[v] for v in versions)])
            st.reported = None
        else:
            st.reported = cur.version if cur is not None else None
            if self.no_open:
                st.served = cur
        mtime = cur.since_ns if cur is not None else node.mtime_ns
        return size, mtime

    def _state(self, inode: int) -> _InodeState:
        st = self._states.get(inode)
        if st is None:
            st = self._states[inode] = _InodeState()
        return st

    @guarded
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        node = self.tree.lookup(parent_inode, name)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self._entry(node)

    @guarded
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await self._entry(self._node(inode))

    @guarded
    async def forget(self, inode_list: Iterable[tuple[int, int]]) -> None:
        # Inodes live as long as their volume; only our bookkeeping of kernel state goes.
        for inode, _ in inode_list:
            st = self._states.get(inode)
            if st is not None and not st.open_versions:
                del self._states[inode]

    # --- directories --------------------------------------------------------------------------

    @guarded
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if not self._node(inode).is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @guarded
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if self.tree.get(fh) is None:
            return
        children = self.tree.children(fh)
        for i in range(start_id, len(children)):
            child = children[i]
            try:
                attrs = await self._entry(child)
            except pyfuse3.FUSEError:
                continue  # unreadable for now; a lookup of it answers EIO
            if not pyfuse3.readdir_reply(token, child.name, attrs, i + 1):
                break

    @guarded
    async def releasedir(self, fh: int) -> None:
        return None

    # --- files --------------------------------------------------------------------------------

    @guarded
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & _WRITE_FLAGS:
            raise pyfuse3.FUSEError(errno.EROFS)
        try:
            content = await self.volumes.content(inode)
        except FetchError as exc:
            log.warning("open %s/%s: %s", node.volume, node.spec and node.spec.path, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        if self.no_open:
            # This open succeeds all the same (with no handle), and no OPEN or RELEASE follows
            # on this connection: every READ from now on names its inode.
            raise pyfuse3.FUSEError(errno.ENOSYS)
        st = self._state(inode)
        # Is a handle of another version open? (The keys are the versions with open handles.)
        ov = st.open_versions
        others = len(ov) > 1 or (len(ov) == 1 and content.version not in ov)
        fh = inode << FH_SHIFT | (self._next_fh & _FH_MASK)
        self._next_fh += 1
        if not others and st.reported == content.version:
            fi = pyfuse3.FileInfo(fh=fh, keep_cache=st.page_version == content.version)
            st.page_version = content.version
        else:
            fi = pyfuse3.FileInfo(fh=fh, direct_io=True)
            if st.reported != content.version and not others:
                self.invalidate({inode})
        self._hold(fh, inode, content)
        if audit.isEnabledFor(logging.INFO):
            self._audit(node, ctx, content)
        return fi

    def _audit(self, node: Node, ctx: pyfuse3.RequestContext, content: Rendered) -> None:
        """One audit line: a tuple for the writer thread (secretfs/logs.py AuditTrail), which
        formats and writes it; never blocks. The volume's identity names the pod."""
        vol = self.volumes.volumes.get(node.volume) if node.volume is not None else None
        AUDIT.put(
            (
                time.time(),
                node.volume or "",
                vol.identity if vol is not None else None,
                node.spec.path if node.spec else "",
                ctx.uid,
                ctx.gid,
                ctx.pid,
                content.version,
            )
        )

    def _hold(self, fh: int, inode: int, content: Rendered) -> None:
        st = self._state(inode)
        if st.open_versions is _NONE_OPEN:
            st.open_versions, st.open_sizes = {}, {}
        st.open_versions[content.version] = st.open_versions.get(content.version, 0) + 1
        st.open_sizes[content.version] = len(content.data)
        self._handles[fh] = _Handle(inode, content)

    @guarded
    async def read(self, fh: int, off: int, size: int) -> bytes:
        if fh < _FIRST_FH:
            if not self.no_open and not self._said_no_open:
                self._said_no_open = True
                log.warning(
                    "this FUSE connection serves no-open reads (an earlier daemon generation "
                    "chose them): no open reaches this daemon, so --audit writes no lines until "
                    "the connection is mounted anew"
                )
            return (await self._served(fh)).data[off : off + size]
        h = self._handles.get(fh)
        if h is None:
            h = await self._adopt(fh)
        return h.content.data[off : off + size]

    async def _served(self, inode: int) -> Rendered:
        """A no-open READ: the version whose size the kernel was told last, or (none told by
        this generation, after a takeover) the current one, which it is then told."""
        self.no_open_reads += 1
        st = self._states.get(inode)
        if st is not None and st.served is not None:
            return st.served
        if inode == 0:
            log.warning(
                "a READ without a file handle: this connection serves no-open reads, which "
                "this pyfuse3 cannot (install the build of scripts/build-pyfuse3.sh)"
            )
        content = await self._read_content(inode)
        st = self._state(inode)
        st.served = content
        st.reported = content.version
        return content

    async def _read_content(self, inode: int) -> Rendered:
        """The current version of a file a READ names without an open of this process (an
        earlier generation's handle, or no-open mode): EBADF if ``inode`` is no file."""
        node = self.tree.get(inode)
        if node is None or node.spec is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        try:
            return await self.volumes.content(inode)
        except FetchError as exc:
            log.warning("read %s/%s: %s", node.volume, node.spec.path, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None

    async def _adopt(self, fh: int) -> _Handle:
        """A handle this process never issued: an earlier generation opened it."""
        inode = fh >> FH_SHIFT
        content = await self._read_content(inode)
        h = self._handles.get(fh)  # another read of the same handle may have adopted it
        if h is None:
            self._hold(fh, inode, content)
            self.adopted += 1
            h = self._handles[fh]
        return h

    @guarded
    async def release(self, fh: int) -> None:
        h = self._handles.pop(fh, None)
        if h is None:
            return
        st = self._state(h.inode)
        v = h.content.version
        left = st.open_versions.get(v, 0) - 1
        if left > 0:
            st.open_versions[v] = left
        else:
            st.open_versions.pop(v, None)
            st.open_sizes.pop(v, None)
            if not st.open_versions:
                st.open_versions = st.open_sizes = _NONE_OPEN
            cur = self.volumes.current(h.inode) if self.tree.get(h.inode) else None
            if cur is not None and cur.version != v:
                # The last handle of an old version is gone: let the kernel re-read attributes
                # so the next open can use the page cache again.
                self.invalidate({h.inode})

    @guarded
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = s.f_bfree = s.f_bavail = 0
        s.f_files = len(self.tree.nodes)
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    @guarded
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        # user.secretfs.refresh of a volume's directory reloads it (Volumes.xattr); not listed.
        value = await self.volumes.xattr(self._node(inode), name)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    @guarded
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        self._node(inode)
        return []

    @guarded
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        """Only an announcement (secretfs/announce.py) gets here: every mount anyone can reach is
        read-only, so the kernel refuses a SETATTR before sending it, except through the daemon's
        private writable clone. Even so, accept a change of times only, and store nothing: the
        answer is the file's own attributes (mtime = when its current version was first served),
        which the kernel caches, and the kernel raises IN_ATTRIB for every watcher."""
        node = self._node(inode)
        if (
            node.spec is None
            or fields.update_mode
            or fields.update_uid
            or fields.update_gid
            or fields.update_size
        ):
            raise pyfuse3.FUSEError(errno.EROFS)
        self.announced += 1
        st = self._states.get(inode)
        if self.no_open and st is not None and st.served is not None:
            # The kernel keeps a SETATTR answer without dropping pages even if the mtime moved
            # (only GETATTR answers make FUSE_AUTO_INVAL_DATA compare it). Answer what it already
            # has, to be asked again at once: that GETATTR brings the new version's size and
            # mtime, and the kernel drops the old pages.
            return self._attrs(node, told=st.served)
        return await self._entry(node)

    # Everything else that would change the filesystem.
    mknod = mkdir = unlink = rmdir = symlink = rename = link = guarded(_erofs)
    write = create = setxattr = removexattr = guarded(_erofs)

    # --- kernel cache invalidation and change announcements -----------------------------------

    def announce(self, inodes: set[int]) -> None:
        """Tell watchers that these files changed (IN_ATTRIB): the announcer touches them."""
        if self.announcer is None or self._nursery is None:
            return
        paths = [p for p in map(self.tree.path, sorted(inodes)) if p]
        if paths:
            try:
                self.announcer(paths)
            except Exception:
                log_unexpected(log, "announcing a change failed")

    def invalidate(self, inodes: set[int]) -> None:
        """Drop the kernel's cached attributes and pages of ``inodes`` (asynchronously)."""
        if self._nursery is not None:
            self._nursery.start_soon(self._invalidate, tuple(inodes))

    def invalidate_files(self) -> None:
        """Drop the kernel's cached attributes of every file: after a takeover they may be of a
        version this generation does not serve (pages go at the next open: keep_cache false)."""
        self.invalidate({n.inode for n in self.tree.nodes.values() if n.spec is not None})

    def forget_entry(self, parent: int, name: bytes) -> None:
        """Tell the kernel a name is gone (a removed volume's directory)."""
        if self._nursery is not None:
            self._nursery.start_soon(self._invalidate_entry, parent, name)

    async def _invalidate(self, inodes: tuple[int, ...]) -> None:
        await trio.to_thread.run_sync(_invalidate_sync, inodes, limiter=self._inval_limiter)

    async def _invalidate_entry(self, parent: int, name: bytes) -> None:
        await trio.to_thread.run_sync(
            _invalidate_entry_sync, parent, name, limiter=self._inval_limiter
        )


def _invalidate_sync(inodes: tuple[int, ...]) -> None:
    for ino in inodes:
        try:
            pyfuse3.invalidate_inode(ino, attr_only=True)  # never pages: see the module doc
        except OSError as exc:
            # ENOENT: the kernel never saw this inode (or forgot it); nothing to drop.
            if exc.errno != errno.ENOENT:
                log.warning("invalidate inode %d: %s", ino, exc.strerror)
        except Exception as exc:
            log.warning("invalidate inode %d: %s", ino, type(exc).__name__)


def _invalidate_entry_sync(parent: int, name: bytes) -> None:
    try:
        pyfuse3.invalidate_entry(parent, name)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            log.warning("invalidate entry: %s", exc.strerror)
    except Exception as exc:
        log.warning("invalidate entry: %s", type(exc).__name__)


__all__ = ["ROOT_INODE", "SecretFS", "guarded"]
