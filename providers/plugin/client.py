"""The wire side of provider plugins: sockets, channels, ``Version`` and ``Mount``, and gRPC
failures as :class:`FetchError`s.

A plugin is upstream's provider DaemonSet: a gRPC server of ``v1alpha1.CSIDriverProvider`` on
``<dir>/<provider>.sock``. The socket is looked for in each configured directory in order (upstream:
``--provider-volume`` then ``--additional-provider-volume-paths``). One channel per provider name,
kept while it works; a failure that says the connection is gone (UNAVAILABLE) drops it, so the next
call looks for the socket again (the DaemonSet may have restarted, or moved to another directory)
and says ``Version`` again, as on first use.

Messages name the provider, the socket and the gRPC status, plus the provider's own detail
(shortened, escaped, and scrubbed of the tokens and nodePublishSecretRef values that were sent);
never file contents.

=====================  =========  ===========================================================
code                   transient  cause
=====================  =========  ===========================================================
NoProviderSocket       yes        no ``<provider>.sock`` in any providers directory
Unavailable            yes        UNAVAILABLE, CANCELLED, ABORTED: the socket does not answer
Timeout                yes        DEADLINE_EXCEEDED (``--provider-timeout``)
Throttled              yes        RESOURCE_EXHAUSTED from the provider
ProviderFailed         yes        INTERNAL, UNKNOWN, DATA_LOSS: the provider or its backend broke
NotFound               no         NOT_FOUND: the object does not exist
PermissionDenied       no         PERMISSION_DENIED, UNAUTHENTICATED
BadRequest             no         INVALID_ARGUMENT, FAILED_PRECONDITION, OUT_OF_RANGE, ...
Unimplemented          no         UNIMPLEMENTED: not a v1alpha1 provider
ResponseTooLarge       no         the answer is over ``--max-call-recv-msg-size``
=====================  =========  ===========================================================
"""

from __future__ import annotations

import logging
import os
import re
import stat
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

import grpc

from providers.base import FetchError
from providers.limits import quote
from providers.plugin.pb import service_pb2, service_pb2_grpc
from providers.plugin.settings import Settings

log = logging.getLogger(__name__)

API_VERSION = "v1alpha1"
_MAX_DETAIL = 300

# grpc.StatusCode -> (code, transient)
_CODES: dict[grpc.StatusCode, tuple[str, bool]] = {
    grpc.StatusCode.UNAVAILABLE: ("Unavailable", True),
    grpc.StatusCode.CANCELLED: ("Unavailable", True),
    grpc.StatusCode.ABORTED: ("Unavailable", True),
    grpc.StatusCode.DEADLINE_EXCEEDED: ("Timeout", True),
    grpc.StatusCode.RESOURCE_EXHAUSTED: ("Throttled", True),
    grpc.StatusCode.INTERNAL: ("ProviderFailed", True),
    grpc.StatusCode.UNKNOWN: ("ProviderFailed", True),
    grpc.StatusCode.DATA_LOSS: ("ProviderFailed", True),
    grpc.StatusCode.NOT_FOUND: ("NotFound", False),
    grpc.StatusCode.PERMISSION_DENIED: ("PermissionDenied", False),
    grpc.StatusCode.UNAUTHENTICATED: ("PermissionDenied", False),
    grpc.StatusCode.INVALID_ARGUMENT: ("BadRequest", False),
    grpc.StatusCode.FAILED_PRECONDITION: ("BadRequest", False),
    grpc.StatusCode.OUT_OF_RANGE: ("BadRequest", False),
    grpc.StatusCode.ALREADY_EXISTS: ("BadRequest", False),
    grpc.StatusCode.UNIMPLEMENTED: ("Unimplemented", False),
}


def fold(text: str, scrub: Iterable[str]) -> str:
    """A provider's detail for a message: secrets sent to it removed, whitespace folded, cut."""
    for s in sorted((s for s in scrub if s), key=len, reverse=True):
        if len(s) < 4 and s in text:
            # Too short to cut out without mangling the text: say nothing of it.
            return "(detail withheld: it may quote data sent to the provider)"
        text = text.replace(s, "<redacted>")
    text = re.sub(r"\s+", " ", text).strip()
    return quote(text, _MAX_DETAIL) if text else ""


