"""FUSE handlers called directly, without the kernel, over a fake provider."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import AsyncIterator, Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pyfuse3
import pytest
import trio
import trio.testing

import providers
from providers.base import AMBIENT, FetchError, Identity
from secretfs.fs import FH_SHIFT, SecretFS
from secretfs.tree import ROOT_INODE
from secretfs.volumes import VolumeError, Volumes
from tests.fake_provider import FakeProvider

CTX = pyfuse3.RequestContext()
OBJECTS = """
- name: db
- name: api
  path: app/api-key
  mode: "0640"
"""


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeProvider]:
    prov = FakeProvider()
    monkeypatch.setitem(providers.REGISTRY, "fake", "tests.fake_provider:FakeProvider")
    monkeypatch.setitem(providers._instances, "fake", prov)
    prov.set("db", b"password-1")
    prov.set("api", b"key-1")
    yield prov


@pytest.fixture
async def fs(fake: FakeProvider) -> AsyncIterator[SecretFS]:
    async with trio.open_nursery() as n:
        vols = Volumes(ttl=10, max_stale=100)
        vols.start(n)
        plan = fake.parse({"objects": OBJECTS})
        await vols.add("v", plan, AMBIENT, uid=7, gid=8, at_root=True)
        yield SecretFS(vols)
        n.cancel_scope.cancel()


async def ino(fs: SecretFS, path: str) -> int:
    cur = ROOT_INODE
    for part in path.split("/"):
        cur = (await fs.lookup(cur, part.encode(), CTX)).st_ino
    return cur


async def read_all(fs: SecretFS, inode: int) -> bytes:
    fi = await fs.open(inode, os.O_RDONLY, CTX)
    try:
        return await fs.read(fi.fh, 0, 1 << 20)
    finally:
        await fs.release(fi.fh)


async def test_lookup_getattr_and_read(fs: SecretFS) -> None:
    db = await ino(fs, "db")
    attrs = await fs.getattr(db, CTX)
    assert stat.S_ISREG(attrs.st_mode) and stat.S_IMODE(attrs.st_mode) == 0o644
    assert (attrs.st_uid, attrs.st_gid, attrs.st_size) == (7, 8, len(b"password-1"))
    assert await read_all(fs, db) == b"password-1"
    api = await ino(fs, "app/api-key")
    assert stat.S_IMODE((await fs.getattr(api, CTX)).st_mode) == 0o640
    app = await ino(fs, "app")
    assert stat.S_ISDIR((await fs.getattr(app, CTX)).st_mode)
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await fs.lookup(ROOT_INODE, b"nope", CTX)
    assert exc.value.errno == errno.ENOENT
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await fs.getattr(99999, CTX)
    assert exc.value.errno == errno.ENOENT


async def test_reads_slice_the_snapshot(fs: SecretFS) -> None:
    db = await ino(fs, "db")
    fi = await fs.open(db, os.O_RDONLY, CTX)
    assert await fs.read(fi.fh, 3, 4) == b"swor"
    assert await fs.read(fi.fh, 100, 4) == b""
    await fs.release(fi.fh)


async def test_handles_of_an_earlier_generation_are_served(fs: SecretFS) -> None:
    # After a takeover the kernel sends READ and RELEASE with handles an earlier daemon issued:
    # the handle carries its inode, so this process serves it (and from then on one version).
    db = await ino(fs, "db")
    issued = await fs.open(db, os.O_RDONLY, CTX)
    assert issued.fh >> FH_SHIFT == db
    foreign = (db << FH_SHIFT) | 0xABCDEF
    assert await fs.read(foreign, 0, 100) == b"password-1"
    assert fs.adopted == 1
    assert await fs.read(foreign, 4, 4) == b"word"
    assert fs.adopted == 1
    await fs.release(foreign)
    await fs.release((db << FH_SHIFT) | 0x123)  # never seen: nothing to do
    # A handle whose inode is gone (or never was a file) is refused, not guessed at.
    for fh in ((99999 << FH_SHIFT) | 1, 1 << FH_SHIFT, 0):
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await fs.read(fh, 0, 1)
        assert exc.value.errno == errno.EBADF
    await fs.release(issued.fh)


async def test_no_open_mode_reads_by_inode_the_version_the_kernel_was_told(
    fs: SecretFS,
    fake: FakeProvider,
    mock_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No-open mode: OPEN answers ENOSYS (after the checks an open must still fail), READs name
    the inode and get the version whose size the kernel was last told, so the bytes always match
    the size it clips at; a new generation serves them too."""
    mock_clock.rate = 1
    fs.no_open = True
    db = await ino(fs, "db")  # the lookup tells the kernel v1's size
    for inode, flags, err in (
        (db, os.O_RDONLY, errno.ENOSYS),
        (db, os.O_WRONLY, errno.EROFS),
        (await ino(fs, "app"), os.O_RDONLY, errno.EISDIR),
    ):
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await fs.open(inode, flags, CTX)
        assert exc.value.errno == err
    assert await fs.read(db, 0, 100) == b"password-1"
    assert await fs.read(db, 4, 4) == b"word"
    fake.set("db", b"password-2-longer")
    mock_clock.jump(11)
    await fs.getattr(db, CTX)  # past the TTL: still v1's size, and the refresh starts
    await until(lambda: fake.calls["db"] == 2 and not fs.volumes.cache._inflight)
    # The cache has v2 now, but until the kernel is told its size READs keep answering v1.
    assert await fs.read(db, 0, 100) == b"password-1"
    assert (await fs.getattr(db, CTX)).st_size == len(b"password-2-longer")
    assert await fs.read(db, 0, 100) == b"password-2-longer"
    assert fs.no_open_reads == 4
    # A new daemon generation (takeover) has told the kernel nothing: it serves the current one,
    # also if it chose the open path (the kernel keeps no-open mode), saying once what that costs.
    assert await SecretFS(fs.volumes, no_open=True).read(db, 9, 100) == b"2-longer"
    opened = SecretFS(fs.volumes, no_open=False)
    assert await opened.read(db, 9, 100) == b"2-longer"
    assert await opened.read(db, 0, 8) == b"password"
    said = [r for r in caplog.records if "serves no-open reads" in r.getMessage()]
    assert len(said) == 1 and "--audit writes no lines" in said[0].getMessage()
    # No inode, or not a file: refused, never guessed at.
    for bad in (0, 99999, ROOT_INODE):
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await fs.read(bad, 0, 1)
        assert exc.value.errno == errno.EBADF


