"""NodePublishVolume latency of the CSI node plugin, as the kubelet sees it (p50/p99).

Runs ``secretfs node`` (daemon + csi processes), a moto server (AWS Secrets Manager + STS) and the
test Kubernetes API server, then times NodePublishVolume over the real unix socket:

- cold: every publish is for a new service account (a new identity), so the daemon does
  AssumeRoleWithWebIdentity and GetSecretValue before answering;
- warm: every publish is for the same identity and objects as a running pod's, so the values
  are cached: no backend call;
- republish: a repeated publish of a mounted volume with a fresh token (``requiresRepublish``).

Each measured publish is followed by an (untimed) unpublish. Needs root and /dev/fuse.

    sudo .venv/bin/python bench/publish_latency.py [--n 200] [--objects 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import backends, needs_root, pct  # noqa: E402
from tests.csi_node import ROLE_ANNOTATION, CsiNode, Pod, role_arn  # noqa: E402


def spc(objects: int) -> dict[str, object]:
    body = "".join(
        f'- objectName: "bench/secret-{i}"\n  objectType: "secretsmanager"\n'
        f'  objectAlias: "secret-{i}"\n'
        for i in range(objects)
    )
    return {
        "apiVersion": "secrets-store.csi.x-k8s.io/v1",
        "kind": "SecretProviderClass",
        "metadata": {"name": "bench"},
        "spec": {"provider": "aws", "parameters": {"objects": body}},
    }


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200, help="publishes per case (200)")
    ap.add_argument("--objects", type=int, default=1, help="objects in the SecretProviderClass")
    args = ap.parse_args()
    if needs_root():
        return 2
    node: CsiNode | None = None
    with backends() as env:
        try:
            sm = env.secretsmanager()
            kube = env.kube
            for i in range(args.objects):
                sm.create_secret(Name=f"bench/secret-{i}", SecretString=f"value-{i}" * 8)
            kube.add_spc("default", spc(args.objects))
            kube.add_service_account("default", "warm", {ROLE_ANNOTATION: role_arn("warm")})
            for i in range(args.n):
                kube.add_service_account("default", f"sa-{i}", {ROLE_ANNOTATION: role_arn("c")})
            node = CsiNode(
                env.tmp, kube.kubeconfig(env.tmp / "kubeconfig"), ttl=3600, log_level="INFO"
            )
            node.start_pair()
            results: dict[str, list[float]] = {"cold": [], "warm": [], "republish": []}

            def run(case: str, pod: Pod, republish: bool = False) -> None:
                if republish:
                    node.publish(pod, "bench")  # type: ignore[union-attr]
                    ms = timed(lambda: node.publish(pod, "bench", token="fresh.t.k"))  # type: ignore[union-attr]
                else:
                    ms = timed(lambda: node.publish(pod, "bench"))  # type: ignore[union-attr]
                results[case].append(ms)
                node.unpublish(pod)  # type: ignore[union-attr]

            # A running pod of the warm identity keeps its values cached (values are dropped
            # when the last volume using them goes away).
            holder = Pod("holder", "h-0", service_account="warm")
            node.publish(holder, "bench")
            for i in range(args.n):
                run("cold", Pod(f"cold-{i}", f"c-{i}", service_account=f"sa-{i}"))
                run("warm", Pod(f"warm-{i}", f"w-{i + 1}", service_account="warm"))
                run("republish", Pod(f"rep-{i}", f"r-{i}", service_account="warm"), True)
            node.unpublish(holder)
        finally:
            if node is not None:
                node.close()
    print(f"NodePublishVolume latency, {args.objects} object(s), n={args.n} per case\n")
    print("| case | p50 ms | p99 ms | mean ms |")
    print("|---|---:|---:|---:|")
    labels = {
        "cold": "cold (new identity: STS + GetSecretValue)",
        "warm": "warm (same identity and object cached)",
        "republish": "republish (mounted; fresh token)",
    }
    for case, values in results.items():
        print(
            f"| {labels[case]} | {pct(values, 50):.1f} | {pct(values, 99):.1f} "
            f"| {statistics.fmean(values):.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
