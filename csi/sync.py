"""Secret sync, opt-in (csi ``--sync-secrets``; chart ``syncSecret.enabled``): the Kubernetes
Secrets a SecretProviderClass's ``spec.secretObjects`` asks for, kept in step with the volume.

Turning it on gives up "nothing at rest" for those objects: the API server stores a Secret in etcd.
Off (the default), csi only warns (csi/status.py). On, upstream's semantics:

- each entry's Secret is written in the pod's namespace, of the entry's ``type``, with its
  ``labels`` and ``annotations`` and the label ``secrets-store.csi.k8s.io/managed=true``;
  ``data[].key`` is filled from the volume's file ``data[].objectName`` (object name or alias);
  ``kubernetes.io/tls`` keys are ``tls.crt`` (the certificate PEM blocks) and ``tls.key`` (the
  private key as PKCS#1/SEC1 PEM), from PEM or, failing that, PKCS#12 without a password;
- written at publish, again when the daemon reports new object versions (a rotation), and at a
  republish when the last write is RESYNC seconds old (a Secret deleted by hand comes back);
- every pod that mounts the class is an owner (``ownerReferences``); at unpublish the pod's
  reference is removed, and the Secret is deleted when no owner is left (the garbage collector
  does the same when pods vanish with their node).

Where this differs from upstream, on purpose: a Secret that exists without the managed label is
never overwritten (an Event says so); owners are the pods themselves, not their controllers, so
the Secret is removed as soon as no pod uses it.

The values are read from the volume as a pod reads them: through the node root mount
(``<mount root>/<volume id>/<objectName>``), on this module's own writer thread, so neither CSI
calls nor the status and Event writes wait for it. Messages name keys and files, never values.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx2
import lightkube
from lightkube.resources.core_v1 import Secret

from csi import events
from csi.kube import delete, status_code
from providers.limits import quote
from secretfs.spc import SecretObject

if TYPE_CHECKING:
    from csi.kube import Kube
    from csi.status import PodVolume, Writer

log = logging.getLogger(__name__)

MANAGED_LABEL = "secrets-store.csi.k8s.io/managed"
# upstream's Event reason when a Secret cannot be written
FAILED = "FailedToCreateSecret"
TLS = "kubernetes.io/tls"
# Kubernetes refuses a Secret whose data is larger than this.
MAX_SECRET_BYTES = 1024 * 1024
# A republish writes a Secret again when its last write is this old (seconds), as upstream's
# controller requeues every 5 minutes.
RESYNC = 300.0
TRIES = 5  # attempts per write when another writer changed the Secret in between (409)
_PEM = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----\r?\n?", re.DOTALL)


class SyncError(Exception):
    """The Secret cannot be built from the volume; the message says what to fix (no values)."""


@dataclass
class _Secret:
    """One Secret this node writes: the volumes (pods) that use it here, and the pods whose
    reference is still to be removed."""

    volumes: dict[str, tuple[PodVolume, SecretObject]] = field(default_factory=dict)
    gone: set[str] = field(default_factory=set)
    synced: float | None = None  # when the last write succeeded (monotonic)


def tls_part(key: str, content: bytes, where: str) -> bytes:
    """What a ``kubernetes.io/tls`` Secret holds under ``key``: the certificates (``tls.crt``) or
    the private key (``tls.key``) of a PEM file or, failing that, a PKCS#12 file."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import pkcs12

    if key not in ("tls.crt", "tls.key"):
        raise SyncError(f"{where}: a {TLS} Secret takes the keys tls.crt and tls.key only")
    blocks = [m.group(0) for m in _PEM.finditer(content)]
    if key == "tls.crt":
        certs = [b for b in blocks if b.startswith(b"-----BEGIN CERTIFICATE-----")]
        if certs:
            return b"".join(c if c.endswith(b"\n") else c + b"\n" for c in certs)
    keys = [b for b in blocks if b"PRIVATE KEY-----" in b.split(b"\n", 1)[0]]
    private: Any = None
    chain: list[Any] = []
    try:
        if key == "tls.key" and keys:
            private = serialization.load_pem_private_key(keys[0], password=None)
        elif not blocks:
            private, cert, extra = pkcs12.load_key_and_certificates(content, None)
            chain = [c for c in (cert, *extra) if c is not None]
    except (ValueError, TypeError):
        private, chain = None, []
    if key == "tls.crt":
        if not chain:
            raise SyncError(f"{where}: no certificate (PEM or PKCS#12 without a password) found")
        pem = serialization.Encoding.PEM
        return b"".join(c.public_bytes(pem) for c in chain if isinstance(c, x509.Certificate))
    if private is None:
        raise SyncError(f"{where}: no private key (PEM or PKCS#12 without a password) found")
    traditional = isinstance(private, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey)
    fmt = serialization.PrivateFormat
    out: bytes = private.private_bytes(
        serialization.Encoding.PEM,
        fmt.TraditionalOpenSSL if traditional else fmt.PKCS8,
        serialization.NoEncryption(),
    )
    return out


