"""The daemon's control operations in-process (no FUSE session): error classes and codes, identity
decoding (never the daemon's own ambient identity), add/refresh/remove over the real socket."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from providers.base import FetchError
from secretfs import control
from secretfs.control import ControlError
from secretfs.daemon import Daemon, DaemonOptions, classify, identity_from, serve
from secretfs.volumes import VolumeError


def test_classify_fetch_failures() -> None:
    def err(*errors: FetchError) -> VolumeError:
        return VolumeError("x", errors)

    gone = FetchError("db", "not found", transient=False, code="NotFound")
    denied = FetchError("db", "denied", transient=False, code="AccessDenied")
    outage = FetchError("db", "timeout", transient=True)
    assert classify(err()) == control.UNAVAILABLE  # deadline: retry
    assert classify(err(gone, outage)) == control.UNAVAILABLE
    assert classify(err(denied)) == control.PERMISSION_DENIED
    assert classify(err(gone)) == control.FAILED_PRECONDITION


def test_identity_is_never_ambient() -> None:
    for bad in (None, {}, {"namespace": ""}, {"service_account": "app"}):
        with pytest.raises(ControlError) as info:
            identity_from(bad)
        assert info.value.code == control.INVALID_ARGUMENT
    ident = identity_from(
        {
            "namespace": "ns",
            "service_account": "sa",
            "tokens": {"aud": {"token": "t0k", "expirationTimestamp": "2099"}, "bad": "x"},
            "secrets": {"k": "v"},
            "sa_annotations": {"a": "b"},
        }
    )
    assert not ident.ambient and list(ident.tokens) == ["aud"]
    assert "t0k" not in repr(ident) and "'v'" not in repr(ident)


async def test_operations_over_the_socket(
    tmp_path: Path, aws_env: dict[str, str], nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    import boto3

    # harden() would make the whole pytest process non-dumpable; not this test's subject.
    monkeypatch.setattr("secretfs.daemon.harden", lambda lock: {})

    boto3.client(
        "secretsmanager", region_name=aws_env["region"], endpoint_url=aws_env["endpoint_url"]
    ).create_secret(Name="db", SecretString="v1")
    path = str(tmp_path / "d.sock")
    started = trio.Event()
    daemons: list[Daemon] = []

    def ready(daemon: Daemon) -> None:
        daemons.append(daemon)
        started.set()

    nursery.start_soon(serve, path, DaemonOptions(lock_memory=False), ready)
    await started.wait()
    client = control.Client(path)

    async def call(fn: object, *args: object) -> dict[str, object]:
        return await trio.to_thread.run_sync(fn, *args)  # type: ignore[arg-type]

    status = await call(client.status)
    assert status["attached"] is False and status["volumes"] == []
    spc = {
        "name": "app",
        "provider": "aws",
        "parameters": {"objects": "- objectName: db\n  objectType: secretsmanager\n"},
    }
    # Ambient AWS keys are in this process's environment, but a pod gets only its own identity:
    # without a token and role the fetch is refused, never served with the daemon's keys.
    ident = {"namespace": "ns", "service_account": "sa"}
    # Before a FUSE connection is attached no volume is added: the keeper restores its volumes
    # first, with the inode numbers the kernel knows.
    with pytest.raises(ControlError) as info:
        await call(lambda: client.add("vol-1", spc, {}, ident, 0, 30))
    assert info.value.code == control.UNAVAILABLE
    daemons[0].attached = True  # this test is about the operations, not the FUSE session
    with pytest.raises(ControlError) as info:
        await call(lambda: client.add("vol-1", spc, {}, ident, 0, 30))
    assert info.value.code == control.FAILED_PRECONDITION
    assert "SecretProviderClass ns/app" in info.value.message
    ident["sa_annotations"] = {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/r"}
    ident["tokens"] = {"sts.amazonaws.com": {"token": "a.b.c"}}
    answer = await call(lambda: client.add("vol-1", spc, {}, ident, 0, 30))
    assert answer["existing"] is False and answer["files"] == 1
    # What the keeper records: the inode of every path, and the high-water mark.
    assert set(answer["inodes"]) == {"", "db"} and answer["next_inode"] > max(
        answer["inodes"].values()
    )
    exported = await call(lambda: client.export("vol-1"))
    assert exported["inodes"] == answer["inodes"]
    assert exported["record"]["identity"]["tokens"] == ident["tokens"]
    assert exported["record"]["spc"] == spc
    assert (await call(lambda: client.add("vol-1", spc, {}, ident, 0, 30)))["existing"] is True
    other = {**ident, "service_account": "other"}
    with pytest.raises(ControlError) as info:
        await call(lambda: client.add("vol-1", spc, {}, other, 0, 30))
    assert info.value.code == control.ALREADY_EXISTS
    bad = {**spc, "parameters": {"objects": "- objectType: secretsmanager\n"}}
    with pytest.raises(ControlError) as info:
        await call(lambda: client.add("vol-2", bad, {}, ident, 0, 30))
    assert info.value.code == control.INVALID_ARGUMENT and "objectName" in info.value.message
    refreshed = await call(lambda: client.refresh("vol-1", {"sts.amazonaws.com": {"token": "n"}}))
    objects = refreshed.pop("objects")  # what csi writes to the SecretProviderClassPodStatus
    assert refreshed == {"ok": True, "tokens": 1, "provider": "aws"}
    assert [o["id"] for o in objects] == ["db"] and objects[0]["version"]
    # A restarted keeper gets the fresh token back, not the one of the first publish.
    exported = await call(lambda: client.export("vol-1"))
    assert exported["record"]["identity"]["tokens"] == {"sts.amazonaws.com": {"token": "n"}}
    # Hand-over operations out of order are refused, and say why.
    with pytest.raises(ControlError) as info:
        await call(lambda: client.restore("vol-2", exported["record"], {}, 100))
    assert info.value.code == control.FAILED_PRECONDITION and "before attach" in info.value.message
    with pytest.raises(ControlError) as info:
        await call(client.handback)
    assert info.value.code == control.FAILED_PRECONDITION
    with pytest.raises(ControlError) as info:
        await call(lambda: client.refresh("vol-9", {}))
    assert info.value.code == control.NOT_FOUND
    assert (await call(lambda: client.remove("vol-1")))["removed"] is True
    assert (await call(lambda: client.remove("vol-1")))["removed"] is False
    assert (await call(client.status))["volumes"] == []
    with pytest.raises(ControlError) as info:
        await call(lambda: client.call("nonsense", volume_id="x"))
    assert info.value.code == control.INVALID_ARGUMENT
    assert os.stat(path).st_mode & 0o777 == 0o600
    nursery.cancel_scope.cancel()


def test_every_command_line_argument_has_help() -> None:
    import argparse

    from secretfs.cli import build_parser

    missing = []

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, subparser in action.choices.items():
                    walk(subparser, f"{name} {sub}")
            elif not action.help:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), "secretfs")
    assert not missing


def test_hardening_is_logged_in_words() -> None:
    from secretfs.hardening import describe

    done = {"core_dumps_off": True, "not_dumpable": True, "memory_locked": False}
    assert describe(done) == "core dumps off, not dumpable, memory not locked"


def test_a_refused_mount_says_what_to_check() -> None:
    from secretfs.standalone import mount_hint

    assert "/dev/fuse" in mount_hint(True, True) and "CAP_SYS_ADMIN" in mount_hint(True, False)
    user = mount_hint(False, False)
    assert "fusermount3" in user and "fuse3" in user and "run as root" in user
    assert "user_allow_other" not in user
    assert "user_allow_other" in mount_hint(False, True)
