"""Publish and unpublish: the node root mount, the daemon's volumes, and the bind mounts.

State lives in the kernel's mount table and in the daemon as well as here, so a restarted csi
process carries on where the last one stopped: the node root is the ``fuse.secretfs`` mount at the
mount root, a published volume is a bind of ``/<volume_id>`` of it, and the FUSE connection with
the volume records comes back from the daemon (keeper.py). A restarted daemon gets them from here.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from csi import kube, metrics, mounts
from csi.keeper import REFRESH_MARK, Keeper
from csi.server import CsiError, annotate
from csi.status import KubeObjects
from providers.limits import quote
from secretfs import control, fusewire
from secretfs import spc as spc_mod
from secretfs.control import ControlError
from secretfs.logs import fields

log = logging.getLogger(__name__)

# A SecretProviderClass annotation: set it to a new value (a timestamp) and every volume of the
# class fetches its values again at its next republish, bypassing the TTL.
REFRESH_ANNOTATION = "secretfs.io/refresh"

S = grpc.StatusCode
# Daemon answer codes → gRPC codes and error_type labels.
_DAEMON_CODES = {
    control.INVALID_ARGUMENT: (S.INVALID_ARGUMENT, metrics.INVALID_SPC),
    control.NOT_FOUND: (S.NOT_FOUND, metrics.PROVIDER_ERROR),
    control.ALREADY_EXISTS: (S.ALREADY_EXISTS, metrics.FAILED_TO_MOUNT),
    control.ABORTED: (S.ABORTED, metrics.OPERATION_IN_PROGRESS),
    control.UNAVAILABLE: (S.UNAVAILABLE, metrics.PROVIDER_ERROR),
    control.FAILED_PRECONDITION: (S.FAILED_PRECONDITION, metrics.PROVIDER_ERROR),
    control.PERMISSION_DENIED: (S.PERMISSION_DENIED, metrics.PROVIDER_ERROR),
    control.INTERNAL: (S.INTERNAL, metrics.INTERNAL_ERROR),
}


def daemon_error(exc: ControlError, unreachable: bool = False) -> CsiError:
    if unreachable or isinstance(exc, control.Unreachable):
        return CsiError(S.UNAVAILABLE, exc.message, metrics.DAEMON_UNAVAILABLE)
    code, error_type = _DAEMON_CODES.get(exc.code, (S.INTERNAL, metrics.INTERNAL_ERROR))
    return CsiError(code, exc.message, error_type)


def needs_node_region(spc: spc_mod.SecretProviderClass, attributes: dict[str, str]) -> bool:
    """An AWS volume whose parameters, with the attributes replacing them, name no region: it
    may take the node's region label (providers/aws/params.py has the order)."""
    if spc.provider != "aws":
        return False
    return not ({**spc.parameters, **attributes}.get("region") or "").strip()


def refresh_mark(obj: dict[str, Any]) -> str:
    """The value of a SecretProviderClass object's refresh annotation ("" if none)."""
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    return str(annotations.get(REFRESH_ANNOTATION) or "")


@dataclass(frozen=True)
class Publish:
    volume_id: str
    target: str
    namespace: str
    spc_name: str
    pod_name: str
    pod_uid: str
    service_account: str
    gid: int
    attributes: dict[str, str] = field(repr=False)
    tokens: dict[str, Any] = field(repr=False)
    secrets: dict[str, str] = field(repr=False)


