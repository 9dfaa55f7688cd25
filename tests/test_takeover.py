"""The FUSE connection outlives the daemon: what a container sees across daemon restarts.

Every claim is checked from a container's side: a reader in its own private mount namespace
(``unshare -m --propagation private``) bind-mounts the pod's target path there, as the container
runtime does at container start, and loops open+read+close plus pread on an fd it opened before
anything happened (tests/ns_reader.py). A republish never reaches that bind; only the connection
surviving does. The daemon is restarted with the same arguments as before and no republish is
sent.
"""

from __future__ import annotations

import errno
import math
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml

from tests.csi_node import ROLE_ANNOTATION, CsiNode, Pod, role_arn
from tests.kube_server import KubeServer, kube_api  # noqa: F401
from tests.mounting import ROOT, is_mounted, needs_fuse, wait_for
from tests.ns_reader import NsReader

pytestmark = [needs_fuse, pytest.mark.fuse, pytest.mark.slow]

SEED = yaml.safe_load((ROOT / "examples/aws-seed.yaml").read_text())
NAME = "MyDatabasePassword"
VALUE = "s3cr3t-value"
# The bar: a read stalls no longer than the takeover it spans (from the kill to the next daemon
# serving, measured: Takeovers) plus this, for the resent request and the value's fetch. Starting
# Python is most of a takeover and grows with the machine's load, so the takeover is measured
# rather than assumed.
MAX_STALL = 5.0


@pytest.fixture
def make_node(
    tmp_path: Path,
    kube_api: KubeServer,  # noqa: F811
    aws_env: dict[str, str],
) -> Iterator[Callable[..., CsiNode]]:
    kube_api.add_spc("default", SEED)
    kube_api.add_service_account("default", "app", {ROLE_ANNOTATION: role_arn("app")})
    boto3.client(
        "secretsmanager", region_name=aws_env["region"], endpoint_url=aws_env["endpoint_url"]
    ).create_secret(Name=NAME, SecretString=VALUE)
    made: list[CsiNode] = []

    def make(**kw: Any) -> CsiNode:
        node = CsiNode(tmp_path, kube_api.kubeconfig(tmp_path / "kubeconfig"), **kw)
        made.append(node)
        return node

    try:
        yield make
    finally:
        for node in made:
            node.close()
            assert not node.our_mounts(), "mounts left behind"


@pytest.fixture
def fusectl() -> Path:
    """The kernel's per-connection control files (most distributions mount them at boot).

    Mounted if missing and left mounted, as at boot: it is one mount for the whole machine, and
    another test process (a second xdist worker) may be writing to it. Unmounting it at teardown
    made a concurrent test's abort file vanish (seen 1 run in 6 under load)."""
    from csi import mounts
    from secretfs import fusewire

    path = Path(fusewire.CONNECTIONS)
    if not any(m.fstype == "fusectl" for m in mounts.read_mountinfo()):
        try:
            mounts.mount("fusectl", str(path), "fusectl", 0, None)
        except OSError as exc:  # another process mounted it just now
            if exc.errno != errno.EBUSY:
                raise
    return path


def published(node: CsiNode, tmp_path: Path, pods: int = 1) -> list[Path]:
    node.start_daemon()
    node.start_csi()
    return [
        node.publish(Pod(f"app-{i}", f"7a000000-0000-0000-0000-00000000000{i}"))
        for i in range(pods)
    ]


def reader(tmp_path: Path, target: Path, name: str = "ctr", threads: int = 1) -> NsReader:
    return NsReader(str(target), str(tmp_path / name), NAME, threads)


def assert_clean(summary: dict[str, Any], max_stall: float = MAX_STALL) -> None:
    assert summary["errors"] == {}, summary["errors"]
    assert set(summary["seen"]) == {VALUE}, summary["seen"]
    assert summary["reads"] > 0
    worst = max((took for _, took in summary["slow"]), default=0.0)
    assert worst < max_stall, f"a read stalled {worst:.2f} s"


def restart_daemon(node: CsiNode, sig: int = signal.SIGKILL) -> None:
    proc = node.procs.pop("daemon")
    proc.send_signal(sig)
    proc.wait(15)
    node.start_daemon()


class Takeovers:
    """Restarts ``node``'s daemon and measures each takeover: a thread polls the daemon's status
    every 20 ms and notes when each new generation starts serving."""

    def __init__(self, node: CsiNode) -> None:
        self.node = node
        self.kills: list[float] = []
        self.served: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        last = None
        while not self._stop.wait(0.02):
            try:
                now = generation(self.node)
            except Exception:
                continue
            if now and now != last:
                self.served.append(time.monotonic())
            last = now or last

    def restart(self, sig: int = signal.SIGKILL) -> None:
        self.kills.append(time.monotonic())
        restart_daemon(self.node, sig)

    def longest(self) -> float:
        """The longest wait from a kill to the next generation serving (seconds)."""
        self._stop.set()
        self._thread.join(5)
        waits = [min((t for t in self.served if t > k), default=math.inf) - k for k in self.kills]
        return max(waits, default=0.0)