@pytest.mark.parametrize("flags", [os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC])
async def test_open_for_writing_is_erofs(fs: SecretFS, flags: int) -> None:
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await fs.open(await ino(fs, "db"), flags, CTX)
    assert exc.value.errno == errno.EROFS


def setattr_fields(**set: bool) -> Any:
    """What pyfuse3 passes as SetattrFields (its attributes cannot be set from Python)."""
    names = ("atime", "mtime", "ctime", "mode", "uid", "gid", "size")
    return SimpleNamespace(**{f"update_{n}": False for n in names} | set)


async def test_every_write_handler_is_erofs(fs: SecretFS) -> None:
    db = await ino(fs, "db")
    changes = [
        setattr_fields(update_mtime=True, **{name: True})
        for name in ("update_mode", "update_uid", "update_gid", "update_size")
    ]
    times = setattr_fields(update_atime=True, update_mtime=True)
    calls = [
        *(fs.setattr(db, pyfuse3.EntryAttributes(), f, None, CTX) for f in changes),
        fs.setattr(await ino(fs, "app"), pyfuse3.EntryAttributes(), times, None, CTX),
        fs.mknod(ROOT_INODE, b"n", 0o644, 0, CTX),
        fs.mkdir(ROOT_INODE, b"d", 0o755, CTX),
        fs.unlink(ROOT_INODE, b"db", CTX),
        fs.rmdir(ROOT_INODE, b"app", CTX),
        fs.symlink(ROOT_INODE, b"l", b"db", CTX),
        fs.rename(ROOT_INODE, b"db", ROOT_INODE, b"x", 0, CTX),
        fs.link(db, ROOT_INODE, b"h", CTX),
        fs.write(1, 0, b"x"),
        fs.create(ROOT_INODE, b"c", 0o644, os.O_WRONLY, CTX),
        fs.setxattr(db, b"user.a", b"1", CTX),
        fs.removexattr(db, b"user.a", CTX),
    ]
    for call in calls:
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await call
        assert exc.value.errno == errno.EROFS


