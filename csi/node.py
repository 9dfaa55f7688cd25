"""CSI Identity and Node servicers: validation and translation; the work is in publish.py."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import grpc

from csi import metrics
from csi.pb import csi_pb2, csi_pb2_grpc
from csi.publish import Node, Publish
from csi.server import TOKENS_KEY, CsiError
from secretfs import __version__, control

log = logging.getLogger(__name__)

DRIVER_NAME = "secrets-store.csi.k8s.io"
POD_NAME = "csi.storage.k8s.io/pod.name"
POD_NAMESPACE = "csi.storage.k8s.io/pod.namespace"
POD_UID = "csi.storage.k8s.io/pod.uid"
SERVICE_ACCOUNT = "csi.storage.k8s.io/serviceAccount.name"
SPC_KEY = "secretProviderClass"
# Leave room for our own cleanup inside the kubelet's 2-minute deadline.
DEFAULT_DEADLINE = 110.0


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
    try:
        tokens = json.loads(text)
    except ValueError:
        raise invalid(f"{TOKENS_KEY} in {where} is not valid JSON") from None
    if not isinstance(tokens, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("token"), str) for v in tokens.values()
    ):
        raise invalid(f"{TOKENS_KEY} in {where} is not a map of audience to token")
    return tokens


def publish_request(req: Any) -> Publish:
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
    if not os.path.isabs(req.target_path):
        raise invalid(f"target_path {req.target_path!r} is not an absolute path")
    ctx = dict(req.volume_context)
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
    gid = 0
    group = cap.mount.volume_mount_group if cap.HasField("mount") else ""
    if group:
        if not group.isdigit() or int(group) > 0xFFFFFFFE:
            raise invalid(f"volume_mount_group {group!r} is not a numeric group id")
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
        target=os.path.normpath(req.target_path),
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
        req = publish_request(request)
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
        if not os.path.isabs(request.target_path):
            raise invalid(f"target_path {request.target_path!r} is not an absolute path")
        with self.node.guard(request.volume_id):
            self.node.unpublish(request.volume_id, os.path.normpath(request.target_path))
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
