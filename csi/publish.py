"""Publish and unpublish: the node root mount, the daemon's volumes, and the bind mounts.

State lives in the kernel's mount table and in the daemon, never only in this process, so a
restarted csi process carries on where the last one stopped: the node root is the
``fuse.secretfs`` mount at the mount root, a published volume is a bind of ``/<volume_id>`` of it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from csi import kube, metrics, mounts
from csi.server import CsiError, annotate
from secretfs import control
from secretfs import spc as spc_mod
from secretfs.control import ControlError

log = logging.getLogger(__name__)

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
    def __init__(self, client: control.Client, kube_api: kube.Kube, mount_root: str) -> None:
        self.client = client
        self.kube = kube_api
        self.mount_root = os.path.abspath(mount_root)
        self._root_lock = threading.Lock()
        self._busy: set[str] = set()
        self._busy_lock = threading.Lock()

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
        """The node root mount, served by the daemon (mounting and attaching it if needed)."""
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
                return root, status
            if root is not None:
                log.warning("detaching the node mount %s of a previous daemon", self.mount_root)
                mounts.unmount_all(self.mount_root)
            try:
                self._attach(int(status.get("uid", 0)), int(status.get("gid", 0)))
            except OSError as exc:
                raise CsiError(
                    S.INTERNAL,
                    f"cannot mount the node root {self.mount_root}: {exc.strerror}",
                    metrics.FAILED_TO_MOUNT,
                ) from None
            root = mounts.node_root(mounts.read_mountinfo(), self.mount_root)
            if root is None:
                raise CsiError(S.INTERNAL, "the node root vanished", metrics.FAILED_TO_MOUNT)
            return root, {**status, "attached": True, "serving": True}

    def _attach(self, uid: int, gid: int) -> None:
        os.makedirs(self.mount_root, mode=0o755, exist_ok=True)
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        try:
            mounts.mount_fuse_root(self.mount_root, fd, uid, gid)
            try:
                self.client.attach(fd)
            except ControlError as exc:
                mounts.unmount_all(self.mount_root)
                raise daemon_error(exc) from None
        finally:
            os.close(fd)  # the daemon holds the session now
        log.info("node root %s mounted and handed to the daemon", self.mount_root)

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
                # requiresRepublish: only the tokens are new. Cheap, no API or backend call.
                try:
                    answer = self.client.refresh(req.volume_id, req.tokens)
                except ControlError as exc:
                    raise daemon_error(exc) from None
                annotate(provider=str(answer.get("provider", "")))
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
        spc = self._read_spc(req)
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
        try:
            added = self.client.add(
                req.volume_id,
                {"name": spc.name, "provider": spc.provider, "parameters": dict(spc.parameters)},
                req.attributes,
                identity,
                req.gid,
                timeout=max(5.0, time_left - 5.0),
            )
        except ControlError as exc:
            raise daemon_error(exc) from None
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
        return "published"

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

    def _read_spc(self, req: Publish) -> spc_mod.SecretProviderClass:
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
        return spc

    def _undo(self, req: Publish, created: bool, remove: bool) -> None:
        """Leave nothing behind after a failed publish."""
        with contextlib.suppress(OSError):
            mounts.unmount_all(req.target)
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(req.target)
        if remove:
            try:
                self.client.remove(req.volume_id)
            except ControlError as exc:
                log.warning("volume %s: cleanup in the daemon failed: %s", req.volume_id, exc)

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
        try:
            self.client.remove(volume_id)
        except ControlError as exc:
            # A daemon that is gone holds no volumes (and no values) any more.
            log.warning("volume %s: not removed from the daemon: %s", volume_id, exc.message)
