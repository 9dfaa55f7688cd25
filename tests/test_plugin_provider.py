"""External providers through upstream's provider plugin API (providers/plugin/).

Against :mod:`tests.plugin_server` (the real proto over a real unix socket): the generated stubs,
what a Mount request carries, versions, error classes, the missing-socket and legacy-provider
messages, provider names, bounds on answers, reconnecting; then the daemon's volumes (one Mount per
fetch of the whole volume) and a real standalone ``secretfs mount`` with a rotation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import filecmp
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio
import trio.testing
from google.protobuf import descriptor_pb2

from csi.keeper import Connection as KeeperConnection
from csi.keeper import Keeper
from providers import plugin
from providers.base import AMBIENT, Fetched, FetchError, Identity, ParameterError, Token
from providers.limits import MAX_FILES
from providers.plugin.pb import service_pb2
from providers.plugin.provider import LEGACY, TOKENS_KEY, PluginProvider
from secretfs import control
from secretfs import spc as spc_mod
from secretfs.daemon import Daemon, DaemonOptions, classify, serve
from secretfs.volumes import VolumeError, Volumes
from tests.csi_node import CsiNode
from tests.csi_node import Pod as CsiPod
from tests.kube_server import KubeServer, kube_api  # noqa: F401
from tests.mounting import (
    ROOT,
    MountFailed,
    is_mounted,
    mounted,
    needs_fuse,
    needs_sources,
    wait_for,
)
from tests.plugin_server import MockProvider, serve_mock, serving

NAME = "e2e-provider"
TOKEN = "eyJhbGciOiJSUzI1NiJ9.pod-token.signature"
PASSWORD = "s3cr3t-client-secret"


@pytest.fixture
def sockets() -> Iterator[Path]:
    """A short directory for sockets (a unix socket path has at most 107 bytes), configured as
    the only providers directory for the test."""
    d = Path(tempfile.mkdtemp(prefix="sfsp", dir="/tmp"))
    before = plugin.current()
    plugin.configure(dirs=[str(d)], timeout=5.0)
    try:
        yield d
    finally:
        plugin.configure(dirs=before.dirs, max_recv=before.max_recv, timeout=before.timeout)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def mock(sockets: Path) -> Iterator[MockProvider]:
    with serving(sockets, NAME) as m:
        m.set("foo", b"secret", "v1")
        m.set("dir/fookey", b"-----BEGIN PUBLIC KEY-----\n", "v1", mode=0o640)
        yield m


def pod(**kw: Any) -> Identity:
    return Identity(
        namespace="default",
        service_account="app",
        pod_name="app-0",
        pod_uid="uid-1",
        tokens={"api": Token(TOKEN, "2099-01-01T00:00:00Z")},
        secrets={"clientid": "id-1", "clientsecret": PASSWORD},
        **kw,
    )


PARAMS = {
    "objects": "- name: foo\n",
    "secretProviderClass": "app-secrets",
    "csi.storage.k8s.io/pod.name": "app-0",
    "csi.storage.k8s.io/pod.namespace": "default",
}


def fetch_error(call: Callable[[], object]) -> FetchError:
    with pytest.raises(FetchError) as info:
        call()
    return info.value


# --- the proto and its stubs ---------------------------------------------------------------------


def _strip_json_names(msg: descriptor_pb2.DescriptorProto) -> None:
    for f in msg.field:
        f.ClearField("json_name")


@needs_sources
def test_generated_stubs_match_the_proto(tmp_path: Path) -> None:
    # What upstream's .proto describes is exactly what the committed stubs speak.
    out = tmp_path / "set.pb"
    protoc = [sys.executable, "-m", "grpc_tools.protoc", "-Iproviders/plugin/proto"]
    proto = "providers/plugin/proto/provider/v1alpha1/service.proto"
    subprocess.run([*protoc, f"--descriptor_set_out={out}", proto], check=True, cwd=ROOT)
    want = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    for m in want.message_type:
        _strip_json_names(m)
    have = descriptor_pb2.FileDescriptorProto.FromString(service_pb2.DESCRIPTOR.serialized_pb)
    assert have == want, "the .proto changed: run scripts/gen_provider_proto.sh"
    gen = ROOT / "providers/plugin/gen/service_pb2_grpc.py"
    recorded = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", gen.read_text())
    if recorded is None or recorded.group(1) != version("grpcio-tools"):
        return
    subprocess.run(
        [str(ROOT / "scripts/gen_provider_proto.sh"), str(tmp_path)], check=True, cwd=ROOT
    )
    names = ["service_pb2.py", "service_pb2.pyi", "service_pb2_grpc.py"]
    _, mismatch, errors = filecmp.cmpfiles(tmp_path, gen.parent, names, shallow=False)
    assert (mismatch, errors) == ([], []), "run scripts/gen_provider_proto.sh"


def test_wire_names_and_field_numbers_are_upstreams() -> None:
    d = service_pb2.DESCRIPTOR
    assert (d.name, d.package) == ("provider/v1alpha1/service.proto", "v1alpha1")
    svc = d.services_by_name["CSIDriverProvider"]
    assert svc.full_name == "v1alpha1.CSIDriverProvider"
    assert sorted(svc.methods_by_name) == ["Mount", "Version"]
    fields = {f.name: f.number for f in service_pb2.MountRequest.DESCRIPTOR.fields}
    assert fields == {
        "attributes": 1,
        "secrets": 2,
        "target_path": 3,
        "permission": 4,
        "current_object_version": 5,
    }
    fields = {f.name: f.number for f in service_pb2.MountResponse.DESCRIPTOR.fields}
    assert fields == {"object_version": 1, "error": 2, "files": 3}
    fields = {f.name: f.number for f in service_pb2.File.DESCRIPTOR.fields}
    assert fields == {"path": 1, "mode": 2, "contents": 3}


@needs_sources
def test_the_license_header_of_the_proto_is_kept() -> None:
    text = (ROOT / "providers/plugin/proto/provider/v1alpha1/service.proto").read_text()
    assert "Copyright 2020 The Kubernetes Authors." in text
    assert "Licensed under the Apache License, Version 2.0" in text


# --- names and plans -----------------------------------------------------------------------------


def spc(provider: str) -> spc_mod.SecretProviderClass:
    return spc_mod.SecretProviderClass("c", "default", provider, {"a": "b"})


@pytest.mark.parametrize("name", ["bad/name", "a" * 31, "dots.no", "new\nline", "ü"])
def test_a_name_upstream_would_refuse_is_refused(name: str) -> None:
    with pytest.raises(ParameterError, match=r"must match \^\[a-zA-Z0-9_-\]\{0,30\}\$"):
        spc_mod.plan(spc(name))


def test_any_other_name_is_an_external_provider_planned_at_mount(sockets: Path) -> None:
    plan = spc_mod.plan(spc("akeyless"), {"csi.storage.k8s.io/pod.uid": "u"})
    assert plan.provider == "akeyless" and plan.files == ()
    assert plan.notes == (
        "the files are what the akeyless provider returns when the volume is mounted "
        f"(its socket akeyless.sock in {sockets})",
    )
    # Parameters (with the volume attributes over them) decide what may be shared.
    assert plan.auth == spc_mod.plan(spc("akeyless"), {"csi.storage.k8s.io/pod.uid": "u"}).auth
    assert plan.auth != spc_mod.plan(spc("akeyless"), {"csi.storage.k8s.io/pod.uid": "v"}).auth


# --- what a Mount request carries ----------------------------------------------------------------


def test_mount_sends_what_upstream_sends(mock: MockProvider) -> None:
    provider = PluginProvider(NAME)
    plan = provider.parse(PARAMS)
    expanded, values = provider.expand_sync(plan, pod(), "/var/lib/kubelet/pods/uid-1/mnt")
    [req] = mock.requests
    attributes = json.loads(req.attributes)
    tokens = attributes.pop("csi.storage.k8s.io/serviceAccount.tokens")
    assert attributes == PARAMS
    assert json.loads(tokens) == {
        "api": {"token": TOKEN, "expirationTimestamp": "2099-01-01T00:00:00Z"}
    }
    assert json.loads(req.secrets) == {"clientid": "id-1", "clientsecret": PASSWORD}
    assert req.target_path == "/var/lib/kubelet/pods/uid-1/mnt"
    assert req.permission == "420"  # json of 0o644, as upstream
    assert list(req.current_object_version) == []
    assert mock.version_calls == 1
    # The files are the answer's, with its modes.
    assert [(f.path, f.mode) for f in expanded.files] == [("dir/fookey", 0o640), ("foo", 0o644)]
    assert values == {
        "foo": Fetched(b"secret", "v1"),
        "dir/fookey": Fetched(b"-----BEGIN PUBLIC KEY-----\n", "v1"),
    }


def test_standalone_sends_no_tokens_and_empty_secrets(mock: MockProvider) -> None:
    provider = PluginProvider(NAME)
    provider.expand_sync(provider.parse({"a": "b"}, default_mode=0o600), AMBIENT, "/mnt/x")
    [req] = mock.requests
    assert json.loads(req.attributes) == {"a": "b"}
    assert (req.secrets, req.permission) == ("{}", "384")


def test_versions_come_from_object_version_and_are_sent_back(mock: MockProvider) -> None:
    provider = PluginProvider(NAME)
    plan, values = provider.expand_sync(provider.parse(PARAMS), pod(), "/t")
    assert {p: v.version for p, v in values.items()} == {"foo": "v1", "dir/fookey": "v1"}
    mock.set("foo", b"rotated", "v2")
    result = provider.fetch_sync(plan, pod(), ["foo", "dir/fookey"])
    assert result == {
        "foo": Fetched(b"rotated", "v2"),
        "dir/fookey": Fetched(b"-----BEGIN PUBLIC KEY-----\n", "v1"),
    }
    # The second call told the provider what the first one returned (pre-1.6 upstream did).
    sent = {(o.id, o.version) for o in mock.requests[1].current_object_version}
    assert sent == {("foo", "v1"), ("dir/fookey", "v1")}
    assert mock.version_calls == 1  # one connection, greeted once


def test_a_file_without_its_own_object_gets_a_version_of_all_objects(mock: MockProvider) -> None:
    provider = PluginProvider(NAME)
    mock.versions = {"secret/a": "3", "secret/b": "7"}
    _, values = provider.expand_sync(provider.parse(PARAMS), pod(), "/t")
    first = values["foo"].version
    assert first.startswith("objects-") and values["dir/fookey"].version == first
    mock.versions["secret/b"] = "8"
    _, values = provider.expand_sync(provider.parse(PARAMS), pod(), "/t")
    assert values["foo"].version not in (first, "")
    mock.versions = {"secret/only": "42"}
    _, values = provider.expand_sync(provider.parse(PARAMS), pod(), "/t")
    assert values["foo"].version == "42"


def test_a_file_the_provider_stops_returning_is_gone(mock: MockProvider) -> None:
    provider = PluginProvider(NAME)
    plan, _ = provider.expand_sync(provider.parse(PARAMS), pod(), "/t")
    del mock.files["dir/fookey"]
    result = provider.fetch_sync(plan, pod(), ["foo", "dir/fookey"])
    err = result["dir/fookey"]
    assert isinstance(err, FetchError) and not err.transient and err.code == "NotFound"
    assert str(err) == "object 'dir/fookey': the e2e-provider provider no longer returns this file"


# --- errors --------------------------------------------------------------------------------------


def test_a_missing_socket_says_where_it_looked(sockets: Path) -> None:
    other = "/nonexistent/providers"
    plugin.configure(dirs=[str(sockets), other])
    provider = PluginProvider("conjur")
    err = fetch_error(lambda: provider.expand_sync(provider.parse(PARAMS), pod(), "/t"))
    assert str(err) == (
        f"object 'conjur': no provider conjur: no socket at {sockets}/conjur.sock (looked in "
        f"{sockets}, {other}); is its DaemonSet running?"
    )
    assert err.transient and err.code == "NoProviderSocket"


def test_the_second_directory_is_used_when_the_first_has_no_socket(sockets: Path) -> None:
    plugin.configure(dirs=["/nonexistent/providers", str(sockets)])
    with serving(sockets, "conjur") as m:
        m.set("x", b"1", "v1")
        provider = PluginProvider("conjur")
        _, values = provider.expand_sync(provider.parse(PARAMS), AMBIENT, "/t")
        assert values == {"x": Fetched(b"1", "v1")}


@pytest.mark.parametrize(
    ("status", "code", "transient"),
    [
        (grpc.StatusCode.UNAVAILABLE, "Unavailable", True),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "Timeout", True),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "Throttled", True),
        (grpc.StatusCode.INTERNAL, "ProviderFailed", True),
        (grpc.StatusCode.UNKNOWN, "ProviderFailed", True),
        (grpc.StatusCode.NOT_FOUND, "NotFound", False),
        (grpc.StatusCode.PERMISSION_DENIED, "PermissionDenied", False),
        (grpc.StatusCode.UNAUTHENTICATED, "PermissionDenied", False),
        (grpc.StatusCode.INVALID_ARGUMENT, "BadRequest", False),
        (grpc.StatusCode.FAILED_PRECONDITION, "BadRequest", False),
        (grpc.StatusCode.UNIMPLEMENTED, "Unimplemented", False),
    ],
)
def test_grpc_status_codes_map_to_the_error_classes(
    mock: MockProvider, status: grpc.StatusCode, code: str, transient: bool
) -> None:
    mock.fail = (status, "secret/foo: the backend said no")
    provider = PluginProvider(NAME)
    err = fetch_error(lambda: provider.expand_sync(provider.parse(PARAMS), pod(), "/t"))
    assert (err.code, err.transient) == (code, transient)
    assert str(err) == (
        f"object '{NAME}': provider {NAME} ({mock_socket(mock)}) failed Mount: {status.name}: "
        "'secret/foo: the backend said no'"
    )


def mock_socket(mock: MockProvider) -> str:
    return f"{plugin.current().dirs[0]}/{mock.name}.sock"


def test_publish_answers_follow_the_error_class(mock: MockProvider) -> None:
    # What csi answers the kubelet (secretfs/daemon.classify) for each class.
    cases = {
        grpc.StatusCode.UNAVAILABLE: "UNAVAILABLE",
        grpc.StatusCode.PERMISSION_DENIED: "PERMISSION_DENIED",
        grpc.StatusCode.NOT_FOUND: "FAILED_PRECONDITION",
    }
    provider = PluginProvider(NAME)
    for status, answer in cases.items():
        mock.fail = (status, "no")
        err = fetch_error(lambda: provider.expand_sync(provider.parse(PARAMS), pod(), "/t"))
        assert classify(VolumeError(str(err), [err])) == answer


def test_a_slow_provider_times_out(mock: MockProvider, sockets: Path) -> None:
    plugin.configure(timeout=0.2)
    mock.gate = gate = threading.Event()
    try:
        provider = PluginProvider(NAME)
        err = fetch_error(lambda: provider.expand_sync(provider.parse(PARAMS), pod(), "/t"))
    finally:
        gate.set()
    assert (err.code, err.transient) == ("Timeout", True)
    assert "did not answer Mount within 0.2 s (--provider-timeout)" in str(err)


@pytest.mark.parametrize(
    ("answer_code", "code", "transient"),
    [
        ("SecretNotFound", "NotFound", False),
        ("secret_not_found", "NotFound", False),
        ("AccessDenied", "PermissionDenied", False),
        ("Unauthorized", "PermissionDenied", False),
        ("InvalidParameters", "BadRequest", False),
        ("GRPCProviderError", "ProviderError", True),
    ],
)
def test_an_error_code_in_the_answer_maps_too(
    mock: MockProvider, answer_code: str, code: str, transient: bool
) -> None:
    mock.error_code = answer_code
    provider = PluginProvider(NAME)
    err = fetch_error(lambda: provider.expand_sync(provider.parse(PARAMS), pod(), "/t"))
    assert (err.code, err.transient) == (code, transient)
    assert f"answered Mount with error code {answer_code!r}" in str(err)


def test_a_legacy_provider_is_refused_naming_the_requirement(mock: MockProvider) -> None:
    mock.legacy = True  # versions, no files: it would have written into the target path
    provider = PluginProvider(NAME)
    err = fetch_error(lambda: provider.expand_sync(provider.parse(PARAMS), pod(), "/t"))
    assert (err.code, err.transient) == ("LegacyProvider", False)
    assert str(err) == f"object '{NAME}': the {NAME} provider {LEGACY}"
    assert "never lets a provider write to disk" in str(err)
    assert "driverWritesSecrets: true" in str(err)


def test_details_never_carry_the_tokens_or_secret_data_sent(mock: MockProvider) -> None:
    mock.fail = (grpc.StatusCode.PERMISSION_DENIED, f"login with {TOKEN} and {PASSWORD} failed")
    provider = PluginProvider(NAME)
    err = fetch_error(lambda: provider.expand_sync(provider.parse(PARAMS), pod(), "/t"))
    assert TOKEN not in str(err) and PASSWORD not in str(err)
    assert "'login with <redacted> and <redacted> failed'" in str(err)


def test_a_detail_quoting_a_short_secret_is_withheld(mock: MockProvider) -> None:
    mock.fail = (grpc.StatusCode.PERMISSION_DENIED, "pin 42x rejected")
    provider = PluginProvider(NAME)
    ident = dataclasses.replace(pod(), secrets={"pin": "42x"})
    err = fetch_error(lambda: provider.expand_sync(provider.parse(PARAMS), ident, "/t"))
    assert "42x" not in str(err)
    assert str(err).endswith(
        "failed Mount: PERMISSION_DENIED: (detail withheld: it may quote data sent to the provider)"
    )


def test_check_says_where_the_files_of_an_external_provider_come_from(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from secretfs.cli import main

    assert main(["check", str(ROOT / "examples/conjur-spc.yaml")]) == 0
    out, err = capsys.readouterr()
    assert "provider conjur, 0 file(s)" in out
    assert (
        "warning: the files are what the conjur provider returns when the volume is mounted "
        "(its socket conjur.sock in " in err
    )


def test_an_answer_over_the_receive_limit_is_a_clear_permanent_error(
    mock: MockProvider,
) -> None:
    plugin.configure(max_recv=64 * 1024)
    mock.set("big", b"x" * (100 * 1024), "v1")
    provider = PluginProvider(NAME)
    err = fetch_error(lambda: provider.expand_sync(provider.parse(PARAMS), pod(), "/t"))
    assert (err.code, err.transient) == ("ResponseTooLarge", False)
    assert "more than 65536 bytes; raise --max-call-recv-msg-size" in str(err)


@pytest.mark.parametrize(
    ("path", "mode", "problem"),
    [
        ("../etc/passwd", 0o644, "must not contain a '..' element"),
        ("/etc/passwd", 0o644, "must be relative"),
        ("a/../../b", 0o644, "must not contain a '..' element"),
        ("..hidden", 0o644, "must not start with '..'"),
        ("a//b", 0o644, "has an empty or '.' element"),
        ("new\nline", 0o644, "contains a control character"),
        ("x" * 300, 0o644, "a path element is longer than 255 bytes"),
        ("ok", 0o1777, "mode 1023 is outside 0-511"),
        ("ok", -1, "mode -1 is outside 0-511"),
    ],
)
def test_unsafe_files_in_an_answer_are_refused(
    mock: MockProvider, path: str, mode: int, problem: str
) -> None:
    mock.set(path, b"x", "v1", mode=mode)
    provider = PluginProvider(NAME)
    err = fetch_error(lambda: provider.expand_sync(provider.parse(PARAMS), pod(), "/t"))
    assert (err.code, err.transient) == ("BadResponse", False)
    assert problem in str(err)


def test_a_file_and_a_directory_of_the_same_name_are_refused(mock: MockProvider) -> None:
    mock.set("foo/bar", b"x", "v1")  # "foo" is a file already
    provider = PluginProvider(NAME)
    err = fetch_error(lambda: provider.expand_sync(provider.parse(PARAMS), pod(), "/t"))
    assert err.code == "BadResponse" and "needs directory 'foo'" in str(err)


def test_too_many_files_and_no_versions_are_refused(mock: MockProvider) -> None:
    provider = PluginProvider(NAME)
    mock.versions = {}
    err = fetch_error(lambda: provider.expand_sync(provider.parse(PARAMS), pod(), "/t"))
    assert "returned files but no object versions" in str(err)
    mock.files = {f"f{i}": (b"", 0o644) for i in range(MAX_FILES + 1)}
    mock.versions = {"all": "1"}
    err = fetch_error(lambda: provider.expand_sync(provider.parse(PARAMS), pod(), "/t"))
    assert (err.code, str(err)) == (
        "TooManyFiles",
        f"object '{NAME}': the {NAME} provider returned {MAX_FILES + 1} files; at most "
        f"{MAX_FILES} per volume",
    )


def test_a_restarted_provider_is_greeted_again(sockets: Path) -> None:
    provider = PluginProvider(NAME)
    first = MockProvider(NAME)
    first.set("foo", b"1", "v1")
    with serve_mock(first, sockets / f"{NAME}.sock"):
        plan, _ = provider.expand_sync(provider.parse(PARAMS), AMBIENT, "/t")
        provider.fetch_sync(plan, AMBIENT, ["foo"])
        assert (first.version_calls, len(first.requests)) == (1, 2)
    err = fetch_error(lambda: provider.fetch_sync(plan, AMBIENT, ["foo"]))
    assert (err.code, err.transient) == ("NoProviderSocket", True)
    second = MockProvider(NAME)
    second.set("foo", b"2", "v2")
    with serve_mock(second, sockets / f"{NAME}.sock"):
        assert provider.fetch_sync(plan, AMBIENT, ["foo"]) == {"foo": Fetched(b"2", "v2")}
        assert (second.version_calls, len(second.requests)) == (1, 1)


# --- the daemon's volumes ------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running(**kw: Any) -> AsyncIterator[Volumes]:
    async with trio.open_nursery() as n:
        vols = Volumes(**{"ttl": 10, "max_stale": 100, **kw})
        vols.start(n)
        yield vols
        n.cancel_scope.cancel()


async def test_a_volume_is_one_mount_call_per_fetch_of_all_its_files(
    mock: MockProvider, mock_clock: trio.testing.MockClock
) -> None:
    mock_clock.rate = 1.0  # provider calls run in worker threads, in real time
    plan = spc_mod.plan(spc_mod.SecretProviderClass("c", "default", NAME, PARAMS))
    async with running() as vols:
        vol = await vols.add("v", plan, pod(), uid=0, gid=0, target="/pods/uid-1/mnt")
        assert len(mock.requests) == 1  # the files and their values: one call
        assert sorted(vol.inodes) == ["", "dir", "dir/fookey", "foo"]
        assert (await vols.content(vol.inodes["foo"])).data == b"secret"
        assert vols.versions(vol) == [
            {"id": "dir/fookey", "version": "v1"},
            {"id": "foo", "version": "v1"},
        ]
        mock.set("foo", b"rotated", "v2")
        assert await vols.reload("v") == {"fetched": 2, "changed": 1, "failed": 0}
        assert len(mock.requests) == 2  # both files: one call
        assert (await vols.content(vol.inodes["foo"])).data == b"rotated"
        assert mock.requests[1].target_path == "/pods/uid-1/mnt"
        # Tokens renewed by a republish are what the next call sends; a refusal then is
        # permanent: the values are dropped, not served until --max-stale.
        renewed = dataclasses.replace(pod(), tokens={"api": Token("renewed.token.sig")})
        vols.refresh_identity("v", renewed)
        mock.fail = (grpc.StatusCode.PERMISSION_DENIED, "revoked")
        mock_clock.jump(6)  # past the coalescing of on-demand reloads
        assert await vols.reload("v") == {"fetched": 0, "changed": 0, "failed": 2}
        tokens = json.loads(json.loads(mock.requests[2].attributes)[TOKENS_KEY])
        assert tokens == {"api": {"token": "renewed.token.sig"}}
        assert vols.cache.stale(vol.keys[vol.plan.files[0]]) is None
        await vols.remove("v")


async def test_a_failed_publish_names_the_provider_and_the_cause(sockets: Path) -> None:
    plan = spc_mod.plan(spc_mod.SecretProviderClass("c", "default", "nothere", PARAMS))
    async with running() as vols:
        with pytest.raises(VolumeError) as info:
            await vols.add("v", plan, pod(), uid=0, gid=0)
        assert "no provider nothere: no socket at" in str(info.value)
        assert classify(info.value) == "UNAVAILABLE"
        assert vols.volumes == {}


async def test_a_restored_volume_is_rebuilt_from_its_recorded_files(mock: MockProvider) -> None:
    plan = spc_mod.plan(spc_mod.SecretProviderClass("c", "default", NAME, PARAMS))
    async with running() as vols:
        vol = await vols.add("v", plan, pod(), uid=0, gid=0, target="/t")
        files = [[f.path, f.mode] for f in vol.plan.files]
        inodes = dict(vol.inodes)
    async with running() as vols:
        vol = await vols.add(
            "v", plan, pod(), uid=0, gid=0, restore=inodes, files=files, target="/t"
        )
        assert len(mock.requests) == 1  # rebuilt without a call
        assert vol.inodes == inodes
        assert (await vols.content(vol.inodes["dir/fookey"])).data.startswith(b"-----BEGIN")
        assert len(mock.requests) == 2
        assert dataclasses.replace(vol.plan, notes=()).files == vol.plan.files


# --- a real standalone mount ---------------------------------------------------------------------

SPC = f"""\
apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: app
spec:
  provider: {NAME}
  parameters:
    objects: |
      - name: foo
