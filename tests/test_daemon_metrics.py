"""The daemon's Prometheus endpoint, csi's k8s_request_total and the shipped Grafana dashboard.

Every scrape is parsed with prometheus-client's own parser. In process: ``Volumes`` over the fake
provider with ``metrics.serve`` on a free port (fast; errors of both classes on demand). End to
end: ``secretfs daemon --metrics-addr`` and ``secretfs csi`` as processes, AWS through moto, the
SecretProviderClass from the test Kubernetes API server; the dashboard's queries are checked
against the names these real scrapes export.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import trio
import yaml
from prometheus_client.parser import text_string_to_metric_families

import providers
from csi import metrics as csi_metrics
from providers.base import AMBIENT, FetchError
from secretfs import metrics
from secretfs.cli import build_parser, node_argvs
from secretfs.volumes import Volumes
from tests.csi_node import ROLE_ANNOTATION, CsiNode, Pod, free_port, role_arn
from tests.fake_provider import FakeProvider
from tests.kube_server import KubeServer, kube_api  # noqa: F401
from tests.mounting import ROOT, needs_fuse, wait_for

DASHBOARD = ROOT / "deploy/grafana/secretfs.json"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> tuple[dict[str, Any], Samples]:
    """The families (name -> Metric) and every sample (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as rsp:
        text = rsp.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples: Samples = {}
    for fam in families.values():
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return families, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value (0 if absent)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


# --- in process: Volumes over the fake provider ---------------------------------------------


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeProvider]:
    prov = FakeProvider()
    monkeypatch.setitem(providers.REGISTRY, "fake", "tests.fake_provider:FakeProvider")
    monkeypatch.setitem(providers._instances, "fake", prov)
    for name in ("db", "api"):
        prov.set(name, f"{name}-1".encode())
    yield prov


@contextlib.asynccontextmanager
async def serving(port: int, **kw: Any) -> AsyncIterator[Volumes]:
    async with trio.open_nursery() as n:
        vols = Volumes(**{"ttl": 10, "max_stale": 100, **kw})
        vols.start(n)
        assert metrics.serve(f"127.0.0.1:{port}", vols)
        yield vols
        n.cancel_scope.cancel()


async def ascrape(port: int) -> Samples:
    return (await trio.to_thread.run_sync(scrape, port))[1]


async def poll(cond: Callable[[], bool], within: float = 10.0) -> None:
    with trio.fail_after(within):
        while not cond():  # noqa: ASYNC110 (a worker thread's effect)
            await trio.sleep(0.01)