class SecretSync:
    def __init__(
        self,
        kube: Kube,
        writer: Writer,
        recorder: events.Recorder,
        mount_root: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kube = kube
        self.writer = writer
        self.recorder = recorder
        self.mount_root = mount_root
        self._clock = clock
        self._lock = threading.Lock()
        self._secrets: dict[tuple[str, str], _Secret] = {}
        self._by_volume: dict[str, set[tuple[str, str]]] = {}

    # --- what csi reports ---

    def published(self, vol: PodVolume, objects: tuple[SecretObject, ...]) -> None:
        keys = {(vol.namespace, so.secret_name) for so in objects}
        with self._lock:
            for key in self._by_volume.pop(vol.volume_id, set()) - keys:
                self._drop(key, vol)
            for so in objects:
                key = (vol.namespace, so.secret_name)
                entry = self._secrets.setdefault(key, _Secret())
                entry.volumes[vol.volume_id] = (vol, so)
                entry.gone.discard(vol.pod_uid)
            self._by_volume[vol.volume_id] = keys
        for key in keys:
            self._submit(key)

    def changed(self, volume_id: str) -> None:
        """The volume's object versions changed: write its Secrets again."""
        with self._lock:
            keys = set(self._by_volume.get(volume_id, ()))
        for key in keys:
            self._submit(key)

    def republished(self, volume_id: str) -> None:
        """A republish: write the volume's Secrets again if their last write is RESYNC old."""
        now = self._clock()
        with self._lock:
            keys = [
                k
                for k in self._by_volume.get(volume_id, ())
                if (s := self._secrets.get(k)) is not None
                and (s.synced is None or now - s.synced >= RESYNC)
            ]
        for key in keys:
            self._submit(key)

    def unpublished(self, volume_id: str) -> None:
        with self._lock:
            keys = self._by_volume.pop(volume_id, set())
            for key in keys:
                entry = self._secrets.get(key)
                found = entry.volumes.get(volume_id) if entry else None
                if found is not None:
                    self._drop(key, found[0])
        for key in keys:
            self._submit(key)

    def _drop(self, key: tuple[str, str], vol: PodVolume) -> None:
        """(Lock held.) The pod's volume no longer uses the Secret ``key``."""
        entry = self._secrets.get(key)
        if entry is None:
            return
        entry.volumes.pop(vol.volume_id, None)
        if not any(v.pod_uid == vol.pod_uid for v, _ in entry.volumes.values()):
            entry.gone.add(vol.pod_uid)

    def _submit(self, key: tuple[str, str]) -> None:
        self.writer.submit(("Secret", *key), lambda: self._write(*key))

    # --- the writes (on the writer thread) ---

    def _write(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        with self._lock:
            entry = self._secrets.get(key)
            if entry is None:
                return
            live = list(entry.volumes.values())
            gone = set(entry.gone)
        data: dict[str, str] | None = None
        what = f"Secret {namespace}/{name}"
        try:
            if live:
                vol, so = live[-1]
                data = self._data(vol, so, what)
            self._apply(namespace, name, live, gone, data)
        except SyncError as exc:
            self._failed(live, str(exc))
            return
        except httpx2.HTTPStatusError as exc:
            if status_code(exc) not in (403, 422):
                raise  # the writer tries again with backoff
            because = (
                "forbidden: the driver's RBAC has no rights on Secrets (the chart's "
                "syncSecret.enabled grants them)"
                if status_code(exc) == 403
                else f"refused by the API server: {_message(exc)}"
            )
            self._failed(live, f"cannot write {what}: {because}")
            return
        with self._lock:
            entry = self._secrets.get(key)
            if entry is not None:
                entry.gone -= gone
                entry.synced = self._clock()
                if not entry.volumes and not entry.gone:
                    del self._secrets[key]

    def _failed(self, live: list[tuple[PodVolume, SecretObject]], message: str) -> None:
        log.warning("secret sync: %s", message)
        for vol, _ in live:
            self.recorder.record(vol.pod, FAILED, message)

    def _data(self, vol: PodVolume, so: SecretObject, what: str) -> dict[str, str]:
        """The Secret's data (base64) from the volume's files, read through the node mount."""
        out: dict[str, str] = {}
        total = 0
        base = os.path.join(self.mount_root, vol.volume_id)
        for key, object_name in so.data:
            where = f"{what} key {key} (objectName {quote(object_name)})"
            try:
                with open(os.path.join(base, object_name), "rb") as f:
                    content = f.read(MAX_SECRET_BYTES + 1 - total)
            except FileNotFoundError:
                raise SyncError(
                    f"{where}: the volume has no such file; objectName must be the path of a "
                    "mounted file (the object's name or its alias)"
                ) from None
            except OSError as exc:
                raise SyncError(f"{where}: cannot read it: {exc.strerror}") from None
            total += len(content)
            if total > MAX_SECRET_BYTES:
                raise SyncError(
                    f"{what}: its data would be larger than {MAX_SECRET_BYTES} bytes, the most "
                    "Kubernetes stores in a Secret"
                )
            if so.type == TLS:
                content = tls_part(key, content, where)
            out[key] = base64.b64encode(content).decode()
        return out

    def _apply(
        self,
        namespace: str,
        name: str,
        live: list[tuple[PodVolume, SecretObject]],
        gone: set[str],
        data: dict[str, str] | None,
    ) -> None:
        api = self.kube._client()
        what = f"Secret {namespace}/{name}"
        owners = {}
        for vol, _ in live:
            owners[vol.pod_uid] = {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": vol.pod_name,
                "uid": vol.pod_uid,
            }
        so = live[-1][1] if live else None
        for _ in range(TRIES):
            current = _read(api, namespace, name)
            if current is None:
                if so is None or data is None:
                    return  # gone already, and no pod here uses it
                body = _body(namespace, name, so, data, list(owners.values()))
                try:
                    api.create(_secret(body), namespace=namespace)
                except httpx2.HTTPStatusError as exc:
                    if status_code(exc) == 409:
                        continue  # created meanwhile (another node): read it again
                    raise
                log.info("secret sync: created %s", what)
                return
            meta = current.get("metadata") or {}
            if (meta.get("labels") or {}).get(MANAGED_LABEL) != "true":
                raise SyncError(
                    f"{what} exists and was not created by the driver (no label "
                    f"{MANAGED_LABEL}=true): it is not overwritten; delete it or rename the "
                    "secretObjects entry"
                )
            refs = []  # the owners it has, in their order, less the gone pods, plus ours
            for ref in meta.get("ownerReferences") or []:
                uid = ref.get("uid") if isinstance(ref, dict) else None
                if uid in owners:
                    ref = owners[uid]
                elif uid in gone:
                    continue
                refs.append(ref)
            known = {r.get("uid") for r in refs if isinstance(r, dict)}
            refs += [o for uid, o in owners.items() if uid not in known]
            version = str(meta.get("resourceVersion") or "")
            try:
                if not refs:
                    delete(api, Secret, name, namespace, version)
                    log.info("secret sync: deleted %s (no pod uses it any more)", what)
                    return
                if so is not None and data is not None:
                    body = _body(namespace, name, so, data, refs)
                else:
                    body = {**current, "metadata": {**meta, "ownerReferences": refs}}
                if _same(body, current):
                    return
                body["metadata"]["resourceVersion"] = version
                api.replace(_secret(body))  # namespace: the body's
                return
            except httpx2.HTTPStatusError as exc:
                if status_code(exc) in (404, 409):
                    continue  # changed or deleted meanwhile: read it again
                raise
        raise RuntimeError(f"{what} kept changing under {TRIES} writes")


def _read(api: lightkube.Client, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        secret = api.get(Secret, name, namespace=namespace)
    except httpx2.HTTPStatusError as exc:
        if status_code(exc) == 404:
            return None
        raise
    return secret.to_dict()


def _secret(body: dict[str, Any]) -> Secret:
    secret = Secret.from_dict(body)  # the client takes its model
    assert isinstance(secret, Secret)
    return secret


def _body(
    namespace: str,
    name: str,
    so: SecretObject,
    data: dict[str, str],
    owners: list[dict[str, Any]],
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {**so.labels, MANAGED_LABEL: "true"},
            "annotations": dict(so.annotations),
            "ownerReferences": owners,
        },
        "type": so.type,
        "data": data,
    }


def _same(body: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether writing ``body`` would change nothing that is ours to set."""
    new, old = body.get("metadata") or {}, current.get("metadata") or {}
    return (
        body.get("type") == current.get("type")
        and (body.get("data") or {}) == (current.get("data") or {})
        and all((new.get(k) or {}) == (old.get(k) or {}) for k in ("labels", "annotations"))
        and (new.get("ownerReferences") or []) == (old.get("ownerReferences") or [])
    )


def _message(exc: httpx2.HTTPStatusError) -> str:
    """The API's Status message of an error answer (its reason phrase if it sent none)."""
    status = getattr(exc, "status", None)  # lightkube.ApiError: the Status object
    message = getattr(status, "message", None)
    return quote(message or exc.response.reason_phrase, 300)
