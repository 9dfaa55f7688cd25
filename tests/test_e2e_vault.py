"""End to end: Vault-backed SecretProviderClasses on real FUSE mounts (standalone mode).

The daemon runs as ``python -m secretfs mount ... --foreground`` in a subprocess with an ambient
``VAULT_TOKEN`` (what the provider's standalone mode reads) and talks HTTP to the Vault test
server of :mod:`tests.vault_server`, which runs in this process so its counters can be checked.
The SecretProviderClasses of the first tests are HashiCorp's own documented examples, unchanged
except for the Vault address. The last tests drive :class:`secretfs.volumes.Volumes` in-process
for what one standalone mount cannot show (several volumes in one daemon).
"""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from collections.abc import Hashable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import trio

import providers
from providers.base import AMBIENT, Fetched, FetchError, Identity, Lease, Plan
from secretfs import spc as spc_mod
from secretfs import volumes
from secretfs.volumes import Volume, Volumes
from tests.fake_provider import FakeProvider
from tests.mounting import Mount, mounted, needs_fuse, wait_for
from tests.vault_server import Recorded, ServerTLS, VaultTestServer, make_tls, run_vault_server

TOKEN = "hvs.e2e-standalone-token"  # a test server's token, not a credential

# HashiCorp's tutorial "Mount Vault secrets through Container Storage Interface (CSI) volume"
# (developer.hashicorp.com/vault/tutorials/kubernetes/kubernetes-secret-store-driver), which seeds
# it with `vault kv put secret/db-pass password="db-secret-password"` (KV v2 mounted at secret/).
TUTORIAL_ADDRESS = "http://vault.default:8200"
TUTORIAL_SPC = """\
apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: vault-database
spec:
  provider: vault
  parameters:
    vaultAddress: "http://vault.default:8200"
    roleName: "database"
    objects: |
      - objectName: "db-password"
        secretPath: "secret/data/db-pass"
        secretKey: "password"
"""

# vault-csi-provider's "Hello World" class (test/bats/configs/vault-kv-secretproviderclass.yaml):
# no vaultAddress, so VAULT_ADDR supplies it, as the provider's -vault-addr flag would.
HELLO_WORLD_SPC = """\
# The "Hello World" Vault SecretProviderClass
apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: vault-kv
spec:
  provider: vault
  parameters:
    roleName: "kv-role"
    audience: "vault"
    objects: |
      - objectName: "secret-1"
        secretPath: "secret/data/kv1"
        secretKey: "bar1"
        filePermission: 0624
      - objectName: "secret-2"
        secretPath: "secret/data/kv2"
        secretKey: "bar2"
"""

# The Vault docs' "File based dynamic database credentials" example
# (developer.hashicorp.com/vault/docs/platform/k8s/csi/examples), v1alpha1 and all.
DOCS_DB_SPC = """\
---
apiVersion: secrets-store.csi.x-k8s.io/v1alpha1
kind: SecretProviderClass
metadata:
  name: vault-db-creds
spec:
  provider: vault
  parameters:
    roleName: 'app'
    objects: |
      - objectName: "dbUsername"
        secretPath: "database/creds/db-app"
        secretKey: "username"
      - objectName: "dbPassword"
        secretPath: "database/creds/db-app"
        secretKey: "password"
"""

# vault-csi-provider's PKI class (test/bats/configs/vault-pki-secretproviderclass.yaml): PUT with
# secretArgs over TLS with a CA file. Address and CA path are the only changes.
PKI_ADDRESS, PKI_CA = "https://vault:8200", "/mnt/tls/ca.crt"
PKI_SPC = """\
apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: vault-pki
spec:
  provider: vault
  parameters:
    roleName: "pki-role"
    audience: "vault"
    vaultAddress: https://vault:8200
    vaultCACertPath: /mnt/tls/ca.crt
    # N.B. No secretKey means the whole JSON response will be written.
    objects: |
      - objectName: "certs"
        secretPath: "pki/issue/example-dot-com"
        secretArgs:
          common_name: "test.example.com"
          ttl: "24h"
        method: "PUT"
"""