class Node:
    def __init__(
        self,
        client: control.Client,
        kube_api: kube.Kube,
        mount_root: str,
        keeper: Keeper | None = None,
        kubelet_root: str = "/var/lib/kubelet",
        node_name: str = "",
    ) -> None:
        self.client = client
        self.kube = kube_api
        self.node_name = node_name  # this node's Node object (its region label)
        self.mount_root = os.path.abspath(mount_root)
        self.kubelet_root = kubelet_root
        self.keeper = keeper or Keeper(client)
        self._root_lock = threading.Lock()
        self._busy: set[str] = set()
        self._busy_lock = threading.Lock()
        # Status objects and Events in the Kubernetes API (csi/status.py; None: none written).
        self.objects: KubeObjects | None = None

    @contextlib.contextmanager
    def guard(self, volume_id: str) -> Iterator[None]:
        """One operation per volume at a time; a concurrent duplicate gets ABORTED."""
        with self._busy_lock:
            if volume_id in self._busy:
                raise CsiError(
                    S.ABORTED,
                    f"an operation on volume {volume_id} is already in progress",
                    metrics.OPERATION_IN_PROGRESS,
                )
            self._busy.add(volume_id)
        try:
            yield
        finally:
            with self._busy_lock:
                self._busy.discard(volume_id)

    # --- the node root ---

    def status(self, timeout: float = 5.0) -> dict[str, Any]:
        try:
            return self.client.status(timeout)
        except ControlError as exc:
            raise daemon_error(exc, unreachable=True) from None

    def ensure_root(self) -> tuple[mounts.MountInfo, dict[str, Any]]:
        """The node root mount, served by the daemon: mounted and attached if there is none,
        handed to a new daemon generation if ours is gone, taken back from the daemon if this
        process restarted."""
        with self._root_lock:
            status = self.status()
            root = mounts.node_root(mounts.read_mountinfo(), self.mount_root)
            if status.get("attached"):
                if not status.get("serving"):
                    raise CsiError(
                        S.UNAVAILABLE,
                        "the secretfs daemon's FUSE session has ended; it is restarting",
                        metrics.DAEMON_UNAVAILABLE,
                    )
                if root is None:
                    # The daemon serves a root this process cannot see: a csi container restarted
                    # without Bidirectional propagation on the mount root's volume.
                    raise CsiError(
                        S.UNAVAILABLE,
                        f"the daemon serves a node root that is not mounted at {self.mount_root} "
                        "in this mount namespace (mount its directory with Bidirectional "
                        "propagation); restart the daemon to recover",
                        metrics.DAEMON_UNAVAILABLE,
                    )
                if self.keeper.conn is None:
                    self._call(lambda: self.keeper.reclaim(root), "take the connection back")
                return root, status
            if self.keeper.conn is not None:
                if not self.keeper.alive():
                    self.keeper.drop("the kernel aborted the FUSE connection")
                elif root is not None and root.device == self.keeper.conn.device:
                    self._call(
                        lambda: self.keeper.take_over(status), "hand the connection to the daemon"
                    )
                    return root, self.status()
                else:
                    self.keeper.drop(f"the node root at {self.mount_root} is gone")
            if root is not None:
                log.warning(
                    "detaching the node mount %s: its FUSE connection is dead (aborted, or lost "
                    "with both the daemon and this process); pods that mounted it before must be "
                    "recreated",
                    self.mount_root,
                )
                mounts.unmount_all(self.mount_root)
            try:
                self.keeper.mount_fresh(
                    self.mount_root, int(status.get("uid", 0)), int(status.get("gid", 0))
                )
            except ControlError as exc:
                raise daemon_error(exc) from None
            except (OSError, fusewire.WireError) as exc:
                raise CsiError(
                    S.INTERNAL,
                    f"cannot mount the node root {self.mount_root}: "
                    f"{getattr(exc, 'strerror', None) or exc}",
                    metrics.FAILED_TO_MOUNT,
                ) from None
            root = mounts.node_root(mounts.read_mountinfo(), self.mount_root)
            if root is None:
                raise CsiError(S.INTERNAL, "the node root vanished", metrics.FAILED_TO_MOUNT)
            return root, {**status, "attached": True, "serving": True}

    @staticmethod
    def _call(fn: Any, what: str) -> Any:
        try:
            return fn()
        except ControlError as exc:
            err = daemon_error(exc)
            raise CsiError(err.code, f"cannot {what}: {exc.message}", err.error_type) from None

    def ready(self) -> bool:
        try:
            self.ensure_root()
        except CsiError as exc:
            log.info("not ready: %s", exc.message)
            return False
        return True

    # --- publish ---

    def publish(self, req: Publish, time_left: float) -> str:
        """Publish (or republish) a volume; returns "published" or "republished"."""
        root, status = self.ensure_root()
        current = mounts.at(mounts.read_mountinfo(), req.target)
        if current is not None:
            shown = mounts.volume_of(current, root)
            if shown == req.volume_id and req.volume_id in status.get("volumes", ()):
                self.republish(req, time_left)
                return "republished"
            if (shown is None and current.fstype == mounts.FSTYPE) or shown == req.volume_id:
                # Our bind of a volume a previous daemon served: it is dead; publish afresh.
                log.warning("target %s shows a stale volume; remounting", req.target)
                mounts.unmount_all(req.target)
            else:
                what = f"volume {shown}" if shown else f"a {current.fstype} filesystem"
                raise CsiError(
                    S.FAILED_PRECONDITION,
                    f"target path {req.target} is busy: {what} is mounted there",
                    metrics.FAILED_TO_ENSURE_MOUNT_POINT,
                )
        created = self._check_target(req.target)
        spc, mark = self._read_spc(req)
        annotations = {}
        if req.service_account:
            try:
                annotations = self.kube.service_account_annotations(
                    req.namespace, req.service_account
                )
            except kube.KubeError as exc:
                raise CsiError(S.UNAVAILABLE, str(exc), metrics.KUBE_API_ERROR) from None
        identity = {
            "namespace": req.namespace,
            "service_account": req.service_account,
            "pod_name": req.pod_name,
            "pod_uid": req.pod_uid,
            "tokens": req.tokens,
            "secrets": req.secrets,
            "sa_annotations": annotations,
        }
        record: dict[str, Any] = {
            "spc": {
                "name": spc.name,
                "provider": spc.provider,
                "parameters": dict(spc.parameters),
                "ttl": spc.ttl,  # secretfs.io/ttl (seconds) or None
                REFRESH_MARK: mark,  # the daemon ignores it; export hands it back
            },
            "attributes": req.attributes,
            "identity": identity,
            "gid": req.gid,
            # The pod's target path: what upstream sends external providers (targetPath); kept
            # in the record, so a restored volume tells them the same.
            "target": req.target,
        }
        node, unread = self._node_facts(spc, req)
        if node is not None:
            record["node"] = node  # recorded: a restarted daemon plans with the same region
        for _ in range(2):
            generation = self.keeper.generation
            try:
                added = self.client.add(req.volume_id, **record, timeout=max(5.0, time_left - 5.0))
            except ControlError as exc:
                if (
                    unread
                    and exc.code == control.INVALID_ARGUMENT
                    and kube.REGION_LABEL in exc.message
                ):
                    # The region was to come from the Node, which could not be read: retry.
                    raise CsiError(S.UNAVAILABLE, exc.message, metrics.KUBE_API_ERROR) from None
                raise daemon_error(exc) from None
            self.keeper.record(req.volume_id, record, added)
            if self.keeper.generation == generation:
                break
            # A takeover ran while the daemon added it: the new generation may not have it, so
            # add it again (an answer of "existing" if it does).
        try:
            if not os.path.isdir(req.target):
                os.mkdir(req.target, 0o750)
                created = True
            mounts.bind_readonly(os.path.join(self.mount_root, req.volume_id), req.target)
        except OSError as exc:
            self._undo(req, created, remove=not added.get("existing"))
            raise CsiError(
                S.INTERNAL,
                f"cannot mount the volume at {req.target}: {exc.strerror}",
                metrics.FAILED_TO_MOUNT,
            ) from None
        if self.objects is not None:  # queued, never failing the publish (csi/status.py)
            self._track(
                req,
                added,
                secret_objects=spc.secret_objects,
                secret_problems=spc.secret_object_problems,
            )
        return "published"

    def _track(self, req: Publish, answer: dict[str, Any], **kw: Any) -> None:
        """Write (queue) the volume's SecretProviderClassPodStatus from the daemon's answer."""
        assert self.objects is not None
        self.objects.published(
            req.volume_id,
            namespace=req.namespace,
            pod_name=req.pod_name,
            pod_uid=req.pod_uid,
            spc_name=req.spc_name,
            target=req.target,
            objects=answer.get("objects"),
            **kw,
        )

    def republish(self, req: Publish, time_left: float) -> None:
        """requiresRepublish: fresh tokens, and the nodePublishSecretRef data as it is now. Cheap
        (no backend call) unless that data changed, or the class asks for a refresh now."""
        deadline = time.monotonic() + time_left
        try:
            answer = self.client.refresh(
                req.volume_id, req.tokens, req.secrets, timeout=max(5.0, time_left - 5.0)
            )
        except ControlError as exc:
            # The daemon renews the tokens even when it cannot use new Secret data.
            self.keeper.update_identity(req.volume_id, tokens=req.tokens)
            raise daemon_error(exc) from None
        self.keeper.update_identity(req.volume_id, tokens=req.tokens, secrets=req.secrets)
        annotate(provider=str(answer.get("provider", "")))
        if self.objects is not None:
            if self.objects.known(req.volume_id):
                self.objects.republished(req.volume_id)
            else:
                # This process restarted since the publish: its status object (and its synced
                # Secrets) are tracked again.
                self._track(req, answer, **self._secret_objects(req))
        self._refresh_on_request(req, deadline)

    def _secret_objects(self, req: Publish) -> dict[str, Any]:
        """The class's secretObjects, from the class cache ({} if it cannot be read now: the
        Secrets are then written again by the next process that knows them)."""
        if self.objects is None or self.objects.sync is None:
            return {}
        try:
            obj = self.kube.cached_secret_provider_class(req.namespace, req.spc_name)
            spc = spc_mod.from_object(obj, f"SecretProviderClass {req.namespace}/{req.spc_name}")
        except (kube.KubeError, spc_mod.SpcError) as exc:
            log.warning("volume %s: its secretObjects are not synced now: %s", req.volume_id, exc)
            return {}
        return {
            "secret_objects": spc.secret_objects,
            "secret_problems": spc.secret_object_problems,
        }

    def _refresh_on_request(self, req: Publish, deadline: float) -> None:
        """The class's secretfs.io/refresh annotation differs from the value this volume last
        honoured: the daemon fetches the volume's values now, bypassing the TTL. The class is
        read from a cache of SPC_CACHE_SECONDS; an API failure skips the check (never the
        republish); a failed refresh fails the republish, and is tried again at the next one."""
        honoured = self.keeper.refresh_mark(req.volume_id)
        if honoured is None:
            return  # no record of the volume here (no connection held): nothing to compare
        where = f"SecretProviderClass {req.namespace}/{req.spc_name}"
        try:
            obj = self.kube.cached_secret_provider_class(req.namespace, req.spc_name)
        except kube.KubeError as exc:
            log.warning(
                "volume %s: %s; its %s annotation is not looked at this time",
                req.volume_id,
                exc,
                REFRESH_ANNOTATION,
            )
            return
        mark = refresh_mark(obj)
        if mark == honoured:
            return
        asked = f"annotation {REFRESH_ANNOTATION}={quote(mark)} of {where}"
        try:
            answer = self.client.reload(
                req.volume_id, timeout=max(5.0, deadline - time.monotonic() - 5.0)
            )
        except ControlError as exc:
            if exc.code == control.INVALID_ARGUMENT and "unknown operation" in exc.message:
                log.warning(
                    "volume %s: %s asks for a refresh, which this secretfs daemon cannot do "
                    "(an older release); values refresh at their TTL",
                    req.volume_id,
                    asked,
                    extra=fields(volume=req.volume_id, pod_namespace=req.namespace),
                )
                return
            err = daemon_error(exc)
            raise CsiError(
                err.code,
                f"the refresh asked for by {asked} failed: {exc.message}; the volume keeps "
                "serving its current values, and the refresh is tried again at the next "
                "republish",
                err.error_type,
            ) from None
        failed = int(answer.get("failed") or 0)
        if failed:
            raise CsiError(
                S.UNAVAILABLE,
                f"the refresh asked for by {asked} could not fetch {failed} value(s) (the "
                "secretfs daemon's log on this node says which and why); it is tried again at "
                "the next republish",
                metrics.PROVIDER_ERROR,
            )
        self.keeper.set_refresh_mark(req.volume_id, mark)
        log.info(
            "volume %s: refreshed as %s asked: %s value(s) fetched, %s changed",
            req.volume_id,
            asked,
            answer.get("fetched", "?"),
            answer.get("changed", "?"),
            extra=fields(volume=req.volume_id, pod_namespace=req.namespace, pod_name=req.pod_name),
        )

    def _check_target(self, target: str) -> bool:
        """Refuse a target that is not an empty directory; False if it exists already."""
        if not os.path.lexists(target):
            return False
        if os.path.islink(target) or not os.path.isdir(target):
            problem = "it is not a directory"
        elif os.listdir(target):
            problem = "the directory is not empty"
        else:
            return False
        raise CsiError(
            S.FAILED_PRECONDITION,
            f"target path {target} is busy: {problem}",
            metrics.FAILED_TO_ENSURE_MOUNT_POINT,
        )

    def _node_facts(
        self, spc: spc_mod.SecretProviderClass, req: Publish
    ) -> tuple[dict[str, str] | None, bool]:
        """What the daemon needs of this node for the volume (None: nothing), and whether the
        Node could not be read (True: a region error is UNAVAILABLE). For an AWS class whose
        parameters (with the volume's attributes over them) name no region, the Node's
        topology.kubernetes.io/region label. The daemon uses it after its own AWS_REGION, as
        upstream's provider does. Read once (csi/kube.py); a failed read is tried again at the
        next publish that needs it, and only fails this one if no AWS_REGION stands in."""
        if not needs_node_region(spc, req.attributes):
            return None, False
        if not self.node_name:
            return {"problem": "csi runs without --nodeid, so it cannot read its Node"}, False
        try:
            region = self.kube.node_region(self.node_name)
        except kube.KubeError as exc:
            log.warning(
                "volume %s: SecretProviderClass %s/%s names no AWS region, and the node's %s "
                "label is unknown: %s",
                req.volume_id,
                req.namespace,
                req.spc_name,
                kube.REGION_LABEL,
                exc,
            )
            problem = f"{exc}; tried again at the next publish"
            return {"name": self.node_name, "problem": problem}, True
        if not region:
            return {"name": self.node_name, "problem": "the Node has no such label"}, False
        return {"name": self.node_name, "region": region}, False

    def _read_spc(self, req: Publish) -> tuple[spc_mod.SecretProviderClass, str]:
        """The volume's class, and its secretfs.io/refresh annotation ("" if none)."""
        try:
            obj = self.kube.secret_provider_class(req.namespace, req.spc_name)
        except kube.NotFound as exc:
            raise CsiError(S.NOT_FOUND, str(exc), metrics.SPC_NOT_FOUND) from None
        except kube.KubeError as exc:
            raise CsiError(S.UNAVAILABLE, str(exc), metrics.KUBE_API_ERROR) from None
        try:
            spc = spc_mod.from_object(obj, f"SecretProviderClass {req.namespace}/{req.spc_name}")
        except spc_mod.SpcError as exc:
            raise CsiError(S.INVALID_ARGUMENT, str(exc), metrics.INVALID_SPC) from None
        annotate(provider=spc.provider)
        return spc, refresh_mark(obj)

    def _undo(self, req: Publish, created: bool, remove: bool) -> None:
        """Leave nothing behind after a failed publish."""
        with contextlib.suppress(OSError):
            mounts.unmount_all(req.target)
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(req.target)
        if remove:
            self.keeper.forget(req.volume_id)
            try:
                self.client.remove(req.volume_id)
            except ControlError as exc:
                log.warning(
                    "volume %s: cleanup in the daemon failed: %s",
                    req.volume_id,
                    exc,
                    extra=fields(volume=req.volume_id, error_type=exc.code),
                )

    # --- unpublish ---

    def unpublish(self, volume_id: str, target: str) -> None:
        try:
            mounts.unmount_all(target)
        except OSError as exc:
            raise CsiError(
                S.INTERNAL, f"cannot unmount {target}: {exc.strerror}", metrics.FAILED_TO_UNMOUNT
            ) from None
        try:
            os.rmdir(target)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise CsiError(
                    S.INTERNAL,
                    f"cannot remove {target}: {exc.strerror}",
                    metrics.FAILED_TO_UNMOUNT,
                ) from None
        self.keeper.forget(volume_id)
        if self.objects is not None:
            self.objects.unpublished(volume_id)
        try:
            self.client.remove(volume_id)
        except ControlError as exc:
            # A daemon that is gone holds no volumes (and no values) any more; the next
            # generation will not be given this one.
            log.warning(
                "volume %s: not removed from the daemon: %s",
                volume_id,
                exc.message,
                extra=fields(volume=volume_id, error_type=exc.code),
            )
