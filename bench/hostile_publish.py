"""Blast radius of hostile input: what one bad SecretProviderClass or pod does to the node.

Runs the daemon and csi processes, a moto server and the test Kubernetes API server; publishes a
good volume and reads it in a loop (open+read+close, timed per read) while hostile publishes are
sent through the real CSI socket:

- a "billion laughs" YAML alias bomb in a SecretProviderClass's ``objects``;
- the same bomb in the pod's ``volumeAttributes`` (they override the class's parameters);
- an ``objects`` string just under the size limit (a big but legal document: parsed in full);
- an ``objects`` string over the size limit (refused before parsing).

Prints, per attack: the answer's code, how long the refusal took (p50/max), the good volume's read
latency during the attack (p50/p99/max) against a quiet baseline, and the daemon's VmRSS before and
after. Needs root and /dev/fuse.

    sudo .venv/bin/python bench/hostile_publish.py [--n 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import yaml  # noqa: E402

from bench.common import REGION, backends, needs_root, pct  # noqa: E402
from providers import limits  # noqa: E402
from tests.csi_node import ROLE_ANNOTATION, CsiNode, Pod, role_arn  # noqa: E402

NAME = "MyDatabasePassword"


def bomb(levels: int = 9) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + f"\nobjects: *a{levels - 1}\n"


def big(limit: int) -> str:
    item = '- objectName: "{}"\n  objectType: secretsmanager\n'
    out, i = [], 0
    while sum(map(len, out)) < limit:
        out.append(item.format(f"unknown-{i}"))
        i += 1
    return "".join(out)


def spc(name: str, objects: str) -> dict[str, object]:
    return {
        "apiVersion": "secrets-store.csi.x-k8s.io/v1",
        "kind": "SecretProviderClass",
        "metadata": {"name": name},
        "spec": {"provider": "aws", "parameters": {"objects": objects, "region": REGION}},
    }


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    return -1


class Reader:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.lat: list[float] = []
        self.errors = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self) -> None:
        while not self.stop.is_set():
            start = time.perf_counter()
            try:
                with open(self.path, "rb") as f:
                    f.read()
            except OSError:
                self.errors += 1
            self.lat.append(time.perf_counter() - start)
            time.sleep(0.001)

    def take(self) -> list[float]:
        out, self.lat = self.lat, []
        return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10, help="hostile publishes per attack (10)")
    args = ap.parse_args()
    if needs_root():
        return 2
    node: CsiNode | None = None
    rows = []
    with backends() as env:
        try:
            env.secretsmanager().create_secret(Name=NAME, SecretString="good-value")
            kube = env.kube
            kube.add_spc("default", yaml.safe_load((ROOT / "examples/aws-seed.yaml").read_text()))
            kube.add_spc("default", spc("bomb", bomb()))
            kube.add_spc("default", spc("big", big(limits.MAX_PARAMETER_BYTES - 4096)))
            kube.add_spc("default", spc("huge", big(limits.MAX_PARAMETER_BYTES + 4096)))
            kube.add_service_account("default", "app", {ROLE_ANNOTATION: role_arn("app")})
            node = CsiNode(env.tmp, kube.kubeconfig(env.tmp / "kubeconfig"), log_level="WARNING")
            node.lock_memory = True
            node.start_daemon()
            node.start_csi()
            daemon = node.procs["daemon"].pid
            good = node.publish(Pod("good", "g0000000-0000-0000-0000-000000000000")) / NAME
            reader = Reader(good)
            time.sleep(3)
            rows.append(("quiet (baseline)", "", [], reader.take(), rss(daemon), rss(daemon)))
            attacks = [
                ("alias bomb in the SPC", "bomb", None),
                ("alias bomb in volumeAttributes", "aws-secrets", {"objects": bomb()}),
                ("objects just under the size limit", "big", None),
                ("objects over the size limit", "huge", None),
            ]
            for label, spc_name, extra in attacks:
                before = rss(daemon)
                took, codes = [], set()
                reader.take()
                for i in range(args.n):
                    pod = Pod(f"h{i}", f"h{len(rows)}-{i}")
                    req = node.publish_request(pod, spc_name, extra=extra)
                    start = time.perf_counter()
                    try:
                        node.node().NodePublishVolume(req, timeout=120)
                        codes.add("OK")
                    except grpc.RpcError as exc:
                        codes.add(exc.code().name)
                    took.append(time.perf_counter() - start)
                rows.append(
                    (label, "/".join(sorted(codes)), took, reader.take(), before, rss(daemon))
                )
            reader.stop.set()
            errors = reader.errors
        finally:
            if node is not None:
                node.close()
    print(f"Hostile publishes ({args.n} each) while a good volume is read in a loop\n")
    print(
        "| attack | answer | refused in p50 ms | max ms | good reads p50 ms | p99 ms | max ms "
        "| daemon RSS before/after MiB |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for label, code, took, lat, before, after in rows:
        t50 = f"{statistics.median(took) * 1e3:.0f}" if took else ""
        tmax = f"{max(took) * 1e3:.0f}" if took else ""
        print(
            f"| {label} | {code} | {t50} | {tmax} | {pct(lat, 50) * 1e3:.2f} "
            f"| {pct(lat, 99) * 1e3:.2f} | {max(lat) * 1e3:.2f} | {before} / {after} |"
        )
    print(f"\nread errors on the good volume: {errors}")
    print(f"{sys.argv[0]} {' '.join(sys.argv[1:])}; kernel {os.uname().release}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