ROTATING_SPC = """\
apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: rotating
spec:
  provider: vault
  parameters:
    objects: |
      - objectName: "api-key"
        secretPath: "secret/data/api"
        secretKey: "key"
      - objectName: "api.json"
        secretPath: "secret/data/api"
      - objectName: "legacy"
        secretPath: "kv/legacy"
        secretKey: "token"
"""

# Database credentials forced static: every refresh issues new ones (the daemon warns).
FORCED_STATIC_SPC = """\
apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: forced-static
spec:
  provider: vault
  parameters:
    objects: |
      - objectName: "report-user"
        secretPath: "database/creds/reporting"
        secretKey: "username"
        dynamic: false
      - objectName: "report-password"
        secretPath: "database/creds/reporting"
        secretKey: "password"
        dynamic: false
"""


# --- helpers ----------------------------------------------------------------------------------


class Issued:
    """What the test server handed out on ``creds/`` paths: lease id -> data."""

    def __init__(self, vault: VaultTestServer) -> None:
        self.data: dict[str, dict[str, Any]] = {}
        handle = vault.handle

        def recording(rec: Recorded) -> tuple[int, dict[str, Any] | None]:
            status, answer = handle(rec)
            if answer and answer.get("lease_id") and "/creds/" in rec.path:
                self.data.setdefault(answer["lease_id"], answer["data"])
            return status, answer

        vault.handle = recording  # type: ignore[method-assign]

    def by_username(self, username: bytes) -> tuple[str, dict[str, Any]]:
        [found] = [(k, d) for k, d in self.data.items() if d["username"].encode() == username]
        return found


@pytest.fixture
def vault() -> Iterator[VaultTestServer]:
    with run_vault_server() as v:
        v.add_token(TOKEN, policies=["*"])
        yield v
        assert not v.server_errors


@pytest.fixture
def vault_tls(tmp_path: Path) -> Iterator[tuple[VaultTestServer, ServerTLS]]:
    tls = make_tls(sub(tmp_path, "tls"))  # trustme CA: a file only because the SPC names one
    with run_vault_server(tls=tls) as v:
        v.add_token(TOKEN, policies=["*"])
        yield v, tls
        assert not v.server_errors


@pytest.fixture
def issued(vault: VaultTestServer) -> Issued:
    return Issued(vault)


def ambient(vault: VaultTestServer) -> dict[str, str]:
    """The daemon's environment: a token and the server's address, as a user would export."""
    return {"VAULT_TOKEN": TOKEN, "VAULT_ADDR": vault.url}


def calls(vault: VaultTestServer, path: str) -> int:
    return sum(n for what, n in vault.calls.items() if what.split(" ", 1)[1] == path)


def creds(m: Mount, user: str = "dbUsername", password: str = "dbPassword") -> tuple[bytes, bytes]:
    return m.read(user), m.read(password)


def sub(tmp_path: Path, name: str) -> Path:
    d = tmp_path / name
    d.mkdir()
    return d


# --- documented examples ----------------------------------------------------------------------


@needs_fuse
@pytest.mark.fuse
def test_the_tutorials_class_mounts_unchanged(vault: VaultTestServer, tmp_path: Path) -> None:
    vault.put_kv2("secret", "db-pass", {"password": "db-secret-password"})
    spc = TUTORIAL_SPC.replace(TUTORIAL_ADDRESS, vault.url)
    assert spc != TUTORIAL_SPC
    with mounted(spc, tmp_path, "--uid", "1000", "--gid", "2000", env={"VAULT_TOKEN": TOKEN}) as m:
        assert os.listdir(m.path) == ["db-password"]
        # secretKey "password" is found under KV v2's data.data, written as plain text.
        assert m.read("db-password") == b"db-secret-password"
        st = os.stat(m.file("db-password"))
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o644
        assert (st.st_uid, st.st_gid, st.st_size) == (1000, 2000, len(b"db-secret-password"))
        log = m.log()
    # The ambient token was used as is: no Kubernetes login with roleName "database".
    assert vault.logins == []
    assert {r.token for r in vault.requests} == {TOKEN}
    assert calls(vault, "secret/data/db-pass") == 1  # fetched once at mount, then cached
    assert "db-secret-password" not in log and TOKEN not in log


