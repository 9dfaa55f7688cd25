"""How long a container's reads stall when the node's daemon is killed and restarted (takeover).

Runs the daemon and csi processes, a moto server (Secrets Manager + STS) and the test Kubernetes
API server, publishes one pod volume, and starts a reader in a private mount namespace that
bind-mounts the volume there (as a container runtime does) and loops open+read+close plus pread
on a long-lived fd in 1 or 16 threads (tests/ns_reader.py). Then, N times: ``kill -9`` the daemon,
start it again with the same arguments, wait until the new generation serves the connection.

A takeover's stall is the longest single read operation that overlapped it, as the reader timed
it. Prints the distribution per reader count, errors (must be 0), and the keeper's own measure
(death noticed → new generation serving). Needs root and /dev/fuse.

    sudo .venv/bin/python bench/takeover_stall.py [--n 20] [--readers 1 16]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from bench.common import backends, needs_root, pct  # noqa: E402
from secretfs import control  # noqa: E402
from tests.csi_node import ROLE_ANNOTATION, CsiNode, Pod, role_arn  # noqa: E402
from tests.mounting import wait_for  # noqa: E402
from tests.ns_reader import NsReader  # noqa: E402

NAME = "MyDatabasePassword"


def generation(node: CsiNode) -> int:
    try:
        status = control.Client(node.daemon_socket).status(1.0)
    except control.ControlError:
        return 0
    return int(status["generation"]) if status.get("serving") else 0


def keeper_stall(node: CsiNode) -> float:
    for line in node.metrics().splitlines():
        if line.startswith("secretfs_takeover_last_stall_seconds "):
            return float(line.split()[1])
    return float("nan")


def run(node: CsiNode, target: Path, tmp: Path, readers: int, n: int) -> dict[str, object]:
    r = NsReader(str(target), str(tmp / f"ctr-{readers}"), NAME, readers)
    windows: list[tuple[float, float]] = []
    keeper: list[float] = []
    try:
        time.sleep(0.5)
        for _ in range(n):
            before = generation(node)
            start = time.monotonic()
            proc = node.procs.pop("daemon")
            proc.send_signal(signal.SIGKILL)
            proc.wait(15)
            node.start_daemon()
            if not wait_for(lambda b=before: generation(node) > b, timeout=30, interval=0.01):  # type: ignore[misc]
                raise RuntimeError("no takeover within 30 s")
            windows.append((start, time.monotonic()))
            keeper.append(keeper_stall(node))
            time.sleep(0.3)
    finally:
        summary = r.finish()
    slow = summary["slow"]
    assert isinstance(slow, list)
    stalls = []
    for begin, end in windows:
        overlapping = [took for s, took in slow if s < end and s + took > begin]
        stalls.append(max(overlapping, default=0.0))
    return {"stalls": stalls, "keeper": keeper, "summary": summary}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20, help="takeovers per reader count (20)")
    ap.add_argument("--readers", type=int, nargs="+", default=[1, 16])
    args = ap.parse_args()
    if needs_root():
        return 2
    node: CsiNode | None = None
    results = {}
    with backends() as env:
        try:
            env.secretsmanager().create_secret(Name=NAME, SecretString="bench-value")
            seed = yaml.safe_load((ROOT / "examples/aws-seed.yaml").read_text())
            env.kube.add_spc("default", seed)
            env.kube.add_service_account("default", "app", {ROLE_ANNOTATION: role_arn("app")})
            node = CsiNode(env.tmp, env.kube.kubeconfig(env.tmp / "kubeconfig"), log_level="INFO")
            node.start_daemon()
            node.start_csi()
            target = node.publish(Pod("app-0", "b0000000-0000-0000-0000-000000000000"))
            for readers in args.readers:
                results[readers] = run(node, target, env.tmp, readers, args.n)
        finally:
            if node is not None:
                node.close()
    print(f"Read stall across `kill -9` + restart of the daemon, {args.n} takeovers per row\n")
    print(
        "| readers | reads | errors | stall p50 s | p90 s | max s | keeper p50 s | keeper max s |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for readers, res in results.items():
        stalls = res["stalls"]
        keeper = res["keeper"]
        summary = res["summary"]
        assert isinstance(stalls, list) and isinstance(keeper, list) and isinstance(summary, dict)
        errors = sum(summary["errors"].values())
        print(
            f"| {readers} | {summary['reads']} | {errors} | {pct(stalls, 50):.2f} "
            f"| {pct(stalls, 90):.2f} | {max(stalls):.2f} | {statistics.median(keeper):.2f} "
            f"| {max(keeper):.2f} |"
        )
    print(f"\n{sys.argv[0]} {' '.join(sys.argv[1:])}; kernel {os.uname().release}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
