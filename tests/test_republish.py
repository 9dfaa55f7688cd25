"""The republish path (requiresRepublish): new nodePublishSecretRef data and on-demand refresh.

- **New Secret data.** The kubelet republishes with the current data of the volume's
  nodePublishSecretRef Secret; data that changed changes the identity, and the daemon re-keys the
  volume: everything is fetched with the new data first, then the files switch to it at once. If
  the new data cannot fetch, the republish fails with the provider's status and the old values
  are still served.
- **Refresh now.** A ``secretfs.io/refresh`` annotation on the SecretProviderClass whose value
  differs from the one a volume last honoured makes its next republish fetch every value now,
  whatever the TTL. The csi process reads the class at most once per 30 s, and an API failure
  never fails a republish.

End to end through the CSI pair as the kubelet drives it (gRPC on the unix socket, real FUSE,
the Kubernetes API test server) against the Azure Key Vault + Entra ID test server: a service
principal from the nodePublishSecretRef data (``clientid``, ``clientsecret``) is what the data
decides, so the server tells the two identities apart (which client asked for a token, which one
the vault lets read). The re-key itself and the class cache are also tested in-process.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
import trio

import providers
from csi import kube
from csi.keeper import REFRESH_MARK, Connection, Keeper
from csi.publish import Node as CsiNodeCore
from csi.publish import Publish
from csi.server import CsiError
from providers.base import FetchError, Identity
from secretfs import control
from secretfs.control import ControlError
from secretfs.daemon import classify
from secretfs.volumes import VolumeError, Volumes
from tests.azure_server import AzureTestServer, serve
from tests.csi_node import Pod
from tests.fake_provider import FakeProvider
from tests.kube_server import KubeServer, kube_api  # noqa: F401
from tests.mounting import needs_fuse, wait_for
from tests.test_e2e_csi_providers import ProviderNode, azure_settings

TENANT = "tenant-1"
VAULT = "kvname"
REFRESH = "secretfs.io/refresh"

# Azure Key Vault with a service principal from the volume's nodePublishSecretRef (no clientID).
SP_SPC = {
    "metadata": {"name": "azure-sp"},
    "spec": {
        "provider": "azure",
        "parameters": {
            "usePodIdentity": "false",
            "keyvaultName": VAULT,
            "tenantID": TENANT,
            "objects": "array:\n  - |\n    objectName: secret1\n    objectType: secret\n",
        },
    },
}
# Client secrets, distinctive so that the logs can be searched for them.
SECRET_1 = "sp-one-Secret-1f4a"
SECRET_2 = "sp-two-Secret-9c2e"
SECRET_3 = "sp-three-Secret-77b0"


def sp(client_id: str, secret: str) -> dict[str, str]:
    return {"clientid": client_id, "clientsecret": secret}


# --- the re-key in the daemon's Volumes, in-process -----------------------------------------------


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeProvider:
    prov = FakeProvider()
    monkeypatch.setitem(providers.REGISTRY, "fake", "tests.fake_provider:FakeProvider")
    monkeypatch.setitem(providers._instances, "fake", prov)
    prov.set("db", b"password-1")
    prov.set("api", b"key-1")
    return prov


def ident(secret: str) -> Identity:
    return Identity(namespace="ns", service_account="sa", secrets={"clientsecret": secret})


async def test_rekey_fetches_under_the_new_identity_then_swaps(
    fake: FakeProvider, nursery: trio.Nursery
) -> None:
    vols = Volumes(ttl=3600, max_stale=7200)
    vols.start(nursery)
    changes: list[set[int]] = []
    vols.on_inodes_changed.append(changes.append)
    plan = fake.parse({"objects": "- name: db\n- name: api\n  path: app/api-key\n"})
    vol = await vols.add("v", plan, ident("a"), uid=0, gid=0)
    other = await vols.add("w", plan, ident("a"), uid=0, gid=0)  # the same (old) identity
    db, api, w_db = vol.inodes["db"], vol.inodes["app/api-key"], other.inodes["db"]
    assert (await vols.content(db)).data == b"password-1"
    assert (await vols.content(api)).data == b"key-1"
    old_keys = dict(vol.keys)
    fake.set("db", b"password-2")  # the TTL is long: the old identity's value stays cached

    assert await vols.rekey("v", ident("b")) == 1
    new = vols.volumes["v"]
    assert new is not vol and new.identity.key() == ident("b").key()
    assert new.inodes == vol.inodes  # same files, same inode numbers
    assert fake.identities[-1].secrets == {"clientsecret": "b"}
    # Only the file whose bytes differ is announced (api's value is the same for both).
    assert changes == [{db}]
    assert (await vols.content(db)).data == b"password-2"
    assert (await vols.content(api)).data == b"key-1"
    for spec, key in new.keys.items():
        assert key != old_keys[spec] and vols.tree.inodes_for(key) == {new.inodes[spec.path]}
        assert vols.tree[new.inodes[spec.path]].key == key
    # The volume still using the old identity keeps its keys and values, and the identity.
    assert {k: vols.tree.inodes_for(k) for k in old_keys.values()} == {
        old_keys[s]: {other.inodes[s.path]} for s in plan.files
    }
    assert (await vols.content(w_db)).data == b"password-1"
    assert (await vols.content(other.inodes["app/api-key"])).data == b"key-1"
    assert fake.released == []
    calls = sum(fake.calls.values())
    # A second volume moving to the same new identity finds its values fresh: no backend call.
    assert await vols.rekey("w", ident("b")) == 1
    assert sum(fake.calls.values()) == calls
    assert (await vols.content(w_db)).data == b"password-2"
    # Now nothing uses the old identity: its credentials are released, its values dropped.
    assert fake.released == [ident("a").key()]
    assert all(not vols.tree.inodes_for(k) for k in old_keys.values())
    assert len(vols.cache) == 2  # db and api, once, under the new identity
    await vols.remove("v")
    await vols.remove("w")
    assert fake.released == [ident("a").key(), ident("b").key()]


async def test_rekey_that_cannot_fetch_changes_nothing(
    fake: FakeProvider, nursery: trio.Nursery
) -> None:
    vols = Volumes(ttl=3600, max_stale=7200)
    vols.start(nursery)
    changes: list[set[int]] = []
    vols.on_inodes_changed.append(changes.append)
    plan = fake.parse({"objects": "- name: db\n- name: api\n"})
    vol = await vols.add("v", plan, ident("a"), uid=0, gid=0)
    db = vol.inodes["db"]
    keys = dict(vol.keys)
    fake.fail["api"] = FetchError("api", "access denied", transient=False, code="AccessDenied")
    with pytest.raises(VolumeError) as info:
        await vols.rekey("v", ident("b"))
    assert "object 'api': access denied" in str(info.value)
    assert classify(info.value) == control.PERMISSION_DENIED
    assert fake.identities[-1].secrets == {"clientsecret": "b"}  # it was tried with the new data
    fake.fail.clear()
    fake.set("db", b"password-2")
    # Same volume, same identity, same keys; the old values are served; nothing announced.
    assert vols.volumes["v"] is vol and vol.identity.key() == ident("a").key()
    assert vol.keys == keys and vols.tree[db].key == keys[plan.files[0]]
    assert (await vols.content(db)).data == b"password-1"
    assert changes == [] and fake.released == [] and len(vols.cache) == 2


# --- the csi process's SecretProviderClass cache -------------------------------------------------


def test_spc_reads_on_republish_are_cached_per_class(
    kube_api: KubeServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    now = [0.0]
    k = kube.Kube(str(kube_api.kubeconfig(tmp_path / "kubeconfig")), clock=lambda: now[0])
    kube_api.add_spc("team", {**SP_SPC, "metadata": {"name": "db"}})
    path = "/apis/secrets-store.csi.x-k8s.io/v1/namespaces/team/secretproviderclasses/db"

    def gets() -> int:
        return sum(1 for p in kube_api.requests if p.split("?")[0] == path)

    # 100 pods republishing at once: one GET.
    with ThreadPoolExecutor(16) as pool:
        objs = list(pool.map(lambda _: k.cached_secret_provider_class("team", "db"), range(100)))
    assert gets() == 1 and all(o["metadata"]["name"] == "db" for o in objs)
    now[0] = 29.9
    k.cached_secret_provider_class("team", "db")
    assert gets() == 1
    now[0] = 30.0
    kube_api.spcs[("team", "db")]["metadata"]["annotations"] = {REFRESH: "1"}
    assert k.cached_secret_provider_class("team", "db")["metadata"]["annotations"] == {REFRESH: "1"}
    assert gets() == 2
    # A failure is an answer too (an API outage is not asked again by every pod)...
    kube_api.fail_with = 500
    now[0] = 60.0
    for _ in range(3):
        with pytest.raises(kube.KubeError, match="cannot read SecretProviderClass team/db"):
            k.cached_secret_provider_class("team", "db")
    assert gets() == 3
    # ... and a missing class keeps its type.
    kube_api.fail_with = None
    now[0] = 90.0
    with pytest.raises(kube.NotFound):
        k.cached_secret_provider_class("team", "gone")
    # An uncached read (publish) always asks.
    k.secret_provider_class("team", "db")
    assert gets() == 4


# --- the csi process's decision to refresh now --------------------------------------------------


class FakeDaemon:
    def __init__(self) -> None:
        self.reloads: list[str | None] = []
        self.answer: dict[str, Any] = {"fetched": 1, "changed": 1, "failed": 0}
        self.error: ControlError | None = None

    def reload(self, volume_id: str | None, timeout: float = 60.0) -> dict[str, Any]:
        self.reloads.append(volume_id)
        if self.error is not None:
            raise self.error
        return self.answer


class FakeKube:
    def __init__(self) -> None:
        self.obj: dict[str, Any] = {"metadata": {"name": "db"}}
        self.error: kube.KubeError | None = None

    def cached_secret_provider_class(self, namespace: str, name: str) -> dict[str, Any]:
        if self.error is not None:
            raise self.error
        return self.obj


def test_refresh_on_request_decisions(tmp_path: Path) -> None:
    daemon, api = FakeDaemon(), FakeKube()
    keeper = Keeper(cast(Any, daemon))
    keeper.conn = Connection(-1, "0:0", b"", None, 1, 2)
    record = {"spc": {"name": "db", REFRESH_MARK: ""}, "identity": {}}
    keeper.conn.volumes["vol-1"] = {"record": record, "inodes": {}}
    node = CsiNodeCore(cast(Any, daemon), cast(Any, api), str(tmp_path), keeper)
    req = Publish("vol-1", "/t", "team", "db", "pod", "uid", "sa", 0, {}, {}, {})

    def republish() -> None:
        node._refresh_on_request(req, time.monotonic() + 60)

    republish()  # no annotation, none recorded: nothing to do
    assert daemon.reloads == []
    api.obj = {"metadata": {"annotations": {REFRESH: "1"}}}
    # Values the refresh could not fetch: the republish says so and the mark is not honoured
    # yet, so the next republish tries again.
    daemon.answer = {"fetched": 1, "changed": 0, "failed": 1}
    with pytest.raises(CsiError) as info:
        republish()
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert "annotation secretfs.io/refresh='1' of SecretProviderClass team/db" in info.value.message
    assert "could not fetch 1 value(s)" in info.value.message
    assert keeper.refresh_mark("vol-1") == ""
    daemon.error = ControlError(control.UNAVAILABLE, "the daemon did not answer")
    with pytest.raises(CsiError) as info:
        republish()
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert "did not answer" in info.value.message and "tried again" in info.value.message
    # A daemon of an older release has no reload: values refresh at their TTL; no failure.
    daemon.error = ControlError(control.INVALID_ARGUMENT, "unknown operation 'reload'")
    republish()
    assert keeper.refresh_mark("vol-1") == "" and len(daemon.reloads) == 3
    daemon.error, daemon.answer = None, {"fetched": 1, "changed": 1, "failed": 0}
    republish()
    assert keeper.refresh_mark("vol-1") == "1" and daemon.reloads == ["vol-1"] * 4
    republish()  # honoured: once
    assert len(daemon.reloads) == 4
    # The API cannot be read: the republish goes on without looking.
    api.obj = {"metadata": {"annotations": {REFRESH: "2"}}}
    api.error = kube.KubeError("cannot read SecretProviderClass team/db: HTTP 500")
    republish()
    assert len(daemon.reloads) == 4
    # No record of the volume (no connection held): nothing to compare with.
    api.error = None
    keeper.forget("vol-1")
    republish()
    assert len(daemon.reloads) == 4


# --- end to end: the CSI pair against the Azure test server --------------------------------------


class Node:
    """A ProviderNode with the Azure server, and the kubelet's republish with Secret data."""

    def __init__(self, node: ProviderNode, srv: AzureTestServer) -> None:
        self.node, self.srv = node, srv

    def publish(self, pod: Pod, secrets: dict[str, str], spc: str = "azure-sp") -> Path:
        """NodePublishVolume (the first, or a republish) with this nodePublishSecretRef data."""
        req = self.node.publish_request(pod, spc, token=f"token-{time.monotonic_ns()}")
        for k, v in secrets.items():
            req.secrets[k] = v
        self.node.node().NodePublishVolume(req, timeout=60)
        return self.node.target(pod)

    def record(self, pod: Pod) -> dict[str, Any]:
        """The volume's record as the daemon holds it (what a restarted csi takes back)."""
        record: dict[str, Any] = control.Client(self.node.daemon_socket).export(pod.volume_id)[
            "record"
        ]
        return record

    def vault_calls(self) -> int:
        return sum(n for name, n in self.srv.calls.items() if name != "openid")

    def clients_asking(self) -> list[str]:
        return [r["client_id"] for r in self.srv.token_requests]

    def restart_daemon(self) -> None:
        """kill -9 the daemon and start the next generation; the keeper hands it every volume
        (with the records it holds) and the connection."""
        self.node.kill("daemon")
        argv = ["-m", "tests.e2e_harness", "daemon", *self.node.daemon_args()]
        self.node._run("daemon", argv, {**os.environ, **self.node.env})
        client = control.Client(self.node.daemon_socket)

        def serving() -> bool:
            try:
                status = client.status(1)
            except control.ControlError:
                return False
            return bool(status.get("serving")) and int(status.get("generation", 0)) >= 2

        assert wait_for(serving, timeout=30), self.node.logs()