@needs_fuse
@pytest.mark.fuse
def test_upstreams_hello_world_class_with_vault_addr(
    vault: VaultTestServer, tmp_path: Path
) -> None:
    vault.put_kv2("secret", "kv1", {"bar1": "hello1"})
    vault.put_kv2("secret", "kv2", {"bar2": "hello2", "other": "not written"})
    with mounted(HELLO_WORLD_SPC, tmp_path, env=ambient(vault)) as m:
        assert sorted(os.listdir(m.path)) == ["secret-1", "secret-2"]
        assert (m.read("secret-1"), m.read("secret-2")) == (b"hello1", b"hello2")
        # filePermission: 0624 is YAML octal; the other file gets the default 0644.
        assert stat.S_IMODE(os.stat(m.file("secret-1")).st_mode) == 0o624
        assert stat.S_IMODE(os.stat(m.file("secret-2")).st_mode) == 0o644
    assert vault.logins == []


# --- dynamic secrets --------------------------------------------------------------------------


@needs_fuse
@pytest.mark.fuse
def test_dynamic_credentials_match_are_never_reissued_nor_shared(
    vault: VaultTestServer, issued: Issued, tmp_path: Path
) -> None:
    vault.add_db_role("database", "db-app", ttl=3600)
    with mounted(DOCS_DB_SPC, sub(tmp_path, "a"), "--ttl", "1", env=ambient(vault)) as a:
        user, password = creds(a)
        # One request answered both objects: username and password belong together.
        assert calls(vault, "database/creds/db-app") == 1
        lease, data = issued.by_username(user)
        assert password == data["password"].encode()
        assert user.startswith(b"v-k8s-db-app-")

        time.sleep(2.2)  # two TTLs: a static value would have been refreshed by now
        assert creds(a) == (user, password)
        assert creds(a) == (user, password)
        assert calls(vault, "database/creds/db-app") == 1

        # A second mount of the same class gets credentials of its own.
        with mounted(DOCS_DB_SPC, sub(tmp_path, "b"), "--ttl", "1", env=ambient(vault)) as b:
            user_b, password_b = creds(b)
            assert calls(vault, "database/creds/db-app") == 2
            assert user_b != user and password_b != password
            assert issued.by_username(user_b)[1]["password"].encode() == password_b
            assert creds(a) == (user, password)
        assert vault.lease_alive(lease)
        log = a.log()
    assert password.decode() not in log and TOKEN not in log


# --- leases -----------------------------------------------------------------------------------


def renewals(vault: VaultTestServer, lease: str) -> int:
    with vault.lock:
        return vault.renewed_leases.count(lease)


@needs_fuse
@pytest.mark.fuse
def test_leases_are_renewed_while_mounted_and_revoked_on_unmount(
    vault: VaultTestServer, issued: Issued, tmp_path: Path
) -> None:
    # A 3 s lease: the daemon renews at two thirds of it, so after 2 s and 4 s.
    vault.add_db_role("database", "db-app", ttl=3)
    with mounted(DOCS_DB_SPC, tmp_path, "--revoke-leases", env=ambient(vault)) as m:
        before = creds(m)
        [lease] = vault.issued_leases
        assert wait_for(lambda: renewals(vault, lease) >= 2, timeout=15)
        # Renewal extends the lease; it does not change the credentials.
        assert vault.lease_alive(lease)
        assert creds(m) == before
        assert vault.issued_leases == [lease]
        assert calls(vault, "database/creds/db-app") == 1
        assert vault.revoked_leases == []
        assert m.unmount() == 0
    assert vault.revoked_leases == [lease]
    assert not vault.lease_alive(lease)
    assert "revocation failed" not in m.log() and "renewal failed" not in m.log()