"""


@needs_fuse
@pytest.mark.fuse
def test_standalone_mount_serves_the_plugin_files_and_rotates(
    mock: MockProvider, sockets: Path, tmp_path: Path
) -> None:
    mock.set("foo", b"first-plugin-value", "v1")
    with mounted(SPC, tmp_path, "--ttl", "1", "--providers-dir", str(sockets)) as m:
        assert m.read("foo") == b"first-plugin-value"
        assert m.read("dir/fookey") == b"-----BEGIN PUBLIC KEY-----\n"
        assert oct(os.stat(m.file("dir/fookey")).st_mode & 0o777) == "0o640"
        [req] = mock.requests
        assert req.target_path == str(m.path) and json.loads(req.attributes) == {
            "objects": "- name: foo\n"
        }
        mock.set("foo", b"rotated-value", "v2")
        assert wait_for(lambda: m.read("foo") == b"rotated-value")
        assert os.stat(m.file("foo")).st_size == len(b"rotated-value")
        # Nothing was written anywhere for us: the providers directory holds the socket only.
        assert sorted(os.listdir(sockets)) == [f"{NAME}.sock"]
        assert "first-plugin-value" not in m.log() and "rotated-value" not in m.log()
        assert "connected to" in m.log()  # the log was read: it holds the daemon's lines
    assert not is_mounted(m.path)


@needs_fuse
@pytest.mark.fuse
def test_standalone_mount_without_the_provider_fails_clearly(sockets: Path, tmp_path: Path) -> None:
    env = {"SECRETFS_PROVIDERS_DIRS": f"{sockets}:/nonexistent"}  # the flag's fallback
    with pytest.raises(MountFailed) as info, mounted(SPC, tmp_path, env=env):
        pass
    assert info.value.answer == (
        f"error: cannot mount: object '{NAME}': no provider {NAME}: no socket at "
        f"{sockets}/{NAME}.sock (looked in {sockets}, /nonexistent); is its DaemonSet running?"
    )
    assert not is_mounted(tmp_path / "mnt")


# --- the CSI pair --------------------------------------------------------------------------------


@needs_fuse
@pytest.mark.fuse
@pytest.mark.slow
def test_the_csi_pair_publishes_an_external_provider_volume(
    sockets: Path,
    tmp_path: Path,
    kube_api: KubeServer,  # noqa: F811
) -> None:
    # The documented Conjur example, unchanged, served by a plugin named "conjur".
    kube_api.add_spc("default", (ROOT / "examples/conjur-spc.yaml").read_text())
    kube_api.add_service_account("default", "app")
    pod = CsiPod(
        "secretfs-conjur-example",
        "0f0e0d0c-0b0a-0908-0706-050403020100",
        volume="conjur-credentials",
    )
    node = CsiNode(
        tmp_path,
        kube_api.kubeconfig(tmp_path / "kubeconfig"),
        ttl=1.0,
        log_level="INFO",
        daemon_extra=("--providers-dir", str(sockets)),
    )
    try:
        with serving(sockets, "conjur") as conjur:
            conjur.set("db/username", b"app-user", "1")
            conjur.set("db/password", b"first-db-password", "1", mode=0o440)
            node.start_pair()
            req = node.publish_request(pod, "credentials-from-conjur")
            tokens = {"conjur": {"token": TOKEN, "expirationTimestamp": "2099-01-01T00:00:00Z"}}
            req.volume_context["csi.storage.k8s.io/serviceAccount.tokens"] = json.dumps(tokens)
            node.node().NodePublishVolume(req, timeout=60)
            target = node.target(pod)
            assert is_mounted(target)
            assert (target / "db/password").read_bytes() == b"first-db-password"
            assert oct(os.stat(target / "db/password").st_mode & 0o777) == "0o440"
            # What the provider got: the SPC's parameters, the kubelet's attributes and tokens.
            [sent] = conjur.requests
            attributes = json.loads(sent.attributes)
            assert attributes["applianceUrl"] == "https://conjur.conjur-ns.svc.cluster.local"
            assert attributes["conjur.org/configurationVersion"] == "0.2.0"
            assert attributes["csi.storage.k8s.io/pod.name"] == pod.name
            assert attributes["csi.storage.k8s.io/pod.uid"] == pod.uid
            assert attributes["secretProviderClass"] == "credentials-from-conjur"
            assert json.loads(attributes[TOKENS_KEY]) == tokens
            assert (sent.secrets, sent.permission) == ("{}", "420")
            assert sent.target_path == str(target)  # the pod's own target path, as upstream
            # Rotation: the provider's new value shows after the TTL, through the bind mount.
            conjur.set("db/password", b"second-db-password", "2", mode=0o440)
            assert wait_for(lambda: (target / "db/password").read_bytes() == b"second-db-password")
            node.unpublish(pod)
            assert not is_mounted(target)
            logs = node.logs()
            assert "first-db-password" not in logs and TOKEN not in logs
    finally:
        node.close()
    assert not node.our_mounts()


# --- the daemon's control operations and the keeper's record -------------------------------------


async def test_the_daemon_records_the_files_a_plugin_returned(
    mock: MockProvider, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("secretfs.daemon.harden", lambda lock: {})
    path = str(plugin.current().dirs[0]) + "/d.sock"
    started = trio.Event()
    daemons: list[Daemon] = []

    def ready(daemon: Daemon) -> None:
        daemons.append(daemon)
        started.set()

    nursery.start_soon(serve, path, DaemonOptions(lock_memory=False), ready)
    await started.wait()
    daemons[0].attached = True  # the operations, not the FUSE session
    client = control.Client(path)
    spc = {"name": "app", "provider": NAME, "parameters": {"objects": "- name: foo\n"}}
    ident = {"namespace": "default", "service_account": "app", "secrets": {"k": PASSWORD}}
    target = "/var/lib/kubelet/pods/uid-1/volumes/kubernetes.io~csi/v/mount"
    answer = await trio.to_thread.run_sync(
        lambda: client.add("vol-1", spc, {"a": "b"}, ident, 0, 30, target=target)
    )
    assert answer["files"] == 2
    assert answer["plugin_files"] == [["dir/fookey", 0o640], ["foo", 0o644]]
    assert mock.requests[0].target_path == target
    assert json.loads(mock.requests[0].secrets) == {"k": PASSWORD}
    # A restarted keeper gets them back, and the next generation rebuilds without a call.
    exported = await trio.to_thread.run_sync(lambda: client.export("vol-1"))
    assert exported["record"]["files"] == answer["plugin_files"]
    assert exported["record"]["target"] == target
    # Without a target from csi, the provider is told the volume's directory on the node root.
    await trio.to_thread.run_sync(lambda: client.add("vol-2", spc, {}, ident, 0, 30))
    assert mock.requests[1].target_path == "/vol-2"
    nursery.cancel_scope.cancel()


def test_the_keeper_keeps_the_plugin_files_in_its_record() -> None:
    keeper = Keeper(control.Client("/nonexistent"))
    keeper.conn = KeeperConnection(-1, "0:0", b"", None, 1, 0)
    record = {"spc": {"provider": NAME}, "identity": {"namespace": "default"}}
    keeper.record("vol-1", record, {"inodes": {"": 1}, "plugin_files": [["foo", 420]]})
    keeper.record("vol-2", record, {"inodes": {"": 2}})
    assert keeper.conn.volumes["vol-1"]["record"]["files"] == [["foo", 420]]
    assert "files" not in keeper.conn.volumes["vol-2"]["record"]
    assert "files" not in record  # the caller's record is not changed
