"""What the CSI-mode benchmarks share: a local AWS (moto) and Kubernetes API, a scratch directory,
and percentiles. Import it after ``sys.path`` holds the repository root."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3

from tests.kube_server import KubeServer
from tests.moto_server import FAKE_KEYS, REGION, start_moto

__all__ = ["REGION", "Backends", "backends", "needs_root", "pct"]


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


def needs_root() -> bool:
    """True (after saying why) if this machine cannot run a CSI-mode benchmark."""
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        print("needs root and /dev/fuse", file=sys.stderr)
        return True
    return False


@dataclass
class Backends:
    url: str
    kube: KubeServer
    tmp: Path

    def secretsmanager(self) -> Any:
        return boto3.client("secretsmanager", region_name=REGION, endpoint_url=self.url)


@contextlib.contextmanager
def backends() -> Iterator[Backends]:
    """A moto server (the daemons inherit its endpoint and fake keys through the environment),
    the test Kubernetes API server and a scratch directory; all gone afterwards."""
    kube = KubeServer()
    tmp = Path(tempfile.mkdtemp(prefix="sfs-bench-"))
    try:
        with start_moto() as url:
            os.environ.update(FAKE_KEYS, AWS_ENDPOINT_URL=url, AWS_REGION=REGION)
            os.environ.update(AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
            yield Backends(url, kube, tmp)
    finally:
        kube.close()
        shutil.rmtree(tmp, ignore_errors=True)