@pytest.fixture
def azure_node(
    tmp_path: Path,
    kube_api: KubeServer,  # noqa: F811
) -> Iterator[Callable[..., Node]]:
    kube_api.add_service_account("default", "app")
    made: list[ProviderNode] = []
    with serve(tmp_path, vaults=(VAULT,), tenant=TENANT) as srv:
        for client_id, secret in (("app-1", SECRET_1), ("app-2", SECRET_2), ("app-3", SECRET_3)):
            srv.add_app(client_id, secret)
        srv.allow(VAULT, "app-1")
        srv.allow(VAULT, "app-2")  # app-3 may log in, but not read the vault

        def make(ttl: float = 3600.0) -> Node:
            node = ProviderNode(tmp_path, kube_api.kubeconfig(tmp_path / "kubeconfig"), ttl=ttl)
            node.env = azure_settings(srv)
            made.append(node)
            node.start()
            return Node(node, srv)

        try:
            yield make
        finally:
            for node in made:
                node.close()
                assert not node.our_mounts(), "mounts left behind"


@needs_fuse
@pytest.mark.fuse
def test_new_secret_data_serves_values_fetched_with_it(
    azure_node: Callable[..., Node],
    kube_api: KubeServer,  # noqa: F811
) -> None:
    kube_api.add_spc("default", SP_SPC)
    n = azure_node()
    srv = n.srv
    srv.add_secret(VAULT, "secret1", "value-one")
    pod = Pod("app-0", "a0000000-0000-0000-0000-00000000000a")
    target = n.publish(pod, sp("app-1", SECRET_1))
    assert (target / "secret1").read_bytes() == b"value-one"
    assert n.clients_asking() == ["app-1"]

    # The secret rotates; with a TTL of an hour the volume keeps the value it has...
    srv.add_secret(VAULT, "secret1", "value-two, longer")
    calls = n.vault_calls()
    n.publish(pod, sp("app-1", SECRET_1))  # a republish with the same data: no backend call
    assert n.vault_calls() == calls
    assert (target / "secret1").read_bytes() == b"value-one"
    # ... until the Secret's data changes: the republish fetches with the new service principal
    # (Entra ID was asked for a token by app-2) and the file shows what it fetched, same mount.
    n.publish(pod, sp("app-2", SECRET_2))
    assert n.clients_asking() == ["app-1", "app-2"]
    assert (target / "secret1").read_bytes() == b"value-two, longer"
    assert os.stat(target / "secret1").st_size == len(b"value-two, longer")
    assert n.record(pod)["identity"]["secrets"] == sp("app-2", SECRET_2)

    # A daemon restart rebuilds the volume from the keeper's record: with the new data. app-1
    # may no longer read the vault, so the value comes back only if app-2 fetches it.
    srv.vaults[VAULT].allowed.discard("app-1")
    srv.add_secret(VAULT, "secret1", "value-three")
    n.restart_daemon()
    assert (target / "secret1").read_bytes() == b"value-three"
    assert n.clients_asking()[-1] == "app-2"
    assert set(n.clients_asking()) == {"app-1", "app-2"}

    n.node.unpublish(pod)
    logs = n.node.logs()
    assert "nodePublishSecretRef data changed" in logs
    for needle in (SECRET_1, SECRET_2, "value-one", "value-two", "value-three", *srv.tokens):
        assert needle not in logs