def _socket_id(path: str) -> tuple[int, int] | None:
    """(device, inode) of the socket at ``path``; None if there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISSOCK(st.st_mode) else None


def find_socket(name: str, dirs: Sequence[str]) -> str:
    """The socket of provider ``name``: the first ``<dir>/<name>.sock`` that exists."""
    for d in dirs:
        path = os.path.join(d, f"{name}.sock")
        if _socket_id(path) is not None:
            return path
    first = os.path.join(dirs[0], f"{name}.sock") if dirs else f"{name}.sock"
    raise FetchError(
        name,
        f"no provider {name}: no socket at {first} (looked in {', '.join(dirs) or 'nothing'}); "
        "is its DaemonSet running?",
        transient=True,
        code="NoProviderSocket",
    )


class Connection:
    """One provider's channel: looked up, dialled and greeted (``Version``) when first used and
    after it broke. Thread-safe: fetches of several volumes use it at once."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._stub: Any = None
        self._path = ""
        self._socket: tuple[int, int] | None = None
        self.runtime = ""  # "<runtime_name> <runtime_version>", from Version

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        if self._channel is not None:
            self._channel.close()
        self._channel, self._stub, self._path, self._socket = None, None, "", None

    def _connect(self, settings: Settings, scrub: Iterable[str]) -> tuple[Any, str]:
        with self._lock:
            # A socket that went or was made anew (the DaemonSet restarted): reconnect.
            if self._stub is not None and _socket_id(self._path) == self._socket:
                return self._stub, self._path
            self._drop()
            path = find_socket(self.name, settings.dirs)
            ident = _socket_id(path)
            channel = grpc.insecure_channel(
                f"unix:{path}",
                options=[
                    ("grpc.max_receive_message_length", settings.max_recv),
                    # Upstream dials with authority "localhost"; its e2e provider refuses others.
                    ("grpc.default_authority", "localhost"),
                ],
            )
            stub = service_pb2_grpc.CSIDriverProviderStub(channel)
            try:
                answer = stub.Version(
                    service_pb2.VersionRequest(version=API_VERSION), timeout=settings.timeout
                )
            except grpc.RpcError as exc:
                channel.close()
                raise self.error(exc, "Version", path, settings, scrub) from None
            self.runtime = f"{answer.runtime_name} {answer.runtime_version}".strip()
            if answer.version and answer.version != API_VERSION:
                log.warning(
                    "provider %s at %s speaks API %s; secretfs speaks %s",
                    self.name,
                    path,
                    quote(answer.version, 40),
                    API_VERSION,
                )
            log.info(
                "provider %s: connected to %s (%s, API %s)",
                self.name,
                path,
                quote(self.runtime or "unnamed", 80),
                quote(answer.version or "?", 40),
            )
            self._channel, self._stub, self._path, self._socket = channel, stub, path, ident
            return stub, path

    def mount(self, request: Any, settings: Settings, scrub: Sequence[str]) -> Any:
        """``Mount`` on the provider's socket; FetchError for every failure."""
        stub, path = self._connect(settings, scrub)
        started = time.monotonic()
        try:
            return stub.Mount(request, timeout=settings.timeout)
        except grpc.RpcError as exc:
            ours = time.monotonic() - started >= settings.timeout * 0.9
            err = self.error(exc, "Mount", path, settings, scrub, timed_out=ours)
            if err.code == "Unavailable":
                with self._lock:
                    if self._stub is stub:
                        self._drop()  # next call: find the socket again and say Version again
            raise err from None

    def error(
        self,
        exc: grpc.RpcError,
        call: str,
        path: str,
        settings: Settings,
        scrub: Iterable[str],
        *,
        timed_out: bool = True,
    ) -> FetchError:
        """``timed_out``: the call took the whole --provider-timeout (a DEADLINE_EXCEEDED is
        ours, not one the provider answered)."""
        status = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
        raw = exc.details() if isinstance(exc, grpc.Call) else ""
        detail = fold(raw or "", scrub)
        code, transient = _CODES.get(status, ("ProviderFailed", True))
        said = f": {detail}" if detail else ""
        where = f"provider {self.name} ({path})"
        if status == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in (raw or ""):
            return FetchError(
                self.name,
                f"{where} answered {call} with more than {settings.max_recv} bytes; raise "
                "--max-call-recv-msg-size (chart value maxCallRecvMsgSize) or mount fewer objects",
                transient=False,
                code="ResponseTooLarge",
            )
        if status == grpc.StatusCode.DEADLINE_EXCEEDED and timed_out:
            return FetchError(
                self.name,
                f"{where} did not answer {call} within {settings.timeout:g} s (--provider-timeout)",
                transient=True,
                code=code,
            )
        return FetchError(
            self.name, f"{where} failed {call}: {status.name}{said}", transient=transient, code=code
        )
