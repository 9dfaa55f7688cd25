"""Kubernetes API access of the csi process: the client (lightkube, over httpx2), and its reads:
the SecretProviderClass, the pod's ServiceAccount, and its own Node's region label (for AWS
classes that name no region, as upstream). status.py, events.py and sync.py write through the
same client.

In-cluster service-account config, or ``--kubeconfig``. Every request has a timeout (connect 5 s,
the rest 10 s), well inside the kubelet's 2-minute NodePublishVolume deadline, and is counted in
k8s_request_total (``_Counted``, the client's transport). Environment proxies are not used (as
with the official client this replaces): the API server is reached directly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx2
import lightkube
from lightkube.config import client_adapter
from lightkube.config.kubeconfig import KubeConfig
from lightkube.config.models import User
from lightkube.core import resource as lightkube_resource
from lightkube.generic_resource import create_namespaced_resource
from lightkube.resources.core_v1 import Event, Node, Secret, ServiceAccount

from csi import metrics

log = logging.getLogger(__name__)

GROUP = "secrets-store.csi.x-k8s.io"
VERSION = "v1"
PLURAL = "secretproviderclasses"
TIMEOUT = httpx2.Timeout(10.0, connect=5.0)
# How long a republish may use an answer about a SecretProviderClass (one GET per class per this,
# however many pods use it).
SPC_CACHE_SECONDS = 30.0
# The Node label upstream's AWS provider takes the region from when a class names none.
REGION_LABEL = "topology.kubernetes.io/region"
# How long "the Node has no such label" stands before the Node is read again (a new node may get
# it from its cloud controller soon after it registers; daemon.awsRegion users may never have it).
NO_LABEL_SECONDS = 60.0
# The in-cluster service account (token, ca.crt, namespace), as every client reads it.
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"

# The CRD, as a generic resource (its objects are plain dicts).
SecretProviderClass = create_namespaced_resource(GROUP, VERSION, "SecretProviderClass", PLURAL)


class KubeError(Exception):
    """The API could not answer (outage, RBAC); the message says which object and why."""


class NotFound(KubeError):
    pass


def status_code(exc: BaseException) -> int | None:
    """The HTTP status of an API error answer (lightkube's ApiError, or an answer that was not
    a JSON Status), None for anything else (no answer, timeout, bad configuration)."""
    if isinstance(exc, httpx2.HTTPStatusError):
        return exc.response.status_code
    return None


def http_reason(exc: BaseException) -> str:
    """``HTTP 503 Service Unavailable`` of an error answer, else the exception's type."""
    code = status_code(exc)
    if code is None or not isinstance(exc, httpx2.HTTPStatusError):
        return type(exc).__name__
    return f"HTTP {code} {exc.response.reason_phrase or ''}".strip()


def _reason(exc: BaseException) -> str:
    if status_code(exc) == 403:
        return "forbidden (check the driver's RBAC: get on this resource)"
    return http_reason(exc)


def delete(
    api: lightkube.Client,
    res: type[lightkube_resource.NamespacedResource],
    name: str,
    namespace: str,
    resource_version: str,
) -> None:
    """DELETE with ``preconditions.resourceVersion`` (the API's optimistic concurrency: 409 if
    the object changed since it was read). ``Client.delete`` sends no DeleteOptions body, so this
    goes through the client's request pipeline (same connection, auth, timeout, counting)."""
    generic = api._client
    request = generic.prepare_request("delete", res, name=name, namespace=namespace)
    request.data = {
        "kind": "DeleteOptions",
        "apiVersion": "v1",
        "preconditions": {"resourceVersion": resource_version},
    }
    generic.handle_response("delete", generic.send(generic.build_adapter_request(request)), request)


class _Counted(httpx2.BaseTransport):
    """The client's transport: every request (and each retry of one) counts in k8s_request_total,
    with the HTTP status of its answer or ``<error>`` when none came."""

    def __init__(self, inner: httpx2.BaseTransport) -> None:
        self._inner = inner

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        code = "<error>"
        try:
            response = self._inner.handle_request(request)
            code = str(response.status_code)
            return response
        finally:
            metrics.count_kube_request(request.method, str(request.url), code)

    def close(self) -> None:
        self._inner.close()


