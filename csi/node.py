"""CSI Identity and Node servicers: validation and translation; the work is in publish.py."""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

import grpc

from csi import metrics
from csi.pb import csi_pb2, csi_pb2_grpc
from csi.publish import Node, Publish
from csi.server import TOKENS_KEY, CsiError
from providers import limits
from secretfs import __version__, control
from secretfs.logs import fields

log = logging.getLogger(__name__)

DRIVER_NAME = "secrets-store.csi.k8s.io"
POD_NAME = "csi.storage.k8s.io/pod.name"
POD_NAMESPACE = "csi.storage.k8s.io/pod.namespace"
POD_UID = "csi.storage.k8s.io/pod.uid"
SERVICE_ACCOUNT = "csi.storage.k8s.io/serviceAccount.name"
SPC_KEY = "secretProviderClass"
# Leave room for our own cleanup inside the kubelet's 2-minute deadline.
DEFAULT_DEADLINE = 110.0
DEFAULT_KUBELET_ROOT = "/var/lib/kubelet"
# Bounds of what the kubelet passes (Kubernetes' own limits where it has them).
MAX_NAME = 253  # DNS subdomain: object names, service accounts, the SecretProviderClass
MAX_TOKENS_BYTES = 64 * 1024  # the service-account token JSON (a few tokens of ~1 KiB)
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


def invalid(message: str) -> CsiError:
    return CsiError(grpc.StatusCode.INVALID_ARGUMENT, message, metrics.INVALID_REQUEST)


class IdentityServicer(csi_pb2_grpc.IdentityServicer):  # type: ignore[misc]
    def __init__(self, name: str, node: Node) -> None:
        self.name = name
        self.node = node

    def GetPluginInfo(self, request: Any, context: Any) -> Any:
        return csi_pb2.GetPluginInfoResponse(name=self.name, vendor_version=__version__)

    def GetPluginCapabilities(self, request: Any, context: Any) -> Any:
        # Node service only: no controller, no topology constraints.
        return csi_pb2.GetPluginCapabilitiesResponse(capabilities=[])

    def Probe(self, request: Any, context: Any) -> Any:
        rsp = csi_pb2.ProbeResponse()
        rsp.ready.value = self.node.ready()
        return rsp


def parse_tokens(text: str, where: str) -> dict[str, Any]:
    """The kubelet's token JSON; errors never quote it."""
    if limits.size(text) > MAX_TOKENS_BYTES:
        raise invalid(f"{TOKENS_KEY} in {where} is larger than {MAX_TOKENS_BYTES} bytes")
    try:
        tokens = json.loads(text)
    except (ValueError, RecursionError):
        raise invalid(f"{TOKENS_KEY} in {where} is not valid JSON") from None
    if not isinstance(tokens, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("token"), str) for v in tokens.values()
    ):
        raise invalid(f"{TOKENS_KEY} in {where} is not a map of audience to token")
    return tokens


def check_target(target_path: str, kubelet_root: str) -> str:
    """The normalised target path; it must lie in the kubelet's pods directory."""
    if not target_path:
        raise invalid("target_path is missing")
    if not os.path.isabs(target_path):
        raise invalid(f"target_path {limits.quote(target_path, 300)} is not an absolute path")
    target = os.path.normpath(target_path)
    pods = os.path.join(os.path.normpath(kubelet_root), "pods") + "/"
    if not target.startswith(pods) or "\0" in target:
        raise invalid(
            f"target_path {limits.quote(target_path, 300)} is not inside the kubelet's pods "
            f"directory {pods} (the csi process's --kubelet-root, chart value kubeletRootDir)"
        )
    return target


def check_name(value: str, what: str) -> None:
    if value and not _DNS_SUBDOMAIN.match(value):
        raise invalid(
            f"{what} {limits.quote(value)} is not a Kubernetes name (lower-case letters, "
            f"digits, '-' and '.', at most {MAX_NAME} characters)"
        )


