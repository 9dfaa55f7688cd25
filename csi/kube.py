"""Kubernetes API reads of the csi process: the SecretProviderClass and the pod's ServiceAccount.

Uses the official client (in-cluster config, or ``--kubeconfig``). Every call has its own
timeout, well inside the kubelet's 2-minute NodePublishVolume deadline.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)

GROUP = "secrets-store.csi.x-k8s.io"
VERSION = "v1"
PLURAL = "secretproviderclasses"
TIMEOUT = (5.0, 10.0)  # connect, read (seconds)
# How long a republish may use an answer about a SecretProviderClass (one GET per class per this,
# however many pods use it).
SPC_CACHE_SECONDS = 30.0


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
