"""What csi writes to the Kubernetes API: SecretProviderClassPodStatus objects and Events.

End to end through ``secretfs node`` (daemon + csi), the test Kubernetes API server (the real
client library on the wire) and moto; the Event recorder's rate limit against the same server.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import trio
import yaml

import providers
from csi import events
from csi.kube import Kube
from csi.status import NODE_LABEL, Writer
from providers.base import AMBIENT, FetchError
from secretfs.spc import SECRET_OBJECTS
from secretfs.volumes import REFRESH_FAILED, SERVING_STALE, VALUE_DROPPED, Volumes
from tests.csi_node import ROLE_ANNOTATION, CsiNode, Pod, role_arn
from tests.fake_provider import FakeProvider
from tests.kube_server import KubeServer, kube_api  # noqa: F401
from tests.mounting import ROOT, needs_fuse, wait_for

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
    kube_api.add_service_account("default", "app", {ROLE_ANNOTATION: role_arn("app")})
    made: list[CsiNode] = []

    def make(ttl: float = 120.0, pair: bool = True) -> CsiNode:
        node = CsiNode(tmp_path, kube_api.kubeconfig(tmp_path / "kubeconfig"), ttl=ttl)
        made.append(node)
        if pair:
            node.start_pair()
        else:
            node.start_daemon()
            node.start_csi()
        return node

    try:
        yield make
    finally:
        for node in made:
            node.close()
            assert not node.our_mounts(), "mounts left behind"


def events_of(api: KubeServer, reason: str) -> list[dict[str, Any]]:
    return [e for e in list(api.events.values()) if e.get("reason") == reason]


@pytest.mark.fuse
@pytest.mark.slow
@needs_fuse
def test_pod_status_created_updated_deleted(
    make_node: Callable[..., CsiNode],
    kube_api: KubeServer,  # noqa: F811
    aws_env: dict[str, str],
) -> None:
    v1 = sm(aws_env).create_secret(Name=NAME, SecretString="v1-secret")["VersionId"]
    node = make_node(ttl=1.0)
    pod = Pod("app-0", "11111111-2222-3333-4444-555555555555")
    target = node.publish(pod)
    key = ("default", "app-0-default-aws-secrets")  # upstream's <pod>-<namespace>-<spc>
    assert wait_for(lambda: key in kube_api.pod_statuses, timeout=10), node.log("node")
    obj = kube_api.pod_statuses[key]
    assert obj["kind"] == "SecretProviderClassPodStatus"
    assert obj["metadata"]["labels"] == {NODE_LABEL: "node-1"}
    assert obj["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Pod", "name": "app-0", "uid": pod.uid}
    ]
    assert obj["status"] == {
        "podName": "app-0",
        "secretProviderClassName": "aws-secrets",
        "mounted": True,
        "targetPath": str(target),
        "objects": [{"id": NAME, "version": v1}],
    }
    # A rotation: the daemon reports the new version on the watch, csi updates the object.
    v2 = sm(aws_env).put_secret_value(SecretId=NAME, SecretString="v2-secret")["VersionId"]
    time.sleep(1.1)
    assert wait_for(lambda: (target / NAME).read_bytes() == b"v2-secret", timeout=10)
    assert wait_for(
        lambda: kube_api.pod_statuses[key]["status"]["objects"] == [{"id": NAME, "version": v2}],
        timeout=10,
    )
    node.unpublish(pod)
    assert wait_for(lambda: key not in kube_api.pod_statuses, timeout=10)
    methods = [m for m, path, _ in list(kube_api.writes) if "podstatuses" in path]
    assert methods == ["POST", "PATCH", "DELETE"]
    assert "v1-secret" not in repr(kube_api.writes)
    assert "v2-secret" not in repr(kube_api.writes)


@pytest.mark.fuse
@pytest.mark.slow
@needs_fuse
def test_pod_status_survives_a_csi_restart(
    make_node: Callable[..., CsiNode],
    kube_api: KubeServer,  # noqa: F811
    aws_env: dict[str, str],
) -> None:
    sm(aws_env).create_secret(Name=NAME, SecretString="v1-secret")
    node = make_node(pair=False)
    pod = Pod("app-0", "51111111-2222-3333-4444-555555555555")
    node.publish(pod)
    key = ("default", "app-0-default-aws-secrets")
    assert wait_for(lambda: key in kube_api.pod_statuses, timeout=10), node.logs()
    node.kill("csi")
    node.start_csi()
    node.publish(pod)  # the kubelet's republish: the new process tracks the volume again
    node.unpublish(pod)
    assert wait_for(lambda: key not in kube_api.pod_statuses, timeout=10), node.logs()


@pytest.mark.fuse
@pytest.mark.slow
@needs_fuse
def test_warning_event_when_the_backend_says_gone(
    make_node: Callable[..., CsiNode],
    kube_api: KubeServer,  # noqa: F811
    aws_env: dict[str, str],
) -> None:
    sm(aws_env).create_secret(Name=NAME, SecretString="v1-value-xyz")
    node = make_node(ttl=1.0)
    pod = Pod("app-0", "21111111-2222-3333-4444-555555555555")
    target = node.publish(pod)
    assert (target / NAME).read_bytes() == b"v1-value-xyz"
    sm(aws_env).delete_secret(SecretId=NAME, ForceDeleteWithoutRecovery=True)
    time.sleep(1.1)
    (target / NAME).read_bytes()  # stale: served, and a refresh starts
    assert wait_for(lambda: events_of(kube_api, "SecretValueDropped"), timeout=10), node.logs()
    event = events_of(kube_api, "SecretValueDropped")[0]
    assert event["type"] == "Warning"
    assert event["involvedObject"] == {
        "apiVersion": "v1",
        "kind": "Pod",
        "namespace": "default",
        "name": "app-0",
        "uid": pod.uid,
    }
    assert NAME in event["message"]
    assert event["count"] >= 1
    assert event["source"]["host"] == "node-1"
    assert "v1-value-xyz" not in repr(kube_api.writes)
    assert "header.payload.signature" not in repr(kube_api.writes)
    node.unpublish(pod)


@pytest.mark.fuse
@pytest.mark.slow
@needs_fuse
def test_secret_objects_warning_event(
    make_node: Callable[..., CsiNode],
    kube_api: KubeServer,  # noqa: F811
    aws_env: dict[str, str],
) -> None:
    sm(aws_env).create_secret(Name=NAME, SecretString="v1-secret")
    synced = {
        **SEED,
        "metadata": {"name": "synced"},
        "spec": {
            **SEED["spec"],
            "secretObjects": [
                {"secretName": "db", "type": "Opaque", "data": [{"objectName": NAME, "key": "pw"}]}
            ],
        },
    }
    kube_api.add_spc("default", synced)
    node = make_node()
    pod = Pod("app-0", "31111111-2222-3333-4444-555555555555")
    target = node.publish(pod, spc="synced")  # published all the same
    assert (target / NAME).read_bytes() == b"v1-secret"
    reason = events.SECRET_OBJECTS_NOT_SYNCED
    assert wait_for(lambda: len(events_of(kube_api, reason)) == 2, timeout=10), node.logs()
    kinds = {e["involvedObject"]["kind"]: e for e in events_of(kube_api, reason)}
    assert kinds["Pod"]["involvedObject"]["uid"] == pod.uid
    assert kinds["SecretProviderClass"]["involvedObject"]["name"] == "synced"
    assert all(SECRET_OBJECTS in e["message"] and e["type"] == "Warning" for e in kinds.values())
    assert SECRET_OBJECTS in node.logs()
    node.unpublish(pod)


@pytest.mark.fuse
@pytest.mark.slow
@needs_fuse
def test_api_errors_do_not_fail_a_publish(
    make_node: Callable[..., CsiNode],
    kube_api: KubeServer,  # noqa: F811
    aws_env: dict[str, str],
) -> None:
    sm(aws_env).create_secret(Name=NAME, SecretString="v1-secret")
    kube_api.fail_writes = 500
    node = make_node()
    pod = Pod("app-0", "41111111-2222-3333-4444-555555555555")
    target = node.publish(pod)
    assert (target / NAME).read_bytes() == b"v1-secret"
    assert wait_for(lambda: "HTTP 500" in node.logs(), timeout=10)
    assert not kube_api.pod_statuses
    # The API is back: the write is retried (backoff 1, 2 s ...).
    kube_api.fail_writes = None
    key = ("default", "app-0-default-aws-secrets")
    assert wait_for(lambda: key in kube_api.pod_statuses, timeout=10), node.logs()
    node.unpublish(pod)


def test_recorder_aggregates_and_rate_limits(
    tmp_path: Path,
    kube_api: KubeServer,  # noqa: F811
) -> None:
    kube = Kube(str(kube_api.kubeconfig(tmp_path / "kubeconfig")))
    writer = Writer()
    recorder = events.Recorder(kube, writer, "node-1", interval=1.0)
    pod = events.ref("Pod", "default", "p", "uid-1")
    for _ in range(5):
        recorder.record(pod, "SecretRefreshFailed", "refreshing 'x' failed: timeout")
    assert writer.idle(20)  # the client's first call is slow (imports) on a loaded machine
    time.sleep(0.2)  # inside the interval: folded into the next write
    recorder.record(pod, "SecretRefreshFailed", "refreshing 'x' failed: timeout")
    recorder.record(pod, "SecretRefreshFailed", "refreshing 'y' failed: timeout")
    assert wait_for(lambda: sum(e["count"] for e in kube_api.events.values()) == 7, timeout=15), (
        kube_api.events
    )
    posts = [w for w in kube_api.writes if w[0] == "POST"]
    patches = [w for w in kube_api.writes if w[0] == "PATCH"]
    # The first of each message creates its Event; the rest of the first one's count is one
    # patch; at most one write per object and reason per interval.
    assert (len(posts), len(patches), len(kube_api.writes)) == (2, 1, 3)


def test_check_warns_about_secret_objects(tmp_path: Path) -> None:
    doc = {
        **SEED,
        "spec": {
            "provider": "aws",
            "parameters": {**SEED["spec"]["parameters"], "region": "us-east-1"},
            "secretObjects": [{"secretName": "db", "type": "Opaque", "data": []}],
        },
    }
    path = tmp_path / "spc.yaml"
    path.write_text(yaml.safe_dump(doc))
    out = subprocess.run(
        [sys.executable, "-m", "secretfs", "check", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert f"warning: {SECRET_OBJECTS}" in out.stderr


# --- the daemon's reports (in process, fake provider) ----------------------------------------


class Reports:
    """Collects ``Volumes.on_event`` calls (on the trio thread)."""

    def __init__(self) -> None:
        self.got: list[tuple[str, dict[str, Any]]] = []
        self._arrived = trio.Event()

    def __call__(self, kind: str, payload: dict[str, Any]) -> None:
        self.got.append((kind, payload))
        self._arrived.set()

    async def next(self) -> tuple[str, dict[str, Any]]:
        with trio.fail_after(5):
            while not self.got:
                self._arrived = trio.Event()
                await self._arrived.wait()
        return self.got.pop(0)


async def test_volumes_report_versions_and_refresh_failures(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeProvider()
    monkeypatch.setitem(providers.REGISTRY, "fake", "tests.fake_provider:FakeProvider")
    monkeypatch.setitem(providers._instances, "fake", fake)
    fake.set("db", b"password-1")
    reports = Reports()
    async with trio.open_nursery() as n:
        vols = Volumes(ttl=0.2, max_stale=100)
        vols.on_event.append(reports)
        vols.start(n)
        plan = fake.parse({"objects": "- name: db\n  path: app/db\n"})
        vol = await vols.add("v", plan, AMBIENT, uid=0, gid=0)
        assert vols.versions(vol) == [{"id": "app/db", "version": "v1"}]
        fake.set("db", b"password-2")
        await vols.reload("v")
        assert reports.got == [
            ("versions", {"volume_id": "v", "objects": [{"id": "app/db", "version": "v2"}]})
        ]
        reports.got.clear()
        # An outage: the value is served stale (a read starts a refresh in the background).
        ino = vol.inodes["app/db"]
        fake.fail["db"] = FetchError("db", "connection refused", transient=True)
        await trio.sleep(0.25)
        assert (await vols.content(ino)).data == b"password-2"
        kind, event = await reports.next()
        assert (kind, event["reason"], event["type"]) == ("event", SERVING_STALE, "Warning")
        assert "connection refused" in event["message"] and "password" not in event["message"]
        # The backend says gone: the value is dropped (after the failure backoff, at most 1 s).
        fake.fail["db"] = FetchError("db", "not found", transient=False, code="NotFound")
        await trio.sleep(1.05)
        await vols.content(ino)
        kind, event = await reports.next()
        assert (event["volume_id"], event["reason"]) == ("v", VALUE_DROPPED)
        # Nothing to serve: a plain refresh failure (the reader gets the error).
        fake.fail["db"] = FetchError("db", "timed out", transient=True)
        with pytest.raises(FetchError):
            await vols.content(ino)
        assert (await reports.next())[1]["reason"] == REFRESH_FAILED
        n.cancel_scope.cancel()
