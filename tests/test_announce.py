"""Rotation that applications notice: inotify watchers and stat pollers, on real mounts.

Watchers are checked on the host's view and from a container's side (``tests/ns_watcher.py`` in
a private mount namespace, watching a bind of the volume directory and a ``subPath``-style bind of
the single file), because that is what an app in a pod has.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from inotify_simple import INotify, flags

from csi import mounts
from tests.csi_node import CsiNode, Pod
from tests.kube_server import kube_api  # noqa: F401
from tests.mounting import ROOT, mounted, needs_fuse, wait_for
from tests.test_csi_e2e import make_node  # noqa: F401, needed as a fixture
from tests.test_fuse_mount import DB, sm, spc
from tests.test_takeover import restart_daemon

pytestmark = [needs_fuse, pytest.mark.fuse]

NAME = "MyDatabasePassword"
ALL = 0xFFF
READING = {"OPEN", "ACCESS", "CLOSE_NOWRITE"}
# A remount of the superblock (no MS_BIND) read-only: the node root as earlier releases mounted it.
SB_READONLY = mounts.MS_REMOUNT | mounts.MS_RDONLY | mounts.MS_NOSUID | mounts.MS_NODEV


class NsWatcher:
    """tests/ns_watcher.py in a private mount namespace; collects what it prints."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self.lock:
                self.lines.append(json.loads(line))

    def events(self, watch: str) -> list[tuple[set[str], str]]:
        with self.lock:
            return [(set(x["events"]), x["name"]) for x in self.lines if x.get("watch") == watch]

    def stats(self) -> list[tuple[int, int]]:
        with self.lock:
            return [(x["stat"][0], x["stat"][1]) for x in self.lines if "stat" in x]


