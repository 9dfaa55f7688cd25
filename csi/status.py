"""What csi writes to the Kubernetes API about its volumes: a SecretProviderClassPodStatus per pod
volume (upstream's names and fields), Events (events.py) and, when secret sync is on, the Secrets
of classes' secretObjects (sync.py).

The daemon reports on the keeper's watch (``{"versions": {volume_id, objects}}`` when a volume's
object versions change, ``{"event": {volume_id, reason, message, type}}``); publish and
unpublish report here directly. Nothing here blocks a CSI RPC or the watch thread: every API write
runs on one ``Writer`` thread. Best effort: a failed write is logged (at most once a minute) and
retried with backoff, never failing a publish (upstream fails the mount when the status object
cannot be written; here a status object is a report, and an API blip must not keep pods from
starting). Upstream leaves the object to garbage collection with the pod; it is deleted here at
unpublish as well, so a volume that is gone is not reported mounted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import httpx2
import lightkube
from lightkube.generic_resource import create_namespaced_resource
from lightkube.types import PatchType

from csi import events
from csi.kube import GROUP, VERSION, Kube, KubeError, http_reason, status_code
from csi.sync import SecretSync
from secretfs.spc import SecretObject

log = logging.getLogger(__name__)

PLURAL = "secretproviderclasspodstatuses"
KIND = "SecretProviderClassPodStatus"
# The label upstream sets (its informers select a node's objects by it).
NODE_LABEL = "internal.secrets-store.csi.k8s.io/node-name"
# A failed write is tried again after 1, 2, 4 ... RETRY_MAX s, at most MAX_TRIES times.
RETRY_MAX = 60.0
MAX_TRIES = 20
# At most one log line about failed writes this often (seconds).
LOG_EVERY = 60.0
# The CRD, as a generic resource (its objects are plain dicts).
SecretProviderClassPodStatus = create_namespaced_resource(GROUP, VERSION, KIND, PLURAL)


def status_name(pod_name: str, namespace: str, spc_name: str) -> str:
    """Upstream's name of a pod volume's status object: ``<pod>-<namespace>-<spc>``."""
    return f"{pod_name}-{namespace}-{spc_name}"


def why(exc: BaseException) -> str:
    """What is logged about a failed write: the HTTP status, the exception's type, or (no API
    configuration) what is missing."""
    if isinstance(exc, KubeError):
        return str(exc)
    if status_code(exc) == 403:
        return "forbidden (check the driver's RBAC)"
    return http_reason(exc)


class Writer:
    """One thread for API writes. Work is keyed: a job submitted for a key that has one waiting
    replaces it (the job reads the state it writes when it runs). A failed job is retried."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._cond = threading.Condition()
        self._jobs: dict[Hashable, tuple[float, Callable[[], None]]] = {}
        self._tries: dict[Hashable, int] = {}
        self._logged = -LOG_EVERY
        self._quiet = 0  # failures not logged since the last line
        self._busy = False
        threading.Thread(target=self._run, name="kube-writer", daemon=True).start()

    def submit(self, key: Hashable, job: Callable[[], None], delay: float = 0.0) -> None:
        due = self._clock() + delay
        with self._cond:
            waiting = self._jobs.get(key)
            if waiting is not None:
                due = min(due, waiting[0])
            self._jobs[key] = (due, job)
            self._cond.notify()

    def idle(self, timeout: float) -> bool:
        """Wait until no job is due or running (tests, shutdown)."""
        end = self._clock() + timeout
        with self._cond:
            while self._busy or any(d <= self._clock() for d, _ in self._jobs.values()):
                left = end - self._clock()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    def _next(self) -> tuple[Hashable, Callable[[], None]]:
        with self._cond:
            while True:
                now = self._clock()
                if self._jobs:
                    key = min(self._jobs, key=lambda k: self._jobs[k][0])
                    due, job = self._jobs[key]
                    if due <= now:
                        del self._jobs[key]
                        self._busy = True
                        return key, job
                    self._cond.wait(due - now)
                else:
                    self._cond.notify_all()
                    self._cond.wait()

    def _run(self) -> None:
        while True:
            key, job = self._next()
            try:
                job()
            except Exception as exc:
                self._failed(key, job, exc)
            else:
                self._tries.pop(key, None)
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def _failed(self, key: Hashable, job: Callable[[], None], exc: Exception) -> None:
        n = self._tries[key] = self._tries.get(key, 0) + 1
        what = key[0] if isinstance(key, tuple) and key else key
        if n >= MAX_TRIES:
            self._tries.pop(key, None)
            log.warning("writing %s gave up after %d tries: %s", what, n, why(exc))
            return
        delay = min(RETRY_MAX, 2.0 ** (n - 1))
        with self._cond:
            if key not in self._jobs:  # else a newer job is waiting: it runs instead
                self._jobs[key] = (self._clock() + delay, job)
        now = self._clock()
        if now - self._logged >= LOG_EVERY:
            more = f" ({self._quiet} more failure(s) since the last report)" if self._quiet else ""
            log.warning(
                "writing %s to the Kubernetes API failed: %s; retrying in %.0f s%s",
                what,
                why(exc),
                delay,
                more,
            )
            self._logged, self._quiet = now, 0
        else:
            self._quiet += 1


