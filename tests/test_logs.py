"""Structured log fields (secretfs/logs.py) and the audit trail: formatters, the queue that never
blocks a FUSE handler, and audit lines from real mounts (standalone and a CSI pod volume)."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import boto3
import pyfuse3
import pytest
import trio

import providers
from providers.base import FetchError, Identity
from secretfs import fs as fs_mod
from secretfs import logs as logs_mod
from secretfs.fs import SecretFS
from secretfs.logs import (
    AUDIT_LOGGER,
    AuditTrail,
    JsonFormatter,
    TextFormatter,
    fields,
)
from secretfs.tree import ROOT_INODE
from secretfs.volumes import Volumes
from tests.csi_node import ROLE_ANNOTATION, CsiNode, Pod, role_arn
from tests.fake_provider import FakeProvider
from tests.kube_server import KubeServer, kube_api  # noqa: F401
from tests.mounting import ROOT, mounted, needs_fuse, wait_for

SECRET = "s3cr3t-value-never-logged"
TOKEN = "header.payload.signature-never-logged"


def emit(formatter: logging.Formatter, msg: str, *args: object, **extra: Any) -> str:
    """One record through ``formatter``, as a logger call with ``extra=`` makes it."""
    logger = logging.getLogger("secretfs.test_logs")
    record = logger.makeRecord(logger.name, logging.WARNING, __file__, 1, msg, args, None, None)
    record.__dict__.update(extra)
    return formatter.format(record)


def volume(namespace: str | None = "team-a") -> Any:
    ident = Identity(namespace=namespace, service_account="app", pod_name="app-0", pod_uid="u-1")
    return SimpleNamespace(id="csi-abc", identity=ident, plan=SimpleNamespace(provider="aws"))


def test_json_formatter_emits_known_fields_as_keys_and_nothing_else() -> None:
    err = FetchError("db/password", "access denied", transient=False, code="AccessDenied")
    extra = fields(volume(), error=err, duration=0.0123456789)
    # Arbitrary attributes (a library's, or a mistake) never reach the output.
    line = emit(JsonFormatter(), "refresh failed: %s", err, token=TOKEN, value=SECRET, **extra)
    out = json.loads(line)
    assert out["volume"] == "csi-abc"
    assert (out["pod_namespace"], out["pod_name"], out["provider"]) == ("team-a", "app-0", "aws")
    assert (out["object"], out["error_type"]) == ("db/password", "AccessDenied")
    assert out["duration"] == pytest.approx(0.012346)
    assert out["msg"] == "refresh failed: object 'db/password': access denied"
    assert set(out) == {
        *("ts", "level", "logger", "msg", "volume", "pod_namespace", "pod_name"),
        *("provider", "object", "error_type", "duration"),
    }
    assert TOKEN not in line and SECRET not in line
    # Without fields: exactly the old keys.
    assert set(json.loads(emit(JsonFormatter(), "plain"))) == {"ts", "level", "logger", "msg"}


def test_fields_leave_out_what_is_unknown_and_never_carry_error_text() -> None:
    assert fields() == {}
    assert fields(volume="v", pod_namespace="", provider=None) == {"volume": "v"}
    assert fields(error=ValueError(SECRET)) == {"error_type": "ValueError"}
    standalone = fields(volume(namespace=None))
    assert standalone == {"volume": "csi-abc", "pod_name": "app-0", "provider": "aws"}
    # A cache key: (provider, auth, identity key, source).
    key = ("vault", ("addr",), ("team-b", "sa", (), ""), "secret/db")
    assert fields(key=key) == {"provider": "vault", "pod_namespace": "team-b"}


def test_text_format_appends_key_value_quoted_when_needed() -> None:
    err = FetchError("my db", "not found", transient=False, code="ResourceNotFound")
    extra = fields(volume(), error=err, duration=1.5)
    line = emit(TextFormatter(), "volume %s: gone", "csi-abc", token=TOKEN, **extra)
    head = line.split(" secretfs.test_logs: ")[1]
    assert head == (
        "volume csi-abc: gone volume=csi-abc pod_namespace=team-a pod_name=app-0 provider=aws "
        'object="my db" error_type=ResourceNotFound duration=1.5'
    )
    assert TOKEN not in line
    quoted = emit(TextFormatter(), "x", path='a="b"', version="")
    assert quoted.endswith(' x path="a=\\"b\\"" version=""')
    assert emit(TextFormatter(), "no fields").endswith("WARNING secretfs.test_logs: no fields")


def test_text_format_keeps_fields_on_the_first_line_before_a_traceback() -> None:
    logger = logging.getLogger("secretfs.test_logs")
    try:
        raise KeyError("k")
    except KeyError:
        import sys

        record = logger.makeRecord(
            logger.name, logging.ERROR, __file__, 1, "failed", (), sys.exc_info(), None
        )
    record.__dict__.update(fields(volume="v1"))
    first, *rest = TextFormatter().format(record).splitlines()
    assert first.endswith("failed volume=v1") and rest[0].startswith("Traceback")


# --- the audit queue ------------------------------------------------------------------------------


class Collect(logging.Handler):
    """Formats records with ``formatter``; blocks in emit while ``gate`` is clear (a stuck
    writer: a log pipe nobody reads)."""

    def __init__(self, formatter: logging.Formatter) -> None:
        super().__init__()
        self.setFormatter(formatter)
        self.lines: list[str] = []
        self.gate = threading.Event()
        self.gate.set()

    def emit(self, record: logging.LogRecord) -> None:
        self.gate.wait(30)
        self.lines.append(self.format(record))


@pytest.fixture
def audit_out() -> Iterator[Collect]:
    logger = logging.getLogger(AUDIT_LOGGER)
    handler = Collect(JsonFormatter())
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)  # as --audit does
    try:
        yield handler
    finally:
        handler.gate.set()
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture
async def pod_fs(monkeypatch: pytest.MonkeyPatch) -> Any:
    prov = FakeProvider()
    monkeypatch.setitem(providers.REGISTRY, "fake", "tests.fake_provider:FakeProvider")
    monkeypatch.setitem(providers._instances, "fake", prov)
    prov.set("db", SECRET.encode())
    ident = Identity(namespace="team-a", service_account="app", pod_name="app-0", pod_uid="u-1")
    async with trio.open_nursery() as n:
        vols = Volumes(ttl=10, max_stale=100)
        vols.start(n)
        await vols.add("vol-1", prov.parse({"objects": "- name: db\n"}), ident, uid=0, gid=0)
        yield SecretFS(vols)
        n.cancel_scope.cancel()


async def test_audit_queue_never_blocks_and_logs_the_drop_count(
    pod_fs: SecretFS, audit_out: Collect, monkeypatch: pytest.MonkeyPatch
) -> None:
    trail = AuditTrail(maxsize=4, drop_interval=0.05, flush_interval=0.01)
    monkeypatch.setattr(fs_mod, "AUDIT", trail)
    d = (await pod_fs.lookup(ROOT_INODE, b"vol-1", pyfuse3.RequestContext())).st_ino
    db = (await pod_fs.lookup(d, b"db", pyfuse3.RequestContext())).st_ino
    audit_out.gate.clear()  # the writer blocks in its first write
    began = time.monotonic()
    for _ in range(50):
        fi = await pod_fs.open(db, os.O_RDONLY, pyfuse3.RequestContext())
        await pod_fs.release(fi.fh)
    assert time.monotonic() - began < 2.0  # every open returned, none waited for the writer
    # The queue holds 4; the writer may have taken up to 4 before it got stuck.
    assert trail.dropped >= 50 - 8
    audit_out.gate.set()
    dropped = lambda: any("dropped" in line for line in audit_out.lines)  # noqa: E731
    assert await trio.to_thread.run_sync(wait_for, dropped)
    trail.stop()
    lines = [json.loads(line) for line in audit_out.lines]
    drops = [x for x in lines if "dropped" in x["msg"]]
    assert drops[0]["level"] == "warning"
    assert f"{trail.dropped} line(s) dropped" in drops[0]["msg"]
    opens = [x for x in lines if x["msg"] == "open"]
    assert 1 <= len(opens) <= 8 and trail.written == len(opens)
    first = opens[0]
    assert (first["pod_namespace"], first["pod_name"], first["pod_uid"]) == (
        "team-a",
        "app-0",
        "u-1",
    )
    assert (first["volume"], first["path"]) == ("vol-1", "db")
    assert first["version"] and SECRET not in "".join(audit_out.lines)


def test_audit_trail_writes_what_is_queued_at_stop(audit_out: Collect) -> None:
    trail = AuditTrail(maxsize=100)
    for i in range(10):
        trail.put((time.time(), "standalone", None, f"f{i}", 1000, 1000, 42, "v1"))
    trail.stop()
    opens = [json.loads(line) for line in audit_out.lines]
    assert [o["path"] for o in opens] == [f"f{i}" for i in range(10)]
    assert opens[0]["pod_namespace"] == opens[0]["pod_name"] == "standalone"
    assert "pod_uid" not in opens[0] and trail.dropped == 0


def test_audit_lines_built_without_records_are_the_formatters_lines() -> None:
    """The writer's direct lines (no LogRecord) are exactly what the formatters make of the
    audit record: same fields, order, quoting and timestamps."""
    pod = Identity(namespace="team-a", service_account="app", pod_name="app-0", pod_uid="u-1")
    bare = Identity(namespace="team-b", service_account="app")
    items = [
        (1764583200.0, "vol-1", pod, "db", 1000, 1000, 42, "v1"),
        (1764583200.9995, "vol-2", bare, "dir/a b=c", 0, 0, 0, ""),
        (1764583201.123, "standalone", None, 'q"uote\n', 65534, 65534, 7, "AWSCURRENT"),
        (1764583202.5, "vol-3", pod, "données/ключ\u2028", 1, 2, 3, "v\u00e9"),
    ]
    for item in items:
        record = logs_mod._audit_record(item)
        assert logs_mod._audit_json(item) == JsonFormatter().format(record)
        assert logs_mod._audit_text(item) == TextFormatter().format(record)


# --- real mounts ----------------------------------------------------------------------------------

SPC = """\
apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: audit
spec:
  provider: aws
  parameters:
    objects: |
      - objectName: "AuditedSecret"
        objectType: "secretsmanager"