def generation(node: CsiNode) -> int:
    from secretfs import control

    status = control.Client(node.daemon_socket).status()
    return int(status["generation"]) if status.get("serving") else 0


def serving(node: CsiNode) -> int:
    """The generation serving now; 0 while none does (or its socket is gone with it)."""
    try:
        return generation(node)
    except Exception:
        return 0


def test_kill_9_and_restart_is_a_stall_not_an_error(
    make_node: Callable[..., CsiNode], tmp_path: Path, fusectl: Path
) -> None:
    node = make_node()
    (target,) = published(node, tmp_path)
    # The keeper holds tokens and the connection: hardened like the daemon (no core dumps).
    limits = Path(f"/proc/{node.procs['csi'].pid}/limits").read_text()
    assert any(
        line.startswith("Max core file size") and line.split()[4] == "0"
        for line in limits.splitlines()
    )
    r = reader(tmp_path, target)
    takeovers = Takeovers(node)
    try:
        time.sleep(0.3)
        takeovers.restart()
        assert wait_for(lambda: generation(node) == 2, timeout=20)
        time.sleep(0.5)
    finally:
        summary = r.finish()
    took = takeovers.longest()
    assert_clean(summary, MAX_STALL + took)
    # The host path reads too, and the reader's bind never reached the host.
    assert (target / NAME).read_text() == VALUE
    assert not is_mounted(tmp_path / "ctr")
    assert metric(node, "secretfs_takeovers_total") == 1.0
    assert metric(node, "secretfs_takeover_last_stall_seconds") < MAX_STALL + took
    assert metric(node, "secretfs_takeover_resends_total") == 1.0
    assert metric(node, "secretfs_takeover_last_waiting_requests") >= 0


