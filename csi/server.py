"""The gRPC server of the csi process: a unix socket, one interceptor, the servicers.

The interceptor does what every RPC needs: a log line with the duration and outcome (the request
itself only at DEBUG, with ``secrets`` dropped and the token attribute stripped, cf.
CVE-2023-2878), metrics, and turning :class:`CsiError` (or any unexpected exception) into a gRPC
status. Servicers stay about the RPC.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict

from csi import metrics
from providers.limits import quote
from secretfs.logs import fields, log_unexpected

log = logging.getLogger(__name__)

TOKENS_KEY = "csi.storage.k8s.io/serviceAccount.tokens"
STRIPPED = "***stripped***"

_local = threading.local()


class CsiError(Exception):
    """End an RPC with ``code``; ``message`` is what the kubelet shows in its event."""

    def __init__(self, code: grpc.StatusCode, message: str, error_type: str) -> None:
        super().__init__(message)
        assert error_type in metrics.ERROR_TYPES, error_type
        self.code = code
        self.message = message
        self.error_type = error_type


def annotate(**labels: str) -> None:
    """Attach metric labels (``provider``) to the current RPC."""
    note = getattr(_local, "note", None)
    if note is not None:
        note.update(labels)


def redact(request: Any) -> dict[str, Any]:
    d: dict[str, Any] = MessageToDict(request, preserving_proto_field_name=True)
    if "secrets" in d:
        d["secrets"] = {k: STRIPPED for k in d["secrets"]}
    ctx = d.get("volume_context")
    if isinstance(ctx, dict) and TOKENS_KEY in ctx:
        ctx[TOKENS_KEY] = STRIPPED
    return d


def _brief(request: Any) -> str:
    parts = []
    for name in ("volume_id", "target_path"):
        value = getattr(request, name, "")
        if value:
            parts.append(f"{name}={quote(value, 300)}")  # escaped and cut: not yet validated
    return " ".join(parts)


def _fields(request: Any, took: float, provider: str, error: CsiError | None) -> dict[str, object]:
    """Structured log fields of an RPC (request values cut: not validated yet)."""
    ctx = getattr(request, "volume_context", None) or {}
    return fields(
        volume=str(getattr(request, "volume_id", ""))[:300],
        pod_namespace=str(ctx.get("csi.storage.k8s.io/pod.namespace", ""))[:300],
        pod_name=str(ctx.get("csi.storage.k8s.io/pod.name", ""))[:300],
        provider=provider,
        error_type=error.error_type if error else None,
        duration=took,
    )


class Interceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    def intercept_service(
        self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = str(details.method).rsplit("/", 1)[-1]
        inner = handler.unary_unary

        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            _local.note = note = {"provider": ""}
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s request %s", method, redact(request))
            start = time.monotonic()
            error: CsiError | None = None
            try:
                return inner(request, context)
            except CsiError as exc:
                error = exc
            except Exception as exc:
                log_unexpected(log, "%s failed unexpectedly", method)
                error = CsiError(
                    grpc.StatusCode.INTERNAL,
                    f"internal error ({type(exc).__name__})",
                    metrics.INTERNAL_ERROR,
                )
            finally:
                _local.note = None
                took = time.monotonic() - start
                code = error.code.name if error else "OK"
                metrics.record(
                    method, code, took, note["provider"], error.error_type if error else None
                )
                msg = f": {error.message}" if error else ""
                level = logging.WARNING if error else logging.INFO
                if method in ("Probe", "GetPluginInfo", "GetPluginCapabilities") and not error:
                    level = logging.DEBUG
                log.log(
                    level,
                    "%s %s %.1f ms %s%s",
                    method,
                    code,
                    took * 1e3,
                    _brief(request),
                    msg,
                    extra=_fields(request, took, note["provider"], error),
                )
            context.abort(error.code, error.message)

        return grpc.unary_unary_rpc_method_handler(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def socket_path(endpoint: str) -> str:
    """The filesystem path of ``unix:///csi/csi.sock`` (or of a bare path)."""
    if endpoint.startswith("unix://"):
        path = endpoint[len("unix://") :]
    elif endpoint.startswith("unix:"):
        path = endpoint[len("unix:") :]
    else:
        path = endpoint
    if not path.startswith("/"):
        raise ValueError(f"--endpoint must be unix:///absolute/path (got {endpoint!r})")
    return path


def make_server(endpoint: str, register: Callable[[grpc.Server], None], workers: int = 8) -> Any:
    path = socket_path(endpoint)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(path):
        os.unlink(path)  # left by a previous run
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="csi"),
        interceptors=[Interceptor()],
    )
    register(server)
    old = os.umask(0o117)  # root and its group only (the kubelet and the registrar run as root)
    try:
        server.add_insecure_port(f"unix://{path}")
        server.start()
    finally:
        os.umask(old)
    return server
