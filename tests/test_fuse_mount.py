"""Real FUSE mounts of AWS-backed SecretProviderClasses, served by a moto server process."""

from __future__ import annotations

import errno
import itertools
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import boto3
import pytest

from secretfs.readpath import no_open_supported
from tests.moto_server import FAKE_KEYS, _answers, _free_port
from tests.mounting import ROOT, Mount, MountFailed, is_mounted, mounted, needs_fuse, wait_for
from tests.ns_reader import NsReader

pytestmark = [needs_fuse, pytest.mark.fuse]

NOBODY = 65534

SPC = """\
apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: app
spec:
  provider: aws
  parameters:{extra}
    objects: |
{objects}
"""


def spc(*objects: str, **params: str) -> str:
    body = "\n".join(" " * 6 + line for obj in objects for line in obj.strip().splitlines())
    extra = "".join(f"\n    {k}: {v!r}" for k, v in params.items())
    return SPC.format(objects=body, extra=extra)


def sm(env: dict[str, str]) -> Any:
    return boto3.client(
        "secretsmanager", region_name=env["region"], endpoint_url=env["endpoint_url"]
    )


def ssm(env: dict[str, str]) -> Any:
    return boto3.client("ssm", region_name=env["region"], endpoint_url=env["endpoint_url"])


DB = '- objectName: "MyDatabasePassword"\n  objectType: "secretsmanager"'


def eio(m: Mount, name: str) -> bool:
    """True if reading ``name`` fails with EIO right now."""
    try:
        m.read(name)
    except OSError as exc:
        return exc.errno == errno.EIO
    return False