def test_kill_9_at_random_moments_with_reads_in_flight(
    make_node: Callable[..., CsiNode], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every OPEN and READ takes 50 ms in the daemon: kills land on requests it has read and not
    # answered, which the kernel must give to the next generation (FUSE_NOTIFY_RESEND).
    monkeypatch.setenv("SECRETFS_TEST_READ_DELAY", "0.05")
    node = make_node(daemon_module="tests.slow_daemon", log_level="INFO")
    (target,) = published(node, tmp_path)
    rng = random.Random(9)
    r = reader(tmp_path, target, threads=4)
    takeovers = Takeovers(node)
    try:
        last = 1
        for i in range(20):
            if i % 5 == 4:
                # Every fifth kill waits for a newer generation to serve, so at least four kills
                # hit a serving generation and cause a takeover, whatever the machine's load
                # (random moments alone: as few as 1 of 20 while the machine ran two suites).
                assert wait_for(lambda g=last: serving(node) > g, timeout=30)
                last = max(serving(node), last + 1)  # it served above last just now
            # A random moment: sometimes while the previous takeover is still under way.
            time.sleep(rng.uniform(0.0, 1.2))
            takeovers.restart()
        assert wait_for(lambda: serving(node) > last, timeout=30)
        time.sleep(0.5)
    finally:
        summary = r.finish()
    # What is guaranteed during a storm of kills: no read fails or sees anything else, and every
    # read ends within one takeover (plus the margin) of the storm's end, or within the other
    # tests' bound of its own start. Not more: a read resent to a generation that is killed before
    # it answers waits for the next one, so on a loaded machine a read in flight may wait through
    # several takeovers (seen: 24 s with takeovers of at most 9 s, while two suites ran at once).
    assert_clean(summary, math.inf)
    longest = takeovers.longest()
    storm_end = takeovers.kills[-1]
    for start, took in summary["slow"]:
        bound = max(start + 2 * MAX_STALL + longest, storm_end + longest + MAX_STALL)
        assert start + took <= bound, (
            f"a read from {start:.2f} stalled {took:.2f} s: past its own bound and one takeover "
            f"({longest:.2f} s) plus {MAX_STALL} s after the last kill at {storm_end:.2f}"
        )
    logs = node.log("daemon")
    assert "unanswered requests resent" in logs
    # Every generation after the first came from a takeover, counted once. How many of the 16
    # kills at random moments found a generation serving depends on the machine's load, not on
    # the code; the four after a wait did, and the generation serving at the end is a fifth.
    takeovers_done = int(metric(node, "secretfs_takeovers_total"))
    assert takeovers_done == generation(node) - 1 and takeovers_done >= 5


def test_sigterm_upgrade_path(make_node: Callable[..., CsiNode], tmp_path: Path) -> None:
    node = make_node()
    targets = published(node, tmp_path, pods=2)
    readers = [reader(tmp_path, t, f"ctr{i}") for i, t in enumerate(targets)]
    takeovers = Takeovers(node)
    try:
        for expected in (2, 3):
            takeovers.restart(signal.SIGTERM)
            assert wait_for(lambda e=expected: generation(node) == e, timeout=20)  # type: ignore[misc]
        time.sleep(0.3)
    finally:
        summaries = [r.finish() for r in readers]
    took = takeovers.longest()
    for summary in summaries:
        assert_clean(summary, MAX_STALL + took)
    assert "exiting" not in node.log("daemon")  # a SIGTERM'd daemon leaves quietly


def test_csi_restart_between_daemon_restarts(
    make_node: Callable[..., CsiNode], tmp_path: Path
) -> None:
    node = make_node()
    (target,) = published(node, tmp_path)
    r = reader(tmp_path, target)
    takeovers = Takeovers(node)
    try:
        takeovers.restart()
        assert wait_for(lambda: generation(node) == 2, timeout=20)
        # The keeper dies; the daemon holds the connection and gives it back to the next one.
        node.kill("csi")
        node.start_csi()
        assert wait_for(lambda: "took the FUSE connection back" in node.log("csi"), timeout=20)
        takeovers.restart()
        assert wait_for(lambda: generation(node) == 3, timeout=20)
        time.sleep(0.3)
    finally:
        summary = r.finish()
    assert_clean(summary, MAX_STALL + takeovers.longest())
    # Publishing and unpublishing still work, on the same connection.
    other = node.publish(Pod("app-9", "7a000000-0000-0000-0000-000000000009"))
    assert (other / NAME).read_text() == VALUE
    node.unpublish(Pod("app-9", "7a000000-0000-0000-0000-000000000009"))
    assert "detaching" not in node.log("csi")


def test_an_incompatible_daemon_is_refused_and_the_state_kept(
    make_node: Callable[..., CsiNode], tmp_path: Path
) -> None:
    node = make_node()
    (target,) = published(node, tmp_path)
    r = reader(tmp_path, target)
    try:
        node.daemon_module = "tests.odd_daemon"  # speaks hand-over protocol 99
        restart_daemon(node)
        assert wait_for(lambda: "protocol 99" in node.log("csi"), timeout=20)
        assert generation(node) == 0  # it serves nothing
        node.daemon_module = "secretfs"  # the rollback
        restart_daemon(node)
        assert wait_for(lambda: generation(node) == 2, timeout=20)
        time.sleep(0.3)
    finally:
        summary = r.finish()
    assert summary["errors"] == {} and set(summary["seen"]) == {VALUE}
    assert (target / NAME).read_text() == VALUE


def test_takeover_timeout_aborts_so_readers_get_an_error(
    make_node: Callable[..., CsiNode], tmp_path: Path
) -> None:
    node = make_node(csi_extra=("--takeover-timeout", "1"))
    (target,) = published(node, tmp_path)
    node.kill("daemon")
    assert wait_for(lambda: "--takeover-timeout" in node.log("csi"), timeout=20)
    with pytest.raises(OSError) as info:
        (target / NAME).read_text()
    assert info.value.errno == errno.ENOTCONN
    assert metric(node, "secretfs_connection_aborts_total") == 1.0
    # A new daemon gets a fresh node root; the pod is republished (recreated) to use it.
    node.start_daemon()
    node.unpublish(Pod("app-0", "7a000000-0000-0000-0000-000000000000"))
    again = node.publish(Pod("app-0", "7a000000-0000-0000-0000-000000000000"))
    assert (again / NAME).read_text() == VALUE


def metric(node: CsiNode, name: str) -> float:
    for line in node.metrics().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


def test_an_aborted_connection_is_replaced_not_handed_over(
    make_node: Callable[..., CsiNode], tmp_path: Path, fusectl: Path
) -> None:
    from csi import mounts
    from secretfs import fusewire

    node = make_node()
    (target,) = published(node, tmp_path)
    root = mounts.node_root(mounts.read_mountinfo(), node.mount_root)
    assert root is not None
    node.kill("daemon")
    (fusectl / str(fusewire.connection_id(root.device)) / "abort").write_text("1")
    node.start_daemon()
    # The keeper sees the connection is dead: a fresh node root, not a takeover of a corpse.
    assert wait_for(lambda: "the kernel aborted the FUSE connection" in node.log("csi"), 20)
    with pytest.raises(OSError) as info:
        (target / NAME).read_text()
    assert info.value.errno == errno.ENOTCONN
    pod = Pod("app-0", "7a000000-0000-0000-0000-000000000000")
    node.unpublish(pod)
    assert (node.publish(pod) / NAME).read_text() == VALUE
    assert generation(node) == 1