@needs_fuse
@pytest.mark.fuse
def test_without_revoke_leases_unmount_leaves_leases_alone(
    vault: VaultTestServer, tmp_path: Path
) -> None:
    vault.add_db_role("database", "db-app", ttl=3600)
    with mounted(DOCS_DB_SPC, tmp_path, env=ambient(vault)) as m:
        assert creds(m)[0].startswith(b"v-k8s-db-app-")
        [lease] = vault.issued_leases
        assert m.unmount() == 0
    assert vault.revoked_leases == []
    assert calls(vault, "sys/leases/revoke") == 0
    assert vault.lease_alive(lease)


@needs_fuse
@pytest.mark.fuse
def test_a_failed_renewal_is_logged_and_new_credentials_are_issued(
    vault: VaultTestServer, issued: Issued, tmp_path: Path
) -> None:
    vault.add_db_role("database", "db-app", ttl=3)
    with mounted(DOCS_DB_SPC, tmp_path, env=ambient(vault)) as m:
        before = creds(m)
        [old] = vault.issued_leases
        vault.inject(400, errors=["lease not found"], path="sys/leases/renew")
        assert wait_for(lambda: "lease renewal failed" in m.log(), timeout=15)
        # The lease cannot be extended: new credentials are issued and served (tests/
        # test_vault_reissue.py has the details); the daemon stays up.
        assert wait_for(lambda: creds(m) != before, timeout=15)
        assert issued.by_username(creds(m)[0])[0] == vault.issued_leases[1] != old
        assert m.proc.poll() is None
        assert "database/creds/db-app" in m.log()


@needs_fuse
@pytest.mark.fuse
def test_sigterm_with_revoke_leases_revokes_too(vault: VaultTestServer, tmp_path: Path) -> None:
    vault.add_db_role("database", "db-app", ttl=3600)
    with mounted(DOCS_DB_SPC, tmp_path, "--revoke-leases", env=ambient(vault)) as m:
        assert creds(m)[0]
        [lease] = vault.issued_leases
        m.proc.terminate()  # what a service manager does at shutdown
        assert m.proc.wait(20) == 0
    assert vault.revoked_leases == [lease]


@needs_fuse
@pytest.mark.fuse
def test_upstreams_pki_class_over_tls_issues_once(
    vault_tls: tuple[VaultTestServer, ServerTLS], tmp_path: Path
) -> None:
    vault, tls = vault_tls
    vault.add_pki_role("pki", "example-dot-com", ttl=86400, generate_lease=True)
    spc = PKI_SPC.replace(PKI_ADDRESS, vault.url).replace(PKI_CA, tls.ca_path)
    with mounted(spc, sub(tmp_path, "m"), "--ttl", "1", "--revoke-leases", env=ambient(vault)) as m:
        first = m.read("certs")
        answer = json.loads(first)  # no secretKey: Vault's whole answer, lease and all
        assert answer["lease_id"] == vault.issued_leases[0]
        assert answer["data"]["certificate"].startswith("-----BEGIN CERTIFICATE-----")
        assert answer["data"]["private_key"].startswith("-----BEGIN RSA PRIVATE KEY-----")
        [put] = [r for r in vault.requests if r.path == "pki/issue/example-dot-com"]
        assert put.method == "PUT"
        assert put.body == {"common_name": "test.example.com", "ttl": "24h"}
        time.sleep(1.5)  # past the TTL: a certificate is issued once per volume, not per TTL
        assert m.read("certs") == first
        assert calls(vault, "pki/issue/example-dot-com") == 1
        assert m.unmount() == 0
    assert vault.revoked_leases == vault.issued_leases
    assert "PRIVATE KEY" not in m.log()


# --- static values ----------------------------------------------------------------------------


