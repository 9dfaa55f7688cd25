"""Prometheus metrics of the csi process, named as upstream exports them (see upstream.md §1.9)."""

from __future__ import annotations

import logging
import urllib.parse

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

OS_TYPE = "linux"

# error_type label values: a fixed set (upstream's names where the meaning matches).
INVALID_REQUEST = "InvalidRequest"
SPC_NOT_FOUND = "SecretProviderClassNotFound"
INVALID_SPC = "InvalidSecretProviderClass"
KUBE_API_ERROR = "KubernetesAPIError"
DAEMON_UNAVAILABLE = "DaemonUnavailable"
PROVIDER_ERROR = "ProviderError"
FAILED_TO_ENSURE_MOUNT_POINT = "FailedToEnsureMountPoint"
FAILED_TO_MOUNT = "FailedToMount"
FAILED_TO_UNMOUNT = "FailedToUnmount"
OPERATION_IN_PROGRESS = "OperationInProgress"
INTERNAL_ERROR = "InternalError"
ERROR_TYPES = frozenset(
    {
        INVALID_REQUEST,
        SPC_NOT_FOUND,
        INVALID_SPC,
        KUBE_API_ERROR,
        DAEMON_UNAVAILABLE,
        PROVIDER_ERROR,
        FAILED_TO_ENSURE_MOUNT_POINT,
        FAILED_TO_MOUNT,
        FAILED_TO_UNMOUNT,
        OPERATION_IN_PROGRESS,
        INTERNAL_ERROR,
    }
)

# prometheus-client adds the _total suffix to counters.
node_publish = Counter(
    "node_publish", "Successful NodePublishVolume calls", ["provider", "os_type"]
)
node_publish_error = Counter(
    "node_publish_error", "Failed NodePublishVolume calls", ["provider", "error_type", "os_type"]
)
node_unpublish = Counter("node_unpublish", "Successful NodeUnpublishVolume calls", ["os_type"])
node_unpublish_error = Counter(
    "node_unpublish_error", "Failed NodeUnpublishVolume calls", ["os_type"]
)
rpc_duration = Histogram(
    "csi_rpc_duration_seconds",
    "CSI RPC latency",
    ["method", "code"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)

# The FUSE connection's takeovers (keeper.py).
takeovers = Counter("secretfs_takeovers", "FUSE connection hand-overs to a new daemon generation")
takeover_stall = Gauge(
    "secretfs_takeover_last_stall_seconds",
    "From the loss of the last daemon generation to the next one serving the connection",
)
takeover_waiting = Gauge(
    "secretfs_takeover_last_waiting_requests",
    "Requests the kernel held for the connection when the last takeover began: those the dead "
    "daemon had read (resent on Linux 6.9+) and those not read yet (needs fusectl)",
)
takeover_resends = Counter(
    "secretfs_takeover_resends",
    "Takeovers after which the kernel was asked to resend what the dead daemon had read",
)
takeover_volume_errors = Counter(
    "secretfs_takeover_volume_errors", "Volumes a new daemon generation could not restore"
)
connection_aborts = Counter(
    "secretfs_connection_aborts",
    "FUSE connections given up because no daemon took them over within --takeover-timeout",
)


def record(method: str, code: str, seconds: float, provider: str, error_type: str | None) -> None:
    rpc_duration.labels(method, code).observe(seconds)
    if method == "NodePublishVolume":
        if error_type is None:
            node_publish.labels(provider, OS_TYPE).inc()
        else:
            node_publish_error.labels(provider, error_type, OS_TYPE).inc()
    elif method == "NodeUnpublishVolume":
        if error_type is None:
            node_unpublish.labels(OS_TYPE).inc()
        else:
            node_unpublish_error.labels(OS_TYPE).inc()


def serve(addr: str) -> bool:
    """Serve /metrics on ``addr`` (":8095" or "127.0.0.1:8095"); empty means off. A port that
    cannot be bound (busy, malformed) is logged and skipped, as in the daemon: metrics are never
    worth keeping the kubelet's CSI socket down."""
    if not addr:
        return False
    host, _, port = addr.rpartition(":")
    try:
        if not port.isdecimal():
            raise ValueError("give HOST:PORT or :PORT with a port number")
        start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0")
    except (OSError, ValueError) as exc:
        log.error("metrics: cannot serve on %r (%s); running without metrics", addr, exc)
        return False
    log.info("metrics on %s", addr)
    return True


announcements = Counter(
    "secretfs_announcements",
    "Changed files announced to watchers (touched through the private clone: IN_ATTRIB)",
)


# Kubernetes API requests of this process (csi/kube.py's client transport counts each here).
k8s_request = Counter(
    "k8s_request",
    "Kubernetes API requests, by verb, resource and HTTP status code (<error>: no answer)",
    ["verb", "resource", "code"],
)


def kube_request_labels(method: str, url: str) -> tuple[str, str]:
    """The verb and resource of a Kubernetes API request (as the API server's RequestInfo names
    them): ``GET /api/v1/namespaces/ns/serviceaccounts/app`` is ("get", "serviceaccounts")."""
    parts = urllib.parse.urlsplit(url)
    segs = [s for s in parts.path.split("/") if s]
    if segs[:1] == ["api"]:
        segs = segs[2:]
    elif segs[:1] == ["apis"]:
        segs = segs[3:]
    if len(segs) >= 3 and segs[0] == "namespaces":
        segs = segs[2:]
    resource = segs[0] if segs else "unknown"
    named = len(segs) >= 2
    if len(segs) >= 3:
        resource += "/" + segs[2]  # a subresource: pods/status
    method = method.upper()
    query = urllib.parse.parse_qs(parts.query)
    if method == "GET":
        if query.get("watch", [""])[0] in ("true", "1", "True"):
            verb = "watch"
        else:
            verb = "get" if named else "list"
    elif method == "DELETE":
        verb = "delete" if named else "deletecollection"
    else:
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(method, method.lower())
    return verb, resource


def count_kube_request(method: str, url: str, code: str) -> None:
    """Count one request of the process's Kubernetes client (csi/kube.py's transport calls this
    for each request it sends): ``code`` is the HTTP status of the answer, ``<error>`` if none."""
    try:
        verb, resource = kube_request_labels(method, url)
    except Exception:
        verb, resource = method.lower(), "unknown"
    k8s_request.labels(verb, resource, code).inc()