def _config(kubeconfig: str | None) -> Any:
    """The lightkube SingleConfig of ``--kubeconfig`` (its current context) or of the pod's service
    account. Errors name what is missing, never a value of the file (it may hold credentials)."""
    try:
        if kubeconfig:
            cfg = KubeConfig.from_file(kubeconfig).get()
        else:
            host = os.environ.get("KUBERNETES_SERVICE_HOST")
            port = os.environ.get("KUBERNETES_SERVICE_PORT")
            if not (host and port):
                raise KubeError(
                    "no Kubernetes API configuration: KUBERNETES_SERVICE_HOST/PORT are not set "
                    "(not in a pod: give --kubeconfig)"
                )
            cfg = KubeConfig.from_service_account(SERVICE_ACCOUNT_DIR).get()
    except lightkube.ConfigError as exc:
        raise KubeError(f"no Kubernetes API configuration: {exc}") from None
    except KubeError:
        raise
    except Exception as exc:  # unreadable, not YAML, a context naming a missing cluster or user
        # The type only: YAML errors quote the file.
        where = kubeconfig or SERVICE_ACCOUNT_DIR
        raise KubeError(
            f"no Kubernetes API configuration: cannot use {where} ({type(exc).__name__})"
        ) from None
    if cfg is None:
        raise KubeError("no Kubernetes API configuration: the kubeconfig has no current context")
    if cfg.user is None:  # a context without a user: no credentials, as kubectl
        cfg = cfg._replace(user=User())
    return cfg


