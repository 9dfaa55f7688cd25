"""Memory of the node's processes with many volumes, as the chart runs them (CSI mode).

Runs the daemon (memory locked, as the chart's default) and the csi process, a moto server
(Secrets Manager + STS) and the test Kubernetes API server; publishes N pod volumes of a
SecretProviderClass with 10 objects of 1 KiB through the real CSI socket, reads every file once,
then unpublishes them all, and does that ``--rounds`` times with new pods. Two cases, each in
fresh processes:

- one identity: every pod uses the same service account (values are shared);
- distinct identities: every pod has its own service account and IAM role (its own STS
  credentials, clients and values).

Prints VmRSS and VmLck of the daemon (and VmRSS of csi) at start, with every volume mounted, and
after every volume is gone. Needs root and /dev/fuse.

    sudo .venv/bin/python bench/daemon_memory.py [--volumes 1000] [--no-lock] [--identities one]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import REGION, backends, needs_root  # noqa: E402
from tests.csi_node import ROLE_ANNOTATION, CsiNode, Pod, role_arn  # noqa: E402
from tests.kube_server import KubeServer  # noqa: E402

OBJECTS = 10


def spc() -> dict[str, object]:
    body = "".join(
        f'- objectName: "mem/secret-{i}"\n  objectType: "secretsmanager"\n'
        f'  objectAlias: "secret-{i}"\n'
        for i in range(OBJECTS)
    )
    return {
        "apiVersion": "secrets-store.csi.x-k8s.io/v1",
        "kind": "SecretProviderClass",
        "metadata": {"name": "mem"},
        "spec": {"provider": "aws", "parameters": {"objects": body, "region": REGION}},
    }


def status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmLck"):
            out[key] = int(value.split()[0]) // 1024  # MiB
    return out


def run_case(
    kube: KubeServer, tmp: Path, volumes: int, distinct: bool, lock: bool, rounds: int
) -> list[tuple[str, dict[str, int], dict[str, int]]]:
    node = CsiNode(tmp, kube.kubeconfig(tmp / "kubeconfig"), ttl=3600, log_level="WARNING")
    node.lock_memory = lock
    rows = []
    try:
        node.start_daemon()
        node.start_csi()
        daemon, csi = node.procs["daemon"].pid, node.procs["csi"].pid
        time.sleep(1)
        rows.append(("started", status(daemon), status(csi)))
        for r in range(rounds):
            # Each round brings new pods (and, with distinct identities, new identities).
            pods = [
                Pod(
                    f"p-{i}",
                    f"{'d' if distinct else 's'}{r}-{i}",
                    service_account=f"sa-{r}-{i}" if distinct else "shared",
                )
                for i in range(volumes)
            ]
            for pod in pods:
                target = node.publish(pod, "mem")
                for i in range(OBJECTS):
                    (target / f"secret-{i}").read_bytes()
            rows.append((f"round {r + 1}: {volumes} mounted", status(daemon), status(csi)))
            for pod in pods:
                node.unpublish(pod)
            time.sleep(3)  # the daemon returns freed memory once removals pause
            rows.append((f"round {r + 1}: all unpublished", status(daemon), status(csi)))
    finally:
        node.close()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--volumes", type=int, default=1000)
    ap.add_argument("--no-lock", action="store_true", help="run the daemon with --no-mlock")
    ap.add_argument("--rounds", type=int, default=2, help="publish/unpublish rounds (2)")
    ap.add_argument(
        "--identities",
        choices=("both", "one", "distinct"),
        default="both",
        help="which case to run: one service account for every pod, one each, or both (default)",
    )
    args = ap.parse_args()
    if needs_root():
        return 2
    results = {}
    with backends() as env:
        sm = env.secretsmanager()
        for i in range(OBJECTS):
            sm.create_secret(Name=f"mem/secret-{i}", SecretString=os.urandom(512).hex())
        kube = env.kube
        kube.add_spc("default", spc())
        kube.add_service_account("default", "shared", {ROLE_ANNOTATION: role_arn("shared")})
        for r in range(args.rounds):
            for i in range(args.volumes):
                sa = f"sa-{r}-{i}"
                kube.add_service_account("default", sa, {ROLE_ANNOTATION: role_arn(sa)})
        cases = {"both": (False, True), "one": (False,), "distinct": (True,)}[args.identities]
        for distinct in cases:
            case = env.tmp / ("distinct" if distinct else "one")
            case.mkdir()
            results[distinct] = run_case(
                kube, case, args.volumes, distinct, not args.no_lock, args.rounds
            )
    lock = "unlocked (--no-mlock)" if args.no_lock else "locked (mlockall)"
    print(f"Daemon memory, CSI mode, {OBJECTS} objects x 1 KiB per volume, daemon memory {lock}\n")
    print("| identities | moment | daemon VmRSS MiB | daemon VmLck MiB | csi VmRSS MiB |")
    print("|---|---|---:|---:|---:|")
    for distinct, rows in results.items():
        who = f"{args.volumes} distinct" if distinct else "one"
        for moment, d, c in rows:
            print(f"| {who} | {moment} | {d['VmRSS']} | {d.get('VmLck', 0)} | {c['VmRSS']} |")
    print(f"\n{sys.argv[0]} {' '.join(sys.argv[1:])}; kernel {os.uname().release}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
