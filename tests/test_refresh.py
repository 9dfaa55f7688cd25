"""Rotation that applications notice (issue 11): a TTL per SecretProviderClass, on-demand refresh
(control op, SIGHUP, ``secretfs refresh``, the ``user.secretfs.refresh`` attribute), refreshes
batched like the mount-time fetch, and publishing from stale values during a backend outage.

AWS calls are counted by a small proxy in front of the moto server: what the test asserts is the
number of requests that reached the server, not what the code meant to send.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import http.client
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.parse
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import pyfuse3
import pytest
import trio
import trio.testing

import providers
from providers.aws.provider import AwsProvider
from providers.base import AMBIENT, FetchError, Identity, Plan, Token
from secretfs import control
from secretfs import spc as spc_mod
from secretfs import volumes as volumes_mod
from secretfs.cli import main, node_argvs
from secretfs.control import ControlError
from secretfs.daemon import Daemon, DaemonOptions, serve
from secretfs.fs import SecretFS
from secretfs.tree import ROOT_INODE
from secretfs.volumes import VolumeError, Volumes
from tests.fake_provider import FakeProvider
from tests.mounting import ROOT, mounted, needs_fuse, wait_for

XATTR = b"user.secretfs.refresh"
CTX = pyfuse3.RequestContext()


# --- a proxy that counts what reaches moto -------------------------------------------------------


class CountingProxy:
    """Forwards HTTP requests to ``upstream`` and counts each AWS action that went through
    (``X-Amz-Target`` of JSON protocols, ``Action`` of query ones). ``stop()`` plays an outage:
    new connections are refused and requests on open ones get no answer."""

    def __init__(self, upstream: str) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self.calls: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.down = False
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                proxy.forward(self)

            do_GET = do_PUT = do_DELETE = do_POST

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def count(self, action: str) -> int:
        with self.lock:
            return self.calls[action]

    def forward(self, req: BaseHTTPRequestHandler) -> None:
        if self.down:
            req.close_connection = True
            return
        body = req.rfile.read(int(req.headers.get("Content-Length") or 0))
        action = (req.headers.get("X-Amz-Target") or "").rpartition(".")[2]
        if not action:
            query = urllib.parse.parse_qs(body.decode(errors="replace"))
            action = (query.get("Action") or ["?"])[0]
        conn = http.client.HTTPConnection(*self.upstream, timeout=30)
        try:
            headers = {k: v for k, v in req.headers.items() if k.lower() != "connection"}
            conn.request(req.command, req.path, body, headers)
            rsp = conn.getresponse()
            data = rsp.read()
        finally:
            conn.close()
        with self.lock:
            self.calls[action] += 1
        req.send_response(rsp.status)
        for k, v in rsp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length", "date"):
                req.send_header(k, v)
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        req.wfile.write(data)

    def stop(self) -> None:
        self.down = True
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy(aws_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[CountingProxy]:
    """AWS calls of this process (a fresh provider: no client of another test) and of the
    processes it starts go through a counting proxy to the test's moto."""
    p = CountingProxy(aws_env["endpoint_url"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", p.url)
    monkeypatch.setitem(providers._instances, "aws", AwsProvider())
    try:
        yield p
    finally:
        if not p.down:
            p.stop()


def ssm(env: dict[str, str]) -> Any:
    return boto3.client("ssm", region_name=env["region"], endpoint_url=env["endpoint_url"])


def put_params(env: dict[str, str], n: int, value: str = "v1") -> list[str]:
    names = [f"p{i}" for i in range(n)]
    for name in names:
        ssm(env).put_parameter(Name=name, Value=f"{name}-{value}", Type="SecureString")
    return names


def aws_spc(names: list[str], ttl: str | None = None) -> dict[str, Any]:
    objects = "".join(f'- objectName: "{n}"\n  objectType: "ssmparameter"\n' for n in names)
    meta: dict[str, Any] = {"name": "app"}
    if ttl is not None:
        meta["annotations"] = {spc_mod.TTL_ANNOTATION: ttl}
    return {
        "apiVersion": "secrets-store.csi.x-k8s.io/v1",
        "kind": "SecretProviderClass",
        "metadata": meta,
        "spec": {"provider": "aws", "parameters": {"region": "us-east-1", "objects": objects}},
    }


def aws_plan(names: list[str]) -> Plan:
    return spc_mod.plan(spc_mod.from_object(aws_spc(names)))


def cli(argv: list[str]) -> int:
    """``secretfs ...`` in this process, leaving the test's log capture as it was (the command
    sets up its own logging)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        return main(argv)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


async def poll(cond: Callable[[], bool], within: float = 20.0) -> None:
    """Wait until ``cond()`` holds (what worker threads and background refreshes do)."""
    with trio.fail_after(within):
        while not cond():  # noqa: ASYNC110 (polling a worker thread's effect)
            await trio.sleep(0.02)


# --- the annotation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("300", 300), ("2.5", 2.5), ("90s", 90), ("5m", 300), ("1h30m", 5400), ("500ms", 0.5)],
)
def test_ttl_annotation_takes_seconds_or_a_duration(text: str, seconds: float) -> None:
    spc = spc_mod.from_object(aws_spc(["p0"], ttl=text))
    assert spc.ttl == seconds
    assert spc_mod.plan(spc).ttl == seconds
    assert spc_mod.plan(spc_mod.from_object(aws_spc(["p0"]))).ttl is None


@pytest.mark.parametrize("bad", ["0", "-5m", "1d", "5 m", "soon", "1e3", "", "9" * 40, 300])
def test_a_bad_ttl_annotation_is_refused_naming_it(bad: object) -> None:
    obj = aws_spc(["p0"])
    obj["metadata"]["annotations"] = {spc_mod.TTL_ANNOTATION: bad}
    with pytest.raises(spc_mod.SpcError, match=r"metadata\.annotations\['secretfs\.io/ttl'\]"):
        spc_mod.from_object(obj)


def test_check_prints_the_class_ttl(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import yaml

    p = tmp_path / "spc.yaml"
    p.write_text(yaml.safe_dump(aws_spc(["p0"], ttl="5m")))
    assert cli(["check", str(p)]) == 0
    assert "ttl: 300 s (annotation secretfs.io/ttl" in capsys.readouterr().out
    p.write_text(yaml.safe_dump(aws_spc(["p0"])))
    assert cli(["check", str(p)]) == 0
    assert "ttl:" not in capsys.readouterr().out


def test_ttl_bounds_are_checked_and_passed_on(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["daemon", "--min-ttl", "0"]) == 2
    assert "--min-ttl must be more than 0" in capsys.readouterr().err
    assert cli(["daemon", "--max-ttl", "100", "--max-stale", "50", "--ttl", "10"]) == 2
    assert (
        "--max-ttl (100 s) must be more than 0 and at most --max-stale" in capsys.readouterr().err
    )
    assert cli(["daemon", "--min-ttl", "60", "--max-ttl", "30"]) == 2
    from secretfs.cli import build_parser

    args = build_parser().parse_args(
        ["node", "--nodeid", "n", "--min-ttl", "5", "--max-ttl", "600"]
    )
    daemon, _ = node_argvs(args)
    assert daemon[daemon.index("--min-ttl") + 1] == "5.0"
    assert daemon[daemon.index("--max-ttl") + 1] == "600.0"


# --- Volumes over a fake provider ----------------------------------------------------------------

OBJECTS = "- name: db\n- name: api\n- name: creds\n  dynamic: true\n"


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeProvider]:
    prov = FakeProvider()
    monkeypatch.setitem(providers.REGISTRY, "fake", "tests.fake_provider:FakeProvider")
    monkeypatch.setitem(providers._instances, "fake", prov)
    for name in ("db", "api", "creds"):
        prov.set(name, f"{name}-1".encode())
    yield prov


@contextlib.asynccontextmanager
async def running(**kw: Any) -> AsyncIterator[Volumes]:
    async with trio.open_nursery() as n:
        vols = Volumes(**{"ttl": 10, "max_stale": 100, **kw})
        vols.start(n)
        yield vols
        n.cancel_scope.cancel()


def key_of(vols: Volumes, vid: str, name: str) -> Any:
    return next(k for s, k in vols.volumes[vid].keys.items() if s.object_name == name)


async def test_a_class_ttl_is_kept_within_the_node_bounds(
    fake: FakeProvider, caplog: pytest.LogCaptureFixture
) -> None:
    plan = fake.parse({"objects": "- name: db\n"})
    async with running(ttl=100, max_stale=1000, min_ttl=10, max_ttl=500) as vols:
        for vid, asked, used in (("low", 2, 10), ("high", 9999, 500), ("ok", 30, 30)):
            ident = Identity(namespace=vid)  # distinct keys: each volume's TTL alone
            await vols.add(vid, dataclasses.replace(plan, ttl=asked), ident, uid=0, gid=0)
            assert vols.cache.ttl_of(key_of(vols, vid, "db")) == used
        await vols.add("default", plan, Identity(namespace="d"), uid=0, gid=0)
        assert vols.cache.ttl_of(key_of(vols, "default", "db")) == 100
    lines = [r.getMessage() for r in caplog.records if "secretfs.io/ttl" in r.getMessage()]
    assert lines == [
        "volume low: its SecretProviderClass asks for a TTL of 2 s (secretfs.io/ttl); using 10 s, "
        "the node's --min-ttl",
        "volume high: its SecretProviderClass asks for a TTL of 9999 s (secretfs.io/ttl); using "
        "500 s, the node's --max-ttl",
    ]
    # Defaults: --min-ttl 10, --max-ttl = --max-stale; a lower bound above it gives way.
    vols = Volumes(ttl=1, max_stale=4)
    assert (vols.min_ttl, vols.max_ttl) == (4, 4)


async def test_a_shared_value_uses_the_shortest_ttl_while_shared(
    fake: FakeProvider, mock_clock: trio.testing.MockClock
) -> None:
    mock_clock.rate = 1.0  # real time passes too (the refresh is a worker thread's)
    plan = fake.parse({"objects": "- name: db\n"})
    async with running(ttl=100, max_stale=1000) as vols:
        await vols.add("slow", plan, AMBIENT, uid=0, gid=0)
        await vols.add("fast", dataclasses.replace(plan, ttl=20), AMBIENT, uid=0, gid=0)
        key = key_of(vols, "slow", "db")
        assert key == key_of(vols, "fast", "db") and vols.cache.ttl_of(key) == 20
        mock_clock.jump(21)
        fake.set("db", b"db-2")
        ino = vols.volumes["slow"].inodes["db"]
        assert (await vols.content(ino)).data == b"db-1"  # stale: served, refresh started
        await poll(lambda: vols.cache.fresh(key) is not None)
        assert (await vols.content(ino)).data == b"db-2"
        await vols.remove("fast")
        assert vols.cache.ttl_of(key) == 100
        mock_clock.jump(50)
        assert vols.cache.fresh(key) is not None  # the longer TTL again


async def test_a_removed_volume_identity_is_never_used_again(fake: FakeProvider) -> None:
    plan = fake.parse({"objects": "- name: db\n- name: api\n"})

    def ident(token: str) -> Identity:
        return Identity(namespace="ns", service_account="sa", tokens={"aud": Token(token)})

    async with running(ttl=0.2, max_stale=100) as vols:
        await vols.add("a", plan, ident("a"), uid=0, gid=0)
        await vols.add("b", plan, ident("b"), uid=0, gid=0)  # same values: shared with a
        await vols.remove("b")  # the last one grouped them
        await trio.sleep(0.3)
        before = sum(fake.calls.values())
        vols.peek(vols.volumes["a"].inodes["db"])  # stale: refreshes the group
        await poll(lambda: sum(fake.calls.values()) == before + 2)
        assert fake.identities[-1].tokens["aud"].token == "a"


async def test_reload_fetches_static_values_now_and_coalesces(
    fake: FakeProvider, mock_clock: trio.testing.MockClock
) -> None:
    mock_clock.rate = 1.0
    plan = fake.parse({"objects": OBJECTS})
    async with running(ttl=100, max_stale=1000) as vols:
        await vols.add("v", plan, AMBIENT, uid=0, gid=0)
        fake.set("api", b"api-2")
        fake.gate = threading.Event()  # hold the fetch: the second reload joins the first
        results: list[dict[str, int]] = []

        async def reload() -> None:
            results.append(await vols.reload("v"))

        async with trio.open_nursery() as n:
            n.start_soon(reload)
            n.start_soon(reload)
            await trio.sleep(0.1)
            fake.gate.set()
        assert results == [{"fetched": 2, "changed": 1, "failed": 0}] * 2
        assert fake.calls == Counter({"db": 2, "api": 2, "creds": 1})  # dynamic: left alone
        fake.gate = None
        # Just after: the same answer, no fetch. Later: a new reload.
        assert await vols.reload("v") == {"fetched": 2, "changed": 1, "failed": 0}
        assert fake.calls["db"] == 2
        mock_clock.jump(volumes_mod.RELOAD_COALESCE)
        fake.fail["db"] = FetchError("db", "backend unreachable", transient=True)
        assert await vols.reload("v") == {"fetched": 1, "changed": 0, "failed": 1}
        assert fake.calls["db"] == 3
        # Every volume: a value two volumes share counts once.
        await vols.add("w", plan, AMBIENT, uid=0, gid=0)
        mock_clock.jump(volumes_mod.RELOAD_COALESCE)
        del fake.fail["db"]
        assert await vols.reload() == {"fetched": 2, "changed": 0, "failed": 0}
        with pytest.raises(KeyError):
            await vols.reload("nope")


async def test_publish_from_stale_only_when_the_backend_fails_transiently(
    fake: FakeProvider, mock_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    plan = fake.parse({"objects": "- name: db\n- name: api\n"})
    async with running(ttl=10, max_stale=100) as vols:
        await vols.add("a", plan, AMBIENT, uid=0, gid=0)
        mock_clock.jump(42)
        fake.fail["db"] = FetchError("db", "backend unreachable", transient=True)
        await vols.add("b", plan, AMBIENT, uid=0, gid=0)  # db stale, api fetched
        assert vols.cache.stats.stale_publishes == 1
        msg = [r.getMessage() for r in caplog.records if "published from" in r.getMessage()]
        assert msg == [
            "volume b: published from values 42 s old because the backend failed: object 'db': "
            "backend unreachable (1 of 2 value(s) past their TTL; they are refreshed when the "
            "backend answers)"
        ]
        assert (await vols.content(vols.volumes["b"].inodes["db"])).data == b"db-1"
        # A permanent answer is never papered over.
        fake.fail["db"] = FetchError("db", "not found", transient=False, code="NotFound")
        with pytest.raises(VolumeError, match="not found"):
            await vols.add("c", plan, AMBIENT, uid=0, gid=0)
        # Nor is a value past max_stale served.
        fake.fail["db"] = FetchError("db", "backend unreachable", transient=True)
        mock_clock.jump(100)
        with pytest.raises(VolumeError, match="unreachable"):
            await vols.add("d", plan, AMBIENT, uid=0, gid=0)
        assert vols.cache.stats.stale_publishes == 1


@pytest.mark.expect_errors
async def test_the_refresh_attribute_of_a_volume_directory(
    fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = fake.parse({"objects": "- name: db\n- name: api\n  path: sub/api\n"})
    async with running() as vols:
        fs = SecretFS(vols)
        await vols.add("v1", plan, AMBIENT, uid=0, gid=0)
        vdir = vols.volumes["v1"].inodes[""]
        calls = sum(fake.calls.values())
        # A size probe then the read: one reload (the second joins the first).
        first = await fs.getxattr(vdir, XATTR, CTX)
        assert first == b"fetched=2 changed=0 failed=0"
        assert await fs.getxattr(vdir, XATTR, CTX) == first
        assert sum(fake.calls.values()) == calls + 2
        assert await fs.listxattr(vdir, CTX) == []  # cp -a, tar, rsync -X never see it
        # Nowhere else: the node root, a subdirectory, a file; nor any other name.
        inodes = vols.volumes["v1"].inodes
        for ino, name in (
            (ROOT_INODE, XATTR),
            (inodes["sub"], XATTR),
            (inodes["db"], XATTR),
            (vdir, b"user.other"),
        ):
            with pytest.raises(pyfuse3.FUSEError) as info:
                await fs.getxattr(ino, name, CTX)
            assert info.value.errno == errno.ENODATA
        # Whatever goes wrong inside becomes EIO.

        async def broken(volume_id: str | None = None) -> dict[str, int]:
            raise RuntimeError("boom")

        monkeypatch.setattr(vols, "reload", broken)
        with pytest.raises(pyfuse3.FUSEError) as info:
            await fs.getxattr(vdir, XATTR, CTX)
        assert info.value.errno == errno.EIO


# --- AWS through moto: batched refreshes, publishing from stale -------------------------------


async def test_ssm_refreshes_are_batched_like_the_mount(
    aws_env: dict[str, str], proxy: CountingProxy, mock_clock: trio.testing.MockClock
) -> None:
    mock_clock.rate = 1.0  # and jumps age the values at once
    names = put_params(aws_env, 12)
    async with running(ttl=100, max_stale=1000) as vols:
        vol = await vols.add("v", aws_plan(names), AMBIENT, uid=0, gid=0)
        assert proxy.count("GetParameters") == 2  # 12 names: 10 + 2
        for name in ("p2", "p7", "p11"):
            ssm(aws_env).put_parameter(Name=name, Value=f"{name}-v2", Overwrite=True)
        mock_clock.jump(101)  # every value past its TTL
        # One read: the stale value at once, and every value of the volume refreshed together.
        assert (await vols.content(vol.inodes["p0"])).data == b"p0-v1"
        keys = list(vol.keys.values())
        await poll(lambda: all(vols.cache.fresh(k) is not None for k in keys))
        assert proxy.count("GetParameters") == 4
        for name in names:
            want = f"{name}-v2" if name in ("p2", "p7", "p11") else f"{name}-v1"
            assert (await vols.content(vol.inodes[name])).data == want.encode()
        assert proxy.count("GetParameters") == 4
        # On demand: the same batches, whatever the TTL.
        ssm(aws_env).put_parameter(Name="p5", Value="p5-v3", Overwrite=True)
        assert await vols.reload("v") == {"fetched": 12, "changed": 1, "failed": 0}
        assert proxy.count("GetParameters") == 6
        assert (await vols.content(vol.inodes["p5"])).data == b"p5-v3"


async def test_a_publish_during_an_outage_uses_stale_values(
    aws_env: dict[str, str],
    proxy: CountingProxy,
    caplog: pytest.LogCaptureFixture,
    mock_clock: trio.testing.MockClock,
) -> None:
    mock_clock.rate = 1.0
    names = put_params(aws_env, 3)
    async with running(ttl=100, max_stale=1000) as vols:
        await vols.add("a", aws_plan(names), AMBIENT, uid=0, gid=0)
        mock_clock.jump(300)
        proxy.stop()  # moto unreachable from now on
        vol = await vols.add("b", aws_plan(names), AMBIENT, uid=0, gid=0)
        assert vols.cache.stats.stale_publishes == 1
        assert re.search(
            r"volume b: published from values 30\d s old because the backend failed", caplog.text
        )
        assert (await vols.content(vol.inodes["p1"])).data == b"p1-v1"
        # A value the cache never had cannot be published.
        with pytest.raises(VolumeError) as info:
            await vols.add("c", aws_plan(["p9", *names]), AMBIENT, uid=0, gid=0)
        assert info.value.errors and all(e.transient for e in info.value.errors)
        assert "p1-v1" not in caplog.text


# --- the node daemon: add, reload op, SIGHUP, CLI, publishing from stale ---------------------


IRSA = {
    "namespace": "ns",
    "service_account": "sa",
    "sa_annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/r"},
    "tokens": {"sts.amazonaws.com": {"token": "a.b.c"}},
}


async def test_daemon_reload_sighup_cli_and_stale_publish(
    tmp_path: Path,
    aws_env: dict[str, str],
    proxy: CountingProxy,
    nursery: trio.Nursery,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr("secretfs.daemon.harden", lambda lock: {})
    names = put_params(aws_env, 3)
    path = str(tmp_path / "d.sock")
    started = trio.Event()
    daemons: list[Daemon] = []

    def ready(daemon: Daemon) -> None:
        daemons.append(daemon)
        started.set()

    opts = DaemonOptions(ttl=1, max_stale=100, lock_memory=False, min_ttl=5, max_ttl=50)
    nursery.start_soon(serve, path, opts, ready)
    await started.wait()
    daemons[0].attached = True  # the operations, not the FUSE session, are this test's subject
    vols = daemons[0].volumes
    client = control.Client(path)

    async def call(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        return await trio.to_thread.run_sync(lambda: fn(*args, **kw))

    spc = {k: v for k, v in aws_spc(names)["spec"].items()}
    spc["name"] = "app"
    await call(client.add, "vol-1", spc, {}, IRSA, 0, 30)
    assert vols.volumes["vol-1"].plan.ttl is None  # a record without "ttl": an older csi
    await call(client.add, "vol-2", {**spc, "ttl": 2.0}, {}, IRSA, 0, 30)
    assert vols.volumes["vol-2"].plan.ttl == 2.0
    assert vols.ttl_of(vols.volumes["vol-2"].plan) == 5  # clamped to --min-ttl
    # Its values are vol-1's too, whose TTL (the default, 1 s) is shorter: the shortest holds.
    assert vols.cache.ttl_of(key_of(vols, "vol-2", "p0")) == 1
    with pytest.raises(ControlError) as info:
        await call(client.add, "vol-3", {**spc, "ttl": "soon"}, {}, IRSA, 0, 30)
    assert info.value.code == control.INVALID_ARGUMENT and "soon" in info.value.message

    # The control operation: one volume, every volume, and what it refuses.
    ssm(aws_env).put_parameter(Name="p1", Value="p1-v2", Overwrite=True)
    calls = proxy.count("GetParameters")
    answer = await call(client.reload, "vol-1")
    assert answer == {"ok": True, "fetched": 3, "changed": 1, "failed": 0}
    assert proxy.count("GetParameters") == calls + 1  # one batch for the volume
    answer = await call(client.reload, None)  # vol-1: joins the reload above (just ended)
    assert answer == {"ok": True, "fetched": 3, "changed": 1, "failed": 0}
    assert await call(client.call, "reload") == answer  # absent: every volume (both joined)
    for vid, code in (("nope", control.NOT_FOUND), ("../x", control.INVALID_ARGUMENT)):
        with pytest.raises(ControlError) as info:
            await call(client.reload, vid)
        assert info.value.code == code

    # The command, against the daemon's socket.
    capsys.readouterr()
    assert await call(cli, ["refresh", "--volume", "vol-2", "--socket", path]) == 0
    assert capsys.readouterr().out == "fetched=3 changed=0 failed=0\n"
    assert await call(cli, ["refresh", "--volume", "nope", "--socket", path]) == 1
    assert "volume nope is not published" in capsys.readouterr().err
    assert await call(cli, ["refresh", "--socket", path]) == 2

    # SIGHUP: every volume (the reloads above forgotten: coalescing is not this part's subject).
    vols._reloads.clear()
    ssm(aws_env).put_parameter(Name="p2", Value="p2-v2", Overwrite=True)
    calls = proxy.count("GetParameters")
    os.kill(os.getpid(), signal.SIGHUP)
    await poll(lambda: "SIGHUP: reloaded 2 volume(s)" in caplog.text)
    assert "SIGHUP: reloaded 2 volume(s): 3 value(s) fetched, 1 changed, 0 failed" in caplog.text
    assert proxy.count("GetParameters") - calls in (1, 2)  # a batch per volume, or one shared
    assert (await vols.content(vols.volumes["vol-1"].inodes["p2"])).data == b"p2-v2"

    # An outage: a new pod of the same identity is published from the values the node has.
    keys = list(vols.volumes["vol-1"].keys.values())
    await poll(lambda: not vols.cache._inflight and all(vols.cache.fresh(k) is None for k in keys))
    proxy.stop()
    answer = await call(client.add, "vol-4", spc, {}, IRSA, 0, 30)
    assert answer["existing"] is False
    assert "volume vol-4: published from values" in caplog.text
    assert vols.cache.stats.stale_publishes == 1
    # ... and an on-demand reload says what failed.
    vols._reloads.clear()
    assert await call(cli, ["refresh", "--all", "--socket", path]) == 1
    out = capsys.readouterr()
    assert out.out == "fetched=0 changed=0 failed=3\n" and "could not be fetched" in out.err
    nursery.cancel_scope.cancel()


# --- a real mount: the attribute, the command, a class TTL ---------------------------------------


def _probe_size(path: Path, name: bytes) -> int:
    """getxattr(2) with size 0: the kernel asks the filesystem for the value's size."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.getxattr.restype = ctypes.c_ssize_t
    libc.getxattr.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
    n = int(libc.getxattr(os.fsencode(path), name, None, 0))
    if n < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return n


@needs_fuse
@pytest.mark.fuse
def test_refresh_a_mounted_directory(
    aws_env: dict[str, str], proxy: CountingProxy, tmp_path: Path
) -> None:
    import yaml

    def refresh(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "secretfs", "refresh", str(path)],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            check=False,
        )

    names = put_params(aws_env, 12)
    spc_text = yaml.safe_dump(aws_spc(names, ttl="3s"))
    # The node default is 300 s; the class asks for 3 s, which --min-ttl 1 allows.
    with mounted(spc_text, tmp_path, "--ttl", "300", "--min-ttl", "1") as m:
        assert proxy.count("GetParameters") == 2
        ssm(aws_env).put_parameter(Name="p3", Value="p3-v2", Overwrite=True)
        # A size probe, then the read (what getfattr does): one reload, one answer.
        size = _probe_size(m.path, XATTR)
        assert proxy.count("GetParameters") == 4
        value = os.getxattr(m.path, XATTR)
        assert value == b"fetched=12 changed=1 failed=0" and len(value) == size
        assert m.read("p3") == b"p3-v2"
        # The command joins the reload of a moment ago (nobody can hammer the backend).
        res = refresh(m.path)
        assert (res.returncode, res.stdout) == (0, "fetched=12 changed=1 failed=0\n"), res.stderr
        assert proxy.count("GetParameters") == 4
        assert os.listxattr(m.path) == []
        # The class's TTL (3 s), not the node's (300 s): a rotation shows within seconds, the
        # volume's values refreshed in batches of 12 (two calls each).
        ssm(aws_env).put_parameter(Name="p8", Value="p8-v2", Overwrite=True)
        calls = proxy.count("GetParameters")
        assert wait_for(lambda: m.read("p8") == b"p8-v2", timeout=20)
        delta = proxy.count("GetParameters") - calls
        assert delta >= 2 and delta % 2 == 0
        # Anything but a volume's directory: a plain directory, a secret file.
        for other in (tmp_path, m.file("p0")):
            res = refresh(other)
            assert res.returncode == 1 and "not a secretfs volume directory" in res.stderr
        assert "p8-v2" not in m.log() and "p3-v2" not in m.log()


def test_refresh_needs_a_target(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["refresh"]) == 2
    assert cli(["refresh", "/", "--all"]) == 2
    assert "give a MOUNTPOINT, --volume ID or --all" in capsys.readouterr().err
    assert cli(["refresh", "--all", "--socket", "/nonexistent/d.sock"]) == 1
    assert "not reachable" in capsys.readouterr().err


def test_refresh_of_a_plain_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["refresh", str(tmp_path)]) == 1
    assert "not a secretfs volume directory" in capsys.readouterr().err


def test_chart_passes_the_ttl_bounds_to_the_daemon() -> None:
    deploy = pytest.importorskip("tests.test_deploy")

    def args(values: dict[str, Any] | None) -> list[str]:
        ds = deploy.one(deploy.render(values), "DaemonSet", "-daemon")
        out: list[str] = deploy.container(ds, "daemon")["args"]
        return out

    default = args(None)
    assert default[default.index("--min-ttl") + 1] == "10" and "--max-ttl" not in default
    set_ = args({"cache": {"minTtl": 5, "maxTtl": 600}})
    assert set_[set_.index("--min-ttl") + 1] == "5" and set_[set_.index("--max-ttl") + 1] == "600"
    with pytest.raises(deploy.helm.HelmError, match="/cache/minTtl"):
        deploy.render({"cache": {"minTtl": 0}})