async def test_a_time_only_setattr_answers_the_files_own_attributes(fs: SecretFS) -> None:
    """What an announcement's touch sends (secretfs/announce.py): nothing is stored, the answer
    is the file's own attributes."""
    db = await ino(fs, "db")
    before = await fs.getattr(db, CTX)
    times = setattr_fields(update_atime=True, update_mtime=True)
    wanted = pyfuse3.EntryAttributes()
    wanted.st_mtime_ns = wanted.st_atime_ns = 12345
    after = await fs.setattr(db, wanted, times, None, CTX)
    assert after.st_mtime_ns == before.st_mtime_ns != 12345
    assert (after.st_size, after.st_mode) == (before.st_size, before.st_mode)
    assert fs.announced == 1


async def test_open_a_directory_or_missing_inode(fs: SecretFS) -> None:
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await fs.open(await ino(fs, "app"), os.O_RDONLY, CTX)
    assert exc.value.errno == errno.EISDIR
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await fs.open(4242, os.O_RDONLY, CTX)
    assert exc.value.errno == errno.ENOENT
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await fs.opendir(await ino(fs, "db"), CTX)
    assert exc.value.errno == errno.ENOTDIR


@pytest.mark.expect_errors
async def test_unexpected_exceptions_become_eio(
    fs: SecretFS, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "the-" + "secret-value"

    async def boom(inode: int) -> None:
        raise KeyError(secret)

    monkeypatch.setattr(fs.volumes, "content", boom)
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await fs.open(await ino(fs, "db"), os.O_RDONLY, CTX)
    assert exc.value.errno == errno.EIO
    # Logged with its type, never with its message (which could quote data).
    assert "KeyError" in caplog.text
    assert "the-secret-value" not in caplog.text


async def until(predicate: Callable[[], bool]) -> None:
    with trio.fail_after(10):
        while not predicate():  # noqa: ASYNC110 (polling a worker thread's effect)
            await trio.sleep(0.01)


async def test_fetch_failure_is_eio_with_cause_logged(
    fs: SecretFS,
    fake: FakeProvider,
    caplog: pytest.LogCaptureFixture,
    mock_clock: trio.testing.MockClock,
) -> None:
    mock_clock.rate = 1
    db = await ino(fs, "db")
    fake.fail["db"] = FetchError("db", "backend unreachable", transient=True)
    mock_clock.jump(101)  # past max_stale: nothing left to serve
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await fs.open(db, os.O_RDONLY, CTX)
    assert exc.value.errno == errno.EIO
    assert "backend unreachable" in caplog.text


async def test_handles_of_two_versions_never_share_the_page_cache(
    fs: SecretFS, fake: FakeProvider, mock_clock: trio.testing.MockClock
) -> None:
    mock_clock.rate = 1
    db = await ino(fs, "db")
    await fs.getattr(db, CTX)  # the kernel learns v1's size
    first = await fs.open(db, os.O_RDONLY, CTX)
    assert not first.direct_io
    fake.set("db", b"password-2-longer")
    mock_clock.jump(11)
    assert await read_all(fs, db) == b"password-1"  # stale: served, and a refresh starts
    await until(lambda: fake.calls["db"] == 2 and not fs.volumes.cache._inflight)
    second = await fs.open(db, os.O_RDONLY, CTX)
    assert await fs.read(second.fh, 0, 100) == b"password-2-longer"
    # v1 is still open: v2 must bypass the page cache, and getattr covers both sizes.
    assert second.direct_io
    assert (await fs.getattr(db, CTX)).st_size == len(b"password-2-longer")
    assert await fs.read(first.fh, 0, 100) == b"password-1"
    await fs.release(first.fh)
    await fs.release(second.fh)
    # All old handles gone and the kernel told v2's size: back to the page cache, which must be
    # dropped once (keep_cache false) because it may hold v1's pages.
    await fs.getattr(db, CTX)
    third = await fs.open(db, os.O_RDONLY, CTX)
    assert not third.direct_io and not third.keep_cache
    fourth = await fs.open(db, os.O_RDONLY, CTX)
    assert not fourth.direct_io and fourth.keep_cache


async def test_mount_time_fetch_failure_names_the_object(fake: FakeProvider) -> None:
    async with trio.open_nursery() as n:
        vols = Volumes(ttl=10, max_stale=100)
        vols.start(n)
        plan = fake.parse({"objects": "- name: db\n- name: missing\n"})
        with pytest.raises(VolumeError, match=r"'missing'.*not found"):
            await vols.add("v", plan, AMBIENT, uid=0, gid=0)
        assert vols.volumes == {} and len(vols.tree.nodes) == 1
        n.cancel_scope.cancel()


async def test_identity_is_part_of_the_cache_key(fake: FakeProvider) -> None:
    async with trio.open_nursery() as n:
        vols = Volumes(ttl=10, max_stale=100)
        vols.start(n)
        plan = fake.parse({"objects": "- name: db\n"})
        alice = Identity(namespace="ns", service_account="alice")
        bob = Identity(namespace="ns", service_account="bob")
        await vols.add("a1", plan, alice, uid=0, gid=0)
        await vols.add("a2", plan, alice, uid=0, gid=0)
        await vols.add("b1", plan, bob, uid=0, gid=0)
        keys = {vols.volumes[v].keys[plan.files[0]] for v in ("a1", "a2", "b1")}
        assert len(keys) == 2
        # Volumes of one identity share the value; dropping one keeps it for the other.
        await vols.remove("a1")
        assert vols.cache.peek(vols.volumes["a2"].keys[plan.files[0]]) is not None
        await vols.remove("a2")
        await vols.remove("b1")
        assert len(vols.cache) == 0
        n.cancel_scope.cancel()


async def test_volumes_of_one_class_share_a_files_rendering(fake: FakeProvider) -> None:
    """Pods of one class and identity hold one rendering of a file's version, not one each; a
    class with another FileSpec for the same value renders its own; a change reaches all."""
    async with trio.open_nursery() as n:
        vols = Volumes(ttl=10, max_stale=100)
        vols.start(n)
        fake.set("db", b"first")
        plan = fake.parse({"objects": "- name: db\n"})
        other = fake.parse({"objects": "- name: db\n  path: renamed\n"})
        await vols.add("a", plan, AMBIENT, uid=0, gid=0)
        await vols.add("b", plan, AMBIENT, uid=0, gid=0)
        await vols.add("c", other, AMBIENT, uid=0, gid=0)
        ino = {"a": vols.volumes["a"].inodes["db"], "b": vols.volumes["b"].inodes["db"]}
        ino["c"] = vols.volumes["c"].inodes["renamed"]
        got = {v: await vols.content(i) for v, i in ino.items()}
        assert got["a"] is got["b"]
        assert got["c"] is not got["a"] and got["a"].data == got["c"].data == b"first"
        fake.set("db", b"second")
        await vols.reload("a")
        now = {v: await vols.content(i) for v, i in ino.items()}
        assert now["a"] is now["b"] and now["a"].version != got["a"].version
        assert {r.data for r in now.values()} == {b"second"}
        n.cancel_scope.cancel()


async def test_dynamic_sources_belong_to_one_volume(fake: FakeProvider) -> None:
    async with trio.open_nursery() as n:
        vols = Volumes(ttl=10, max_stale=100)
        vols.start(n)
        plan = fake.parse({"objects": "- name: creds\n  dynamic: true\n"})
        fake.set("creds", b"user-1")
        await vols.add("a", plan, AMBIENT, uid=0, gid=0)
        fake.set("creds", b"user-2")
        await vols.add("b", plan, AMBIENT, uid=0, gid=0)
        ka, kb = (vols.volumes[v].keys[plan.files[0]] for v in "ab")
        assert ka != kb
        assert vols.cache.peek(ka, dynamic=True).data == b"user-1"  # type: ignore[union-attr]
        assert vols.cache.peek(kb, dynamic=True).data == b"user-2"  # type: ignore[union-attr]
        n.cancel_scope.cancel()


async def test_last_close_of_an_old_version_invalidates_the_inode(
    fs: SecretFS,
    fake: FakeProvider,
    mock_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mock_clock.rate = 1
    invalidated: list[set[int]] = []
    monkeypatch.setattr(fs, "invalidate", invalidated.append)
    cache = fs.volumes.cache
    db = await ino(fs, "db")

    async def change(value: bytes) -> None:
        calls = fake.calls["db"]
        fake.set("db", value)
        mock_clock.jump(11)
        await read_all(fs, db)  # stale: served, and a refresh starts
        await until(lambda: fake.calls["db"] == calls + 1 and not cache._inflight)

    async def release(fh: int) -> list[set[int]]:
        invalidated.clear()
        await fs.release(fh)
        return list(invalidated)

    # Closing a handle of the current version: nothing to invalidate.
    await fs.getattr(db, CTX)
    h1 = await fs.open(db, os.O_RDONLY, CTX)
    assert await release(h1.fh) == []
    # The value changed and nothing opened the new one yet.
    h1 = await fs.open(db, os.O_RDONLY, CTX)
    await change(b"password-2")
    assert await release(h1.fh) == [{db}]
    # The value changed and the new version is already open.
    h2 = await fs.open(db, os.O_RDONLY, CTX)
    await change(b"password-3")
    h3 = await fs.open(db, os.O_RDONLY, CTX)
    assert await fs.read(h3.fh, 0, 100) == b"password-3"
    assert await release(h2.fh) == [{db}]
    assert await release(h3.fh) == []
    # The cache dropped the value (permanent error): the last version served is still current.
    h4 = await fs.open(db, os.O_RDONLY, CTX)
    fake.fail["db"] = FetchError("db", "gone", transient=False)
    mock_clock.jump(11)
    await read_all(fs, db)
    await until(lambda: len(cache) == 1 and not cache._inflight)  # only "api" is left
    assert await release(h4.fh) == []


async def test_a_restored_volume_keeps_its_inodes_and_fetches_on_first_use(
    fake: FakeProvider,
) -> None:
    # The next daemon generation rebuilds a volume with the inode numbers the kernel holds, and
    # answers getattr of a value it has not fetched yet by fetching it (never size 0).
    async with trio.open_nursery() as n:
        first = Volumes(ttl=10, max_stale=100)
        first.start(n)
        plan = fake.parse({"objects": OBJECTS})
        await first.add("other", plan, AMBIENT, uid=0, gid=0)
        vol = await first.add("v", plan, AMBIENT, uid=0, gid=0)
        assert set(vol.inodes) == {"", "db", "app", "app/api-key"}
        high = first.tree.next_inode

        second = Volumes(ttl=10, max_stale=100)
        second.start(n)
        second.tree.reserve(high)
        fake.set("api", b"key-2-longer")
        calls = sum(fake.calls.values())
        again = await second.add("v", plan, AMBIENT, uid=0, gid=0, restore=vol.inodes)
        assert again.inodes == vol.inodes
        assert sum(fake.calls.values()) == calls  # nothing fetched yet
        fs = SecretFS(second)
        api = vol.inodes["app/api-key"]
        assert (await fs.getattr(api, CTX)).st_size == len(b"key-2-longer")
        assert fake.calls["api"] == 2
        # New numbers start above every number the earlier generation handed out.
        new = await second.add("new", plan, AMBIENT, uid=0, gid=0)
        assert min(new.inodes.values()) >= high
        n.cancel_scope.cancel()


async def test_an_identity_is_released_with_its_last_volume(fake: FakeProvider) -> None:
    import dataclasses

    async with trio.open_nursery() as n:
        vols = Volumes(ttl=10, max_stale=100)
        vols.start(n)
        plan = fake.parse({"objects": OBJECTS})
        pod = dataclasses.replace(AMBIENT, namespace="ns", service_account="a")
        other = dataclasses.replace(pod, service_account="b")
        await vols.add("a1", plan, pod, uid=0, gid=0)
        await vols.add("a2", plan, pod, uid=0, gid=0)
        await vols.add("b1", plan, other, uid=0, gid=0)
        await vols.remove("a1")
        assert fake.released == []  # a2 still uses that identity
        await vols.remove("a2")
        assert fake.released == [pod.key()]
        await vols.remove("b1")
        assert fake.released == [pod.key(), other.key()]
        assert not vols.cache._static  # and no value is left in memory
        n.cancel_scope.cancel()