def as_nobody(*cmd: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(list(cmd), user=NOBODY, group=NOBODY, capture_output=True, check=False)


def test_listing_content_modes_and_subdirectories(aws_env: dict[str, str], tmp_path: Path) -> None:
    sm(aws_env).create_secret(Name="MyDatabasePassword", SecretString="s3cr3t-db")
    sm(aws_env).create_secret(Name="prod/api/key", SecretString='{"user": "u1", "pass": "p1"}')
    ssm(aws_env).put_parameter(Name="/app/flag", Value="on", Type="SecureString")
    objects = [
        DB,
        """
- objectName: "prod/api/key"
  objectType: "secretsmanager"
  objectAlias: "api/key.json"
  filePermission: "0640"
  jmesPath:
    - path: "user"
      objectAlias: "api/user"
""",
        '- objectName: "/app/flag"\n  objectType: "ssmparameter"',
    ]
    # With pathTranslation off, a '/' in a name or alias makes subdirectories (upstream's rule).
    params = {"pathTranslation": "False"}
    with mounted(spc(*objects, **params), tmp_path, "--uid", "1234", "--gid", "4321") as m:
        assert sorted(os.listdir(m.path)) == sorted(["app", "api", "MyDatabasePassword"])
        assert sorted(os.listdir(m.path / "api")) == ["key.json", "user"]
        assert m.read("MyDatabasePassword") == b"s3cr3t-db"
        assert m.read("api/key.json") == b'{"user": "u1", "pass": "p1"}'
        assert m.read("api/user") == b"u1"
        assert m.read("app/flag") == b"on"

        st = os.stat(m.file("MyDatabasePassword"))
        assert stat.S_IMODE(st.st_mode) == 0o644 and stat.S_ISREG(st.st_mode)
        assert (st.st_uid, st.st_gid) == (1234, 4321)
        assert st.st_size == len(b"s3cr3t-db")
        assert stat.S_IMODE(os.stat(m.file("api/key.json")).st_mode) == 0o640
        assert stat.S_ISDIR(os.stat(m.file("api")).st_mode)
        # Inode numbers are stable across lookups.
        assert os.stat(m.file("api/user")).st_ino == os.stat(m.file("api/user")).st_ino


def test_modes_are_enforced_for_other_users(aws_env: dict[str, str], tmp_path: Path) -> None:
    sm(aws_env).create_secret(Name="public", SecretString="everyone")
    sm(aws_env).create_secret(Name="private", SecretString="owner-only")
    objects = [
        '- objectName: "public"\n  objectType: "secretsmanager"',
        '- objectName: "private"\n  objectType: "secretsmanager"\n  filePermission: "0600"',
    ]
    with mounted(spc(*objects), tmp_path, "--uid", "0", "--gid", "0") as m:
        # tmp_path's parents are root-only; let nobody reach the mount point itself.
        for p in m.path.parents:
            if p == Path("/"):
                break
            os.chmod(p, os.stat(p).st_mode | 0o005)
        ok = as_nobody("cat", str(m.file("public")))
        assert ok.returncode == 0 and ok.stdout == b"everyone"
        denied = as_nobody("cat", str(m.file("private")))
        assert denied.returncode != 0
        assert b"Permission denied" in denied.stderr
        assert m.read("private") == b"owner-only"  # root still can


def test_every_write_fails_with_erofs(aws_env: dict[str, str], tmp_path: Path) -> None:
    sm(aws_env).create_secret(Name="MyDatabasePassword", SecretString="pw")
    with mounted(spc(DB), tmp_path) as m:
        f = m.file("MyDatabasePassword")
        attempts = {
            "open for writing": lambda: os.open(f, os.O_WRONLY),
            "open read-write": lambda: os.open(f, os.O_RDWR),
            "truncate": lambda: os.truncate(f, 0),
            "create": lambda: os.open(m.file("new"), os.O_CREAT | os.O_WRONLY, 0o600),
            "chmod": lambda: os.chmod(f, 0o600),
            "chown": lambda: os.chown(f, 1, 1),
            "utime": lambda: os.utime(f, (0, 0)),
            "mkdir": lambda: os.mkdir(m.file("d")),
            "unlink": lambda: os.unlink(f),
            "rmdir": lambda: os.rmdir(m.path),
            "rename": lambda: os.rename(f, m.file("other")),
            "symlink": lambda: os.symlink("x", m.file("link")),
            "link": lambda: os.link(f, m.file("hard")),
            "setxattr": lambda: os.setxattr(f, "user.x", b"1"),
            "removexattr": lambda: os.removexattr(f, "user.x"),
        }
        for what, attempt in attempts.items():
            with pytest.raises(OSError) as exc:
                attempt()
            # rmdir of the mount point itself is EBUSY before the filesystem is even asked.
            expected = {errno.EROFS, errno.EBUSY} if what == "rmdir" else {errno.EROFS}
            assert exc.value.errno in expected, f"{what}: {exc.value}"
        assert m.read("MyDatabasePassword") == b"pw"


def test_rotation_is_visible_after_ttl_without_remount(
    aws_env: dict[str, str], tmp_path: Path
) -> None:
    client = sm(aws_env)
    client.create_secret(Name="MyDatabasePassword", SecretString="v1")
    with mounted(spc(DB), tmp_path, "--ttl", "1") as m:
        assert m.read("MyDatabasePassword") == b"v1"
        client.put_secret_value(SecretId="MyDatabasePassword", SecretString="version-two-longer")
        # Within the TTL the cached value is served without asking the backend.
        assert m.read("MyDatabasePassword") == b"v1"
        assert wait_for(lambda: m.read("MyDatabasePassword") == b"version-two-longer")
        assert os.stat(m.file("MyDatabasePassword")).st_size == len(b"version-two-longer")
        client.put_secret_value(SecretId="MyDatabasePassword", SecretString="3")
        assert wait_for(lambda: m.read("MyDatabasePassword") == b"3")
        assert os.stat(m.file("MyDatabasePassword")).st_size == 1


@pytest.mark.parametrize(
    ("module", "args"),
    [("secretfs", ("--read-path", "open")), ("tests.stock_pyfuse3", ())],
    ids=["open-path", "stock-pyfuse3-falls-back"],
)
def test_an_open_file_keeps_its_version_across_rotation(
    aws_env: dict[str, str], tmp_path: Path, module: str, args: tuple[str, ...]
) -> None:
    """The open path: asked for, or the fallback on a pyfuse3 without the no-open change."""
    client = sm(aws_env)
    old = b"old-value-" + b"o" * 5000
    new = b"new"
    client.create_secret(Name="MyDatabasePassword", SecretString=old.decode())
    with mounted(spc(DB), tmp_path, "--ttl", "1", *args, module=module) as m:
        assert "read path: open" in m.log()
        fd = os.open(m.file("MyDatabasePassword"), os.O_RDONLY)
        try:
            assert os.pread(fd, 10, 0) == old[:10]
            client.put_secret_value(SecretId="MyDatabasePassword", SecretString=new.decode())
            assert wait_for(lambda: m.read("MyDatabasePassword") == new)
            # The handle opened before the rotation still reads the old version, whole.
            assert os.pread(fd, len(old) + 100, 0) == old
            assert m.read("MyDatabasePassword") == new
            assert os.pread(fd, 100, 4000) == old[4000:4100]
        finally:
            os.close(fd)
        # With the old handle gone, new opens keep reading the new version.
        assert m.read("MyDatabasePassword") == new
        # The kernel sends RELEASE asynchronously after close(): until the daemon has it, stat
        # still covers the old version's size (docs/INTERNALS.md). Guaranteed: shortly after.
        size = m.file("MyDatabasePassword")
        assert wait_for(lambda: os.stat(size).st_size == len(new), timeout=5, interval=0.01)


PAGE = 4096


def torn(data: bytes, values: list[bytes]) -> bool:
    """``data`` is what a read overlapping a change can return (measured; docs/INTERNALS.md):
    page by page, one version's bytes, the tail of a page past a version's end possibly zeros,
    at one of the versions' sizes or one rounded up to a whole page. The zeros are the kernel's:
    it zeroes a cached page past a new, shorter end in place while a reader copies it, fills a
    page past a version's end with zeros, and ends a read where a READ answered short."""
    sizes = {len(v) for v in values}
    if len(data) not in sizes | {-(-s // PAGE) * PAGE for s in sizes}:
        return False
    for off in range(0, len(data), PAGE):
        chunk = data[off : off + PAGE]
        cuts = {len(chunk)} | {s - off for s in sizes if off <= s < off + len(chunk)}
        if not any(
            chunk[:c] == v[off : off + c] and not chunk[c:].strip(b"\0")
            for v in values
            for c in cuts
        ):
            return False
    return True


def shape(data: bytes) -> list[tuple[bytes, int]]:
    """``data`` as runs of one byte: (byte, count), for a failure message."""
    return [(bytes([b]), len(list(run))) for b, run in itertools.groupby(data)]


def test_no_open_reads_each_get_one_whole_version(aws_env: dict[str, str], tmp_path: Path) -> None:
    """No-open mode, the default with the pyfuse3 `make setup` builds: opens and cached reads
    never reach the daemon, so a descriptor follows changes (one version per read, not per open;
    docs/INTERNALS.md). A read of a whole file (one READ, up to 128 KiB) is one version, on the
    host and from a container's bind, while the value changes under it.

    The real guarantee, measured: a read that overlaps the moment the kernel learns of a change
    can come back mixed (the old version's start and the new one's end, the old bytes cut at the
    new size, zeros in the last page of the shorter one: ``torn``), because the kernel's
    page-cache read holds neither pages nor size still. Here, with a change every 0.4 s, about 1
    read in 100,000 did. So the loops allow at most 1 in 1,000 such reads, each of a shape
    ``torn`` allows; every read of a settled value (the held descriptor, each value in the
    container) must be whole."""
    assert no_open_supported(), "this pyfuse3 lacks the no-open change: run `make setup`"
    client = sm(aws_env)
    name = "MyDatabasePassword"
    # Changes of size and, from the third back to the first, of content alone (same size: the
    # kernel drops its pages because the mtime changed, FUSE_AUTO_INVAL_DATA). A mixed read may
    # also involve the version before the loop (w2): seen once, A's bytes cut at w2's 2 bytes.
    values = [bytes([c]) * n for c, n in ((65, 60_000), (66, 41_000), (67, 60_000))]
    whole = (b"v2", b"w2", *values)
    client.create_secret(Name=name, SecretString=values[0].decode())
    with mounted(spc(DB), tmp_path, "--ttl", "1") as m:
        assert "read path: no-open" in m.log()
        path = m.file(name)
        held = os.open(path, os.O_RDONLY)
        try:
            assert os.pread(held, 1 << 17, 0) == values[0]
            client.put_secret_value(SecretId=name, SecretString="v2")
            assert wait_for(lambda: os.pread(held, 1 << 17, 0) == b"v2")
            assert os.fstat(held).st_size == 2  # no RELEASE to wait for: the size is current
            client.put_secret_value(SecretId=name, SecretString="w2")
            assert wait_for(lambda: os.pread(held, 1 << 17, 0) == b"w2")
        finally:
            os.close(held)
        # The host reads whole files in a loop while the value changes every 0.4 s.
        seen: list[bytes] = []
        stop = time.monotonic() + 6
        i = 0
        while time.monotonic() < stop:
            i += 1
            client.put_secret_value(SecretId=name, SecretString=values[i % 3].decode())
            until = time.monotonic() + 0.4
            while time.monotonic() < until:
                with open(path, "rb", buffering=0) as f:
                    seen.append(f.read(1 << 17))
        mixed = [s for s in seen if s not in whole]
        assert len(mixed) * 1000 <= len(seen), f"{len(mixed)} of {len(seen)} reads were mixed"
        assert all(torn(s, [*whole]) for s in mixed), [shape(s) for s in mixed]
        assert len(set(seen)) >= 2, "no change was seen in 6 s with a 1 s TTL"
        # A container's view: a bind made in a private mount namespace, read in a loop
        # (open+read+close, and pread on a descriptor held throughout), the host silent. The
        # last change is of content alone (C to A, both 60,000 bytes).
        ctr = NsReader(str(m.path), str(tmp_path / "ctr"), name)
        for value in (values[1], values[2], values[0]):
            client.put_secret_value(SecretId=name, SecretString=value.decode())
            time.sleep(4)  # TTL 1 s + the 1 s attribute cache + the fetch, with room to spare
        summary = ctr.finish()
        in_ctr = summary["seen"]
        assert isinstance(in_ctr, dict) and summary["errors"] == {}, summary["errors"]
        odd = [k.encode() for k in in_ctr if k.encode() not in whole]
        assert sum(in_ctr[k.decode()] for k in odd) * 1000 <= summary["reads"], odd
        assert all(torn(k, [*whole]) for k in odd), [shape(k) for k in odd]
        assert {v.decode() for v in values} <= set(in_ctr)


def test_a_dead_mount_of_a_killed_daemon_is_replaced(
    aws_env: dict[str, str], tmp_path: Path
) -> None:
    sm(aws_env).create_secret(Name="MyDatabasePassword", SecretString="v1")
    with mounted(spc(DB), tmp_path) as m:
        m.proc.kill()
        m.proc.wait(10)
        with pytest.raises(OSError) as info:
            m.read("MyDatabasePassword")
        assert info.value.errno == errno.ENOTCONN
        # A new mount on the same directory detaches the dead one (it is ours) and serves.
        with mounted(spc(DB), tmp_path) as again:
            assert again.read("MyDatabasePassword") == b"v1"
            assert "detaching the dead mount" in again.log()
    assert not is_mounted(tmp_path / "mnt")


@pytest.mark.slow
def test_backend_down_serves_stale_then_eio(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A moto of our own, so we can kill it.
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **FAKE_KEYS},
    )
    try:
        assert wait_for(lambda: _answers(url), timeout=30)
        env = {"endpoint_url": url, "region": "us-east-1"}
        for k, v in {
            "AWS_ENDPOINT_URL": url,
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
        }.items():
            monkeypatch.setenv(k, v)
        sm(env).create_secret(Name="MyDatabasePassword", SecretString="still-here")
        with mounted(spc(DB), tmp_path, "--ttl", "1", "--max-stale", "4") as m:
            assert m.read("MyDatabasePassword") == b"still-here"
            proc.terminate()
            proc.wait(10)
            time.sleep(1.2)
            # Past the TTL, the backend is down: the last good value is still served.
            assert m.read("MyDatabasePassword") == b"still-here"
            # Past max staleness: EIO, and the cause is in the log.
            assert wait_for(lambda: eio(m, "MyDatabasePassword"), timeout=20)
            assert is_mounted(m.path)
            assert "Could not connect" in m.log() or "unreachable" in m.log().lower()
            assert "still-here" not in m.log()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_handler_fault_leaves_the_mount_serving(aws_env: dict[str, str], tmp_path: Path) -> None:
    sm(aws_env).create_secret(Name="MyDatabasePassword", SecretString="fine")
    sm(aws_env).create_secret(Name="boom", SecretString="never-read")
    objects = [DB, '- objectName: "boom"\n  objectType: "secretsmanager"']
    with mounted(
        spc(*objects), tmp_path, module="tests.fuse_harness", env={"SECRETFS_TEST_FAULT": "boom"}
    ) as m:
        with pytest.raises(OSError) as exc:
            m.read("boom")
        assert exc.value.errno == errno.EIO
        with pytest.raises(OSError) as exc:
            os.stat(m.file("lookup-boom"))
        assert exc.value.errno == errno.EIO
        # The daemon is alive and the other file still reads.
        assert m.proc.poll() is None
        assert m.read("MyDatabasePassword") == b"fine"
        assert "RuntimeError" in m.log() and "never-read" not in m.log()


def test_unmount_leaves_nothing_behind(aws_env: dict[str, str], tmp_path: Path) -> None:
    sm(aws_env).create_secret(Name="MyDatabasePassword", SecretString="pw")
    with mounted(spc(DB), tmp_path) as m:
        assert m.read("MyDatabasePassword") == b"pw"
        assert m.unmount() == 0
        assert not is_mounted(m.path)
        assert os.listdir(m.path) == []


def test_mount_command_fails_clearly_and_mounts_nothing(
    aws_env: dict[str, str], tmp_path: Path
) -> None:
    sm(aws_env).create_secret(Name="MyDatabasePassword", SecretString="pw")
    bad = spc(DB, '- objectName: "NoSuchSecret"\n  objectType: "secretsmanager"')
    (tmp_path / "mnt").mkdir()
    (tmp_path / "spc.yaml").write_text(bad)
    # The background form, as a user types it.
    res = subprocess.run(
        [sys.executable, "-m", "secretfs", "mount", "spc.yaml", "mnt"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert res.returncode == 1
    assert "NoSuchSecret" in res.stderr and "not found" in res.stderr
    assert not is_mounted(tmp_path / "mnt")

    with pytest.raises(MountFailed) as failed, mounted(spc(DB), tmp_path, "--ttl", "0"):
        pass
    assert "ttl" in failed.value.answer.lower()


def test_background_mount_returns_once_mounted(aws_env: dict[str, str], tmp_path: Path) -> None:
    sm(aws_env).create_secret(Name="MyDatabasePassword", SecretString="bg")
    (tmp_path / "mnt").mkdir()
    (tmp_path / "spc.yaml").write_text(spc(DB))
    # A descriptor the caller lets the command inherit: the daemon must not keep it open.
    inherited_r, inherited_w = os.pipe()
    try:
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "secretfs",
                "mount",
                "spc.yaml",
                "mnt",
                "--log-level",
                "WARNING",
            ],
            cwd=tmp_path,
            capture_output=True,
            timeout=60,
            pass_fds=(inherited_w,),
            # A marker only this test's daemon carries: other tests (another xdist worker) may
            # run the same command line at the same time.
            env={**os.environ, "PYTHONPATH": str(ROOT), "SECRETFS_TEST_MARK": str(tmp_path)},
        )
    finally:
        os.close(inherited_w)
    mark = f"SECRETFS_TEST_MARK={tmp_path}".encode()
    try:
        assert res.returncode == 0, res.stderr
        os.set_blocking(inherited_r, False)
        assert os.read(inherited_r, 1) == b"", "the daemon holds a descriptor of its caller"
        assert (tmp_path / "mnt" / "MyDatabasePassword").read_bytes() == b"bg"
        # The background daemon (relative paths given) keeps no directory of the caller busy. It
        # is the command's own process forked: the command line as typed, in a session of its own.
        pids = [
            p
            for p in os.listdir("/proc")
            if p.isdigit() and "secretfs mount spc.yaml mnt" in _cmdline(p) and mark in _environ(p)
        ]
        assert len(pids) == 1
        assert os.readlink(f"/proc/{pids[0]}/cwd") == "/"
        assert os.getsid(int(pids[0])) == int(pids[0])
        assert os.readlink(f"/proc/{pids[0]}/fd/0") == os.devnull
    finally:
        os.close(inherited_r)
        subprocess.run(["fusermount3", "-u", "-z", str(tmp_path / "mnt")], check=False)
    assert wait_for(lambda: not is_mounted(tmp_path / "mnt"))


def test_background_mount_with_threads_running_starts_a_fresh_interpreter(
    aws_env: dict[str, str], tmp_path: Path
) -> None:
    """A caller that embeds the command line with threads of its own is not forked (a fork would
    copy their locks, held or not): the daemon is a fresh interpreter, and mounts all the same."""
    sm(aws_env).create_secret(Name="MyDatabasePassword", SecretString="spawned")
    (tmp_path / "mnt").mkdir()
    (tmp_path / "spc.yaml").write_text(spc(DB))
    embed = (
        "import sys, threading; from secretfs.cli import main; "
        "threading.Thread(target=threading.Event().wait, daemon=True).start(); "
        "sys.exit(main(['mount', 'spc.yaml', 'mnt', '--log-level', 'WARNING']))"
    )
    res = subprocess.run(
        [sys.executable, "-c", embed],
        cwd=tmp_path,
        capture_output=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT), "SECRETFS_TEST_MARK": str(tmp_path)},
    )
    mark = f"SECRETFS_TEST_MARK={tmp_path}".encode()
    try:
        assert res.returncode == 0, res.stderr
        assert (tmp_path / "mnt" / "MyDatabasePassword").read_bytes() == b"spawned"
        pids = [
            p
            for p in os.listdir("/proc")
            if p.isdigit() and "--detach" in _cmdline(p) and mark in _environ(p)
        ]
        assert len(pids) == 1
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(tmp_path / "mnt")], check=False)
    assert wait_for(lambda: not is_mounted(tmp_path / "mnt"))


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _environ(pid: str) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return []


