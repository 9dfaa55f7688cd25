"""A Go-free conformance smoke: the Identity and Node calls a CSI conformance suite (csi-sanity)
makes, over the real unix socket."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterator
from pathlib import Path

import boto3
import grpc
import pytest

from csi.pb import csi_pb2
from tests.csi_node import ROLE_ANNOTATION, CsiNode, Pod, role_arn
from tests.kube_server import KubeServer, kube_api  # noqa: F401
from tests.mounting import is_mounted, needs_fuse
from tests.test_csi_e2e import NAME, SEED

pytestmark = [needs_fuse, pytest.mark.fuse, pytest.mark.slow]
C = grpc.StatusCode


@pytest.fixture
def node(
    tmp_path: Path,
    kube_api: KubeServer,  # noqa: F811
    aws_env: dict[str, str],
) -> Iterator[CsiNode]:
    boto3.client(
        "secretsmanager", region_name=aws_env["region"], endpoint_url=aws_env["endpoint_url"]
    ).create_secret(Name=NAME, SecretString="v1")
    kube_api.add_spc("default", SEED)
    kube_api.add_service_account("default", "app", {ROLE_ANNOTATION: role_arn("app")})
    n = CsiNode(tmp_path, kube_api.kubeconfig(tmp_path / "kubeconfig"))
    n.start_pair()
    try:
        yield n
    finally:
        n.close()
        assert not n.our_mounts()


def code_of(call: object, request: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=30)  # type: ignore[operator]
    return info.value.code()  # type: ignore[no-any-return]


def test_identity_service(node: CsiNode) -> None:
    ident = node.identity()
    info = ident.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    assert info.name == "secrets-store.csi.k8s.io"
    assert info.vendor_version == importlib.metadata.version("secretfs-csi")  # = secretfs --version
    caps = ident.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
    assert not any(c.service.type == c.service.CONTROLLER_SERVICE for c in caps.capabilities)
    probe = ident.Probe(csi_pb2.ProbeRequest())
    assert probe.HasField("ready") and probe.ready.value


def test_node_service(node: CsiNode) -> None:
    n = node.node()
    assert n.NodeGetInfo(csi_pb2.NodeGetInfoRequest()).node_id == "node-1"
    caps = n.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest()).capabilities
    assert [c.rpc.type for c in caps] == [csi_pb2.NodeServiceCapability.RPC.VOLUME_MOUNT_GROUP]
    # Not advertised, not served.
    stage = node.channel().unary_unary(
        "/csi.v1.Node/NodeStageVolume",
        request_serializer=lambda _: b"",
        response_deserializer=lambda b: b,
    )
    assert code_of(stage, None) == C.UNIMPLEMENTED

    pod = Pod("sanity", "f0000000-0000-0000-0000-000000000000")
    publish, unpublish = n.NodePublishVolume, n.NodeUnpublishVolume
    assert code_of(publish, csi_pb2.NodePublishVolumeRequest()) == C.INVALID_ARGUMENT
    req = node.publish_request(pod)
    req.ClearField("volume_capability")
    assert code_of(publish, req) == C.INVALID_ARGUMENT
    assert code_of(unpublish, csi_pb2.NodeUnpublishVolumeRequest()) == C.INVALID_ARGUMENT
    missing_target = csi_pb2.NodeUnpublishVolumeRequest(volume_id=pod.volume_id)
    assert code_of(unpublish, missing_target) == C.INVALID_ARGUMENT

    target = node.publish(pod)
    assert target.is_dir() and is_mounted(target)
    node.publish(pod)  # idempotent
    node.unpublish(pod)
    assert not target.exists()
    node.unpublish(pod)  # idempotent when already gone
