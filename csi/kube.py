"""Kubernetes API reads of the csi process: the SecretProviderClass, the pod's ServiceAccount, and
its own Node's region label (for AWS classes that name no region, as upstream).

Uses the official client (in-cluster config, or ``--kubeconfig``). Every call has its own
timeout, well inside the kubelet's 2-minute NodePublishVolume deadline.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from csi import metrics

log = logging.getLogger(__name__)

GROUP = "secrets-store.csi.x-k8s.io"
VERSION = "v1"
PLURAL = "secretproviderclasses"
TIMEOUT = (5.0, 10.0)  # connect, read (seconds)
# How long a republish may use an answer about a SecretProviderClass (one GET per class per this,
# however many pods use it).
SPC_CACHE_SECONDS = 30.0
# The Node label upstream's AWS provider takes the region from when a class names none.
REGION_LABEL = "topology.kubernetes.io/region"
# How long "the Node has no such label" stands before the Node is read again (a new node may get
# it from its cloud controller soon after it registers; daemon.awsRegion users may never have it).
NO_LABEL_SECONDS = 60.0


class KubeError(Exception):
    """The API could not answer (outage, RBAC); the message says which object and why."""


class NotFound(KubeError):
    pass


def _reason(exc: ApiException) -> str:
    if exc.status == 403:
        return "forbidden (check the driver's RBAC: get on this resource)"
    return f"HTTP {exc.status} {exc.reason or ''}".strip()


class Kube:
    def __init__(
        self, kubeconfig: str | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._kubeconfig = kubeconfig
        self._api: client.ApiClient | None = None
        self._lock = threading.Lock()
        self._clock = clock
        # (namespace, name) -> (when, the object or the KubeError it answered with)
        self._spcs: dict[tuple[str, str], tuple[float, dict[str, Any] | KubeError]] = {}
        self._spc_flights: dict[tuple[str, str], threading.Lock] = {}
        self._spc_lock = threading.Lock()
        self._node_region = ""  # the Node's REGION_LABEL once read; a node never changes region
        self._node_unlabelled_at: float | None = None  # when a read found no label
        self._node_lock = threading.Lock()

    def _client(self) -> client.ApiClient:
        # Built on first use: the csi process starts (and answers Probe) before the API is needed.
        with self._lock:
            if self._api is None:
                if self._kubeconfig:
                    self._api = config.new_client_from_config(  # type: ignore[no-untyped-call]
                        config_file=self._kubeconfig
                    )
                else:
                    cfg = client.Configuration()
                    config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
                    self._api = client.ApiClient(cfg)
                # Every request through this client counts in k8s_request_total.
                metrics.count_kube_requests(self._api)
            return self._api

    def warm(self) -> None:
        """Load the client's lazily imported API and model modules (about a second) now, so the
        first NodePublishVolume does not pay for it."""
        for attr in ("CoreV1Api", "CustomObjectsApi", "V1ServiceAccount", "V1ObjectMeta"):
            getattr(client, attr)

    def secret_provider_class(self, namespace: str, name: str) -> dict[str, Any]:
        what = f"SecretProviderClass {namespace}/{name}"
        try:
            api = client.CustomObjectsApi(self._client())
            obj = api.get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, _request_timeout=TIMEOUT
            )
        except ApiException as exc:
            if exc.status == 404:
                raise NotFound(
                    f"{what} not found: create it in namespace {namespace} (a pod can only use "
                    "a SecretProviderClass of its own namespace)"
                ) from None
            raise KubeError(f"cannot read {what}: {_reason(exc)}") from None
        except config.ConfigException as exc:
            raise KubeError(f"no Kubernetes API configuration: {exc}") from None
        except Exception as exc:  # urllib3 connection errors and timeouts
            raise KubeError(f"cannot read {what}: {type(exc).__name__}") from None
        if not isinstance(obj, dict):
            raise KubeError(f"cannot read {what}: unexpected answer")
        return obj

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
        try:
            sa = client.CoreV1Api(self._client()).read_namespaced_service_account(
                name, namespace, _request_timeout=TIMEOUT
            )
        except ApiException as exc:
            if exc.status == 404:
                log.warning("%s not found; using no annotations", what)
                return {}
            raise KubeError(f"cannot read {what}: {_reason(exc)}") from None
        except config.ConfigException as exc:
            raise KubeError(f"no Kubernetes API configuration: {exc}") from None
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
            try:
                rsp: Any = client.CoreV1Api(self._client()).read_node(
                    name, _request_timeout=TIMEOUT, _preload_content=False
                )
                obj = json.loads(rsp.data)  # labels only: no model for the whole Node
            except ApiException as exc:
                if exc.status == 404:
                    raise NotFound(
                        f"{what} not found: the csi container's --nodeid must be the node's name "
                        "(the chart passes spec.nodeName as KUBE_NODE_NAME)"
                    ) from None
                raise KubeError(f"cannot read {what}: {_reason(exc)}") from None
            except config.ConfigException as exc:
                raise KubeError(f"no Kubernetes API configuration: {exc}") from None
            except Exception as exc:
                raise KubeError(f"cannot read {what}: {type(exc).__name__}") from None
            meta = obj.get("metadata") if isinstance(obj, dict) else None
            labels = (meta.get("labels") if isinstance(meta, dict) else None) or {}
            region = labels.get(REGION_LABEL) if isinstance(labels, dict) else None
            self._node_region = region.strip() if isinstance(region, str) else ""
            if self._node_region:
                log.info("node %s: region %s (label %s)", name, self._node_region, REGION_LABEL)
                self._node_unlabelled_at = None
            else:
                self._node_unlabelled_at = self._clock()
            return self._node_region