async def test_scrape_reports_cache_refreshes_and_errors_by_class(
    fake: FakeProvider, mock_clock: trio.testing.MockClock
) -> None:
    mock_clock.rate = 1.0  # provider calls are worker threads: real time passes too
    port = free_port()
    plan = fake.parse({"objects": "- name: db\n- name: api\n"})
    async with serving(port) as vols:
        before = await ascrape(port)
        await vols.add("v1", plan, AMBIENT, uid=0, gid=0)
        db = vols.volumes["v1"].inodes["db"]
        for _ in range(3):
            await vols.content(db)
        s = await ascrape(port)
        assert (
            value(s, "secretfs_cache_hits_total") == value(before, "secretfs_cache_hits_total") + 3
        )
        assert value(s, "secretfs_volumes", provider="fake") == 1
        assert value(s, "secretfs_identities", provider="fake") == 1
        assert value(s, "secretfs_leases", provider="fake") == 0
        assert value(s, "secretfs_cache_values", kind="static") == 2
        calls = value(s, "secretfs_provider_calls_total", provider="fake", outcome="ok")
        assert calls >= 1
        assert (
            value(s, "secretfs_provider_call_duration_seconds_count", provider="fake", outcome="ok")
            == value(
                before,
                "secretfs_provider_call_duration_seconds_count",
                provider="fake",
                outcome="ok",
            )
            + 1
        )

        # Past the TTL: served stale (a stale hit, a stale value), one refresh that fails
        # transiently, then a rotation, then a permanent answer (value dropped: the next read
        # waits for a fetch: a miss).
        fake.fail["db"] = FetchError("db", "down", transient=True, code="Unavailable")
        mock_clock.jump(11)
        s = await ascrape(port)
        assert value(s, "secretfs_cache_stale_values", provider="fake") == 2
        await vols.content(db)
        await poll(lambda: fake.calls["db"] == 2)
        transient = ("secretfs_refresh_errors_total",)
        labels = {"provider": "fake", "error_class": "transient"}
        with trio.fail_after(10):  # the refresh's result lands after the provider call returns
            while True:
                s = await ascrape(port)
                if value(s, *transient, **labels) > value(before, *transient, **labels):
                    break
                await trio.sleep(0.01)
        assert (
            value(s, "secretfs_cache_stale_hits_total")
            >= value(before, "secretfs_cache_stale_hits_total") + 1
        )
        assert (
            total(
                s,
                "rotation_reconcile_error_total",
                provider="fake",
                error_type="Unavailable",
                os_type="linux",
            )
            >= 1
        )
        assert total(s, "secretfs_provider_calls_total", provider="fake", outcome="transient") >= 1
        assert value(s, "secretfs_refreshes_total", provider="fake") >= 2  # db and api together

        del fake.fail["db"]
        fake.set("db", b"db-2")
        await vols.reload("v1")
        s = await ascrape(port)
        assert (
            value(s, "rotation_reconcile_total", provider="fake", os_type="linux", rotated="true")
            >= 1
        )
        assert value(s, "secretfs_cache_stale_values", provider="fake") == 0
        assert value(s, "rotation_reconcile_duration_sec_count", os_type="linux") >= 2

        del fake.values["db"]  # the backend says: not found
        mock_clock.jump(6)  # a reload within 5 s would share the last one's result
        permanent = value(
            s, "secretfs_refresh_errors_total", provider="fake", error_class="permanent"
        )
        await vols.reload("v1")
        s = await ascrape(port)
        assert (
            value(s, "secretfs_refresh_errors_total", provider="fake", error_class="permanent")
            == permanent + 1
        )
        assert total(s, "rotation_reconcile_error_total", error_type="NotFound") >= 1
        misses = value(s, "secretfs_cache_misses_total")
        with pytest.raises(FetchError):
            await vols.content(db)
        s = await ascrape(port)
        assert value(s, "secretfs_cache_misses_total") == misses + 1
        assert value(s, "secretfs_cache_fetch_errors_total") >= 3
        # No label carries an object's name or bytes.
        label_values = {v for (_, ls) in s for _, v in ls}
        assert not label_values & {"db", "api", "db-1", "db-2", "api-1"}


def test_daemon_and_node_take_a_metrics_address() -> None:
    args = build_parser().parse_args(["daemon", "--metrics-addr", ":8096"])
    assert args.metrics_addr == ":8096"
    assert build_parser().parse_args(["daemon"]).metrics_addr == ""  # off unless asked
    assert build_parser().parse_args(["mount", "x.yaml", "/mnt"]).metrics_addr == ""
    node = build_parser().parse_args(["node", "--nodeid", "n", "--daemon-metrics-addr", ":8096"])
    daemon, csi = node_argvs(node)
    assert daemon[daemon.index("--metrics-addr") + 1] == ":8096"
    assert csi[csi.index("--metrics-addr") + 1] == ":8095"


@pytest.mark.expect_errors  # the two lines this test asks for
def test_csi_metrics_on_a_busy_or_bad_address_are_skipped_with_a_clear_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """csi keeps serving the kubelet when its metrics port is taken (as the daemon does)."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        addr = f"127.0.0.1:{busy.getsockname()[1]}"
        assert csi_metrics.serve(addr) is False
    assert csi_metrics.serve("127.0.0.1:http") is False
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert f"metrics: cannot serve on '{addr}'" in errors[0]
    assert "running without metrics" in errors[0] and len(errors) == 2
    assert "Address already in use" in errors[0] and "give HOST:PORT" in errors[1]
    assert not any(r.exc_info for r in caplog.records)


def test_kube_request_labels() -> None:
    label = csi_metrics.kube_request_labels
    base = "https://10.0.0.1:443"
    assert label("GET", f"{base}/api/v1/namespaces/ns/serviceaccounts/app") == (
        "get",
        "serviceaccounts",
    )
    spc = "/apis/secrets-store.csi.x-k8s.io/v1/namespaces/ns/secretproviderclasses/x"
    assert label("GET", base + spc) == ("get", "secretproviderclasses")
    assert label("GET", f"{base}/api/v1/nodes/node-1") == ("get", "nodes")
    assert label("GET", f"{base}/api/v1/namespaces/ns/pods?watch=true") == ("watch", "pods")
    assert label("GET", f"{base}/api/v1/namespaces/ns/pods") == ("list", "pods")
    assert label("POST", f"{base}/api/v1/namespaces/ns/events") == ("create", "events")
    assert label("PATCH", f"{base}/api/v1/namespaces/ns/pods/p/status") == ("patch", "pods/status")
    assert label("DELETE", f"{base}/api/v1/namespaces/ns") == ("delete", "namespaces")


# --- the dashboard --------------------------------------------------------------------------

# PromQL words that are not metric names.
PROMQL = {
    "sum", "rate", "irate", "increase", "by", "without", "histogram_quantile", "le", "on",
    "ignoring", "clamp_min", "clamp_max", "max", "min", "avg", "count", "and", "or", "unless",
    "offset", "bool", "topk", "time", "vector", "delta", "deriv", "label_replace", "abs",
    "changes", "resets", "group_left", "group_right", "instance", "job", "interval",
}  # fmt: skip


def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def panels(d: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in d["panels"]:
        out.append(p)
        out += p.get("panels", [])  # collapsed rows
    return out


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (label matchers, strings, durations removed)."""
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r'"[^"]*"', "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr))
    return {w for w in words if w not in PROMQL and not w.startswith("$")}


