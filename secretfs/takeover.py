"""Taking over a live FUSE connection: the kernel side of "the connection outlives the daemon".

The kernel keeps a FUSE connection as long as one open file of /dev/fuse refers to it. The keeper
(the csi process) opened that file, mounted with it, read the kernel's one ``FUSE_INIT`` request
(``fusewire.read_init``) and keeps both. Each daemon generation then takes the connection over
(:func:`take_over`):

1. ``pyfuse3.init`` on one end ``S`` of a ``SOCK_SEQPACKET`` socketpair (``/dev/fd/S``, no mount);
2. the recorded INIT goes into the other end; pyfuse3's loop lets libfuse process it and libfuse
   writes its INIT reply back (libfuse refuses every request of a session that saw no INIT);
3. once pyfuse3's only reader is parked, ``notify_closing(S)`` (trio must drop its epoll
   registration first, or the loop waits on a file that no longer exists) and
   ``dup2(fuse_fd, S)``: the session's fd number now is the real connection. No relay, no
   per-request cost.

The first generation's INIT reply goes to the kernel; later generations compare theirs with the
recorded one and refuse if it differs (another libfuse build or other options would negotiate
something else than what the kernel already agreed to). A new generation that is fenced (it holds
the node lock, so every earlier one is dead) asks the kernel to resend the requests its
predecessor had read but not answered (``FUSE_NOTIFY_RESEND``, Linux 6.9+).

Measured facts and traps: shared/research/takeover.md.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Awaitable, Callable

import pyfuse3
import trio

from secretfs import fusewire


class TakeoverError(Exception):
    """The connection could not be taken over; the connection and the keeper's state are as
    they were."""


def _wait_all_tasks_blocked() -> Callable[[], Awaitable[None]]:
    """trio's ``wait_all_tasks_blocked``, without importing ``trio.testing``: that package costs
    ~1 MiB resident, and 4 where pytest is installed (it imports pytest), in every daemon of a
    node (each attaches). It is trio's own function either way (the same object)."""
    try:
        from trio._core._run import wait_all_tasks_blocked
    except ImportError:  # another trio layout: the public, heavier import
        from trio.testing import wait_all_tasks_blocked
    return wait_all_tasks_blocked


async def take_over(
    ops: pyfuse3.Operations,
    fuse_fd: int,
    init: bytes,
    options: set[str],
    expected_reply: bytes | None,
) -> tuple[int, bytes]:
    """Start a pyfuse3 session on the live connection ``fuse_fd`` (not consumed).

    Returns the session's fd (a dup of ``fuse_fd``; pyfuse3 closes it) and libfuse's INIT reply.
    Raises TakeoverError, before touching the connection, if the reply differs from
    ``expected_reply``; the process must not start another session then (pyfuse3 keeps one per
    process). On return nothing of pyfuse3's loop runs: the caller starts ``pyfuse3.main()``.
    """
    try:
        fusewire.parse_init(init)
    except fusewire.WireError as exc:
        raise TakeoverError(str(exc)) from None
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    session_fd = ours.detach()  # from now on the number belongs to pyfuse3's session
    peer = trio.socket.from_stdlib_socket(theirs)
    with peer:
        try:
            pyfuse3.init(ops, f"/dev/fd/{session_fd}", options)
        except RuntimeError as exc:
            os.close(session_fd)
            raise TakeoverError(f"cannot start a FUSE session: {exc}") from None
        try:
            with trio.fail_after(fusewire.INIT_TIMEOUT):
                done = trio.Event()

                async def run_main() -> None:
                    await pyfuse3.main()
                    done.set()

                wait_all_tasks_blocked = _wait_all_tasks_blocked()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(run_main)
                    await peer.send(init)
                    reply = await peer.recv(65536)
                    # pyfuse3's readers go back to wait_readable(S), one at a time (a lock), after
                    # the reply. Wake each only once it is parked there, so none still waits on
                    # S when S becomes /dev/fuse; main() returns when none is left.
                    while not done.is_set():
                        await wait_all_tasks_blocked()
                        if not done.is_set():
                            trio.lowlevel.notify_closing(session_fd)
        except trio.TooSlowError:
            pyfuse3.close(unmount=False)
            raise TakeoverError("libfuse did not answer the recorded FUSE_INIT") from None
    if expected_reply is not None and reply != expected_reply:
        pyfuse3.close(unmount=False)  # closes S; the connection itself is untouched
        raise TakeoverError(
            "this daemon negotiates FUSE differently from the generation that started the "
            "connection (another libfuse build or other options); refusing the hand-over"
        )
    os.dup2(fuse_fd, session_fd, inheritable=False)
    if expected_reply is None:
        # The connection's first generation: the kernel still waits for this answer.
        with contextlib.suppress(FileNotFoundError):  # ENOENT: it was answered already
            os.write(session_fd, reply)
    return session_fd, reply
