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
    return boto3.client("secretsmanager", region_name=env["region"], endpoint_url=env["endpoint_url"])


@pytest.fixture
def make_node(
    tmp_path: Path, kube_api: KubeServer, aws_env: dict[str, str]  # noqa: F811
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
