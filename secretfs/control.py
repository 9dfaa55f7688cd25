"""The local control protocol between ``secretfs csi`` (client) and ``secretfs daemon`` (server).

One request per connection over a unix SOCK_STREAM socket: a frame is a 4-byte big-endian length
and a JSON object. A request is ``{"op": ..., ...}``; the answer is ``{"ok": true, ...}`` or
``{"ok": false, "code": CODE, "message": ...}`` with CODE from :data:`CODES` (named after gRPC
status codes, so the csi side maps them one to one). The ``attach`` request and the ``handback``
answer carry the /dev/fuse file descriptor as SCM_RIGHTS ancillary data of their first bytes.

The hand-over operations (``restore``, ``attach``, ``handback``, ``export``, ``watch``) are
versioned by :data:`PROTOCOL`: a daemon refuses an ``attach`` of another version and leaves the
keeper's state as it was.

Requests may carry service-account tokens and nodePublishSecretRef data, so neither side ever
logs a frame, and the socket is owner-only (the daemon also checks the peer's uid).

This module is shared by both processes: only the standard library here (no trio, no pyfuse3).
"""

from __future__ import annotations

import array
import base64
import json
import os
import re
import socket
import struct
from collections.abc import Callable, Sequence
from typing import Any

MAX_FRAME = 1 << 20
# The version of the hand-over messages (attach, restore, handback, export).
PROTOCOL = 1
_HEADER = struct.Struct(">I")

# Error codes of daemon answers.
INVALID_ARGUMENT = "INVALID_ARGUMENT"
NOT_FOUND = "NOT_FOUND"
ALREADY_EXISTS = "ALREADY_EXISTS"
ABORTED = "ABORTED"
UNAVAILABLE = "UNAVAILABLE"
FAILED_PRECONDITION = "FAILED_PRECONDITION"
PERMISSION_DENIED = "PERMISSION_DENIED"
INTERNAL = "INTERNAL"
CODES = frozenset(
    {
        INVALID_ARGUMENT,
        NOT_FOUND,
        ALREADY_EXISTS,
        ABORTED,
        UNAVAILABLE,
        FAILED_PRECONDITION,
        PERMISSION_DENIED,
        INTERNAL,
    }
)

# A volume's directory name in the node tree is the CSI volume id (kubelet: csi-<sha256>).
_VOLUME_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


def check_volume_id(volume_id: str) -> str | None:
    """None if ``volume_id`` can name a directory of the node tree, else why not."""
    if not _VOLUME_ID.match(volume_id) or volume_id in (".", ".."):
        return (
            f"volume id {volume_id[:140]!r} is not usable: at most 128 characters of "
            "A-Z a-z 0-9 . _ -"
        )
    return None


