"""CSI side without mounts: generated stubs, import boundaries, request validation and
redaction, mountinfo parsing, the control protocol, and the Kubernetes reads over real HTTP."""

from __future__ import annotations

import filecmp
import json
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2

from csi import kube, mounts
from csi.node import TOKENS_KEY, publish_request
from csi.pb import csi_pb2
from csi.server import CsiError, redact
from secretfs import control
from tests.kube_server import KubeServer, kube_api  # noqa: F401
from tests.mounting import ROOT, needs_sources


def _strip_json_names(msg: descriptor_pb2.DescriptorProto) -> None:
    for f in msg.field:
        f.ClearField("json_name")
    for nested in msg.nested_type:
        _strip_json_names(nested)


@needs_sources
def test_generated_stubs_match_the_proto(tmp_path: Path) -> None:
    # What the .proto describes is exactly what the committed stubs serve (any tool version).
    out = tmp_path / "set.pb"
    protoc = [sys.executable, "-m", "grpc_tools.protoc", "-Icsi/proto"]
    subprocess.run(
        [*protoc, f"--descriptor_set_out={out}", "csi/proto/csi.proto"], check=True, cwd=ROOT
    )
    want = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    for m in want.message_type:
        _strip_json_names(m)
    have = descriptor_pb2.FileDescriptorProto.FromString(csi_pb2.DESCRIPTOR.serialized_pb)
    assert have == want, "csi/proto/csi.proto changed: run scripts/gen_proto.sh and commit csi/gen"
    # With the grpcio-tools that generated them, regenerating gives the same files byte for byte.
    gen = ROOT / "csi/gen/csi_pb2_grpc.py"
    recorded = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", gen.read_text())
    if recorded is None or recorded.group(1) != version("grpcio-tools"):
        return
    subprocess.run([str(ROOT / "scripts/gen_proto.sh"), str(tmp_path)], check=True, cwd=ROOT)
    names = ["csi_pb2.py", "csi_pb2.pyi", "csi_pb2_grpc.py"]
    _, mismatch, errors = filecmp.cmpfiles(tmp_path, ROOT / "csi/gen", names, shallow=False)
    assert (mismatch, errors) == ([], []), "run scripts/gen_proto.sh and commit csi/gen"


def test_wire_names_and_field_numbers_are_the_specs() -> None:
    d = csi_pb2.DESCRIPTOR
    assert d.package == "csi.v1"
    node = d.services_by_name["Node"]
    assert node.methods_by_name["NodePublishVolume"].full_name == "csi.v1.Node.NodePublishVolume"
    fields = {f.name: f.number for f in csi_pb2.NodePublishVolumeRequest.DESCRIPTOR.fields}
    assert fields == {
        "volume_id": 1,
        "publish_context": 2,
        "staging_target_path": 3,
        "target_path": 4,
        "volume_capability": 5,
        "readonly": 6,
        "secrets": 7,
        "volume_context": 8,
    }
    mount = csi_pb2.VolumeCapability.MountVolume.DESCRIPTOR.fields_by_name
    assert mount["volume_mount_group"].number == 3
    assert csi_pb2.NodeServiceCapability.RPC.VOLUME_MOUNT_GROUP == 6


