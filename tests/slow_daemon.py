"""``python -m tests.slow_daemon daemon ...``: the secretfs command with slow FUSE reads.

A test build for takeover tests: every OPEN and READ waits ``SECRETFS_TEST_READ_DELAY`` seconds
(default 0.2) before it is answered, so a daemon killed at a random moment has reads in flight:
read from the kernel and not yet answered (what FUSE_NOTIFY_RESEND gives to the next generation).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import trio

from secretfs import cli
from secretfs.fs import SecretFS

DELAY = float(os.environ.get("SECRETFS_TEST_READ_DELAY", "0.2"))
_read = SecretFS.read
_open = SecretFS.open


async def slow_read(self: SecretFS, fh: int, off: int, size: int) -> bytes:
    await trio.sleep(DELAY)
    return await _read(self, fh, off, size)


async def slow_open(self: SecretFS, inode: int, flags: int, ctx: Any) -> Any:
    await trio.sleep(DELAY)
    return await _open(self, inode, flags, ctx)


SecretFS.read = slow_read  # type: ignore[method-assign]
SecretFS.open = slow_open  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(cli.main())
