"""Run ``secretfs daemon`` and ``secretfs csi`` (or ``secretfs node``) as processes, and drive the
CSI socket the way the kubelet does. Sockets and the node mount root live in a short directory
under /tmp (unix socket paths are limited to 108 bytes); pods' target paths under the test's
tmp_path. ``close()`` always leaves nothing mounted and no process running.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from csi import mounts
from csi.pb import csi_pb2, csi_pb2_grpc
from tests.mounting import ROOT, stop

TOKENS_KEY = "csi.storage.k8s.io/serviceAccount.tokens"
ROLE_ANNOTATION = "eks.amazonaws.com/role-arn"


def role_arn(name: str) -> str:
    return f"arn:aws:iam::123456789012:role/{name}"


def volume_id(pod_uid: str, volume: str = "secrets-store-inline") -> str:
    # The kubelet's inline volume id: csi-<sha256(podUID + volumeName)>.
    return "csi-" + hashlib.sha256((pod_uid + volume).encode()).hexdigest()


def tokens_json(token: str = "header.payload.signature") -> str:
    exp = "2099-01-01T00:00:00Z"
    return json.dumps({"sts.amazonaws.com": {"token": token, "expirationTimestamp": exp}})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Pod:
    name: str
    uid: str
    namespace: str = "default"
    service_account: str = "app"
    volume: str = "secrets-store-inline"

    @property
    def volume_id(self) -> str:
        return volume_id(self.uid, self.volume)


@dataclass
class CsiNode:
    tmp_path: Path
    kubeconfig: Path
    ttl: float = 120.0
    log_level: str = "DEBUG"
    base: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="sfs-", dir="/tmp")))
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    metrics_port: int = field(default_factory=free_port)
    daemon_module: str = "secretfs"  # tests.slow_daemon: the daemon with slow reads
    lock_memory: bool = False  # the daemon's mlockall (the chart's default; benches use it)
    csi_extra: tuple[str, ...] = ()
    daemon_extra: tuple[str, ...] = ()  # e.g. --providers-dir for external providers
    _channel: grpc.Channel | None = None

    @property
    def endpoint(self) -> str:
        return f"unix://{self.base}/csi.sock"

    @property
    def daemon_socket(self) -> str:
        return str(self.base / "daemon.sock")

    @property
    def mount_root(self) -> str:
        return str(self.base / "root")

    # --- processes ---

    def _spawn(
        self, name: str, *args: str, prefix: tuple[str, ...] = (), module: str = "secretfs"
    ) -> subprocess.Popen[bytes]:
        log = open(self.tmp_path / f"{name}.log", "ab")  # noqa: SIM115
        with log:
            proc = subprocess.Popen(
                [*prefix, sys.executable, "-m", module, *args, "--log-level", self.log_level],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=ROOT,
                start_new_session=True,
            )
        self.procs[name] = proc
        return proc

    def daemon_args(self) -> list[str]:
        lock = [] if self.lock_memory else ["--no-mlock"]
        return ["--socket", self.daemon_socket, "--ttl", str(self.ttl), *lock, *self.daemon_extra]

    def csi_args(self) -> list[str]:
        return [
            "--endpoint",
            self.endpoint,
            "--nodeid",
            "node-1",
            "--daemon-socket",
            self.daemon_socket,
            "--mount-root",
            self.mount_root,
            "--metrics-addr",
            f"127.0.0.1:{self.metrics_port}",
            "--kubeconfig",
            str(self.kubeconfig),
            "--kubelet-root",
            str(self.tmp_path),
            *self.csi_extra,
        ]

    def start_daemon(self, no_capabilities: bool = False) -> None:
        """Start the daemon; with ``no_capabilities`` it runs with every capability dropped
        (no CAP_SYS_ADMIN: it cannot mount anything, and needs not)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.daemon_socket)
        prefix = (
            ("setpriv", "--bounding-set=-all", "--inh-caps=-all", "--") if no_capabilities else ()
        )
        proc = self._spawn(
            "daemon", "daemon", *self.daemon_args(), prefix=prefix, module=self.daemon_module
        )
        self._wait(lambda: os.path.exists(self.daemon_socket), proc, "daemon")

    def start_csi(self) -> None:
        proc = self._spawn("csi", "csi", *self.csi_args())
        self._wait(self._answers, proc, "csi")

    def start_pair(self) -> None:
        proc = self._spawn("node", "node", *self.daemon_args(), *self.csi_args())
        self._wait(self._answers, proc, "node")

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        if name == "csi":
            self.close_channel()

    def _answers(self) -> bool:
        try:
            self.identity().GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=1)
        except grpc.RpcError:
            return False
        return True

    def _wait(self, ready: Any, proc: subprocess.Popen[bytes], name: str) -> None:
        deadline = time.monotonic() + 30
        while not ready():
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited with {proc.returncode}:\n{self.log(name)}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} did not start:\n{self.log(name)}")
            time.sleep(0.05)

    def log(self, name: str) -> str:
        p = self.tmp_path / f"{name}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def logs(self) -> str:
        return "".join(self.log(n) for n in ("daemon", "csi", "node"))

    # --- gRPC, as the kubelet ---

    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.endpoint)
        return self._channel

    def close_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def identity(self) -> Any:
        return csi_pb2_grpc.IdentityStub(self.channel())

    def node(self) -> Any:
        return csi_pb2_grpc.NodeStub(self.channel())

    def target(self, pod: Pod) -> Path:
        parent = self.tmp_path / "pods" / pod.uid / "volumes/kubernetes.io~csi" / pod.volume
        parent.mkdir(parents=True, exist_ok=True, mode=0o750)  # the kubelet creates the parent
        return parent / "mount"

    def publish_request(
        self,
        pod: Pod,
        spc: str = "aws-secrets",
        *,
        token: str = "header.payload.signature",
        tokens_in_secrets: bool = False,
        group: str = "",
        readonly: bool = True,
        extra: dict[str, str] | None = None,
    ) -> Any:
        ctx = {
            "secretProviderClass": spc,
            "csi.storage.k8s.io/pod.name": pod.name,
            "csi.storage.k8s.io/pod.namespace": pod.namespace,
            "csi.storage.k8s.io/pod.uid": pod.uid,
            "csi.storage.k8s.io/serviceAccount.name": pod.service_account,
            "csi.storage.k8s.io/ephemeral": "true",
            **(extra or {}),
        }
        secrets = {}
        if tokens_in_secrets:
            secrets[TOKENS_KEY] = tokens_json(token)
        else:
            ctx[TOKENS_KEY] = tokens_json(token)
        cap = csi_pb2.VolumeCapability(
            mount=csi_pb2.VolumeCapability.MountVolume(volume_mount_group=group),
            access_mode=csi_pb2.VolumeCapability.AccessMode(
                mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_READER_ONLY
            ),
        )
        return csi_pb2.NodePublishVolumeRequest(
            volume_id=pod.volume_id,
            target_path=str(self.target(pod)),
            volume_capability=cap,
            readonly=readonly,
            secrets=secrets,
            volume_context=ctx,
        )

    def publish(self, pod: Pod, spc: str = "aws-secrets", **kw: Any) -> Path:
        self.node().NodePublishVolume(self.publish_request(pod, spc, **kw), timeout=120)
        return self.target(pod)

    def unpublish(self, pod: Pod) -> None:
        req = csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=pod.volume_id, target_path=str(self.target(pod))
        )
        self.node().NodeUnpublishVolume(req, timeout=60)

    def metrics(self) -> str:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics") as rsp:
            return str(rsp.read().decode())

    # --- cleanup ---

    def our_mounts(self) -> list[str]:
        roots = (str(self.base), str(self.tmp_path))
        return [m.mountpoint for m in mounts.read_mountinfo() if m.mountpoint.startswith(roots)]

    def close(self) -> None:
        self.close_channel()
        for name in ("node", "csi", "daemon"):
            proc = self.procs.pop(name, None)
            if proc is not None:
                stop(proc)
        for _ in range(3):
            for path in reversed(self.our_mounts()):
                with contextlib.suppress(OSError):
                    mounts.umount(path, mounts.MNT_DETACH)
        shutil.rmtree(self.base, ignore_errors=True)