def publish_request(req: Any, kubelet_root: str = DEFAULT_KUBELET_ROOT) -> Publish:
    """Validate a NodePublishVolumeRequest (raising INVALID_ARGUMENT) and extract what we need."""
    if not req.volume_id:
        raise invalid("volume_id is missing")
    if not req.target_path:
        raise invalid("target_path is missing")
    if not req.HasField("volume_capability"):
        raise invalid("volume_capability is missing")
    cap = req.volume_capability
    if cap.HasField("block"):
        raise invalid("block access is not supported: secrets-store volumes are filesystems")
    if not req.readonly:
        raise invalid(
            "the volume must be readOnly: true (set readOnly: true on the csi volume of the pod)"
        )
    problem = control.check_volume_id(req.volume_id)
    if problem:
        raise invalid(problem)
    target = check_target(req.target_path, kubelet_root)
    ctx = dict(req.volume_context)
    too_big = limits.check_parameters(ctx) + limits.check_parameters(dict(req.secrets))
    if too_big:
        fld, msg = too_big[0]
        raise invalid(f"the volume context or secrets are too large: {limits.quote(fld)} {msg}")
    spc_name = ctx.get(SPC_KEY, "")
    if not spc_name:
        raise invalid(
            "volumeAttributes.secretProviderClass is missing: name the SecretProviderClass "
            "in the csi volume of the pod"
        )
    namespace = ctx.get(POD_NAMESPACE, "")
    if not namespace:
        raise invalid(
            f"{POD_NAMESPACE} is missing from the volume context: the CSIDriver "
            f"{DRIVER_NAME} needs podInfoOnMount: true"
        )
    check_name(spc_name, "volumeAttributes.secretProviderClass")
    check_name(namespace, POD_NAMESPACE)
    check_name(ctx.get(SERVICE_ACCOUNT, ""), SERVICE_ACCOUNT)
    check_name(ctx.get(POD_NAME, ""), POD_NAME)
    if len(ctx.get(POD_UID, "")) > 64:
        raise invalid(f"{POD_UID} {limits.quote(ctx[POD_UID])} is not a pod uid")
    gid = 0
    group = cap.mount.volume_mount_group if cap.HasField("mount") else ""
    if group:
        # isdigit() alone accepts "²", which int() refuses.
        if (
            not (group.isascii() and group.isdigit() and len(group) <= 10)
            or int(group) > 0xFFFFFFFE
        ):
            raise invalid(f"volume_mount_group {limits.quote(group)} is not a numeric group id")
        gid = int(group)
    secrets = dict(req.secrets)
    # Kubernetes 1.35+ (serviceAccountTokenInSecrets) puts the tokens in secrets; older ones in
    # the volume context. Upstream reads secrets first.
    tokens: dict[str, Any] = {}
    if TOKENS_KEY in secrets:
        tokens = parse_tokens(secrets.pop(TOKENS_KEY), "secrets")
    elif TOKENS_KEY in ctx:
        tokens = parse_tokens(ctx[TOKENS_KEY], "volume_context")
    ctx.pop(TOKENS_KEY, None)
    return Publish(
        volume_id=req.volume_id,
        target=target,
        namespace=namespace,
        spc_name=spc_name,
        pod_name=ctx.get(POD_NAME, ""),
        pod_uid=ctx.get(POD_UID, ""),
        service_account=ctx.get(SERVICE_ACCOUNT, ""),
        gid=gid,
        attributes=ctx,
        tokens=tokens,
        secrets=secrets,
    )


class NodeServicer(csi_pb2_grpc.NodeServicer):  # type: ignore[misc]
    def __init__(self, node_id: str, node: Node) -> None:
        self.node_id = node_id
        self.node = node

    def NodePublishVolume(self, request: Any, context: Any) -> Any:
        req = publish_request(request, self.node.kubelet_root)
        remaining = context.time_remaining()
        time_left = DEFAULT_DEADLINE if remaining is None else min(remaining, DEFAULT_DEADLINE)
        with self.node.guard(req.volume_id):
            outcome = self.node.publish(req, time_left)
        log.info(
            "volume %s %s at %s for pod %s/%s",
            req.volume_id,
            outcome,
            req.target,
            req.namespace,
            req.pod_name,
            extra=fields(volume=req.volume_id, pod_namespace=req.namespace, pod_name=req.pod_name),
        )
        return csi_pb2.NodePublishVolumeResponse()

    def NodeUnpublishVolume(self, request: Any, context: Any) -> Any:
        if not request.volume_id:
            raise invalid("volume_id is missing")
        if not request.target_path:
            raise invalid("target_path is missing")
        problem = control.check_volume_id(request.volume_id)
        if problem:
            raise invalid(problem)
        target = check_target(request.target_path, self.node.kubelet_root)
        with self.node.guard(request.volume_id):
            self.node.unpublish(request.volume_id, target)
        return csi_pb2.NodeUnpublishVolumeResponse()

    def NodeGetCapabilities(self, request: Any, context: Any) -> Any:
        rpc = csi_pb2.NodeServiceCapability.RPC(
            type=csi_pb2.NodeServiceCapability.RPC.VOLUME_MOUNT_GROUP
        )
        return csi_pb2.NodeGetCapabilitiesResponse(
            capabilities=[csi_pb2.NodeServiceCapability(rpc=rpc)]
        )

    def NodeGetInfo(self, request: Any, context: Any) -> Any:
        return csi_pb2.NodeGetInfoResponse(node_id=self.node_id)
