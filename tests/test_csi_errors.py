"""Every NodePublishVolume failure the kubelet can see: its status code, its message, and that
nothing is left mounted or listed in the daemon afterwards."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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
POD = Pod("app-0", "e0000000-0000-0000-0000-000000000000")


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
    kube_api.add_spc("elsewhere", {**SEED, "metadata": {"name": "only-elsewhere"}})
    bad = {"apiVersion": SEED["apiVersion"], "kind": SEED["kind"]}
    kube_api.add_spc(
        "default",
        {**bad, "metadata": {"name": "unknown"}, "spec": {**SEED["spec"], "provider": "acme"}},
    )
    kube_api.add_spc(
        "default",
        {**bad, "metadata": {"name": "bad-name"}, "spec": {**SEED["spec"], "provider": "ac me!"}},
    )
    kube_api.add_spc(
        "default",
        {
            **bad,
            "metadata": {"name": "no-objects"},
            "spec": {"provider": "aws", "parameters": {"region": "us-east-1"}},
        },
    )
    missing = "- objectName: NoSuchSecret\n  objectType: secretsmanager\n"
    kube_api.add_spc(
        "default",
        {
            **bad,
            "metadata": {"name": "missing"},
            "spec": {"provider": "aws", "parameters": {"objects": missing}},
        },
    )
    kube_api.add_service_account("default", "app", {ROLE_ANNOTATION: role_arn("app")})
    n = CsiNode(tmp_path, kube_api.kubeconfig(tmp_path / "kubeconfig"))
    try:
        yield n
    finally:
        n.close()
        assert not n.our_mounts()


def fails(node: CsiNode, request: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        node.node().NodePublishVolume(request, timeout=60)
    return info.value.code(), str(info.value.details())


def assert_clean(node: CsiNode, pod: Pod = POD) -> None:
    """Nothing mounted, no target directory, and (when it runs) no volume in the daemon."""
    from secretfs.control import Client, ControlError

    target = node.target(pod)
    assert not is_mounted(target)
    assert not target.exists()
    try:
        volumes = Client(node.daemon_socket).status()["volumes"]
    except ControlError:
        return
    assert volumes == []


def test_publish_errors(node: CsiNode, kube_api: KubeServer) -> None:  # noqa: F811
    node.start_pair()
    req: Callable[..., Any] = node.publish_request

    r = req(POD)
    r.ClearField("volume_id")
    assert fails(node, r) == (C.INVALID_ARGUMENT, "volume_id is missing")
    r = req(POD)
    r.ClearField("target_path")
    assert fails(node, r) == (C.INVALID_ARGUMENT, "target_path is missing")
    r = req(POD)
    r.ClearField("volume_capability")
    assert fails(node, r) == (C.INVALID_ARGUMENT, "volume_capability is missing")
    code, msg = fails(node, req(POD, readonly=False))
    assert code == C.INVALID_ARGUMENT and "readOnly: true" in msg
    code, msg = fails(node, req(POD, group="staff"))
    assert code == C.INVALID_ARGUMENT and "volume_mount_group" in msg
    r = req(POD)
    r.volume_id = "../../etc"
    assert fails(node, r)[0] == C.INVALID_ARGUMENT
    r = req(POD)
    del r.volume_context["secretProviderClass"]
    code, msg = fails(node, r)
    assert code == C.INVALID_ARGUMENT and "secretProviderClass" in msg
    r = req(POD)
    r.volume_context["csi.storage.k8s.io/serviceAccount.tokens"] = "not json"
    code, msg = fails(node, r)
    assert code == C.INVALID_ARGUMENT and "not valid JSON" in msg and "not json" not in msg

    code, msg = fails(node, req(POD, "nope"))
    assert code == C.NOT_FOUND and "SecretProviderClass default/nope not found" in msg
    code, msg = fails(node, req(POD, "only-elsewhere"))
    assert code == C.NOT_FOUND and "default/only-elsewhere" in msg
    # A name no built-in provider has is an external provider's: no socket is a retryable error
    # (its DaemonSet may be starting) that says where it looked.
    code, msg = fails(node, req(POD, "unknown"))
    assert code == C.UNAVAILABLE, msg
    assert "acme" in msg and "acme.sock" in msg and "DaemonSet" in msg
    # A name upstream could not look up as a socket is the class author's mistake.
    code, msg = fails(node, req(POD, "bad-name"))
    assert code == C.INVALID_ARGUMENT
    assert "SecretProviderClass default/bad-name" in msg and "spec.provider" in msg
    code, msg = fails(node, req(POD, "no-objects"))
    assert code == C.INVALID_ARGUMENT
    assert "SecretProviderClass default/no-objects" in msg and "objects" in msg
    code, msg = fails(node, req(POD, "missing"))
    assert code == C.FAILED_PRECONDITION and "NoSuchSecret" in msg
    # A pod author's volumeAttributes override the class: a "billion laughs" there is refused,
    # naming the limit, and the daemon that serves every volume goes on serving.
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    bomb = "\n".join(levels) + "\nobjects: *a8\n"
    code, msg = fails(node, req(POD, extra={"objects": bomb}))
    assert code == C.INVALID_ARGUMENT and "expands to more than 50000 YAML nodes" in msg
    assert_clean(node)

    # Target path busy: a non-empty directory, then another filesystem mounted there.
    target = node.target(POD)
    target.mkdir()
    (target / "leftover").write_text("x")
    code, msg = fails(node, req(POD))
    assert code == C.FAILED_PRECONDITION and "busy" in msg
    (target / "leftover").unlink()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(target)], check=True)
    try:
        code, msg = fails(node, req(POD))
        assert code == C.FAILED_PRECONDITION and "busy" in msg and "tmpfs" in msg
    finally:
        subprocess.run(["umount", str(target)], check=True)
    target.rmdir()

    # The Kubernetes API failing is retryable.
    kube_api.fail_with = 500
    code, msg = fails(node, req(POD))
    assert code == C.UNAVAILABLE and "SecretProviderClass default/aws-secrets" in msg
    kube_api.fail_with = None
    assert_clean(node)

    metrics = node.metrics()
    for error_type in (
        "InvalidRequest",
        "SecretProviderClassNotFound",
        "InvalidSecretProviderClass",
        "ProviderError",
        "FailedToEnsureMountPoint",
        "KubernetesAPIError",
    ):
        assert f'error_type="{error_type}"' in metrics
    # The request log never carries tokens.
    assert "header.payload.signature" not in node.logs()


def test_backend_unreachable_at_publish(node: CsiNode, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)  # the daemon inherits it
    node.start_pair()
    code, msg = fails(node, node.publish_request(POD))
    assert code == C.UNAVAILABLE
    assert "SecretProviderClass default/aws-secrets" in msg
    assert_clean(node)


def test_concurrent_duplicate_is_aborted(tmp_path: Path) -> None:
    from csi.publish import Node
    from csi.server import CsiError
    from secretfs.control import Client

    node = Node(Client(str(tmp_path / "none.sock")), None, str(tmp_path))  # type: ignore[arg-type]
    with node.guard("vol-1"):
        with pytest.raises(CsiError) as info, node.guard("vol-1"):
            pass
        assert info.value.code == C.ABORTED
        with node.guard("vol-2"):
            pass
    with node.guard("vol-1"):
        pass


def test_probe_and_publish_without_daemon(node: CsiNode) -> None:
    node.start_csi()
    assert not node.identity().Probe(csi_pb2.ProbeRequest()).ready.value
    code, msg = fails(node, node.publish_request(POD))
    assert code == C.UNAVAILABLE and "daemon" in msg
    assert_clean(node)