@needs_fuse
@pytest.mark.fuse
def test_rotation_of_static_values_is_visible_after_the_ttl(
    vault: VaultTestServer, tmp_path: Path
) -> None:
    vault.put_kv2("secret", "api", {"key": "key-one"})
    vault.put_kv1("kv", "legacy", {"token": "legacy-one"})
    with mounted(ROTATING_SPC, tmp_path, "--ttl", "1", env=ambient(vault)) as m:
        assert m.read("api-key") == b"key-one"
        assert m.read("legacy") == b"legacy-one"
        whole = json.loads(m.read("api.json"))  # no secretKey: Vault's whole answer
        assert whole["data"]["data"] == {"key": "key-one"}
        assert whole["data"]["metadata"]["version"] == 1

        assert vault.put_kv2("secret", "api", {"key": "key-two-is-longer"}) == 2
        vault.put_kv1("kv", "legacy", {"token": "legacy-2"})
        assert wait_for(lambda: m.read("api-key") == b"key-two-is-longer")
        assert os.stat(m.file("api-key")).st_size == len(b"key-two-is-longer")
        assert json.loads(m.read("api.json"))["data"]["metadata"]["version"] == 2
        assert wait_for(lambda: m.read("legacy") == b"legacy-2")
        assert m.proc.poll() is None


@needs_fuse
@pytest.mark.fuse
def test_a_static_object_with_a_lease_is_warned_about_once(
    vault: VaultTestServer, tmp_path: Path
) -> None:
    vault.add_db_role("database", "reporting", ttl=3600)
    with mounted(FORCED_STATIC_SPC, tmp_path, "--ttl", "1", env=ambient(vault)) as m:
        first = creds(m, "report-user", "report-password")
        # Past the TTL a static object is refreshed: here that issues new credentials.
        assert wait_for(lambda: creds(m, "report-user", "report-password") != first)
        assert calls(vault, "database/creds/reporting") >= 2
        log = m.log()
    warnings = [line for line in log.splitlines() if "classed as static" in line]
    assert len(warnings) == 1, warnings
    assert "objects 'report-password', 'report-user' are classed as static" in warnings[0]
    assert "dynamic: true" in warnings[0]


# --- several volumes in one daemon (in-process) -----------------------------------------------


def vault_plan(vault: VaultTestServer, objects: str) -> Plan:
    doc = {
        "apiVersion": "secrets-store.csi.x-k8s.io/v1",
        "kind": "SecretProviderClass",
        "metadata": {"name": "x"},
        "spec": {
            "provider": "vault",
            "parameters": {"vaultAddress": vault.url, "objects": objects},
        },
    }
    return spc_mod.plan(spc_mod.from_object(doc))


async def read_file(vols: Volumes, vol: Volume, name: str) -> bytes:
    [spec] = [s for s in vol.plan.files if s.object_name == name]
    [inode] = [i for i in vols.tree.inodes_for(vol.keys[spec]) if vols.tree[i].volume == vol.id]
    return (await vols.content(inode)).data


