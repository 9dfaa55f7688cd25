"""Start-up of ``secretfs mount`` (bench/startup.py): what the standalone path imports and walks.

A standalone mount serves no /metrics unless ``--metrics-addr`` asks for it, so it never imports
prometheus-client and its HTTP server; the AWS provider's first client checks its service name
against its own three services, not against every service botocore ships.
"""

from __future__ import annotations

import os
import subprocess
import sys

import botocore.loaders
import pytest

from bench.startup import IMPORTS
from providers.aws import auth
from tests.mounting import ROOT

# Imported only for a /metrics endpoint (secretfs/metrics.py): 28 modules in all.
METRICS_ONLY = ("prometheus_client", "wsgiref", "http.server", "socketserver")

# A standalone mount without --metrics-addr, in a fresh interpreter: the imports of an AWS mount,
# then what its start-up does with the metrics: serve(""), a provider call and a cache refresh of
# a volume over the fake provider (both recorded through secretfs/metrics.py when served).
STANDALONE = f"""
import sys
{IMPORTS}
import trio

import providers
from providers.base import AMBIENT
from secretfs import metrics
from secretfs.volumes import Volumes
from tests.fake_provider import FakeProvider

fake = providers._instances["fake"] = FakeProvider()
fake.set("db", b"value")
plan = fake.parse({{"objects": "- name: db"}})


async def main() -> None:
    async with trio.open_nursery() as nursery:
        volumes = Volumes(ttl=10, max_stale=100)
        volumes.start(nursery)
        assert metrics.serve("", volumes) is False
        await volumes.add("v", plan, AMBIENT, uid=0, gid=0)
        assert (await volumes.content(volumes.volumes["v"].inodes["db"])).data == b"value"
        await volumes.reload(None)  # a refresh: metrics.observed
        nursery.cancel_scope.cancel()


trio.run(main)
assert "secretfs.metrics" in sys.modules
print(sorted(m for m in sys.modules if m.startswith({METRICS_ONLY!r})))
"""


def test_a_standalone_mount_without_metrics_imports_no_prometheus_client() -> None:
    out = subprocess.run(
        [sys.executable, "-c", STANDALONE], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.fixture
def ambient_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials from the environment (no profile, no IMDS): creating a client calls nobody."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)


def test_the_first_client_lists_only_its_own_services(
    ambient_keys: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    listed: list[str] = []
    listdir = os.listdir

    def counted(path: str = ".") -> list[str]:
        listed.append(path)
        return listdir(path)

    monkeypatch.setattr(os, "listdir", counted)
    client = auth.ClientCache().client("secretsmanager", "us-east-1", None)
    assert client.meta.service_model.service_name == "secretsmanager"
    # botocore's own check walks all ~420 service directories of its data, once per type.
    assert len(listed) < 20, listed[:30]


@pytest.mark.parametrize("type_name", ["service-2", "endpoint-rule-set-1", "waiters-2"])
def test_the_loader_knows_its_services_as_botocore_does(type_name: str) -> None:
    ours = auth._Loader(file_loader=auth._FileLoader()).list_available_services(type_name)
    stock = botocore.loaders.Loader().list_available_services(type_name)
    assert ours == [s for s in stock if s in auth.SERVICES]