@needs_fuse
@pytest.mark.fuse
def test_new_secret_data_that_cannot_fetch_fails_and_keeps_the_old_values(
    azure_node: Callable[..., Node],
    kube_api: KubeServer,  # noqa: F811
) -> None:
    kube_api.add_spc("default", SP_SPC)
    n = azure_node()
    srv = n.srv
    srv.add_secret(VAULT, "secret1", "value-one")
    pod = Pod("app-0", "b0000000-0000-0000-0000-00000000000b")
    target = n.publish(pod, sp("app-1", SECRET_1))
    assert (target / "secret1").read_bytes() == b"value-one"
    srv.add_secret(VAULT, "secret1", "value-two")

    # app-3 logs in but may not read the vault: the republish fails with the vault's refusal.
    with pytest.raises(grpc.RpcError) as info:
        n.publish(pod, sp("app-3", SECRET_3))
    err = info.value
    details = str(err.details())
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED, details
    assert "nodePublishSecretRef Secret changed" in details
    assert "SecretProviderClass default/azure-sp" in details
    assert "does not have secrets get permission" in details
    assert "keeps serving the values fetched with the previous data" in details
    assert SECRET_3 not in details
    assert n.clients_asking() == ["app-1", "app-3"]
    # The volume is mounted and serves what it had, with the old identity, as before.
    assert (target / "secret1").read_bytes() == b"value-one"
    assert n.record(pod)["identity"]["secrets"] == sp("app-1", SECRET_1)
    # A wrong client secret is refused by Entra ID: the same status, saying so.
    with pytest.raises(grpc.RpcError) as info:
        n.publish(pod, sp("app-2", "not-the-secret"))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "AADSTS7000215" in str(info.value.details())
    # The kubelet retries; once the Secret is fixed the republish succeeds.
    n.publish(pod, sp("app-2", SECRET_2))
    assert (target / "secret1").read_bytes() == b"value-two"

    n.node.unpublish(pod)
    logs = n.node.logs()
    for needle in (SECRET_1, SECRET_2, SECRET_3, "not-the-secret", "value-one", *srv.tokens):
        assert needle not in logs


