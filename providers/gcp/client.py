"""Secret Manager clients (google-cloud-secret-manager over gRPC) and their error mapping.

One client, hence one gRPC channel, per endpoint: the global endpoint and one per location of a
regional secret (``secretmanager.<location>.rep.googleapis.com``), shared by every identity. The
caller's access token travels per call in the ``authorization`` metadata, the way upstream passes
per-RPC credentials, so channels are never rebuilt per pod. The only ``grpc`` import of the provider
is here, to give the channel the configured trusted roots; channels are always TLS.
"""

from __future__ import annotations

import threading

import grpc
from google.api_core import exceptions as api_exceptions
from google.api_core import retry as api_retry
from google.auth.credentials import AnonymousCredentials
from google.cloud.secretmanager_v1 import SecretManagerServiceClient
from google.cloud.secretmanager_v1.services.secret_manager_service.transports import (
    SecretManagerServiceGrpcTransport,
)

from providers.base import READ_TIMEOUT, FetchError
from providers.gcp.params import location_of
from providers.gcp.settings import GcpSettings

_DETAIL_MAX = 300

# exception class -> (code for metrics and logs, transient)
_ERRORS: tuple[tuple[type[api_exceptions.GoogleAPICallError], str, bool], ...] = (
    (api_exceptions.NotFound, "NotFound", False),
    (api_exceptions.PermissionDenied, "PermissionDenied", False),
    (api_exceptions.Unauthenticated, "Unauthenticated", False),
    (api_exceptions.InvalidArgument, "InvalidArgument", False),
    (api_exceptions.FailedPrecondition, "FailedPrecondition", False),  # disabled or destroyed
    (api_exceptions.ResourceExhausted, "Throttled", True),
    (api_exceptions.ServiceUnavailable, "Unavailable", True),
    (api_exceptions.DeadlineExceeded, "Timeout", True),
)

_HINTS = {
    "PermissionDenied": "; grant roles/secretmanager.secretAccessor on the secret to the pod's "
    "workload identity (or its iam.gke.io/gcp-service-account)",
    "NotFound": "; check resourceName (project, secret and version)",
}


class SecretClients:
    """AccessSecretVersion with retry, backoff and timeouts, mapped to FetchError."""

    def __init__(self, settings: GcpSettings) -> None:
        self._settings = settings
        self._clients: dict[str, SecretManagerServiceClient] = {}
        self._lock = threading.Lock()
        self._roots: bytes | None = None
        s = settings
        self._retry = api_retry.Retry(
            predicate=api_retry.if_exception_type(
                api_exceptions.ResourceExhausted, api_exceptions.ServiceUnavailable
            ),
            initial=s.retry_initial,
            maximum=s.retry_maximum,
            multiplier=2.0,
            timeout=s.retry_deadline,
        )

    def _client(self, target: str, obj: str) -> SecretManagerServiceClient:
        with self._lock:
            client = self._clients.get(target)
            if client is None:
                if self._roots is None:
                    self._roots = self._settings.read_ca(obj)
                transport = SecretManagerServiceGrpcTransport(
                    host=target,
                    credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
                    ssl_channel_credentials=grpc.ssl_channel_credentials(self._roots),
                )
                client = SecretManagerServiceClient(transport=transport)
                self._clients[target] = client
            return client

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.transport.close()  # type: ignore[no-untyped-call]

    def access(self, name: str, token: str) -> tuple[bytes, str]:
        """The payload and resolved version name of secret version ``name``; raises FetchError."""
        target = self._settings.endpoint_for(location_of(name))
        client = self._client(target, name)
        try:
            resp = client.access_secret_version(
                request={"name": name},
                retry=self._retry,
                timeout=READ_TIMEOUT,
                metadata=[("authorization", f"Bearer {token}")],
            )
        except api_exceptions.RetryError as exc:
            cause = exc.cause
            if isinstance(cause, api_exceptions.GoogleAPICallError):
                raise _fetch_error(name, cause, token, retried=True) from None
            raise FetchError(
                name, "AccessSecretVersion: gave up retrying", transient=True, code="Timeout"
            ) from None
        except api_exceptions.GoogleAPICallError as exc:
            raise _fetch_error(name, exc, token, retried=False) from None
        return bytes(resp.payload.data), str(resp.name)


def _fetch_error(
    name: str, exc: api_exceptions.GoogleAPICallError, token: str, *, retried: bool
) -> FetchError:
    code, transient = type(exc).__name__, isinstance(exc, api_exceptions.ServerError)
    for cls, c, t in _ERRORS:
        if isinstance(exc, cls):
            code, transient = c, t
            break
    detail = str(exc.message or "")
    if token:
        detail = detail.replace(token, "<redacted>")
    detail = " ".join(detail.split())
    detail = detail[:_DETAIL_MAX] or "no details"
    status = exc.grpc_status_code.name if exc.grpc_status_code is not None else code
    after = " after retrying" if retried else ""
    return FetchError(
        name,
        f"AccessSecretVersion failed{after}: {status}: {detail}{_HINTS.get(code, '')}",
        transient=transient,
        code=code,
    )