@contextlib.contextmanager
def ns_watcher(directory: Path, name: str, tmp_path: Path) -> Iterator[NsWatcher]:
    bind_dir, bind_file = tmp_path / "bind-dir", tmp_path / "bind-file"
    bind_dir.mkdir()
    bind_file.touch()
    cmd = ["unshare", "-m", "--propagation", "private", sys.executable, "-m", "tests.ns_watcher"]
    proc = subprocess.Popen(
        [*cmd, str(directory), name, str(bind_dir), str(bind_file)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert line.strip() == "ready", line + proc.stderr.read()
        yield NsWatcher(proc)
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class HostWatch:
    """inotify watches of the file and its directory on the host's view of the mount."""

    def __init__(self, directory: Path, name: str) -> None:
        self.ino = INotify()
        self.wds = {
            self.ino.add_watch(directory / name, ALL): "file",
            self.ino.add_watch(directory, ALL): "dir",
        }
        self.seen: list[tuple[str, set[str], str]] = []

    def events(self, watch: str) -> list[tuple[set[str], str]]:
        for ev in self.ino.read(timeout=0):
            names = {f.name for f in flags.from_mask(ev.mask)}
            self.seen.append((self.wds.get(ev.wd, "?"), names, ev.name))
        return [(e, n) for w, e, n in self.seen if w == watch]

    def close(self) -> None:
        self.ino.close()


def super_options(path: str) -> list[str]:
    """The superblock's options of the mount at ``path`` (the last field of mountinfo)."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == path:
            found = fields[-1].split(",")
    return found


def attribs(events: list[tuple[set[str], str]], name: str = "") -> int:
    return sum(1 for e, n in events if "ATTRIB" in e and n == name)


def test_a_rotation_raises_in_attrib_for_every_watcher_and_reading_cannot(
    aws_env: dict[str, str], tmp_path: Path
) -> None:
    client = sm(aws_env)
    client.create_secret(Name=NAME, SecretString="v1")
    with mounted(spc(DB), tmp_path, "--ttl", "1") as m, ns_watcher(m.path, NAME, tmp_path) as ns:
        host = HostWatch(m.path, NAME)
        try:
            # Reading produces the reader's own events only: never IN_ATTRIB.
            assert m.read(NAME) == b"v1"
            assert wait_for(lambda: any(e & READING for e, _ in host.events("file")))
            time.sleep(1.5)  # past the TTL: the stat poller's getattr refreshes (no change)
            assert m.read(NAME) == b"v1"
            for watch in ("file", "dir"):
                assert all(e <= READING for e, _ in host.events(watch)), host.seen
                assert all(e <= READING for e, _ in ns.events(watch)), ns.lines
            client.put_secret_value(SecretId=NAME, SecretString="version-two-longer")
            # Nobody reads: the container's stat poller alone brings the change, and every
            # watcher gets IN_ATTRIB (the directory's with the file's name).
            for rotation in (1, 2):
                assert wait_for(lambda n=rotation: attribs(host.events("file")) >= n), host.seen
                assert wait_for(lambda n=rotation: attribs(host.events("dir"), NAME) >= n)
                assert wait_for(lambda n=rotation: attribs(ns.events("file")) >= n), ns.lines
                assert wait_for(lambda n=rotation: attribs(ns.events("dir"), NAME) >= n)
                if rotation == 1:
                    client.put_secret_value(SecretId=NAME, SecretString="3")
            # The watch is still there (no IN_IGNORED): the same inode keeps being announced.
            assert not any("IGNORED" in e for e, _ in host.events("file") + ns.events("file"))
            # The SETATTR answer (or, on the no-open path, the GETATTR it asks for) is the new
            # version's.
            assert os.stat(m.file(NAME)).st_size == 1
            assert wait_for(lambda: ns.stats()[-1][0] == 1)
            assert m.read(NAME) == b"3"
        finally:
            host.close()


def test_a_stat_poller_that_never_reads_sees_each_new_version(
    aws_env: dict[str, str], tmp_path: Path
) -> None:
    client = sm(aws_env)
    client.create_secret(Name=NAME, SecretString="v1")
    ttl = 2.0
    with (
        mounted(spc(DB), tmp_path, "--ttl", str(ttl)) as m,
        ns_watcher(m.path, NAME, tmp_path) as ns,
    ):
        f = m.file(NAME)
        first = os.stat(f)
        assert first.st_size == 2
        assert wait_for(lambda: ns.stats() != [])
        time.sleep(0.05)  # a later mtime is a later version: make them distinguishable
        changed = time.monotonic()
        client.put_secret_value(SecretId=NAME, SecretString="version-two-longer")
        # From the host and through the subPath bind: within TTL + 5 s, without a read.
        assert wait_for(lambda: os.stat(f).st_size == 18, timeout=ttl + 5, interval=0.05)
        assert wait_for(lambda: ns.stats()[-1][0] == 18, timeout=ttl + 5, interval=0.05)
        assert time.monotonic() - changed < ttl + 5
        st = os.stat(f)
        assert st.st_mtime_ns > first.st_mtime_ns
        assert st.st_ctime_ns == st.st_mtime_ns
        assert ns.stats()[-1][1] == st.st_mtime_ns
        assert "open volume" not in m.log()


def test_csi_volumes_announce_across_daemon_and_csi_restarts(
    make_node: Callable[..., CsiNode],  # noqa: F811
    aws_env: dict[str, str],
    tmp_path: Path,
) -> None:
    """Through the CSI pair the keeper (csi) touches: the daemon never touches its own mount.
    Announcements keep working for the next daemon generation and after csi restarts."""
    client = sm(aws_env)
    client.create_secret(Name=NAME, SecretString="v1")
    node = make_node(ttl=1.0)
    node.start_daemon()
    node.start_csi()
    pod = Pod("app-0", "a1000000-0000-0000-0000-000000000000")
    target = node.publish(pod)
    assert (target / NAME).read_bytes() == b"v1"
    # What the container sees is read-only, the node root too: only the private clone writes.
    for path in (target / NAME, Path(node.mount_root) / pod.volume_id / NAME):
        with pytest.raises(OSError) as exc:
            os.utime(path)
        assert exc.value.errno == errno.EROFS
    with ns_watcher(target, NAME, tmp_path) as ns:
        restarts = [
            lambda: None,
            lambda: restart_daemon(node),  # a new daemon generation takes the connection over
            # csi restarts and reclaims the connection, from a root whose superblock is read-only,
            # as an earlier release mounted it: the new csi makes it announce again.
            lambda: (
                mounts.mount("secretfs", node.mount_root, None, SB_READONLY, None),
                super_options(node.mount_root)[0] == "ro" or pytest.fail("superblock not ro"),
                node.kill("csi"),
                node.start_csi(),
                node.publish(pod),
            ),
        ]
        for n, restart in enumerate(restarts, 1):
            restart()
            client.put_secret_value(SecretId=NAME, SecretString=f"value-{n}" + "x" * n)
            assert wait_for(lambda n=n: attribs(ns.events("file")) >= n, timeout=20), ns.lines
            assert wait_for(lambda n=n: attribs(ns.events("dir"), NAME) >= n), ns.lines
            assert wait_for(lambda n=n: ns.stats()[-1][0] == len(f"value-{n}") + n)
    assert "announcing" not in node.logs()
    assert super_options(node.mount_root)[0] == "rw"  # the superblock: only the clone writes