class ControlError(Exception):
    """The daemon answered with an error, or could not be reached (code UNAVAILABLE)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code if code in CODES else INTERNAL
        self.message = message


class Unreachable(ControlError):
    """The daemon could not be reached or did not answer."""

    def __init__(self, message: str) -> None:
        super().__init__(UNAVAILABLE, message)


def b64(text: Any) -> bytes | None:
    """Bytes sent as base64 text (None stays None)."""
    return None if text is None else base64.b64decode(str(text), validate=True)


def encode(msg: dict[str, Any]) -> bytes:
    body = json.dumps(msg, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise ControlError(INVALID_ARGUMENT, f"control message too large ({len(body)} bytes)")
    return _HEADER.pack(len(body)) + body


class FrameReader:
    """Accumulates received bytes (and fds) until one whole frame is there."""

    def __init__(self) -> None:
        self.buf = b""
        self.fds: list[int] = []

    def feed(self, data: bytes, ancdata: Sequence[tuple[int, int, bytes]] = ()) -> None:
        self.buf += data
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                self.fds.extend(fds)

    def frame(self) -> dict[str, Any] | None:
        """The frame if complete; raises ControlError on a malformed one."""
        if len(self.buf) < _HEADER.size:
            return None
        (size,) = _HEADER.unpack_from(self.buf)
        if size > MAX_FRAME:
            raise ControlError(INVALID_ARGUMENT, f"control frame too large ({size} bytes)")
        if len(self.buf) < _HEADER.size + size:
            return None
        body = self.buf[_HEADER.size : _HEADER.size + size]
        try:
            msg = json.loads(body)
        except ValueError:
            raise ControlError(INVALID_ARGUMENT, "control frame is not JSON") from None
        if not isinstance(msg, dict):
            raise ControlError(INVALID_ARGUMENT, "control frame is not a JSON object")
        return msg

    def pop(self) -> dict[str, Any] | None:
        """``frame``, and drop it from the buffer (for a stream of frames)."""
        msg = self.frame()
        if msg is not None:
            (size,) = _HEADER.unpack_from(self.buf)
            self.buf = self.buf[_HEADER.size + size :]
        return msg


ANC_SPACE = socket.CMSG_SPACE(4 * array.array("i").itemsize)


def fd_ancillary(fds: Sequence[int]) -> list[tuple[int, int, bytes]]:
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


class Client:
    """Synchronous client used by the csi process (one connection per call)."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout

    def call(
        self, op: str, *, fds: Sequence[int] = (), timeout: float | None = None, **args: Any
    ) -> dict[str, Any]:
        msg, received = self.call_fds(op, fds=fds, timeout=timeout, **args)
        for fd in received:
            os.close(fd)
        return msg

    def call_fds(
        self, op: str, *, fds: Sequence[int] = (), timeout: float | None = None, **args: Any
    ) -> tuple[dict[str, Any], list[int]]:
        """``call``, also returning the fds that came with the answer (the caller owns them)."""
        frame = encode({"op": op, **args})
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(timeout or self.timeout)
            try:
                sock.connect(self.path)
            except OSError as exc:
                raise Unreachable(
                    f"the secretfs daemon is not reachable at {self.path}: "
                    f"{exc.strerror or type(exc).__name__}",
                ) from None
            try:
                if fds:
                    sent = sock.sendmsg([frame], fd_ancillary(fds))
                    if sent < len(frame):
                        sock.sendall(frame[sent:])
                else:
                    sock.sendall(frame)
                reader = FrameReader()
                try:
                    while (msg := reader.frame()) is None:
                        data, anc, _, _ = sock.recvmsg(65536, ANC_SPACE)
                        reader.feed(data, anc)
                        if not data:
                            raise Unreachable(f"the secretfs daemon closed the connection ({op})")
                except BaseException:
                    for fd in reader.fds:
                        os.close(fd)
                    raise
            except TimeoutError:
                raise Unreachable(f"the secretfs daemon did not answer {op!r} in time") from None
            except OSError as exc:
                raise Unreachable(f"secretfs daemon connection failed: {exc.strerror}") from None
        finally:
            sock.close()
        if not msg.get("ok"):
            for fd in reader.fds:
                os.close(fd)
            raise ControlError(str(msg.get("code")), str(msg.get("message", "daemon error")))
        return msg, reader.fds

    # --- operations ---

    def status(self, timeout: float = 5.0) -> dict[str, Any]:
        """``attached``, ``serving``, ``volumes`` (ids), ``uid``, ``gid``, ``pid``."""
        return self.call("status", timeout=timeout)

    def attach(
        self,
        fuse_fd: int,
        init: bytes,
        init_reply: bytes | None,
        generation: int,
        volumes: Sequence[str],
    ) -> dict[str, Any]:
        """Hand the connection to the daemon; ``init_reply`` None: its first generation."""
        return self.call(
            "attach",
            fds=[fuse_fd],
            timeout=30.0,
            proto=PROTOCOL,
            init=base64.b64encode(init).decode(),
            init_reply=None if init_reply is None else base64.b64encode(init_reply).decode(),
            generation=generation,
            volumes=list(volumes),
        )

    def restore(
        self, volume_id: str, record: dict[str, Any], inodes: dict[str, int], next_inode: int
    ) -> dict[str, Any]:
        return self.call(
            "restore",
            volume_id=volume_id,
            record=record,
            inodes=inodes,
            next_inode=next_inode,
            timeout=30.0,
        )

    def handback(self) -> tuple[dict[str, Any], int]:
        """The connection back from the daemon (for a restarted keeper): answer and fd."""
        msg, fds = self.call_fds("handback")
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise ControlError(INTERNAL, "the daemon's handback carried no /dev/fuse fd")
        return msg, fds[0]

    def export(self, volume_id: str) -> dict[str, Any]:
        return self.call("export", volume_id=volume_id)

    def watch(self, on_event: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Block until the daemon's process is gone (it never answers a watch). With
        ``on_event``, the daemon streams events on the watch (``{"touch": [path, ...]}``: files
        whose content changed, to announce) and each is passed to it."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.path)
                sock.sendall(encode({"op": "watch", "events": on_event is not None}))
                sock.settimeout(None)
                reader = FrameReader()
                while data := sock.recv(65536):
                    if on_event is None:
                        continue
                    reader.feed(data)
                    while (event := reader.pop()) is not None:
                        on_event(event)
            except OSError as exc:
                raise Unreachable(
                    f"the secretfs daemon is not reachable at {self.path}: "
                    f"{exc.strerror or type(exc).__name__}"
                ) from None
        finally:
            sock.close()

    def add(
        self,
        volume_id: str,
        spc: dict[str, Any],
        attributes: dict[str, str],
        identity: dict[str, Any],
        gid: int,
        timeout: float,
        node: dict[str, str] | None = None,
        target: str | None = None,
    ) -> dict[str, Any]:
        # ``node``: what csi read of its Node for this volume (the AWS region label); only sent
        # when the volume needs it, so records of other volumes stay as they were. ``target``:
        # the pod's target path (external providers are told it).
        extra: dict[str, Any] = {} if node is None else {"node": node}
        if target is not None:
            extra["target"] = target
        return self.call(
            "add",
            volume_id=volume_id,
            spc=spc,
            attributes=attributes,
            identity=identity,
            gid=gid,
            timeout=timeout,
            **extra,
        )

    def refresh(
        self,
        volume_id: str,
        tokens: dict[str, Any],
        secrets: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """A republish: fresh tokens and the nodePublishSecretRef data as it is now (None: not
        sent, the daemon keeps what it has). Data that changed makes the daemon fetch every
        value with it before it answers: give it the time a publish has."""
        args: dict[str, Any] = {"tokens": tokens}
        if secrets is not None:
            args["secrets"] = secrets
        return self.call("refresh", volume_id=volume_id, timeout=timeout, **args)

    def reload(self, volume_id: str | None, timeout: float = 60.0) -> dict[str, Any]:
        """Fetch the volume's values now, bypassing the TTL: ``fetched``, ``changed``."""
        return self.call("reload", volume_id=volume_id, timeout=timeout)

    def remove(self, volume_id: str) -> dict[str, Any]:
        return self.call("remove", volume_id=volume_id, timeout=30.0)
