"""FUSE wire facts both processes need for a takeover: the recorded ``FUSE_INIT``, the resend
notification, and the kernel's per-connection control files.

Standard library only: the csi process (the keeper) uses it and never imports pyfuse3 or trio.
"""

from __future__ import annotations

import errno
import os
import select
import struct
import time
from dataclasses import dataclass

# struct fuse_in_header: len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding.
_IN_HEADER = struct.Struct("<IIQQIIIHH")
# struct fuse_out_header: len, error, unique.
_OUT_HEADER = struct.Struct("<IiQ")
# struct fuse_init_in (its start): major, minor, max_readahead, flags, flags2.
_INIT_IN = struct.Struct("<IIIII")
FUSE_INIT = 26
FUSE_NOTIFY_RESEND = 7
# FUSE_HAS_RESEND is bit 39 of the 64-bit flags: bit 7 of flags2 (Linux 6.9, protocol 7.40).
_HAS_RESEND_FLAGS2 = 1 << (39 - 32)
# A /dev/fuse read needs a buffer of at least max(8 KiB, 4 KiB + max_write); 1 MiB + 8 KiB fits
# every max_write the kernel allows.
_READ_BUFFER = (1 << 20) + 8192
INIT_TIMEOUT = 5.0
CONNECTIONS = "/sys/fs/fuse/connections"


class WireError(Exception):
    """Bytes that are not what the FUSE protocol says they must be."""


@dataclass(frozen=True)
class Init:
    """What the kernel offered in its ``FUSE_INIT`` request."""

    major: int
    minor: int
    resend: bool  # the kernel understands FUSE_NOTIFY_RESEND


def parse_init(data: bytes) -> Init:
    if len(data) < _IN_HEADER.size + _INIT_IN.size:
        raise WireError(f"a FUSE_INIT request is longer than {len(data)} bytes")
    length, opcode, *_ = _IN_HEADER.unpack_from(data)
    if opcode != FUSE_INIT or length != len(data):
        raise WireError("the recorded request is not a FUSE_INIT")
    major, minor, _, _, flags2 = _INIT_IN.unpack_from(data, _IN_HEADER.size)
    # flags2 means something only with FUSE_INIT_EXT (7.36+).
    return Init(major, minor, minor >= 36 and bool(flags2 & _HAS_RESEND_FLAGS2))


def read_init(fuse_fd: int, timeout: float = INIT_TIMEOUT) -> bytes:
    """The kernel's FUSE_INIT of a freshly mounted connection: the keeper's one read of it."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise WireError(f"the kernel sent no FUSE_INIT within {timeout:.0f} s")
        ready, _, _ = select.select([fuse_fd], [], [], left)
        if not ready:
            continue
        try:
            data = os.read(fuse_fd, _READ_BUFFER)
        except InterruptedError:
            continue
        parse_init(data)
        return data


def resend(fuse_fd: int) -> bool:
    """Ask the kernel to queue again every request a dead daemon had read and not answered.

    Only once the previous daemon is known dead: a live one's requests would run twice. False if
    the kernel does not know the notification (before Linux 6.9)."""
    try:
        os.write(fuse_fd, _OUT_HEADER.pack(_OUT_HEADER.size, FUSE_NOTIFY_RESEND, 0))
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOSYS):
            return False
        raise
    return True


def connection_id(device: str) -> int:
    """The fusectl directory name of a mount's ``major:minor`` (FUSE devices have major 0)."""
    major, _, minor = device.partition(":")
    return os.makedev(int(major), int(minor))


def waiting(device: str) -> int | None:
    """Requests the kernel holds for a connection (unanswered ones, read or not), if fusectl is
    mounted; None otherwise."""
    try:
        with open(f"{CONNECTIONS}/{connection_id(device)}/waiting", encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None