def test_csi_process_imports_no_fuse_and_no_provider_sdk() -> None:
    code = """
import sys
import csi.app, csi.node, csi.publish, csi.server, csi.kube, csi.mounts, csi.metrics
import secretfs.cli, secretfs.control, secretfs.spc
bad = ("pyfuse3", "trio", "boto3", "botocore", "hvac", "azure", "google.cloud", "msal",
       "providers.aws.provider", "providers.vault.provider", "providers.azure.provider",
       "providers.gcp.provider", "providers.plugin.provider", "secretfs.fs",
       "secretfs.volumes", "secretfs.daemon")
print([m for m in sys.modules if m in bad or m.startswith(tuple(b + "." for b in bad))])
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def request(**over: object) -> csi_pb2.NodePublishVolumeRequest:
    ctx = {
        "secretProviderClass": "spc",
        "csi.storage.k8s.io/pod.name": "p",
        "csi.storage.k8s.io/pod.namespace": "ns",
        "csi.storage.k8s.io/pod.uid": "u",
        "csi.storage.k8s.io/serviceAccount.name": "sa",
        TOKENS_KEY: json.dumps({"vault": {"token": "ctx-token", "expirationTimestamp": "x"}}),
        "region": "eu-west-1",
    }
    req = csi_pb2.NodePublishVolumeRequest(
        volume_id="csi-abc",
        target_path="/var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/v/mount",
        volume_capability=csi_pb2.VolumeCapability(
            mount=csi_pb2.VolumeCapability.MountVolume(volume_mount_group="2000")
        ),
        readonly=True,
        volume_context=ctx,
        secrets={"clientsecret": "s3cr3t"},
    )
    for k, v in over.items():
        setattr(req, k, v)
    return req


def test_publish_request_extracts_identity_and_attributes() -> None:
    p = publish_request(request())
    assert (p.namespace, p.service_account, p.spc_name, p.gid) == ("ns", "sa", "spc", 2000)
    assert p.tokens == {"vault": {"token": "ctx-token", "expirationTimestamp": "x"}}
    assert TOKENS_KEY not in p.attributes and p.attributes["region"] == "eu-west-1"
    assert p.secrets == {"clientsecret": "s3cr3t"}
    assert "ctx-token" not in repr(p) and "s3cr3t" not in repr(p)
    # Kubernetes 1.35+: tokens in secrets win, and do not stay among the secrets.
    req = request()
    req.secrets[TOKENS_KEY] = json.dumps({"aud": {"token": "sec-token"}})
    p = publish_request(req)
    assert list(p.tokens) == ["aud"] and TOKENS_KEY not in p.secrets


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        ({"volume_id": ""}, "volume_id is missing"),
        ({"target_path": ""}, "target_path is missing"),
        ({"readonly": False}, "readOnly: true"),
        ({"target_path": "relative/path"}, "absolute"),
        ({"volume_id": "a/b"}, "not usable"),
        ({"volume_id": "x" * 1_000_000}, "not usable"),
        # Only the kubelet's pods directory, after normalisation.
        ({"target_path": "/etc/secretfs"}, "not inside the kubelet's pods directory"),
        ({"target_path": "/var/lib/kubelet/pods/../../../etc"}, "not inside"),
        ({"target_path": "/var/lib/kubelet/podsX/u/mount"}, "not inside"),
        ({"target_path": "/" + "\U000e0001" * 300}, "not inside"),  # escapes stay bounded
    ],
)
def test_publish_request_validation(over: dict[str, object], needle: str) -> None:
    with pytest.raises(CsiError) as info:
        publish_request(request(**over))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in info.value.message
    assert len(info.value.message) < 500  # never echoes a huge value whole


@pytest.mark.parametrize(
    ("ctx", "group", "needle"),
    [
        ({}, "\u00b2", "not a numeric group id"),  # str.isdigit accepts "²", int() does not
        ({}, "-1", "not a numeric group id"),
        ({}, "9" * 4301, "not a numeric group id"),  # int() refuses more than 4300 digits
        ({"secretProviderClass": "x" * 1_000_000}, "", "too large"),
        ({"secretProviderClass": "Bad\nName"}, "", "not a Kubernetes name"),
        ({"secretProviderClass": "a" * 300}, "", "not a Kubernetes name"),
        ({"csi.storage.k8s.io/pod.namespace": "ns\u0000"}, "", "not a Kubernetes name"),
        ({TOKENS_KEY: "[" * 100_000}, "", "larger than"),
        ({TOKENS_KEY: "[" * 30_000}, "", "not valid JSON"),  # nesting: RecursionError
        ({TOKENS_KEY: "1"}, "", "not a map of audience to token"),
    ],
)
def test_publish_request_bounds(ctx: dict[str, str], group: str, needle: str) -> None:
    req = request()
    req.volume_context.update(ctx)
    req.volume_capability.mount.volume_mount_group = group
    with pytest.raises(CsiError) as info:
        publish_request(req)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in info.value.message
    assert len(info.value.message) < 500 and "\n" not in info.value.message
    assert "\x00" not in info.value.message


def test_publish_request_honours_the_kubelet_root() -> None:
    req = request(target_path="/opt/k/pods/u/volumes/kubernetes.io~csi/v/mount")
    assert publish_request(req, "/opt/k/").target == req.target_path
    with pytest.raises(CsiError):
        publish_request(req)  # not under the default /var/lib/kubelet


def test_request_log_line_quotes_and_cuts_ids() -> None:
    from csi.server import _brief

    line = _brief(request(volume_id="a\x00b\nc" + "x" * 10_000))
    assert "\x00" not in line and "\n" not in line and len(line) < 1000
    assert "\\x00" in line and "10005 characters" in line


def test_request_log_redaction() -> None:
    req = request()
    req.secrets[TOKENS_KEY] = "in-secrets-token"
    text = json.dumps(redact(req))
    for secret in ("ctx-token", "s3cr3t", "in-secrets-token"):
        assert secret not in text
    assert "***stripped***" in text and "csi-abc" in text


def test_mountinfo_parsing() -> None:
    text = (
        "36 35 98:0 /mnt1 /mnt/parent\\040dir rw,noatime master:1 - ext3 /dev/root rw\n"
        "40 36 0:52 / /run/sfs/root ro,nosuid,nodev - fuse.secretfs secretfs ro,user_id=0\n"
        "41 22 0:52 /csi-abc /pods/u/mount ro,nosuid,nodev shared:5 - fuse.secretfs secretfs ro\n"
    )
    ms = mounts.parse_mountinfo(text)
    assert ms[0].mountpoint == "/mnt/parent dir" and ms[0].fstype == "ext3"
    root = mounts.node_root(ms, "/run/sfs/root")
    assert root is not None and root.device == "0:52"
    assert mounts.volume_of(mounts.at(ms, "/pods/u/mount"), root) == "csi-abc"
    assert mounts.volume_of(ms[0], root) is None


def test_control_frames_and_volume_ids() -> None:
    frame = control.encode({"op": "status", "x": "é"})
    reader = control.FrameReader()
    reader.feed(frame[:3])
    assert reader.frame() is None
    reader.feed(frame[3:])
    assert reader.frame() == {"op": "status", "x": "é"}
    assert control.check_volume_id("csi-" + "a" * 64) is None
    for bad in ("", "..", "a/b", "x" * 129, "a b"):
        assert control.check_volume_id(bad) is not None
    with pytest.raises(control.ControlError) as info:
        control.Client("/nonexistent/daemon.sock").status()
    assert info.value.code == control.UNAVAILABLE


def test_kubernetes_reads(kube_api: KubeServer, tmp_path: Path) -> None:  # noqa: F811
    kube_api.add_spc(
        "team", {"metadata": {"name": "db"}, "spec": {"provider": "aws", "parameters": {"a": "b"}}}
    )
    kube_api.add_service_account("team", "app", {"eks.amazonaws.com/role-arn": "arn:x"})
    kube_api.add_service_account("team", "plain")
    k = kube.Kube(str(kube_api.kubeconfig(tmp_path / "kubeconfig")))
    obj = k.secret_provider_class("team", "db")
    assert obj["spec"]["provider"] == "aws" and obj["metadata"]["namespace"] == "team"
    with pytest.raises(kube.NotFound, match="SecretProviderClass other/db not found"):
        k.secret_provider_class("other", "db")
    assert k.service_account_annotations("team", "app") == {"eks.amazonaws.com/role-arn": "arn:x"}
    assert k.service_account_annotations("team", "plain") == {}
    assert k.service_account_annotations("team", "ghost") == {}
    kube_api.fail_with = 403
    with pytest.raises(kube.KubeError, match="forbidden"):
        k.secret_provider_class("team", "db")
    assert "/apis/secrets-store.csi.x-k8s.io/v1/namespaces/team/secretproviderclasses/db" in (
        kube_api.requests
    )
