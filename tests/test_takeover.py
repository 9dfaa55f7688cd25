"""The FUSE connection outlives the daemon: what a container sees across daemon restarts.

Every claim is checked from a container's side: a reader in its own private mount namespace
(``unshare -m --propagation private``) bind-mounts the pod's target path there, as the container
runtime does at container start, and loops open+read+close plus pread on an fd it opened before
anything happened (tests/ns_reader.py). A republish never reaches that bind; only the connection
surviving does. The daemon is restarted with the same arguments as before and no republish is
sent.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml

from tests.csi_node import ROLE_ANNOTATION, CsiNode, Pod, role_arn
from tests.kube_server import KubeServer, kube_api  # noqa: F401
from tests.mounting import ROOT, is_mounted, needs_fuse, wait_for
from tests.ns_reader import NsReader

pytestmark = [needs_fuse, pytest.mark.fuse, pytest.mark.slow]

SEED = yaml.safe_load((ROOT / "examples/aws-seed.yaml").read_text())
NAME = "MyDatabasePassword"
VALUE = "s3cr3t-value"
# The bar: a stall bounded by the restart time, at most this long.
MAX_STALL = 5.0


@pytest.fixture
def make_node(
    tmp_path: Path,
    kube_api: KubeServer,  # noqa: F811
    aws_env: dict[str, str],
) -> Iterator[Callable[..., CsiNode]]:
    kube_api.add_spc("default", SEED)
    kube_api.add_service_account("default", "app", {ROLE_ANNOTATION: role_arn("app")})
    boto3.client(
        "secretsmanager", region_name=aws_env["region"], endpoint_url=aws_env["endpoint_url"]
    ).create_secret(Name=NAME, SecretString=VALUE)
    made: list[CsiNode] = []

    def make(**kw: Any) -> CsiNode:
        node = CsiNode(tmp_path, kube_api.kubeconfig(tmp_path / "kubeconfig"), **kw)
        made.append(node)
        return node

    try:
        yield make
    finally:
        for node in made:
            node.close()
            assert not node.our_mounts(), "mounts left behind"


def published(node: CsiNode, tmp_path: Path, pods: int = 1) -> list[Path]:
    node.start_daemon()
    node.start_csi()
    return [
        node.publish(Pod(f"app-{i}", f"7a000000-0000-0000-0000-00000000000{i}"))
        for i in range(pods)
    ]


def reader(tmp_path: Path, target: Path, name: str = "ctr", threads: int = 1) -> NsReader:
    return NsReader(str(target), str(tmp_path / name), NAME, threads)


def assert_clean(summary: dict[str, Any]) -> None:
    assert summary["errors"] == {}, summary["errors"]
    assert set(summary["seen"]) == {VALUE}, summary["seen"]
    assert summary["reads"] > 0
    worst = max((took for _, took in summary["slow"]), default=0.0)
    assert worst < MAX_STALL, f"a read stalled {worst:.2f} s"


def restart_daemon(node: CsiNode, sig: int = signal.SIGKILL) -> None:
    proc = node.procs.pop("daemon")
    proc.send_signal(sig)
    proc.wait(15)
    node.start_daemon()


def generation(node: CsiNode) -> int:
    from secretfs import control

    status = control.Client(node.daemon_socket).status()
    return int(status["generation"]) if status.get("serving") else 0


def test_kill_9_and_restart_is_a_stall_not_an_error(
    make_node: Callable[..., CsiNode], tmp_path: Path
) -> None:
    node = make_node()
    (target,) = published(node, tmp_path)
    r = reader(tmp_path, target)
    try:
        time.sleep(0.3)
        restart_daemon(node)
        assert wait_for(lambda: generation(node) == 2, timeout=20)
        time.sleep(0.5)
    finally:
        summary = r.finish()
    assert_clean(summary)
    # The host path reads too, and the reader's bind never reached the host.
    assert (target / NAME).read_text() == VALUE
    assert not is_mounted(tmp_path / "ctr")
    metrics = node.metrics()
    assert "secretfs_takeovers_total 1.0" in metrics