class Kube:
    def __init__(
        self, kubeconfig: str | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._kubeconfig = kubeconfig
        self._api: lightkube.Client | None = None
        self._lock = threading.Lock()
        self._clock = clock
        # (namespace, name) -> (when, the object or the KubeError it answered with)
        self._spcs: dict[tuple[str, str], tuple[float, dict[str, Any] | KubeError]] = {}
        self._spc_flights: dict[tuple[str, str], threading.Lock] = {}
        self._spc_lock = threading.Lock()
        self._node_region = ""  # the Node's REGION_LABEL once read; a node never changes region
        self._node_unlabelled_at: float | None = None  # when a read found no label
        self._node_lock = threading.Lock()

    def _client(self) -> lightkube.Client:
        """The process's one client (thread-safe: httpx2's connection pool), built on first use:
        the csi process starts (and answers Probe) before the API is needed. KubeError if there is
        no usable configuration (tried again at the next call)."""
        with self._lock:
            if self._api is None:
                cfg = _config(self._kubeconfig)
                # The TLS context lightkube would give its own transport (the cluster's CA, a
                # client certificate), for ours: it counts every request (_Counted).
                try:
                    verify = client_adapter.verify_cluster(
                        cfg.cluster, cfg.user, cfg.abs_file, trust_env=False
                    )
                except Exception as exc:  # a CA or client certificate file missing or bad
                    raise KubeError(
                        f"no Kubernetes API configuration: its TLS files cannot be used "
                        f"({type(exc).__name__})"
                    ) from None
                # retries: connection attempts, as urllib3 (the official client) made 3 more.
                inner = httpx2.HTTPTransport(verify=verify, trust_env=False, retries=3)
                transport = _Counted(inner)
                self._api = lightkube.Client(
                    cfg, timeout=TIMEOUT, trust_env=False, transport=transport
                )
            return self._api

    def warm(self) -> None:
        """Build the client now (httpx2's connection code and the TLS context take most of a
        second to load) and the decoders of the objects read and written (msgspec builds them on
        first use), so the first NodePublishVolume does not pay for it. Sends no request; a
        configuration problem is left to the first call to report."""
        with contextlib.suppress(KubeError):
            self._client()
        for res in (ServiceAccount, Node, Secret, Event):
            with contextlib.suppress(Exception):  # the model's required fields are missing
                res.from_dict({})

    def secret_provider_class(self, namespace: str, name: str) -> dict[str, Any]:
        what = f"SecretProviderClass {namespace}/{name}"
        api = self._client()
        try:
            obj: Any = api.get(SecretProviderClass, name, namespace=namespace)
        except httpx2.HTTPStatusError as exc:
            if status_code(exc) == 404:
                raise NotFound(
                    f"{what} not found: create it in namespace {namespace} (a pod can only use "
                    "a SecretProviderClass of its own namespace)"
                ) from None
            raise KubeError(f"cannot read {what}: {_reason(exc)}") from None
        except Exception as exc:  # connection errors, timeouts, an answer that is not JSON
            raise KubeError(f"cannot read {what}: {type(exc).__name__}") from None
        if not isinstance(obj, dict):
            raise KubeError(f"cannot read {what}: unexpected answer")
        return dict(obj)

    def cached_secret_provider_class(
        self, namespace: str, name: str, max_age: float = SPC_CACHE_SECONDS
    ) -> dict[str, Any]:
        """``secret_provider_class``, or its answer (object or error) of at most ``max_age``
        seconds ago: one GET per class however many volumes ask at once (republish)."""
        key = (namespace, name)
        with self._spc_lock:
            flight = self._spc_flights.setdefault(key, threading.Lock())
        with flight:
            with self._spc_lock:
                hit = self._spcs.get(key)
            if hit is None or self._clock() - hit[0] >= max_age:
                try:
                    answer: dict[str, Any] | KubeError = self.secret_provider_class(*key)
                except KubeError as exc:
                    answer = exc
                now = self._clock()
                with self._spc_lock:
                    for k in [k for k, (t, _) in self._spcs.items() if now - t >= max_age]:
                        del self._spcs[k]
                        if k != key:
                            self._spc_flights.pop(k, None)
                    self._spcs[key] = hit = (now, answer)
        answer = hit[1]
        if isinstance(answer, KubeError):
            raise type(answer)(str(answer))
        return answer

    def service_account_annotations(self, namespace: str, name: str) -> dict[str, str]:
        """The annotations providers read (IRSA role ARN, GKE service account); {} if none."""
        what = f"ServiceAccount {namespace}/{name}"
        api = self._client()
        try:
            sa = api.get(ServiceAccount, name, namespace=namespace)
        except httpx2.HTTPStatusError as exc:
            if status_code(exc) == 404:
                log.warning("%s not found; using no annotations", what)
                return {}
            raise KubeError(f"cannot read {what}: {_reason(exc)}") from None
        except Exception as exc:
            raise KubeError(f"cannot read {what}: {type(exc).__name__}") from None
        annotations = (sa.metadata.annotations if sa.metadata else None) or {}
        return {str(k): str(v) for k, v in annotations.items()}

    def node_region(self, name: str) -> str:
        """The ``topology.kubernetes.io/region`` label of Node ``name`` ("" if it has none).

        One GET for the life of the process: a label found is kept; a Node without it is read
        again after NO_LABEL_SECONDS; a failed read (KubeError) at the next call (the next
        publish that needs it). Concurrent callers wait for one answer."""
        with self._node_lock:
            if self._node_region:
                return self._node_region
            seen = self._node_unlabelled_at
            if seen is not None and self._clock() - seen < NO_LABEL_SECONDS:
                return ""
            what = f"Node {name}"
            api = self._client()
            try:
                node = api.get(Node, name)
            except httpx2.HTTPStatusError as exc:
                if status_code(exc) == 404:
                    raise NotFound(
                        f"{what} not found: the csi container's --nodeid must be the node's name "
                        "(the chart passes spec.nodeName as KUBE_NODE_NAME)"
                    ) from None
                raise KubeError(f"cannot read {what}: {_reason(exc)}") from None
            except Exception as exc:
                raise KubeError(f"cannot read {what}: {type(exc).__name__}") from None
            labels = (node.metadata.labels if node.metadata else None) or {}
            region = labels.get(REGION_LABEL)
            self._node_region = region.strip() if isinstance(region, str) else ""
            if self._node_region:
                log.info("node %s: region %s (label %s)", name, self._node_region, REGION_LABEL)
                self._node_unlabelled_at = None
            else:
                self._node_unlabelled_at = self._clock()
            return self._node_region