def exported(families: dict[str, Any]) -> set[str]:
    """Every sample name a scrape can hold (counters' _total, histograms' series)."""
    names = set()
    for name, fam in families.items():
        names.add(name)
        if fam.type == "counter":
            names |= {name + "_total", name + "_created"}
        if fam.type == "histogram":
            names |= {name + s for s in ("_bucket", "_sum", "_count", "_created")}
    return names


def test_dashboard_has_what_grafana_requires() -> None:
    d = dashboard()
    assert d["title"] and isinstance(d["schemaVersion"], int) and d["uid"]
    assert isinstance(d["panels"], list) and d["panels"]
    titles = set()
    for p in panels(d):
        assert p["type"] and p["title"] and isinstance(p["gridPos"], dict)
        if p["type"] == "row":
            continue
        titles.add(p["title"])
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["expr"] and t["refId"]
            assert metric_names(t["expr"]), t["expr"]
    # What it is for.
    wanted = ("hit ratio", "stale", "refresh errors", "latency", "publish", "takeover")
    for word in wanted:
        assert any(word in t.lower() for t in titles), word


# --- end to end: the daemon and csi processes -------------------------------------------------

SEED = yaml.safe_load((ROOT / "examples/aws-seed.yaml").read_text())
NAME = "MyDatabasePassword"


class MetricsNode(CsiNode):
    daemon_metrics_port: int = 0

    def daemon_args(self) -> list[str]:
        return [*super().daemon_args(), "--metrics-addr", f"127.0.0.1:{self.daemon_metrics_port}"]