# --- end to end: secretfs.io/refresh --------------------------------------------------------------


@needs_fuse
@pytest.mark.fuse
def test_refresh_annotation_fetches_now_once(
    azure_node: Callable[..., Node],
    kube_api: KubeServer,  # noqa: F811
) -> None:
    kube_api.add_spc("default", SP_SPC)
    n = azure_node(ttl=3600.0)
    srv = n.srv
    srv.add_secret(VAULT, "secret1", "value-one")
    pod = Pod("app-0", "c0000000-0000-0000-0000-00000000000c")
    target = n.publish(pod, sp("app-1", SECRET_1))
    assert (target / "secret1").read_bytes() == b"value-one"
    path = "/apis/secrets-store.csi.x-k8s.io/v1/namespaces/default/secretproviderclasses/azure-sp"

    def spc_gets() -> int:
        return sum(1 for p in kube_api.requests if p.split("?")[0] == path)

    # The secret rotates; the volume keeps its value for the TTL (an hour) ...
    srv.add_secret(VAULT, "secret1", "value-two, longer")
    # ... unless the user asks for a refresh now (kubectl annotate): the next republish fetches.
    kube_api.spcs[("default", "azure-sp")]["metadata"]["annotations"] = {REFRESH: "1700000000"}
    calls = n.vault_calls()
    n.publish(pod, sp("app-1", SECRET_1))
    assert n.vault_calls() > calls
    assert (target / "secret1").read_bytes() == b"value-two, longer"
    assert os.stat(target / "secret1").st_size == len(b"value-two, longer")
    assert "refreshed as annotation secretfs.io/refresh='1700000000'" in n.node.log("csi")
    # Once: the next republishes (same annotation; the class read at most once per 30 s) make
    # no backend call and no API call.
    srv.add_secret(VAULT, "secret1", "value-three")
    gets, calls = spc_gets(), n.vault_calls()
    for _ in range(3):
        n.publish(pod, sp("app-1", SECRET_1))
    assert n.vault_calls() == calls and spc_gets() == gets
    assert (target / "secret1").read_bytes() == b"value-two, longer"

    # A class the API cannot answer for (a class no republish has read yet, so not cached):
    # the republish succeeds without looking, and says why in the log.
    kube_api.add_spc("default", {**SP_SPC, "metadata": {"name": "azure-sp-2"}})
    pod2 = Pod("app-1", "c1111111-0000-0000-0000-00000000000c")
    target2 = n.publish(pod2, sp("app-1", SECRET_1), spc="azure-sp-2")
    kube_api.spcs[("default", "azure-sp-2")]["metadata"]["annotations"] = {REFRESH: "1"}
    kube_api.fail_with = 500
    calls = n.vault_calls()
    n.publish(pod2, sp("app-1", SECRET_1), spc="azure-sp-2")
    kube_api.fail_with = None
    assert n.vault_calls() == calls
    assert (target2 / "secret1").read_bytes() == b"value-two, longer"
    assert "HTTP 500" in n.node.log("csi")
    assert "its secretfs.io/refresh annotation is not looked at this time" in n.node.log("csi")

    n.node.unpublish(pod)
    n.node.unpublish(pod2)
