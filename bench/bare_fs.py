"""A bare pyfuse3 filesystem, the baseline for bench/read_latency.py.

Serves a flat directory of files from memory with the least work pyfuse3 allows: ``open`` answers
``keep_cache=True`` at once, nothing is checked, nothing is counted. Same trio loop, same mount
options and same FUSE requests as secretfs (FLUSH unimplemented), so the difference between the
two is secretfs's own per-request work.

    python bench/bare_fs.py MOUNTPOINT < files.json    # {"name": "text", ...}

Prints ``ready`` on stdout once mounted; unmount (``fusermount3 -u``) or SIGTERM to stop.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import sys

import pyfuse3
import trio

TIMEOUT = 60.0


class BareFS(pyfuse3.Operations):
    def __init__(self, files: dict[str, bytes]) -> None:
        super().__init__()
        self.names = {name.encode(): i for i, name in enumerate(sorted(files), start=2)}
        self.data = {self.names[name.encode()]: data for name, data in files.items()}

    def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.entry_timeout = a.attr_timeout = TIMEOUT
        if inode == pyfuse3.ROOT_INODE:
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
        else:
            a.st_mode = stat.S_IFREG | 0o444
            a.st_nlink = 1
            a.st_size = len(self.data[inode])
        return a

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if inode != pyfuse3.ROOT_INODE and inode not in self.data:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(inode)

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        inode = self.names.get(name)
        if parent_inode != pyfuse3.ROOT_INODE or inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(inode)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return self.data[fh][off : off + size]

    async def release(self, fh: int) -> None:
        return None


def main() -> int:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    files = {name: text.encode() for name, text in json.load(sys.stdin).items()}
    options = set(pyfuse3.default_options) | {"fsname=bare", "ro", "nosuid", "nodev"}
    pyfuse3.init(BareFS(files), sys.argv[1], options)
    print("ready", flush=True)
    try:
        trio.run(_serve)
    finally:
        pyfuse3.close(unmount=True)
    return 0


async def _serve() -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_sigterm, nursery.cancel_scope)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _stop_on_sigterm(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            scope.cancel()
            return


if __name__ == "__main__":
    os.umask(0o022)
    sys.exit(main())