"""


def json_lines(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


@needs_fuse
@pytest.mark.fuse
def test_audit_line_from_a_standalone_mount(tmp_path: Path, aws_env: dict[str, str]) -> None:
    sm = boto3.client(
        "secretsmanager", region_name=aws_env["region"], endpoint_url=aws_env["endpoint_url"]
    )
    sm.create_secret(Name="AuditedSecret", SecretString=SECRET)
    with mounted(SPC, tmp_path, "--audit", "--log-format", "json") as m:
        assert m.read("AuditedSecret") == SECRET.encode()
        assert wait_for(lambda: '"msg": "open"' in m.log())
        log = m.log()
    opens = [x for x in json_lines(log) if x["msg"] == "open"]
    assert opens, log
    o = opens[0]
    assert (o["path"], o["volume"], o["uid"], o["gid"]) == ("AuditedSecret", "standalone", 0, 0)
    assert o["pod_namespace"] == "standalone" and o["logger"] == AUDIT_LOGGER
    assert o["pid"] > 0 and o["version"]
    assert SECRET not in log


class AuditNode(CsiNode):
    def daemon_args(self) -> list[str]:
        return [*super().daemon_args(), "--audit", "--log-format", "json"]

    def csi_args(self) -> list[str]:
        return [*super().csi_args(), "--log-format", "json"]


@needs_fuse
@pytest.mark.fuse
@pytest.mark.slow
def test_audit_line_of_a_csi_volume_names_the_pod(
    tmp_path: Path,
    kube_api: KubeServer,  # noqa: F811
    aws_env: dict[str, str],
) -> None:
    import yaml

    kube_api.add_spc("default", yaml.safe_load((ROOT / "examples/aws-seed.yaml").read_text()))
    kube_api.add_service_account("default", "app", {ROLE_ANNOTATION: role_arn("app")})
    sm = boto3.client(
        "secretsmanager", region_name=aws_env["region"], endpoint_url=aws_env["endpoint_url"]
    )
    sm.create_secret(Name="MyDatabasePassword", SecretString=SECRET)
    node = AuditNode(tmp_path, kube_api.kubeconfig(tmp_path / "kubeconfig"))
    try:
        node.start_daemon()
        node.start_csi()
        pod = Pod("app-0", "a0d17000-0000-0000-0000-000000000001", namespace="default")
        target = node.publish(pod)
        with open(target / "MyDatabasePassword", "rb") as f:
            assert f.read() == SECRET.encode()
        assert wait_for(lambda: '"msg": "open"' in node.log("daemon"))
        node.unpublish(pod)
    finally:
        node.close()
    daemon, csi = json_lines(node.log("daemon")), json_lines(node.log("csi"))
    o = next(x for x in daemon if x["msg"] == "open")
    assert (o["pod_namespace"], o["pod_name"], o["pod_uid"]) == ("default", "app-0", pod.uid)
    assert (o["volume"], o["path"], o["uid"], o["gid"]) == (
        pod.volume_id,
        "MyDatabasePassword",
        0,
        0,
    )
    assert o["version"]
    added = next(x for x in daemon if x["msg"].startswith(f"volume {pod.volume_id} added"))
    assert (added["volume"], added["pod_namespace"], added["pod_name"]) == (
        pod.volume_id,
        "default",
        "app-0",
    )
    assert added["provider"] == "aws"
    rpc = next(x for x in csi if x["msg"].startswith("NodePublishVolume OK"))
    assert (rpc["volume"], rpc["pod_namespace"], rpc["pod_name"]) == (
        pod.volume_id,
        "default",
        "app-0",
    )
    assert rpc["provider"] == "aws" and rpc["duration"] > 0
    gone = next(x for x in csi if x["msg"].startswith("NodeUnpublishVolume OK"))
    assert gone["volume"] == pod.volume_id
    logs = node.log("daemon") + node.log("csi")
    assert SECRET not in logs and "header.payload.signature" not in logs
