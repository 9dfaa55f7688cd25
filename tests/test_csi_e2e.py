"""The CSI node plugin end to end, driven like the kubelet over the real unix socket.

``secretfs node`` (or ``daemon`` + ``csi`` separately) runs as processes; the SecretProviderClass
and ServiceAccount come from the test Kubernetes API server through the real client library; the
secrets from moto through the AWS provider (IRSA: role ARN annotation + sts.amazonaws.com token).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml

from tests.csi_node import ROLE_ANNOTATION, CsiNode, Pod, role_arn
from tests.kube_server import KubeServer, kube_api  # noqa: F401
from tests.mounting import ROOT, is_mounted, needs_fuse, wait_for

pytestmark = [needs_fuse, pytest.mark.fuse, pytest.mark.slow]

SEED = yaml.safe_load((ROOT / "examples/aws-seed.yaml").read_text())
NAME = "MyDatabasePassword"


def sm(env: dict[str, str]) -> Any:
    return boto3.client(
        "secretsmanager", region_name=env["region"], endpoint_url=env["endpoint_url"]
    )


@pytest.fixture
def make_node(
    tmp_path: Path,
    kube_api: KubeServer,  # noqa: F811
    aws_env: dict[str, str],
) -> Iterator[Callable[..., CsiNode]]:
    kube_api.add_spc("default", SEED)
    for sa in ("app", "other"):
        kube_api.add_service_account("default", sa, {ROLE_ANNOTATION: role_arn(sa)})
    made: list[CsiNode] = []

    def make(ttl: float = 120.0) -> CsiNode:
        node = CsiNode(tmp_path, kube_api.kubeconfig(tmp_path / "kubeconfig"), ttl=ttl)
        made.append(node)
        return node

    try:
        yield make
    finally:
        for node in made:
            node.close()
            assert not node.our_mounts(), "mounts left behind"


def test_publish_read_republish_rotate_unpublish(
    make_node: Callable[..., CsiNode], aws_env: dict[str, str]
) -> None:
    sm(aws_env).create_secret(Name=NAME, SecretString="v1-secret")
    node = make_node(ttl=1.0)
    node.start_pair()
    pod = Pod("app-0", "11111111-2222-3333-4444-555555555555")
    target = node.publish(pod, group="3000")
    assert is_mounted(target)
    assert (target / NAME).read_bytes() == b"v1-secret"
    st = os.stat(target / NAME)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 3000, 0o644)
    with pytest.raises(OSError):
        (target / NAME).write_text("x")
    # A republish (requiresRepublish) with a fresh token: cheap success, same mount.
    sm(aws_env).put_secret_value(SecretId=NAME, SecretString="v2-secret")
    node.publish(pod, group="3000", token="fresh.token.value")
    assert wait_for(lambda: (target / NAME).read_bytes() == b"v2-secret", timeout=20)
    node.unpublish(pod)
    assert not is_mounted(target)
    assert not target.exists()
    node.unpublish(pod)  # idempotent
    metrics = node.metrics()
    assert 'node_publish_total{os_type="linux",provider="aws"} 2.0' in metrics
    assert 'node_unpublish_total{os_type="linux"} 2.0' in metrics
    assert "fresh.token.value" not in node.logs()
    assert "header.payload.signature" not in node.logs()


def test_identities_share_values_only_when_equal(
    make_node: Callable[..., CsiNode], aws_env: dict[str, str]
) -> None:
    sm(aws_env).create_secret(Name=NAME, SecretString="v1-secret")
    node = make_node(ttl=300.0)
    node.start_pair()
    first = node.publish(Pod("a-0", "a0000000-0000-0000-0000-000000000000"))
    assert (first / NAME).read_bytes() == b"v1-secret"
    sm(aws_env).put_secret_value(SecretId=NAME, SecretString="v2-secret")
    # Same namespace and service account: served from the shared cache, no provider call (a
    # call would have brought v2).
    same = node.publish(Pod("a-1", "a1111111-0000-0000-0000-000000000000"), tokens_in_secrets=True)
    assert (same / NAME).read_bytes() == b"v1-secret"
    # Another service account (another role): its own fetch, never the first pod's value.
    other = node.publish(
        Pod("b-0", "b0000000-0000-0000-0000-000000000000", service_account="other")
    )
    assert (other / NAME).read_bytes() == b"v2-secret"
    assert (first / NAME).read_bytes() == b"v1-secret"


def test_csi_restart_keeps_volumes_readable(
    make_node: Callable[..., CsiNode], aws_env: dict[str, str]
) -> None:
    sm(aws_env).create_secret(Name=NAME, SecretString="v1-secret")
    node = make_node()
    node.start_daemon(no_capabilities=True)  # the daemon needs no mount privilege
    status = Path(f"/proc/{node.procs['daemon'].pid}/status").read_text()
    assert "CapEff:\t0000000000000000" in status
    node.start_csi()
    pod = Pod("app-0", "c0000000-0000-0000-0000-000000000000")
    target = node.publish(pod)
    node.kill("csi")
    assert (target / NAME).read_bytes() == b"v1-secret"
    node.start_csi()
    assert (target / NAME).read_bytes() == b"v1-secret"
    node.publish(pod)  # the restarted process finds the volume in mountinfo and the daemon
    node.unpublish(pod)
    assert not is_mounted(target) and not target.exists()
    assert "detaching" not in node.log("csi")


def test_daemon_gone_publish_unavailable_unpublish_cleans_up(
    make_node: Callable[..., CsiNode], aws_env: dict[str, str]
) -> None:
    import grpc

    from csi.pb import csi_pb2

    sm(aws_env).create_secret(Name=NAME, SecretString="v1-secret")
    node = make_node()
    node.start_daemon()
    node.start_csi()
    pod = Pod("app-0", "d0000000-0000-0000-0000-000000000000")
    target = node.publish(pod)
    node.kill("daemon")
    assert not node.identity().Probe(csi_pb2.ProbeRequest()).ready.value
    with pytest.raises(grpc.RpcError) as info:
        node.publish(Pod("app-1", "d1111111-0000-0000-0000-000000000000"))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "daemon is not reachable" in str(info.value.details())
    node.unpublish(pod)
    assert not is_mounted(target) and not target.exists()
    # A new daemon: the csi process mounts a fresh node root and publishing works again.
    node.start_daemon()
    assert wait_for(lambda: node.identity().Probe(csi_pb2.ProbeRequest()).ready.value)
    again = node.publish(pod)
    assert (again / NAME).read_bytes() == b"v1-secret"
    node.unpublish(pod)