def test_secret_values_never_reach_the_log(aws_env: dict[str, str], tmp_path: Path) -> None:
    client = sm(aws_env)
    v1, v2 = "first-Sup3rS3cret-value", "second-Sup3rS3cret-value"
    client.create_secret(Name="MyDatabasePassword", SecretString=v1)
    client.create_secret(Name="json", SecretString='{"user": "json-Sup3rS3cret-user"}')
    objects = [
        DB,
        '- objectName: "json"\n  objectType: "secretsmanager"\n'
        '  jmesPath:\n    - path: "user"\n      objectAlias: "user"',
    ]
    with mounted(spc(*objects), tmp_path, "--ttl", "1", "--log-level", "DEBUG", "--audit") as m:
        assert m.read("MyDatabasePassword") == v1.encode()
        assert m.read("user") == b"json-Sup3rS3cret-user"
        client.put_secret_value(SecretId="MyDatabasePassword", SecretString=v2)
        assert wait_for(lambda: m.read("MyDatabasePassword") == v2.encode())
        client.put_secret_value(SecretId="json", SecretString="not json any more")
        client.delete_secret(SecretId="MyDatabasePassword", ForceDeleteWithoutRecovery=True)

        # A deleted secret stops being served within a TTL (not after max staleness), and a
        # value the jmesPath no longer fits is an EIO with the cause logged.
        assert wait_for(lambda: eio(m, "MyDatabasePassword"))
        assert wait_for(lambda: eio(m, "user"))
        log = m.log()
    assert "open volume=standalone path=MyDatabasePassword" in log  # the audit trail is there
    assert "Sup3rS3cret" not in log
    assert "not json any more" not in log


def test_the_daemon_is_hardened(aws_env: dict[str, str], tmp_path: Path) -> None:
    sm(aws_env).create_secret(Name="MyDatabasePassword", SecretString="pw")
    spc_file = tmp_path / "spc.yaml"
    spc_file.write_text(spc(DB))
    (tmp_path / "mnt").mkdir()
    r, w = os.pipe()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "secretfs",
            "mount",
            str(spc_file),
            str(tmp_path / "mnt"),
            "--foreground",
            "--ready-fd",
            str(w),
            "--log-level",
            "WARNING",
        ],
        pass_fds=(w,),
        cwd=ROOT,
    )
    os.close(w)
    try:
        assert os.read(r, 100).strip() == b"ok"
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
        assert core.split()[4:6] == ["0", "0"]
        status = Path(f"/proc/{proc.pid}/status").read_text()
        locked_kb = int(next(x for x in status.splitlines() if x.startswith("VmLck")).split()[1])
        assert locked_kb > 0  # running as root here, so mlockall is allowed
    finally:
        os.close(r)
        subprocess.run(["fusermount3", "-u", "-z", str(tmp_path / "mnt")], check=False)
        proc.wait(20)