@dataclass
class PodVolume:
    volume_id: str
    namespace: str
    pod_name: str
    pod_uid: str
    spc_name: str
    target: str
    objects: list[dict[str, str]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return status_name(self.pod_name, self.namespace, self.spc_name)

    @property
    def pod(self) -> dict[str, str]:
        return events.ref("Pod", self.namespace, self.pod_name, self.pod_uid)


class KubeObjects:
    """The status objects and Events of this node's volumes."""

    def __init__(
        self,
        kube: Kube,
        node_id: str,
        writer: Writer | None = None,
        event_interval: float = events.EVENT_INTERVAL,
        sync_root: str | None = None,
    ) -> None:
        """``sync_root``: the node root mount, to sync secretObjects into Secrets from (None:
        secret sync is off, and classes that ask for it get a warning)."""
        self.kube = kube
        self.node_id = node_id
        self.writer = writer or Writer()
        self.recorder = events.Recorder(kube, self.writer, node_id, event_interval)
        self.sync: SecretSync | None = None
        if sync_root is not None:
            # Its own thread: reading a volume's files must not hold up status or Event writes.
            self.sync = SecretSync(kube, Writer(), self.recorder, sync_root)
        self._lock = threading.Lock()
        self._volumes: dict[str, PodVolume] = {}
        self._by_name: dict[tuple[str, str], PodVolume] = {}
        self._exists: set[tuple[str, str]] = set()  # objects this process created or updated

    def install(self, handlers: dict[str, Callable[[dict[str, Any]], None]]) -> None:
        """Take the daemon's "versions" and "event" reports (``Keeper.handlers``)."""
        handlers["versions"] = self.on_versions
        handlers["event"] = self.on_event

    # --- reports ---

    def published(
        self,
        volume_id: str,
        *,
        namespace: str,
        pod_name: str,
        pod_uid: str,
        spc_name: str,
        target: str,
        objects: Any,
        secret_objects: tuple[SecretObject, ...] = (),
        secret_problems: tuple[str, ...] = (),
    ) -> None:
        """A volume is mounted (a publish, or a republish this process had no record of)."""
        if not (pod_name and pod_uid):
            log.debug("volume %s: no pod name or uid in its context; no status object", volume_id)
            return
        vol = PodVolume(volume_id, namespace, pod_name, pod_uid, spc_name, target)
        vol.objects = _objects(objects)
        with self._lock:
            self._volumes[volume_id] = vol
            self._by_name[(namespace, vol.name)] = vol
        self._sync(namespace, vol.name)
        where = f"SecretProviderClass {namespace}/{spc_name}"
        spc = events.ref("SecretProviderClass", namespace, spc_name, api_version=f"{GROUP}/v1")
        if self.sync is not None:
            self.sync.published(vol, secret_objects)
            if secret_problems:  # entries that cannot be synced
                message = f"{where}: not synced: " + "; ".join(secret_problems)
                log.warning("volume %s: %s", volume_id, message)
                self.recorder.record(vol.pod, events.SECRET_OBJECTS_NOT_SYNCED, message)
                self.recorder.record(spc, events.SECRET_OBJECTS_NOT_SYNCED, message)
        elif secret_objects or secret_problems:
            log.warning("volume %s: %s: %s", volume_id, where, events.SECRET_OBJECTS_MESSAGE)
            message = f"{where}: {events.SECRET_OBJECTS_MESSAGE}"
            self.recorder.record(vol.pod, events.SECRET_OBJECTS_NOT_SYNCED, message)
            self.recorder.record(spc, events.SECRET_OBJECTS_NOT_SYNCED, message)

    def known(self, volume_id: str) -> bool:
        with self._lock:
            return volume_id in self._volumes

    def unpublished(self, volume_id: str) -> None:
        with self._lock:
            vol = self._volumes.pop(volume_id, None)
            if vol is None:
                return
            if self._by_name.get((vol.namespace, vol.name)) is vol:
                del self._by_name[(vol.namespace, vol.name)]
        self._sync(vol.namespace, vol.name)
        if self.sync is not None:
            self.sync.unpublished(volume_id)

    def republished(self, volume_id: str) -> None:
        """A republish of a volume this process tracks (its Secrets are written again now and
        then, as upstream's controller does)."""
        if self.sync is not None:
            self.sync.republished(volume_id)

    def on_versions(self, payload: dict[str, Any]) -> None:
        with self._lock:
            vol = self._volumes.get(str(payload.get("volume_id")))
            if vol is None:
                return
            vol.objects = _objects(payload.get("objects"))
        self._sync(vol.namespace, vol.name)
        if self.sync is not None:
            self.sync.changed(vol.volume_id)

    def on_event(self, payload: dict[str, Any]) -> None:
        with self._lock:
            vol = self._volumes.get(str(payload.get("volume_id")))
        reason = str(payload.get("reason") or "")
        if vol is None or not reason:
            return
        kind = events.WARNING if payload.get("type") != events.NORMAL else events.NORMAL
        self.recorder.record(vol.pod, reason, str(payload.get("message") or ""), kind)

    # --- the status objects ---

    def _sync(self, namespace: str, name: str) -> None:
        self.writer.submit((KIND, namespace, name), lambda: self._write(namespace, name))

    def _write(self, namespace: str, name: str) -> None:
        """Run on the writer thread: make the API's object what this process knows now."""
        api = self.kube._client()
        with self._lock:
            vol = self._by_name.get((namespace, name))
            body = self._body(vol) if vol is not None else None
            exists = (namespace, name) in self._exists
        if body is None:
            try:
                api.delete(SecretProviderClassPodStatus, name, namespace=namespace)
            except httpx2.HTTPStatusError as exc:
                if status_code(exc) != 404:
                    raise
            with self._lock:
                self._exists.discard((namespace, name))
            return
        if exists:
            try:
                self._patch(api, namespace, name, body)
            except httpx2.HTTPStatusError as exc:
                if status_code(exc) != 404:
                    raise
                self._create(api, namespace, name, body)
        else:
            self._create(api, namespace, name, body)
        with self._lock:
            self._exists.add((namespace, name))

    @staticmethod
    def _create(api: lightkube.Client, namespace: str, name: str, body: dict[str, Any]) -> None:
        try:
            api.create(SecretProviderClassPodStatus.from_dict(body), namespace=namespace)
        except httpx2.HTTPStatusError as exc:
            if status_code(exc) != 409:
                raise
            # There is one already (a StatefulSet pod of the same name, a restarted csi): as
            # upstream, it is updated.
            KubeObjects._patch(api, namespace, name, body)

    @staticmethod
    def _patch(api: lightkube.Client, namespace: str, name: str, body: dict[str, Any]) -> None:
        api.patch(
            SecretProviderClassPodStatus,
            name,
            body,
            namespace=namespace,
            patch_type=PatchType.MERGE,
        )

    def _body(self, vol: PodVolume) -> dict[str, Any]:
        owner = {"apiVersion": "v1", "kind": "Pod", "name": vol.pod_name, "uid": vol.pod_uid}
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "metadata": {
                "name": vol.name,
                "namespace": vol.namespace,
                "labels": {NODE_LABEL: self.node_id},
                "ownerReferences": [owner],
            },
            "status": {
                "podName": vol.pod_name,
                "secretProviderClassName": vol.spc_name,
                "mounted": True,
                "targetPath": vol.target,
                "objects": list(vol.objects),
            },
        }


def _objects(value: Any) -> list[dict[str, str]]:
    """``[{id, version}]`` sorted by id, from what the daemon sent (bounded, strings only)."""
    out = {}
    for item in value if isinstance(value, list) else ():
        if isinstance(item, dict) and item.get("id"):
            out[str(item["id"])[:1024]] = str(item.get("version") or "")[:1024]
    return [{"id": k, "version": out[k]} for k in sorted(out)]
