"""Vault dynamic secrets are issued anew before their lease ends.

A lease Vault will not extend (its role's ``max_ttl`` caps renewals, a renewal failed, or it was
never renewable, like a PKI certificate's) gets new material at about two thirds of what is left of
it; the file then serves the new material on the same inode, and the old lease is revoked after
``REISSUE_GRACE`` when revocation is on. Against :mod:`tests.vault_server` through the real hvac
client: :class:`secretfs.volumes.Volumes` in-process with short leases, and one real FUSE mount
(the daemon runs as ``python -m tests.test_vault_reissue mount ...``: the real command with a
short grace period, see the end of this file).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Hashable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import trio

from providers.base import AMBIENT, Fetched, FetchError, Identity, Plan
from providers.vault.provider import VaultProvider
from secretfs import spc as spc_mod
from secretfs import volumes
from secretfs.volumes import Volume, Volumes
from tests.mounting import mounted, needs_fuse, wait_for
from tests.vault_server import VaultTestServer, run_vault_server

TOKEN = "hvs.reissue-test-token"  # a test server's token, not a credential
FUSE_GRACE = 1.0  # REISSUE_GRACE of the daemon this module runs (see the end of the file)

DB_OBJECTS = (
    "- {objectName: dbUsername, secretPath: database/creds/short, secretKey: username}\n"
    "- {objectName: dbPassword, secretPath: database/creds/short, secretKey: password}\n"
)
DB_SPC = f"""\
apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: vault-db-creds
spec:
  provider: vault
  parameters:
    objects: |
{"".join("      " + line + chr(10) for line in DB_OBJECTS.splitlines())}"""


@pytest.fixture
def vault(monkeypatch: pytest.MonkeyPatch) -> Iterator[VaultTestServer]:
    with run_vault_server() as v:
        v.add_token(TOKEN, policies=["*"])
        # Standalone mode: the ambient token, as `secretfs mount` uses it.
        monkeypatch.setenv("VAULT_TOKEN", TOKEN)
        monkeypatch.setenv("VAULT_ADDR", v.url)
        yield v
        assert not v.server_errors


def plan_for(vault: VaultTestServer, objects: str) -> Plan:
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


def inode_of(vols: Volumes, vol: Volume, name: str) -> int:
    [spec] = [s for s in vol.plan.files if s.object_name == name]
    nodes = vols.tree.inodes_for(vol.keys[spec])
    [inode] = [i for i in nodes if vols.tree[i].volume == vol.id and vols.tree[i].spec == spec]
    return inode


async def read(vols: Volumes, vol: Volume, name: str) -> bytes:
    return (await vols.content(inode_of(vols, vol, name))).data


async def creds(vols: Volumes, vol: Volume) -> tuple[bytes, bytes]:
    return await read(vols, vol, "dbUsername"), await read(vols, vol, "dbPassword")


def served(vols: Volumes, vol: Volume, name: str, data: bytes) -> Callable[[], Awaitable[bool]]:
    """A predicate for ``poll``: the file serves ``data``."""

    async def check() -> bool:
        return await read(vols, vol, name) == data

    return check


def issued_creds(vault: VaultTestServer, lease: str) -> tuple[bytes, bytes]:
    data = vault.issued_data[lease]
    return data["username"].encode(), data["password"].encode()


async def poll(predicate: Callable[[], bool | Awaitable[bool]], within: float) -> None:
    """Wait until ``predicate()`` holds; fail the test after ``within`` seconds."""
    with trio.fail_after(within):
        while True:
            got = predicate()
            if not isinstance(got, bool):
                got = await got
            if got:
                return
            await trio.sleep(0.05)


def assert_clean(text: str, vault: VaultTestServer) -> None:
    """No token, lease id or issued secret in ``text`` (a log)."""
    assert TOKEN not in text
    for lease, data in vault.issued_data.items():
        assert lease not in text
        for value in data.values():
            if isinstance(value, str) and len(value) > 8:
                assert value not in text


# --- the provider: what a renewal answers --------------------------------------------------------


def test_a_renewal_asks_for_the_same_duration_and_returns_what_vault_granted(
    vault: VaultTestServer,
) -> None:
    vault.add_db_role("database", "short", ttl=600, max_ttl=1000)
    p = VaultProvider()
    plan = plan_for(vault, DB_OBJECTS)
    [source] = plan.sources()
    value = p.fetch_sync(plan, AMBIENT, [source])[source]
    assert isinstance(value, Fetched) and value.lease is not None
    lease = value.lease
    assert (lease.duration, lease.renewable) == (600.0, True)

    vault.advance(100)  # 900 s of max_ttl left: the full increment
    renewed = p.renew_sync(plan, AMBIENT, lease)
    assert (renewed.duration, renewed.renewable) == (600.0, True)
    assert vault.requests[-1].body == {"lease_id": lease.lease_id, "increment": 600}

    vault.advance(400)  # 500 s left: capped, and the answer says so
    capped = p.renew_sync(plan, AMBIENT, renewed)
    assert 499 <= capped.duration <= 500 and capped.lease_id == lease.lease_id

    vault.advance(501)  # past max_ttl: the lease is gone
    with pytest.raises(FetchError) as err:
        p.renew_sync(plan, AMBIENT, capped)
    assert (err.value.code, err.value.transient) == ("LeaseInvalid", False)
    assert "lease not found or lease is not renewable" in str(err.value)
    assert lease.lease_id not in str(err.value) and TOKEN not in str(err.value)


# --- in-process: Volumes against the Vault test server ----------------------------------------


async def test_a_capped_lease_is_reissued_before_its_max_ttl_and_left_to_expire_without_revocation(
    vault: VaultTestServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Renewals at 2/3 of 3 s; the role's max_ttl of 5 s caps the first one (2 s granted, 3 asked).
    vault.add_db_role("database", "short", ttl=3, max_ttl=5)
    async with trio.open_nursery() as n:
        vols = Volumes(ttl=60, max_stale=600, revoke_leases=False)
        vols.start(n)
        changed: list[set[int]] = []
        vols.on_inodes_changed.append(changed.append)
        vol = await vols.add("vol-a", plan_for(vault, DB_OBJECTS), AMBIENT, uid=0, gid=0)
        [old] = vault.issued_leases
        assert await creds(vols, vol) == issued_creds(vault, old)
        inodes = {inode_of(vols, vol, name) for name in ("dbUsername", "dbPassword")}

        await poll(lambda: len(vault.issued_leases) >= 2, within=8)
        new = vault.issued_leases[1]
        # Issued before the old lease's max TTL, after one (capped) renewal of it.
        assert vault.issued_at[new] < vault.issued_at[old] + 5
        assert vault.renewed_leases.count(old) == 1
        # The server counts a lease before its answer arrives: wait for the file to change.
        await poll(served(vols, vol, "dbUsername", issued_creds(vault, new)[0]), within=3)
        # Served on the same inodes, and the change was announced for exactly those.
        assert await creds(vols, vol) == issued_creds(vault, new)
        assert {inode_of(vols, vol, name) for name in ("dbUsername", "dbPassword")} == inodes
        assert inodes in changed
        assert vol.retiring == []  # revocation off: nothing waits to be revoked

        # Not revoked, not even when the volume goes: it ends by itself at its max TTL.
        assert await vols.remove("vol-a")
        assert vault.revoked_leases == [] and vault.calls["PUT sys/leases/revoke"] == 0
        assert vault.lease_alive(old) and vault.lease_alive(new)
        n.cancel_scope.cancel()
    assert (
        "vol-a: the lease of objects 'dbPassword', 'dbUsername' ends in 2 s and cannot be extended"
        in caplog.text
    )
    assert "new objects 'dbPassword', 'dbUsername' issued" in caplog.text
    assert "left to expire" in caplog.text
    assert_clean(caplog.text, vault)


async def test_a_failed_renewal_reissues_and_removal_in_the_grace_period_revokes_both_leases(
    vault: VaultTestServer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(volumes, "REISSUE_GRACE", 30.0)  # the volume goes well before it ends
    vault.add_db_role("database", "short", ttl=6)  # no max_ttl: renewals are never capped
    # The first renewal (after 4 s) answers as Vault does for a lease that is gone: new
    # credentials follow REISSUE_MIN_DELAY (1 s) later.
    vault.inject(400, errors=["lease not found or lease is not renewable"], path="sys/leases/renew")
    async with trio.open_nursery() as n:
        vols = Volumes(ttl=60, max_stale=600, revoke_leases=True)
        vols.start(n)
        vol = await vols.add("vol-b", plan_for(vault, DB_OBJECTS), AMBIENT, uid=0, gid=0)
        [old] = vault.issued_leases
        assert await creds(vols, vol) == issued_creds(vault, old)

        await poll(lambda: len(vault.issued_leases) >= 2, within=8)
        new = vault.issued_leases[1]
        # The server counts a lease before its answer arrives: wait for the file to change.
        await poll(served(vols, vol, "dbUsername", issued_creds(vault, new)[0]), within=3)
        assert await creds(vols, vol) == issued_creds(vault, new)
        assert vault.issued_at[new] < vault.issued_at[old] + 6  # before the old lease ended
        assert "vol-b: lease renewal failed" in caplog.text
        # The old lease waits out its grace period; the new one is renewed from now on.
        assert [lease.lease_id for _, lease in vol.retiring] == [old]
        [key] = set(vol.keys.values())
        assert vol.leases[key].lease_id == new and vol.leases[key].renewable
        assert key not in vol.reissue_at
        assert vault.revoked_leases == []

        # Removed during the grace period: the pending old lease is revoked with the current one.
        assert await vols.remove("vol-b")
        assert sorted(vault.revoked_leases) == sorted([old, new])
        assert vault.issued_leases == [old, new]
        n.cancel_scope.cancel()
    assert "is revoked in 30 s" in caplog.text
    assert_clean(caplog.text, vault)


PKI_OBJECTS = (
    "- {objectName: tls.crt, secretPath: pki/issue/web, method: PUT,"
    " secretArgs: {common_name: web.example}, secretKey: certificate}\n"
)


@pytest.mark.expect_errors  # the provider exception below is logged (type and frames)
async def test_a_failing_reissue_retries_with_backoff_while_the_old_certificate_is_served(
    vault: VaultTestServer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(volumes, "REISSUE_GRACE", 0.2)
    # A PKI certificate with a lease: never renewable, issued anew at max(1 s, 6 - 5 s margin).
    vault.add_pki_role("pki", "web", ttl=6, generate_lease=True)
    async with trio.open_nursery() as n:
        vols = Volumes(ttl=60, max_stale=600, revoke_leases=True)
        reports: list[tuple[str, dict[str, Any]]] = []
        vols.on_event.append(lambda kind, payload: reports.append((kind, payload)))
        vols.start(n)
        vol = await vols.add("vol-c", plan_for(vault, PKI_OBJECTS), AMBIENT, uid=0, gid=0)
        [old] = vault.issued_leases
        first = await read(vols, vol, "tls.crt")
        assert first == vault.issued_data[old]["certificate"].encode()

        # Try 1: Vault fails (HTTP 500). Try 2: the provider itself raises. Try 3 succeeds.
        vault.inject(500, errors=["internal error"], path="pki/issue/web")
        tries: list[float] = []
        fetch = vol.provider.fetch_sync

        def flaky(
            plan: Plan, identity: Identity, sources: Sequence[Hashable]
        ) -> Mapping[Hashable, Fetched | FetchError]:
            tries.append(time.monotonic())  # in the worker thread
            if len(tries) == 2:
                raise RuntimeError(f"an SDK message quoting data: {TOKEN} {first.decode()}")
            return fetch(plan, identity, sources)

        monkeypatch.setattr(vol.provider, "fetch_sync", flaky)

        await poll(lambda: "issuing new object 'tls.crt' failed (1 in a row" in caplog.text, 5)
        assert await read(vols, vol, "tls.crt") == first  # still the old certificate
        await poll(lambda: "issuing new object 'tls.crt' failed (2 in a row" in caplog.text, 5)
        assert await read(vols, vol, "tls.crt") == first
        assert vault.issued_leases == [old]

        await poll(lambda: len(vault.issued_leases) >= 2, within=8)
        new = vault.issued_leases[1]
        cert = vault.issued_data[new]["certificate"].encode()
        await poll(served(vols, vol, "tls.crt", cert), within=3)  # its answer may be on the way
        assert vault.issued_at[new] < vault.issued_at[old] + 6  # before the old one expired
        # Backoff: 1 s after the first failure, 2 s after the second.
        assert len(tries) == 3
        assert tries[1] - tries[0] >= 1.0 and tries[2] - tries[1] >= 2.0
        await poll(lambda: old in vault.revoked_leases, within=5)  # after the 0.2 s grace
        assert new not in vault.revoked_leases
        await vols.remove("vol-c")
        n.cancel_scope.cancel()

    warnings = [r for r in caplog.records if "issuing new" in r.getMessage()]
    assert len(warnings) == 2 and all(r.levelno == logging.WARNING for r in warnings)
    assert all("vol-c" in r.getMessage() for r in warnings)
    assert "Vault failed PUT pki/issue/web (500: internal error)" in warnings[0].getMessage()
    assert "provider error (RuntimeError)" in warnings[1].getMessage()
    assert_clean(caplog.text, vault)
    # Each failure is an Event on the pod too (csi records it), saying what and until when.
    events = [p for k, p in reports if k == "event" and p["reason"] == volumes.REISSUE_FAILED]
    assert [e["volume_id"] for e in events] == ["vol-c", "vol-c"]
    assert all(e["type"] == "Warning" for e in events)
    assert "issuing new object 'tls.crt' failed (1 in a row" in events[0]["message"]
    assert "the current material is still served" in events[0]["message"]
    assert "provider error (RuntimeError)" in events[1]["message"]
    assert TOKEN not in repr(events) and first.decode() not in repr(events)


# --- a real FUSE mount ------------------------------------------------------------------------


@needs_fuse
@pytest.mark.fuse
def test_a_mount_serves_reissued_credentials_on_the_same_inode_and_revokes_the_old_lease(
    vault: VaultTestServer, tmp_path: Path
) -> None:
    vault.add_db_role("database", "short", ttl=3, max_ttl=5)
    env = {"VAULT_TOKEN": TOKEN, "VAULT_ADDR": vault.url}
    with mounted(
        DB_SPC, tmp_path, "--revoke-leases", module="tests.test_vault_reissue", env=env
    ) as m:
        [old] = vault.issued_leases
        user0, pass0 = issued_creds(vault, old)
        assert (m.read("dbUsername"), m.read("dbPassword")) == (user0, pass0)
        ino = os.stat(m.file("dbUsername")).st_ino
        fd = os.open(m.file("dbUsername"), os.O_RDONLY)
        try:
            assert wait_for(lambda: len(vault.issued_leases) >= 2, timeout=10)
            new = vault.issued_leases[1]
            user1, pass1 = issued_creds(vault, new)
            assert vault.issued_at[new] < vault.issued_at[old] + 5  # before its max TTL
            assert wait_for(lambda: m.read("dbUsername") == user1, timeout=5)
            assert m.read("dbPassword") == pass1
            assert os.stat(m.file("dbUsername")).st_ino == ino
            # No-open reads (the default): a descriptor follows the change too; each read is one
            # version (the open path pins it: tests/test_fuse_mount.py).
            assert os.pread(fd, 4096, 0) == user1
        finally:
            os.close(fd)
        # Revoked once the grace period is over, not before.
        assert wait_for(lambda: old in vault.revoked_leases, timeout=10)
        assert vault.revoked_at[old] - vault.issued_at[new] >= FUSE_GRACE
        assert new not in vault.revoked_leases
        # The new lease is renewed in its turn (after 2 s of its 3).
        assert wait_for(lambda: new in vault.renewed_leases, timeout=5)
        assert m.unmount() == 0
    # Unmounting revokes the current lease (and any replaced one still in its grace period).
    assert {old, new} <= set(vault.revoked_leases)
    log = m.log()
    assert "new objects 'dbPassword', 'dbUsername' issued" in log
    assert_clean(log, vault)


def _daemon() -> int:
    """``python -m tests.test_vault_reissue mount ...``: the real command, short grace."""
    from secretfs import cli

    volumes.REISSUE_GRACE = FUSE_GRACE
    return cli.main()


if __name__ == "__main__":
    sys.exit(_daemon())