async def test_volumes_in_one_daemon_never_share_dynamic_credentials(
    vault: VaultTestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VAULT_TOKEN", TOKEN)
    vault.add_db_role("database", "db-app", ttl=3600)
    vault.put_kv2("secret", "shared", {"v": "same-for-all"})
    plan = vault_plan(
        vault,
        "- {objectName: user, secretPath: database/creds/db-app, secretKey: username}\n"
        "- {objectName: conf, secretPath: secret/data/shared, secretKey: v}\n",
    )
    async with trio.open_nursery() as n:
        vols = Volumes(ttl=60, max_stale=600, revoke_leases=True)
        vols.start(n)
        one = await vols.add("one", plan, AMBIENT, uid=0, gid=0)
        two = await vols.add("two", plan, AMBIENT, uid=0, gid=0)
        users = [await read_file(vols, v, "user") for v in (one, two)]
        assert users[0] != users[1]
        assert [await read_file(vols, v, "conf") for v in (one, two)] == [b"same-for-all"] * 2
        assert calls(vault, "database/creds/db-app") == 2
        # Same identity, same static object: one cache entry; per volume for dynamic ones.
        specs = {s.object_name: s for s in plan.files}
        assert one.keys[specs["conf"]] == two.keys[specs["conf"]]
        assert one.keys[specs["user"]] != two.keys[specs["user"]]

        lease_one = one.leases[one.keys[specs["user"]]].lease_id
        assert await vols.remove("one")
        assert vault.revoked_leases == [lease_one]
        assert await read_file(vols, two, "user") == users[1]
        assert calls(vault, "database/creds/db-app") == 2
        await vols.remove("two")
        n.cancel_scope.cancel()


class LeasingFake(FakeProvider):
    """Every value comes with a lease; revoke_sync blocks on names listed in ``hang``."""

    def __init__(self) -> None:
        super().__init__()
        self.revoked: list[str] = []
        self.hang: set[str] = set()
        self.release = threading.Event()

    def fetch_sync(
        self, plan: Plan, identity: Identity, sources: Sequence[Hashable]
    ) -> Mapping[Hashable, Fetched | FetchError]:
        out = dict(super().fetch_sync(plan, identity, sources))
        for src, res in out.items():
            if isinstance(res, Fetched):
                name = src[1]  # type: ignore[index]
                lease = Lease(f"{name}/{self.calls[name]}", 3600.0, False)
                out[src] = Fetched(res.data, res.version, lease)
        return out

    def revoke_sync(self, plan: Plan, identity: Identity, lease: Lease) -> None:
        if lease.lease_id.split("/")[0] in self.hang:
            self.release.wait(30)
        self.revoked.append(lease.lease_id)


@pytest.fixture
def leasing(monkeypatch: pytest.MonkeyPatch) -> Iterator[LeasingFake]:
    prov = LeasingFake()
    monkeypatch.setitem(providers.REGISTRY, "fake", "tests.fake_provider:FakeProvider")
    monkeypatch.setitem(providers._instances, "fake", prov)
    prov.set("creds", b"per-volume")
    prov.set("static", b"shared")
    yield prov
    prov.release.set()


OBJECTS = "- {name: creds, dynamic: true}\n- {name: static}\n"


async def test_a_lease_on_a_value_another_volume_serves_is_not_revoked(
    leasing: LeasingFake, caplog: pytest.LogCaptureFixture
) -> None:
    plan = leasing.parse({"objects": OBJECTS})
    async with trio.open_nursery() as n:
        vols = Volumes(ttl=60, max_stale=600, revoke_leases=True)
        vols.start(n)
        await vols.add("a", plan, AMBIENT, uid=0, gid=0)
        await vols.add("b", plan, AMBIENT, uid=0, gid=0)
        await vols.remove("a")
        # a's own credentials go; a lease on the static value b still serves is left alone.
        assert leasing.revoked == ["creds/1"]
        await vols.remove("b")
        assert "creds/2" in leasing.revoked and "static/1" not in leasing.revoked
        n.cancel_scope.cancel()
    # Static with a lease: one warning per volume and source.
    warned = [r for r in caplog.records if "classed as static" in r.getMessage()]
    assert len(warned) == 2 and all("'static'" in r.getMessage() for r in warned)


async def test_revocation_gives_up_at_its_deadline(
    leasing: LeasingFake, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(volumes, "REVOKE_DEADLINE", 0.5)
    leasing.hang = {"creds"}
    plan = leasing.parse({"objects": OBJECTS})
    async with trio.open_nursery() as n:
        vols = Volumes(ttl=60, max_stale=600, revoke_leases=True)
        vols.start(n)
        await vols.add("a", plan, AMBIENT, uid=0, gid=0)
        start = trio.current_time()
        # Called the way the daemon calls it at shutdown: under a shield, from a cancelled scope.
        with trio.CancelScope() as outer:
            outer.cancel()
            with trio.CancelScope(shield=True):
                assert await vols.remove("a")
        assert 0.5 <= trio.current_time() - start < 10
        assert leasing.revoked == []  # the first one hung; the rest were not tried
        assert "revocation did not finish" in caplog.text
        assert "a" not in vols.volumes
        n.cancel_scope.cancel()
