"""``secretfs csi``: run the CSI node plugin until SIGTERM.

Stopping leaves every mount in place: the kubelet's volumes stay readable through a restart, and
the next process finds them in /proc/self/mountinfo and in the daemon.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from dataclasses import dataclass
from types import FrameType

from csi import metrics
from csi.keeper import Keeper
from csi.kube import Kube
from csi.node import DRIVER_NAME, IdentityServicer, NodeServicer
from csi.pb import csi_pb2_grpc
from csi.publish import Node
from csi.server import make_server
from csi.status import KubeObjects
from secretfs import control
from secretfs.hardening import describe, harden

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CsiOptions:
    endpoint: str
    node_id: str
    daemon_socket: str
    mount_root: str
    driver_name: str = DRIVER_NAME
    metrics_addr: str = ""
    kubeconfig: str | None = None
    takeover_timeout: float = 0.0
    kubelet_root: str = "/var/lib/kubelet"
    lock_memory: bool = False
    # Sync spec.secretObjects into Kubernetes Secrets (csi/sync.py); off: a warning per class.
    sync_secrets: bool = False


def command(args: argparse.Namespace) -> int:
    """``secretfs csi`` (registered as an entry point of secretfs.commands: secretfs/cli.py)."""
    return run(
        CsiOptions(
            endpoint=args.endpoint,
            node_id=args.nodeid,
            daemon_socket=args.daemon_socket,
            mount_root=args.mount_root,
            driver_name=args.drivername,
            metrics_addr=args.metrics_addr,
            kubeconfig=args.kubeconfig,
            takeover_timeout=args.takeover_timeout,
            kubelet_root=args.kubelet_root,
            lock_memory=getattr(args, "lock_memory", False),
            sync_secrets=args.sync_secrets,
        )
    )


def run(opts: CsiOptions) -> int:
    # This process holds pod tokens and nodePublishSecretRef data: no core dumps, no ptrace, and
    # with --lock-memory (the chart's default, csi.lockMemory) its memory locked against swap as
    # pages are first touched: 79 MiB with 1000 volumes against 78 unlocked (deploy/INSTALL.md).
    log.info("process hardening: %s", describe(harden(opts.lock_memory)))
    kube_api = Kube(opts.kubeconfig)
    threading.Thread(target=kube_api.warm, name="warm", daemon=True).start()
    client = control.Client(opts.daemon_socket)
    keeper = Keeper(client, opts.takeover_timeout)
    node = Node(
        client, kube_api, opts.mount_root, keeper, opts.kubelet_root, node_name=opts.node_id
    )
    # SecretProviderClassPodStatus objects and Events, written by a thread of their own.
    node.objects = KubeObjects(
        kube_api, opts.node_id, sync_root=opts.mount_root if opts.sync_secrets else None
    )
    node.objects.install(keeper.handlers)

    def register(server: object) -> None:
        csi_pb2_grpc.add_IdentityServicer_to_server(
            IdentityServicer(opts.driver_name, node), server
        )
        csi_pb2_grpc.add_NodeServicer_to_server(NodeServicer(opts.node_id, node), server)

    metrics.serve(opts.metrics_addr)
    server = make_server(opts.endpoint, register)
    log.info(
        "CSI driver %s on %s (node %s, daemon %s, mount root %s)",
        opts.driver_name,
        opts.endpoint,
        opts.node_id,
        opts.daemon_socket,
        opts.mount_root,
    )
    # Mount the node root now if the daemon is up (else on the first Probe or publish).
    node.ready()
    stop = threading.Event()
    # Hands the FUSE connection to the next daemon generation as soon as one answers.
    threading.Thread(
        target=keeper.watch, args=(node.ensure_root, stop), name="keeper", daemon=True
    ).start()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stop.wait()
    log.info("stopping; mounts stay in place, the daemon keeps the FUSE connection")
    server.stop(grace=5).wait()
    return 0