@needs_fuse
@pytest.mark.fuse
def test_scrape_a_running_daemon_and_csi(
    tmp_path: Path,
    kube_api: KubeServer,  # noqa: F811
    aws_env: dict[str, str],
) -> None:
    kube_api.add_spc("default", SEED)
    kube_api.add_service_account("default", "app", {ROLE_ANNOTATION: role_arn("app")})
    sm = boto3.client(
        "secretsmanager", region_name=aws_env["region"], endpoint_url=aws_env["endpoint_url"]
    )
    sm.create_secret(Name=NAME, SecretString="v1-secret")
    node = MetricsNode(tmp_path, kube_api.kubeconfig(tmp_path / "kubeconfig"), ttl=1.0)
    node.daemon_metrics_port = free_port()
    port = node.daemon_metrics_port
    try:
        node.start_daemon()  # as the chart runs them: two processes
        node.start_csi()
        families, before = scrape(port)
        for name in (
            "secretfs_cache_hits",
            "secretfs_cache_stale_hits",
            "secretfs_cache_misses",
            "secretfs_stale_publishes",
            "secretfs_cache_values",
            "secretfs_volumes",
            "process_resident_memory_bytes",
        ):
            assert name in families, name
        assert families["secretfs_cache_hits"].type == "counter"
        assert families["secretfs_volumes"].type == "gauge"
        pod = Pod("app-0", "d0000000-0000-0000-0000-000000000000")
        target = node.publish(pod)
        for _ in range(3):
            assert (target / NAME).read_bytes() == b"v1-secret"
        families, s = scrape(port)
        assert value(s, "secretfs_volumes", provider="aws") == 1
        assert value(s, "secretfs_identities", provider="aws") == 1
        assert value(s, "secretfs_cache_values", kind="static") == 1
        reads = value(s, "secretfs_cache_hits_total") + value(s, "secretfs_cache_stale_hits_total")
        assert reads >= 3
        assert value(s, "secretfs_provider_calls_total", provider="aws", outcome="ok") == 1
        assert families["secretfs_provider_call_duration_seconds"].type == "histogram"
        assert (
            value(
                s,
                "secretfs_provider_call_duration_seconds_bucket",
                provider="aws",
                outcome="ok",
                le="+Inf",
            )
            == 1
        )

        # The secret is deleted: the next refresh gets a permanent answer and drops the value.
        sm.delete_secret(SecretId=NAME, ForceDeleteWithoutRecovery=True)
        time.sleep(1.1)  # past the TTL

        def refreshed_with_error() -> bool:
            with contextlib.suppress(OSError):
                (target / NAME).read_bytes()
            return (
                value(
                    scrape(port)[1],
                    "secretfs_refresh_errors_total",
                    provider="aws",
                    error_class="permanent",
                )
                >= 1
            )

        assert wait_for(refreshed_with_error, timeout=20)
        families, s = scrape(port)
        assert (
            total(
                s,
                "rotation_reconcile_error_total",
                provider="aws",
                error_type="NotFound",
                os_type="linux",
            )
            >= 1
        )
        assert (
            value(s, "secretfs_cache_misses_total") > value(before, "secretfs_cache_misses_total")
            or value(s, "secretfs_cache_stale_hits_total") >= 1
        )
        assert value(s, "secretfs_refreshes_total", provider="aws") >= 1
        daemon_names = exported(families)

        csi_families, c = scrape(node.metrics_port)
        assert (
            value(c, "k8s_request_total", verb="get", resource="secretproviderclasses", code="200")
            >= 1
        )
        assert (
            value(c, "k8s_request_total", verb="get", resource="serviceaccounts", code="200") >= 1
        )
        # The dashboard uses only what the two processes export (csi's takeover counters have
        # no labels: exported from the start).
        names = daemon_names | exported(csi_families)
        for p in panels(dashboard()):
            for t in p.get("targets", []):
                unknown = metric_names(t["expr"]) - names
                assert not unknown, (p["title"], unknown)
        # Every family the two processes export is documented in the README's tables.
        readme = (ROOT / "README.md").read_text()
        for fam in [*families.values(), *csi_families.values()]:
            if fam.name.startswith(("process_", "python_")) or fam.name.endswith("_created"):
                continue  # prometheus-client's own families, and counters' creation times
            shown = fam.name + ("_total" if fam.type == "counter" else "")
            assert f"| `{shown}` |" in readme, f"{shown} is not documented in README.md"
        logs = node.logs()
        assert "v1-secret" not in logs
    finally:
        node.close()


# --- the chart --------------------------------------------------------------------------------


def test_chart_serves_daemon_metrics_by_default_and_can_turn_them_off() -> None:
    from tests.test_deploy import by_kind, container, one, render, validate

    objs = render()
    daemon = container(one(objs, "DaemonSet", "-daemon"), "daemon")
    assert daemon["args"][daemon["args"].index("--metrics-addr") + 1] == ":8096"
    assert daemon["ports"] == [{"name": "metrics", "containerPort": 8096, "protocol": "TCP"}]
    assert by_kind(objs, "PodMonitor") == []  # off by default: needs the operator's CRD
    objs = render({"daemon": {"metrics": {"enabled": False}}})
    daemon = container(one(objs, "DaemonSet", "-daemon"), "daemon")
    assert "--metrics-addr" not in daemon["args"] and "ports" not in daemon
    objs = render({"daemon": {"metrics": {"port": 9100}}, "podMonitor": {"enabled": True}})
    daemon = container(one(objs, "DaemonSet", "-daemon"), "daemon")
    assert daemon["ports"][0]["containerPort"] == 9100
    validate(one(objs, "DaemonSet", "-daemon"))
    pm = one(objs, "PodMonitor")
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    assert pm["spec"]["podMetricsEndpoints"] == [
        {"port": "metrics", "path": "/metrics", "interval": "30s"}
    ]
    # It selects both DaemonSets' pods, whose metrics ports are both named "metrics".
    selector = pm["spec"]["selector"]["matchLabels"]
    for ds in by_kind(objs, "DaemonSet"):
        pod_labels = ds["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= pod_labels.items()
    csi = container(one(objs, "DaemonSet", "-csi"), "csi")
    assert any(p["name"] == "metrics" for p in csi["ports"])
