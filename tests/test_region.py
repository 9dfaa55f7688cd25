"""The AWS region from the node, as upstream: the ``region`` parameter, else AWS_REGION of the
daemon (the chart's daemon.awsRegion), else the node's ``topology.kubernetes.io/region`` label,
which csi reads once from its Node and passes in the ``add`` request (recorded, so a restarted
daemon plans the volume the same way). Offline ``secretfs check`` warns instead of failing.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import grpc
import pytest
import yaml

import providers
from csi import kube
from csi.publish import Node, Publish, needs_node_region
from providers.aws.params import AwsAuth
from providers.aws.provider import AwsProvider
from providers.base import OFFLINE, NodeInfo, ParameterError
from secretfs import spc as spc_mod
from secretfs.cli import main
from secretfs.daemon import record_request
from tests.csi_node import ROLE_ANNOTATION, CsiNode, Pod, role_arn
from tests.kube_server import KubeServer, kube_api  # noqa: F401
from tests.mounting import ROOT, needs_fuse, wait_for

LABEL = "topology.kubernetes.io/region"
SEED_PATH = ROOT / "examples" / "aws-seed.yaml"
SEED = yaml.safe_load(SEED_PATH.read_text())
NAME = "MyDatabasePassword"
OBJECTS = '- objectName: "a"\n  objectType: "secretsmanager"\n'
NODE = NodeInfo(name="node-1", region="eu-west-1")


@pytest.fixture
def no_region_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)


def region_of(params: dict[str, str], node: NodeInfo | None) -> str:
    spc = spc_mod.SecretProviderClass("c", "ns", "aws", {"objects": OBJECTS, **params})
    auth = spc_mod.plan(spc, node=node).auth
    assert isinstance(auth, AwsAuth)
    return auth.region


# --- precedence ------------------------------------------------------------------------------


def test_parameter_beats_environment_beats_node_label(
    no_region_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert region_of({}, NODE) == "eu-west-1"  # nothing else: the node's label
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ca-central-1")
    assert region_of({}, NODE) == "ca-central-1"
    monkeypatch.setenv("AWS_REGION", "us-east-2")  # the chart's daemon.awsRegion
    assert region_of({}, NODE) == "us-east-2"
    assert region_of({"region": "ap-south-1"}, NODE) == "ap-south-1"


def test_the_pods_attribute_replaces_the_parameter_and_beats_the_label(no_region_env: None) -> None:
    spc = spc_mod.load(SEED_PATH)
    plan = spc_mod.plan(spc, {"region": "sa-east-1"}, node=NODE)
    assert isinstance(plan.auth, AwsAuth) and plan.auth.region == "sa-east-1"
    # An empty attribute leaves it to the node, like an absent one.
    plan = spc_mod.plan(spc, {"region": ""}, node=NODE)
    assert isinstance(plan.auth, AwsAuth) and plan.auth.region == "eu-west-1"


def test_no_region_anywhere_says_where_it_can_come_from(no_region_env: None) -> None:
    node = NodeInfo(name="node-7", problem="the Node has no such label")
    with pytest.raises(ParameterError) as info:
        region_of({}, node)
    (p,) = info.value.problems
    assert p.field == "region"
    for part in ("parameter 'region'", f"label node node-7 with {LABEL}", "no such label"):
        assert part in p.message
    assert "daemon.awsRegion" in p.message and "AWS_REGION" in p.message
    # Standalone (no node): the environment or the parameter.
    with pytest.raises(ParameterError, match=r"set parameter 'region' \(or AWS_REGION"):
        region_of({}, None)


def test_a_bad_label_value_is_a_region_problem(no_region_env: None) -> None:
    with pytest.raises(ParameterError, match="not an AWS region name"):
        region_of({}, NodeInfo(name="n", region="Not A Region"))


def test_other_providers_never_see_the_node(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    seen = 0
    for f in sorted((ROOT / "examples").glob("*.yaml")):
        if "kind: SecretProviderClass" not in f.read_text():
            continue
        spc = spc_mod.load(f)
        if spc.provider == "aws":
            continue
        seen += 1
        assert spc_mod.plan(spc, node=NODE) == spc_mod.plan(spc)
        if spc.provider in providers.REGISTRY:  # built in: nothing to say offline
            assert spc_mod.plan(spc, node=OFFLINE).notes == ()
    assert seen == 4  # azure, gcp, vault, and the conjur example (an external provider)


def test_node_value_from_a_request() -> None:
    assert spc_mod.node_value(None) is None
    assert spc_mod.node_value("us-east-1") is None
    got = spc_mod.node_value({"name": "n1", "region": " eu-west-1 ", "other": "x"})
    assert got == NodeInfo(name="n1", region="eu-west-1")
    assert spc_mod.node_value({"problem": "p" * 1000}) == NodeInfo(problem="p" * 400)


def test_the_daemon_records_the_node_it_was_given() -> None:
    msg: dict[str, Any] = {"spc": {}, "attributes": {}, "identity": {}, "gid": 0}
    assert "node" not in record_request(msg)  # volumes that need none: records as before
    node = {"name": "node-1", "region": "eu-west-1"}
    assert record_request({**msg, "node": node})["node"] == node


# --- secretfs check ------------------------------------------------------------------------


def test_check_of_the_seed_warns_where_the_region_comes_from(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for env in (None, "us-east-1"):  # this machine's AWS_REGION says nothing about a node's
        if env is None:
            monkeypatch.delenv("AWS_REGION", raising=False)
            monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
        else:
            monkeypatch.setenv("AWS_REGION", env)
        assert main(["check", str(SEED_PATH)]) == 0
        out, err = capsys.readouterr()
        assert NAME in out and "provider aws" in out
        assert "warning: parameter 'region' is not set" in err
        assert f"node's label {LABEL}" in err and "AWS_REGION" in err
        assert "daemon.awsRegion" in err


def test_check_with_a_region_does_not_warn(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_region_env: None
) -> None:
    doc = {**SEED, "spec": {**SEED["spec"], "parameters": {**SEED["spec"]["parameters"]}}}
    doc["spec"]["parameters"]["region"] = "eu-west-1"
    (tmp_path / "spc.yaml").write_text(yaml.safe_dump(doc))
    assert main(["check", str(tmp_path / "spc.yaml")]) == 0
    assert "warning" not in capsys.readouterr().err


def test_check_offline_skips_the_arn_region_match(no_region_env: None) -> None:
    arn = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:db-AbCdEf"
    plan = AwsProvider().parse_on_node({"objects": f"- objectName: {arn}\n"}, 0o644, OFFLINE)
    assert [f.path for f in plan.files] == [arn.replace("/", "_")] and plan.notes


# --- csi: reading the label ----------------------------------------------------------------


def test_node_label_is_read_once(kube_api: KubeServer, tmp_path: Path) -> None:  # noqa: F811
    now = [0.0]
    k = kube.Kube(str(kube_api.kubeconfig(tmp_path / "kubeconfig")), clock=lambda: now[0])
    path = "/api/v1/nodes/node-1"
    with pytest.raises(kube.NotFound, match=r"Node node-1 not found.*--nodeid"):
        k.node_region("node-1")
    kube_api.add_node("node-1", {"kubernetes.io/os": "linux"})
    assert k.node_region("node-1") == ""  # a failure is retried at once
    assert k.node_region("node-1") == ""  # no label: stands for NO_LABEL_SECONDS
    assert kube_api.requests.count(path) == 2
    kube_api.add_node("node-1", {LABEL: "eu-west-1"})
    now[0] += kube.NO_LABEL_SECONDS
    assert k.node_region("node-1") == "eu-west-1"
    kube_api.fail_with = 500
    assert k.node_region("node-1") == "eu-west-1"  # kept for the life of the process
    assert kube_api.requests.count(path) == 3


def test_node_read_failure_is_a_kube_error_then_retried(
    kube_api: KubeServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    kube_api.add_node("node-1", {LABEL: "us-west-2"})
    k = kube.Kube(str(kube_api.kubeconfig(tmp_path / "kubeconfig")))
    kube_api.fail_with = 403
    with pytest.raises(kube.KubeError, match="cannot read Node node-1: forbidden"):
        k.node_region("node-1")
    kube_api.fail_with = None
    assert k.node_region("node-1") == "us-west-2"


def _spc(provider: str, **params: str) -> spc_mod.SecretProviderClass:
    return spc_mod.SecretProviderClass("c", "ns", provider, {"objects": OBJECTS, **params})


def test_which_volumes_need_the_node_region() -> None:
    assert needs_node_region(_spc("aws"), {})
    assert needs_node_region(_spc("aws", region=" "), {})
    assert needs_node_region(_spc("aws", region="eu-west-1"), {"region": ""})
    assert not needs_node_region(_spc("aws", region="eu-west-1"), {})
    assert not needs_node_region(_spc("aws"), {"region": "eu-west-1"})
    assert not needs_node_region(_spc("vault"), {})


class _Kube:
    def __init__(self, answer: str | kube.KubeError) -> None:
        self.answer = answer
        self.calls = 0

    def node_region(self, name: str) -> str:
        self.calls += 1
        if isinstance(self.answer, kube.KubeError):
            raise self.answer
        return self.answer


def _facts(
    answer: str | kube.KubeError, spc: spc_mod.SecretProviderClass, name: str = "node-1"
) -> Any:
    fake = _Kube(answer)
    node = Node(None, fake, "/nonexistent", keeper=object(), node_name=name)  # type: ignore[arg-type]
    req = Publish("v", "/t", "ns", "c", "p", "u", "sa", 0, {}, {}, {})
    return node._node_facts(spc, req), fake.calls


def test_what_csi_sends_the_daemon() -> None:
    assert _facts("eu-west-1", _spc("aws")) == (
        ({"name": "node-1", "region": "eu-west-1"}, False),
        1,
    )
    assert _facts("eu-west-1", _spc("aws", region="us-east-1")) == ((None, False), 0)
    assert _facts("eu-west-1", _spc("gcp")) == ((None, False), 0)
    (node, unread), _ = _facts("", _spc("aws"))
    assert node == {"name": "node-1", "problem": "the Node has no such label"} and not unread
    (node, unread), _ = _facts(kube.KubeError("cannot read Node node-1: HTTP 503"), _spc("aws"))
    assert unread and "region" not in node
    assert node["problem"] == "cannot read Node node-1: HTTP 503; tried again at the next publish"
    (node, unread), calls = _facts("eu-west-1", _spc("aws"), name="")
    assert "--nodeid" in node["problem"] and calls == 0


# --- end to end through the CSI pair ---------------------------------------------------------


def _generation(node: CsiNode) -> int:
    from secretfs import control

    status = control.Client(node.daemon_socket).status()
    return int(status["generation"]) if status.get("serving") else 0


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(e.decode(errors="replace").partition("=")[::2] for e in raw if e)


@pytest.fixture
def region_node(
    tmp_path: Path,
    kube_api: KubeServer,  # noqa: F811
    aws_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Callable[[], CsiNode]]:
    # No AWS_REGION anywhere: the processes inherit this environment.
    monkeypatch.delenv("AWS_REGION")
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    kube_api.add_spc("default", SEED)
    kube_api.add_service_account("default", "app", {ROLE_ANNOTATION: role_arn("app")})
    made: list[CsiNode] = []

    def make() -> CsiNode:
        node = CsiNode(tmp_path, kube_api.kubeconfig(tmp_path / "kubeconfig"))
        made.append(node)
        return node

    try:
        yield make
    finally:
        for node in made:
            node.close()
            assert not node.our_mounts(), "mounts left behind"


@needs_fuse
@pytest.mark.fuse
@pytest.mark.slow
def test_seed_publishes_with_the_node_label_region(
    region_node: Callable[[], CsiNode],
    kube_api: KubeServer,  # noqa: F811
    aws_env: dict[str, str],
) -> None:
    # The secret exists only in the node's region, not in the tests' usual us-east-1.
    boto3.client(
        "secretsmanager", region_name="eu-west-1", endpoint_url=aws_env["endpoint_url"]
    ).create_secret(Name=NAME, SecretString="from-eu-west-1")
    kube_api.add_node("node-1", {LABEL: "eu-west-1"})
    node = region_node()
    node.start_daemon()
    node.start_csi()
    for name in ("daemon", "csi"):
        env = _environ(node.procs[name].pid)
        assert not {"AWS_REGION", "AWS_DEFAULT_REGION"} & set(env), name
    first = node.publish(Pod("app-0", "e0000000-0000-0000-0000-000000000000"))
    assert (first / NAME).read_bytes() == b"from-eu-west-1"
    second = node.publish(Pod("app-1", "e1111111-0000-0000-0000-000000000000"))
    assert (second / NAME).read_bytes() == b"from-eu-west-1"
    node_gets = [p for p in kube_api.requests if p.startswith("/api/v1/nodes/")]
    assert node_gets == ["/api/v1/nodes/node-1"]  # read once
    # A new daemon generation rebuilds the volumes from the records, region included; it has no
    # values yet, so the read below fetches from eu-west-1 again.
    proc = node.procs.pop("daemon")
    proc.send_signal(signal.SIGKILL)
    proc.wait(15)
    node.start_daemon()
    assert wait_for(lambda: _generation(node) == 2, timeout=20)
    assert (first / NAME).read_bytes() == b"from-eu-west-1"
    assert [p for p in kube_api.requests if p.startswith("/api/v1/nodes/")] == node_gets
    node.unpublish(Pod("app-0", "e0000000-0000-0000-0000-000000000000"))
    node.unpublish(Pod("app-1", "e1111111-0000-0000-0000-000000000000"))


@needs_fuse
@pytest.mark.fuse
@pytest.mark.slow
def test_no_region_and_no_label_fails_publish_naming_the_label(
    region_node: Callable[[], CsiNode],
    kube_api: KubeServer,  # noqa: F811
) -> None:
    node = region_node()
    node.start_pair()
    pod = Pod("app-0", "f0000000-0000-0000-0000-000000000000")
    # No Node object to read: the region could not be looked up, retried at the next publish.
    with pytest.raises(grpc.RpcError) as info:
        node.publish(pod)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    details = str(info.value.details())
    assert LABEL in details and "Node node-1 not found" in details
    # The Node is there, without the label: the class or the operator must give a region.
    kube_api.add_node("node-1", {"kubernetes.io/os": "linux"})
    with pytest.raises(grpc.RpcError) as info:
        node.publish(pod)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = str(info.value.details())
    assert f"label node node-1 with {LABEL} (the Node has no such label)" in details
    assert "parameter 'region'" in details and "daemon.awsRegion" in details
    assert not node.target(pod).exists()
