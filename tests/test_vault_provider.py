"""The Vault provider against tests/vault_server.py: hvac over real HTTP(S) on 127.0.0.1."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from providers import get_provider
from providers.base import Fetched, FetchError, Identity, Lease, ParameterError, Plan, Token
from providers.vault.config import VaultAuth, VaultSelect, VaultSource, is_dynamic
from providers.vault.provider import VaultProvider
from tests.vault_server import VaultTestServer, make_tls, run_vault_server

JWT = "jwt-app-0123456789"
POD = Identity(
    namespace="default",
    service_account="app",
    pod_name="app-1",
    pod_uid="uid-1",
    tokens={"vault": Token(JWT)},
)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def vault() -> Iterator[VaultTestServer]:
    with run_vault_server() as srv:
        srv.add_role(
            "app", jwts={JWT}, policies=["secret/*", "kv/*", "database/creds/*", "pki/issue/*"]
        )
        srv.put_kv2("secret", "app", {"username": "admin", "password": "s3cret-pw"})
        srv.put_kv1("kv", "app", {"api-key": "k-123"})
        yield srv


@pytest.fixture(autouse=True)
def _no_vault_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in (
        "VAULT_ADDR",
        "VAULT_TOKEN",
        "VAULT_NAMESPACE",
        "VAULT_CACERT",
        "VAULT_CAPATH",
        "VAULT_CLIENT_CERT",
        "VAULT_CLIENT_KEY",
        "VAULT_TLS_SERVER_NAME",
        "VAULT_SKIP_VERIFY",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.vault-token


def params(url: str, objects: str, **extra: str) -> dict[str, str]:
    return {"vaultAddress": url, "roleName": "app", "objects": objects, **extra}


def fetch_all(p: VaultProvider, plan: Plan, identity: Identity = POD) -> dict[str, bytes]:
    """objectName -> rendered bytes; raises the first FetchError."""
    got = p.fetch_sync(plan, identity, plan.sources())
    out = {}
    for f in plan.files:
        v = got[f.source]
        if isinstance(v, FetchError):
            raise v
        out[f.object_name] = p.render(f, v)
    return out


def one_error(p: VaultProvider, plan: Plan, identity: Identity = POD) -> FetchError:
    got = p.fetch_sync(plan, identity, plan.sources())
    errs = [v for v in got.values() if isinstance(v, FetchError)]
    assert errs, got
    return errs[0]


def assert_clean(text: str, *secrets: str) -> None:
    for s in (JWT, "s3cret-pw", "hvs.", *secrets):
        assert s not in text


KV2 = """
- objectName: password
  secretPath: secret/data/app
  secretKey: password
- objectName: user
  secretPath: secret/data/app
  secretKey: username
"""

# --- parameters -----------------------------------------------------------------------------------


def test_registry_builds_the_provider() -> None:
    assert isinstance(get_provider("vault"), VaultProvider)


def test_parse_every_parameter() -> None:
    plan = VaultProvider().parse(
        {
            "roleName": "app",
            "vaultAddress": "https://vault.example:8200/",
            "vaultNamespace": "/team-a/",
            "vaultAuthMountPath": "/k8s-east/",
            "audience": "vault-east",
            "vaultSkipTLSVerify": "True",
            "vaultCACertPath": "/etc/vault/ca.pem",
            "vaultCADirectory": "/etc/vault/ca.d",
            "vaultTLSServerName": "vault.internal",
            "vaultTLSClientCertPath": "/etc/vault/tls.crt",
            "vaultTLSClientKeyPath": "/etc/vault/tls.key",
            "csi.storage.k8s.io/pod.name": "ignored",
            "objects": """
- objectName: dir/cert.pem
  secretPath: /v1/pki/issue/web
  method: post
  secretArgs:
    common_name: a.example
    ttl: 24h
    exclude_cn_from_sans: yes
    n: 3
    not_after: 2030-01-01
  secretKey: certificate
  filePermission: 0600
  encoding: UTF-8
- objectName: raw
  secretPath: secret/data/app?version=2
- objectName: blob
  secretPath: kv/blob
  secretKey: bin
  encoding: base64
  filePermission: "0o640"
""",
        },
        default_mode=0o444,
    )
    auth = plan.auth
    assert isinstance(auth, VaultAuth)
    assert (auth.address, auth.namespace, auth.mount, auth.role, auth.audience) == (
        "https://vault.example:8200",
        "team-a",
        "k8s-east",
        "app",
        "vault-east",
    )
    assert auth.tls.skip_verify and auth.tls.ca_cert == "/etc/vault/ca.pem"
    assert auth.tls.ca_dir == "/etc/vault/ca.d" and auth.tls.server_name == "vault.internal"
    assert (auth.tls.client_cert, auth.tls.client_key) == (
        "/etc/vault/tls.crt",
        "/etc/vault/tls.key",
    )
    cert, raw, blob = plan.files
    assert (cert.path, cert.mode, cert.dynamic) == ("dir/cert.pem", 0o600, True)
    assert cert.source == VaultSource(
        "pki/issue/web",
        "POST",
        '{"common_name":"a.example","exclude_cn_from_sans":"yes","n":3,"not_after":"2030-01-01",'
        '"ttl":"24h"}',
    )
    assert cert.select == VaultSelect("certificate", "utf-8")
    assert (raw.mode, raw.dynamic, raw.select) == (0o444, False, VaultSelect(None, "utf-8"))
    assert raw.source == VaultSource("secret/data/app?version=2", "GET", None)
    assert (blob.mode, blob.select) == (0o640, VaultSelect("bin", "base64"))


def test_parse_defaults_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    objs = "- {objectName: a, secretPath: secret/data/a}"
    auth = VaultProvider().parse({"objects": objs}).auth
    assert isinstance(auth, VaultAuth)
    assert (auth.address, auth.mount, auth.audience, auth.role, auth.namespace) == (
        "https://127.0.0.1:8200",
        "kubernetes",
        "vault",
        None,
        None,
    )
    assert not auth.tls.skip_verify
    monkeypatch.setenv("VAULT_ADDR", "http://127.0.0.1:1234")
    monkeypatch.setenv("VAULT_NAMESPACE", "ns1")
    monkeypatch.setenv("VAULT_SKIP_VERIFY", "1")
    auth = VaultProvider().parse({"objects": objs, "vaultKubernetesMountPath": "kube"}).auth
    assert isinstance(auth, VaultAuth)
    assert (auth.address, auth.namespace, auth.mount, auth.tls.skip_verify) == (
        "http://127.0.0.1:1234",
        "ns1",
        "kube",
        True,
    )
    # A parameter beats the environment.
    auth = VaultProvider().parse({"objects": objs, "vaultSkipTLSVerify": "false"}).auth
    assert isinstance(auth, VaultAuth) and not auth.tls.skip_verify


def test_parse_collects_every_problem() -> None:
    with pytest.raises(ParameterError) as err:
        VaultProvider().parse(
            {
                "vaultAddress": "vault:8200",
                "vaultKubernetesMountPath": "a",
                "vaultAuthMountPath": "b",
                "vaultSkipTLSVerify": "yes",
                "vaultTLSClientCertPath": "/c.pem",
                "objects": """
- secretPath: secret/data/x
- objectName: nopath
- objectName: badmethod
  secretPath: secret/data/x
  method: DELETE
- objectName: badenc
  secretPath: secret/data/x
  encoding: rot13
- objectName: badmode
  secretPath: secret/data/x
  filePermission: "rw-r--r--"
- objectName: ../escape
  secretPath: secret/data/x
- objectName: dup
  secretPath: secret/data/x
- objectName: dup
  secretPath: secret/data/y
- objectName: args
  secretPath: secret/data/x
  secretArgs: [1, 2]
- objectName: dots
  secretPath: secret/../sys/x
- 42
""",
            }
        )
    got = {(p.obj, p.field) for p in err.value.problems}
    for want in [
        (None, "vaultAddress"),
        (None, "vaultAuthMountPath"),
        (None, "vaultSkipTLSVerify"),
        (None, "vaultTLSClientKeyPath"),
        ("objects[0]", "objectName"),
        ("nopath", "secretPath"),
        ("badmethod", "method"),
        ("badenc", "encoding"),
        ("badmode", "filePermission"),
        ("../escape", "objectName"),
        ("dup", "path"),
        ("args", "secretArgs"),
        ("dots", "secretPath"),
        (None, "objects[10]"),
    ]:
        assert want in got, (want, got)


@pytest.mark.parametrize(
    ("objects", "why"),
    [
        (None, "is required"),
        ("", "is required"),
        ("[]", "lists no objects"),
        ("- a: [", "not valid YAML"),
        ("{a: 1}", "must be a YAML list"),
    ],
)
def test_parse_objects_errors(objects: str | None, why: str) -> None:
    p = {} if objects is None else {"objects": objects}
    with pytest.raises(ParameterError, match=why):
        VaultProvider().parse(p)


@pytest.mark.parametrize(
    ("path", "method", "dynamic"),
    [
        ("secret/data/app", "GET", False),
        ("kv/app", "GET", False),
        ("database/creds/app", "GET", True),
        ("team/db/creds/app", "GET", True),
        ("pki/issue/web", "GET", True),
        ("pki_int/sign/web", "GET", True),
        ("aws/sts/deploy", "GET", True),
        ("gcp/roleset/r1/token", "GET", True),
        ("gcp/static-account/a/key", "GET", True),
        ("database/static-creds/app", "GET", False),
        ("secret/data/creds/db", "GET", False),  # a KV v2 secret under "creds"
        ("creds/data/app", "GET", False),  # a mount named creds
        ("database/creds", "GET", False),  # no role after the keyword
        ("secret/data/app", "PUT", True),
        ("transit/random/32", "POST", True),
    ],
)
def test_dynamic_rule(path: str, method: str, dynamic: bool) -> None:
    assert is_dynamic(path, method) is dynamic


def test_objects_share_a_source_and_dynamic_can_be_overridden() -> None:
    plan = VaultProvider().parse(
        {
            "objects": """
- {objectName: u, secretPath: database/creds/app, secretKey: username}
- {objectName: p, secretPath: /v1/database/creds/app, secretKey: password}
- {objectName: other-args, secretPath: database/creds/app, secretArgs: {x: 1}}
- {objectName: kv-a, secretPath: kv/creds/app, dynamic: false}
- {objectName: kv-b, secretPath: kv/creds/app, secretKey: k}
- {objectName: forced, secretPath: secret/data/rotating, dynamic: true}
"""
        }
    )
    u, p, other, kva, kvb, forced = plan.files
    assert u.source == p.source != other.source
    assert len(plan.sources()) == 4
    assert u.dynamic and p.dynamic and other.dynamic
    assert not kva.dynamic and not kvb.dynamic  # explicit word wins for the whole source
    assert forced.dynamic


def test_file_permission_forms() -> None:
    plan = VaultProvider().parse(
        {
            "objects": """
- {objectName: a, secretPath: s/a, filePermission: 0640}
- {objectName: b, secretPath: s/b, filePermission: 416}
- {objectName: c, secretPath: s/c, filePermission: 0o400}
- {objectName: d, secretPath: s/d, filePermission: 0}
- {objectName: e, secretPath: s/e, filePermission: 500}
"""
        },
        default_mode=0o644,
    )
    # As upstream's os.FileMode through yaml.v3: 500 is decimal (0764), 0 means the default.
    assert [f.mode for f in plan.files] == [0o640, 0o640, 0o400, 0o644, 0o764]


@pytest.mark.parametrize("perm", ['"0400"', '"500"', "-1", "true", '""', "1000"])
def test_file_permissions_upstream_refuses(perm: str) -> None:
    objects = f"- {{objectName: a, secretPath: s/a, filePermission: {perm}}}\n"
    with pytest.raises(ParameterError) as info:
        VaultProvider().parse({"objects": objects})
    assert "filePermission" in str(info.value)


# --- reading --------------------------------------------------------------------------------------


def test_kv2_descends_data_data_and_versions(vault: VaultTestServer) -> None:
    p = VaultProvider()
    plan = p.parse(
        params(
            vault.url,
            KV2
            + """
- objectName: old
  secretPath: secret/data/app?version=1
  secretKey: password
""",
        )
    )
    assert fetch_all(p, plan) == {"password": b"s3cret-pw", "user": b"admin", "old": b"s3cret-pw"}
    assert vault.calls["GET secret/data/app"] == 2  # one per distinct source: latest and ?version=1
    assert vault.requests[-1].query == {"version": ["1"]}
    first = p.fetch_sync(plan, POD, plan.sources())[plan.files[0].source]
    assert isinstance(first, Fetched) and first.version.startswith("v1-")
    assert first.lease is None and "s3cret" not in repr(first)
    vault.put_kv2("secret", "app", {"username": "admin", "password": "rotated"})
    got = fetch_all(p, plan)
    assert (got["password"], got["old"]) == (b"rotated", b"s3cret-pw")
    second = p.fetch_sync(plan, POD, plan.sources())[plan.files[0].source]
    assert isinstance(second, Fetched) and second.version.startswith("v2-")


def test_unchanged_secret_keeps_its_bytes_and_version(vault: VaultTestServer) -> None:
    p = VaultProvider()
    plan = p.parse(params(vault.url, "- {objectName: a, secretPath: kv/app}"))
    one, two = (p.fetch_sync(plan, POD, plan.sources())[plan.files[0].source] for _ in range(2))
    assert isinstance(one, Fetched) and isinstance(two, Fetched)
    assert (one.data, one.version) == (two.data, two.version)
    vault.put_kv1("kv", "app", {"api-key": "k-456"})
    three = p.fetch_sync(plan, POD, plan.sources())[plan.files[0].source]
    assert isinstance(three, Fetched) and three.version != one.version


def test_kv1_key_and_whole_response_in_upstream_format(vault: VaultTestServer) -> None:
    p = VaultProvider()
    plan = p.parse(
        params(
            vault.url,
            """
- {objectName: key, secretPath: kv/app, secretKey: api-key}
- {objectName: whole, secretPath: kv/app}
""",
        )
    )
    got = fetch_all(p, plan)
    assert got["key"] == b"k-123"
    # Go's json.Marshal of api.Secret; request_id left empty (see providers/vault/provider.py).
    assert got["whole"] == (
        b'{"request_id":"","lease_id":"","lease_duration":2764800,"renewable":false,'
        b'"data":{"api-key":"k-123"},"warnings":null}'
    )


def test_whole_response_keeps_numbers_and_escapes_like_go(vault: VaultTestServer) -> None:
    body = (
        '{"request_id":"r-1","lease_id":"","renewable":false,"lease_duration":0,'
        '"data":{"z":1.50,"a":1e3,"html":"<a&b>","u":"é\\u2028","ctl":"\\b\\u0001",'
        '"nested":{"y":[true,null,10000000000000000000001]}},"wrap_info":null,'
        '"warnings":["deprecated"],"auth":null,"mount_type":"kv"}'
    ).encode()
    vault.inject(200, body=body, path="kv/odd")
    p = VaultProvider()
    plan = p.parse(params(vault.url, "- {objectName: w, secretPath: kv/odd}"))
    assert fetch_all(p, plan)["w"].decode() == (
        '{"request_id":"","lease_id":"","lease_duration":0,"renewable":false,'
        '"data":{"a":1e3,"ctl":"\\b\\u0001","html":"\\u003ca\\u0026b\\u003e",'
        '"nested":{"y":[true,null,10000000000000000000001]},"u":"é\\u2028","z":1.50},'
        '"warnings":["deprecated"],"mount_type":"kv"}'
    )


def test_non_string_values_are_written_as_json(vault: VaultTestServer) -> None:
    vault.put_kv2(
        "secret",
        "typed",
        {"n": 42, "b": True, "none": None, "l": [1, "x"], "m": {"k": "v", "a": 1}},
    )
    p = VaultProvider()
    keys = ["n", "b", "none", "l", "m"]
    plan = p.parse(
        params(
            vault.url,
            "\n".join(
                f"- {{objectName: {k}, secretPath: secret/data/typed, secretKey: {k}}}"
                for k in keys
            ),
        )
    )
    assert fetch_all(p, plan) == {
        "n": b"42",
        "b": b"true",
        "none": b"null",
        "l": b'[1,"x"]',
        "m": b'{"a":1,"k":"v"}',
    }


def test_encodings(vault: VaultTestServer) -> None:
    vault.put_kv1(
        "kv", "enc", {"b64": "AAEC/w==\n", "hex": "00ff10", "text": "héllo", "bad": "not base64!"}
    )
    p = VaultProvider()
    plan = p.parse(
        params(
            vault.url,
            """
- {objectName: b64, secretPath: kv/enc, secretKey: b64, encoding: base64}
- {objectName: hex, secretPath: kv/enc, secretKey: hex, encoding: HEX}
- {objectName: text, secretPath: kv/enc, secretKey: text, encoding: utf-8}
- {objectName: plain, secretPath: kv/enc, secretKey: text}
""",
        )
    )
    assert fetch_all(p, plan) == {
        "b64": b"\x00\x01\x02\xff",
        "hex": b"\x00\xff\x10",
        "text": "héllo".encode(),
        "plain": "héllo".encode(),
    }
    bad = p.parse(
        params(vault.url, "- {objectName: x, secretPath: kv/enc, secretKey: bad, encoding: base64}")
    )
    with pytest.raises(FetchError) as err:
        fetch_all(p, bad)
    assert err.value.code == "DecodeError" and not err.value.transient
    assert "not base64" not in str(err.value) and "'x'" in str(err.value)


def test_missing_key_names_object_and_path(vault: VaultTestServer) -> None:
    p = VaultProvider()
    plan = p.parse(
        params(vault.url, "- {objectName: x, secretPath: secret/data/app, secretKey: nope}")
    )
    with pytest.raises(
        FetchError, match="'nope' does not exist at secret path 'secret/data/app'"
    ) as err:
        fetch_all(p, plan)
    assert err.value.code == "KeyNotFound"


def test_list_method(vault: VaultTestServer) -> None:
    vault.put_kv1("kv", "dir/a", {"x": "1"})
    vault.put_kv1("kv", "dir/sub/b", {"x": "2"})
    p = VaultProvider()
    plan = p.parse(
        params(vault.url, "- {objectName: keys, secretPath: kv/dir, secretKey: keys, method: list}")
    )
    assert fetch_all(p, plan) == {"keys": b'["a","sub/"]'}
    assert vault.calls["LIST kv/dir"] == 1


# --- authentication -------------------------------------------------------------------------------


def test_login_is_cached_per_identity_and_renewed_before_expiry(vault: VaultTestServer) -> None:
    clock = Clock()
    p = VaultProvider(clock=clock)
    plan = p.parse(params(vault.url, KV2))
    fetch_all(p, plan)
    fetch_all(p, plan)
    assert vault.logins == [("app", JWT)]
    login = vault.requests[0]
    assert (login.method, login.path, login.body) == (
        "POST",
        "auth/kubernetes/login",
        {"role": "app", "jwt": JWT},
    )
    other = Identity(namespace="default", service_account="other", tokens={"vault": Token(JWT)})
    fetch_all(p, plan, other)
    assert len(vault.logins) == 2  # another service account never rides on this login
    clock.t += 3600 * 0.8 - 1
    fetch_all(p, plan)
    assert len(vault.logins) == 2
    clock.t += 2  # past 80% of the token's 3600 s lease
    fetch_all(p, plan)
    assert len(vault.logins) == 3


def test_concurrent_fetches_log_in_once(vault: VaultTestServer) -> None:
    p = VaultProvider()
    plan = p.parse(params(vault.url, KV2))
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: fetch_all(p, plan), range(16)))
    assert all(r["password"] == b"s3cret-pw" for r in results)
    assert len(vault.logins) == 1


def test_address_from_vault_addr(vault: VaultTestServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAULT_ADDR", vault.url)
    p = VaultProvider()
    plan = p.parse({"roleName": "app", "objects": KV2})
    assert fetch_all(p, plan)["user"] == b"admin"


def test_relogin_once_on_403_from_a_cached_token(vault: VaultTestServer) -> None:
    p = VaultProvider()
    plan = p.parse(params(vault.url, KV2))
    fetch_all(p, plan)
    vault.revoke_token(vault.requests[-1].token or "")
    assert fetch_all(p, plan)["password"] == b"s3cret-pw"
    assert len(vault.logins) == 2


def test_denied_path_after_fresh_login_is_not_retried(vault: VaultTestServer) -> None:
    vault.put_kv1("other", "x", {"k": "v"})
    p = VaultProvider()
    plan = p.parse(params(vault.url, "- {objectName: x, secretPath: other/x, secretKey: k}"))
    err = one_error(p, plan)
    assert (err.code, err.transient) == ("PermissionDenied", False)
    assert "object 'x'" in str(err) and "GET other/x" in str(err)
    assert "permission denied" in str(err) and "role 'app'" in str(err)
    assert len(vault.logins) == 1
    assert_clean(str(err) + repr(err))


def test_token_audience_selection(vault: VaultTestServer) -> None:
    vault.add_role("east", jwts={"jwt-east"}, policies=["secret/*"])
    ident = Identity(
        namespace="default",
        service_account="app",
        tokens={"vault": Token(JWT), "vault-east": Token("jwt-east")},
    )
    p = VaultProvider()
    plan = p.parse(params(vault.url, KV2, roleName="east", audience="vault-east"))
    assert fetch_all(p, plan, ident)["user"] == b"admin"
    assert vault.logins == [("east", "jwt-east")]


def test_missing_audience_token_is_a_clear_error_for_every_object(vault: VaultTestServer) -> None:
    p = VaultProvider()
    plan = p.parse(
        params(vault.url, KV2 + "- {objectName: k, secretPath: kv/app}", audience="other")
    )
    got = p.fetch_sync(plan, POD, plan.sources())
    errs = [got[s] for s in plan.sources()]
    assert all(isinstance(e, FetchError) and e.code == "MissingToken" for e in errs)
    assert {e.obj for e in errs if isinstance(e, FetchError)} == {"password", "k"}
    assert "tokenRequests" in str(errs[0]) and "'other'" in str(errs[0])
    assert vault.logins == []


def test_missing_role_with_a_pod_identity(vault: VaultTestServer) -> None:
    p = VaultProvider()
    plan = p.parse({"vaultAddress": vault.url, "objects": KV2})
    err = one_error(p, plan)
    assert err.code == "MissingRole" and "roleName" in str(err)


def test_login_denied_and_unknown_role(vault: VaultTestServer) -> None:
    p = VaultProvider()
    wrong = Identity(
        namespace="default", service_account="intruder", tokens={"vault": Token("jwt-forged")}
    )
    plan = p.parse(params(vault.url, KV2 + "- {objectName: k, secretPath: kv/app}"))
    got = p.fetch_sync(plan, wrong, plan.sources())
    errs = [got[s] for s in plan.sources()]
    assert all(isinstance(e, FetchError) and e.code == "PermissionDenied" for e in errs)
    assert "login at auth/kubernetes with role 'app'" in str(errs[0])
    assert "default/intruder" in str(errs[0]) and "jwt-forged" not in str(errs[0])
    assert vault.calls["POST auth/kubernetes/login"] == 1  # one failed login answers for all
    plan = p.parse(params(vault.url, KV2, roleName="nobody"))
    err = one_error(p, plan)
    assert err.code == "BadRequest" and 'invalid role name "nobody"' in str(err)


@pytest.mark.parametrize("key", ["vaultAuthMountPath", "vaultKubernetesMountPath"])
def test_auth_mount_path(vault: VaultTestServer, key: str) -> None:
    vault.add_role("app", jwts={JWT}, policies=["secret/*"], mount="k8s/east")
    p = VaultProvider()
    plan = p.parse(params(vault.url, KV2, **{key: "k8s/east"}))
    assert fetch_all(p, plan)["user"] == b"admin"
    assert vault.calls["POST auth/k8s/east/login"] == 1


def test_namespace_header(vault: VaultTestServer) -> None:
    vault.add_role("app", jwts={JWT}, policies=["secret/*"], namespace="team-a")
    vault.put_kv2("secret", "app", {"username": "team-a-user", "password": "x"}, namespace="team-a")
    p = VaultProvider()
    plan = p.parse(params(vault.url, KV2, vaultNamespace="team-a"))
    assert fetch_all(p, plan)["user"] == b"team-a-user"
    assert {r.namespace for r in vault.requests} == {"team-a"}
    plain = p.parse(params(vault.url, KV2))
    assert fetch_all(p, plain)["user"] == b"admin"  # other namespace, other login, other data
    assert vault.requests[-1].namespace == ""


def test_standalone_uses_vault_token(
    vault: VaultTestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = VaultProvider()
    plan = p.parse({"vaultAddress": vault.url, "objects": KV2})
    err = one_error(p, plan, Identity())
    assert err.code == "MissingToken" and "VAULT_TOKEN" in str(err)
    vault.add_token("root-token-xyz", policies=["secret/*"])
    monkeypatch.setenv("VAULT_TOKEN", "root-token-xyz")
    assert fetch_all(p, plan, Identity())["user"] == b"admin"
    assert vault.logins == [] and vault.requests[-1].token == "root-token-xyz"
    vault.revoke_token("root-token-xyz")
    err = one_error(p, plan, Identity())
    assert err.code == "PermissionDenied" and "root-token-xyz" not in str(err)


# --- dynamic secrets and leases -------------------------------------------------------------------

DB = """
- {objectName: db-user, secretPath: database/creds/app, secretKey: username}
- {objectName: db-pass, secretPath: database/creds/app, secretKey: password}
"""


def test_dynamic_creds_fetched_once_per_call_and_consistent(vault: VaultTestServer) -> None:
    vault.add_db_role("database", "app", ttl=600)
    p = VaultProvider()
    plan = p.parse(params(vault.url, DB))
    assert all(f.dynamic for f in plan.files) and len(plan.sources()) == 1
    got = p.fetch_sync(plan, POD, plan.sources())
    value = got[plan.sources()[0]]
    assert isinstance(value, Fetched) and value.lease is not None
    assert (value.lease.duration, value.lease.renewable) == (600.0, True)
    assert value.lease.lease_id == vault.issued_leases[0]
    assert vault.calls["GET database/creds/app"] == 1
    user, pw = (p.render(f, value) for f in plan.files)
    assert user.startswith(b"v-k8s-app-") and len(pw) > 10
    again = fetch_all(p, plan)
    assert again["db-user"] != user and vault.calls["GET database/creds/app"] == 2


def test_pki_issue_with_secret_args(vault: VaultTestServer) -> None:
    vault.add_pki_role("pki", "web")
    p = VaultProvider()
    plan = p.parse(
        params(
            vault.url,
            """
- objectName: tls.crt
  secretPath: pki/issue/web
  method: PUT
  secretArgs: {common_name: web.example, ttl: 24h}
  secretKey: certificate
- objectName: tls.key
  secretPath: pki/issue/web
  method: PUT
  secretArgs: {ttl: 24h, common_name: web.example}
  secretKey: private_key
- objectName: ca.crt
  secretPath: pki/issue/web
  method: POST
  secretArgs: {common_name: web.example}
  secretKey: issuing_ca
""",
        )
    )
    got = fetch_all(p, plan)
    assert got["tls.crt"].startswith(b"-----BEGIN CERTIFICATE-----")
    assert got["tls.key"].startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    assert vault.calls["PUT pki/issue/web"] == 1 and vault.calls["POST pki/issue/web"] == 1
    assert [r.body for r in vault.requests if r.path == "pki/issue/web"] == [
        {"common_name": "web.example", "ttl": "24h"},
        {"common_name": "web.example"},
    ]
    assert fetch_all(p, plan)["tls.crt"] != got["tls.crt"]  # new material on every call
    bad = p.parse(params(vault.url, "- {objectName: c, secretPath: pki/issue/web, method: PUT}"))
    err = one_error(p, bad)
    assert err.code == "BadRequest" and "common_name field is required" in str(err)


def _db_lease(
    vault: VaultTestServer, p: VaultProvider, ident: Identity = POD
) -> tuple[Plan, Lease]:
    plan = p.parse(params(vault.url, DB))
    value = p.fetch_sync(plan, ident, plan.sources())[plan.sources()[0]]
    assert isinstance(value, Fetched) and value.lease is not None
    return plan, value.lease


def test_renew_and_revoke(vault: VaultTestServer) -> None:
    vault.add_db_role("database", "app", ttl=600)
    p = VaultProvider()
    plan, lease = _db_lease(vault, p)
    vault.advance(500)
    new = p.renew_sync(plan, POD, lease)
    assert (new.lease_id, new.duration, new.renewable) == (lease.lease_id, 600.0, True)
    assert vault.renewed_leases == [lease.lease_id] and len(vault.renewed_tokens) == 1
    vault.advance(500)
    assert vault.lease_alive(lease.lease_id)  # 1000 s after issue, alive thanks to the renewal
    with pytest.raises(FetchError) as err:
        p.revoke_sync(plan, POD, lease)  # the role's policies do not grant sys/leases/revoke
    assert err.value.code == "PermissionDenied" and "sys/leases/revoke" in str(err.value)
    assert lease.lease_id not in str(err.value)
    vault.grant("app", "sys/leases/revoke")
    p.revoke_sync(plan, POD, lease)
    assert vault.revoked_leases == [lease.lease_id] and not vault.lease_alive(lease.lease_id)


def test_renewal_keeps_the_issuing_token_alive(vault: VaultTestServer) -> None:
    vault.add_role("app", jwts={JWT}, policies=["database/creds/*"], ttl=100)
    vault.add_db_role("database", "app", ttl=1000)
    p = VaultProvider()
    plan, lease = _db_lease(vault, p)
    issuer = vault.requests[-1].token
    vault.advance(80)
    p.renew_sync(plan, POD, lease)
    assert vault.renewed_tokens == [issuer]
    vault.advance(80)  # 160 s: the token's own 100 s would have ended, and its leases with it
    assert vault.lease_alive(lease.lease_id)


def test_renewing_an_expired_lease(vault: VaultTestServer) -> None:
    vault.add_db_role("database", "app", ttl=60)
    p = VaultProvider()
    plan, lease = _db_lease(vault, p)
    vault.advance(61)
    with pytest.raises(FetchError) as err:
        p.renew_sync(plan, POD, lease)
    assert (err.value.code, err.value.transient) == ("LeaseInvalid", False)
    assert "lease not found" in str(err.value) and "database/creds/app" in str(err.value)


def test_pki_lease_is_not_renewable(vault: VaultTestServer) -> None:
    vault.add_pki_role("pki", "web", generate_lease=True)
    p = VaultProvider()
    plan = p.parse(
        params(
            vault.url,
            "- {objectName: c, secretPath: pki/issue/web, method: POST,"
            " secretArgs: {common_name: a.b}, secretKey: certificate}",
        )
    )
    value = p.fetch_sync(plan, POD, plan.sources())[plan.sources()[0]]
    assert isinstance(value, Fetched) and value.lease is not None and not value.lease.renewable
    with pytest.raises(FetchError, match="not renewable"):
        p.renew_sync(plan, POD, value.lease)


# --- failures -------------------------------------------------------------------------------------


def test_sealed(vault: VaultTestServer) -> None:
    p = VaultProvider()
    plan = p.parse(params(vault.url, KV2))
    fetch_all(p, plan)
    vault.sealed = True
    err = one_error(p, plan)
    assert (err.code, err.transient) == ("VaultSealed", True)
    assert "sealed" in str(err) and "object 'password'" in str(err)


def test_not_found(vault: VaultTestServer) -> None:
    p = VaultProvider()
    plan = p.parse(params(vault.url, "- {objectName: gone, secretPath: secret/data/gone}"))
    err = one_error(p, plan)
    assert (err.code, err.transient) == ("NotFound", False)
    assert "secret/data/gone" in str(err) and "404" in str(err)


@pytest.mark.parametrize(
    ("status", "errors", "code", "transient"),
    [
        (500, ["internal error"], "ServerError", True),
        (502, ["bad gateway"], "ServerError", True),
        (429, ["rate limit"], "Throttled", True),
        (503, ["standby"], "VaultUnavailable", True),
        (400, ["bad"], "BadRequest", False),
        (405, ["unsupported operation"], "BadRequest", False),
    ],
)
def test_vault_error_answers(
    vault: VaultTestServer, status: int, errors: list[str], code: str, transient: bool
) -> None:
    p = VaultProvider()
    plan = p.parse(params(vault.url, KV2))
    fetch_all(p, plan)  # logged in
    vault.inject(status, errors=errors, path="secret/data/app")
    err = one_error(p, plan)
    assert (err.code, err.transient) == (code, transient)
    assert errors[0] in str(err)


def test_unusable_answers(vault: VaultTestServer) -> None:
    p = VaultProvider()
    plan = p.parse(params(vault.url, KV2))
    vault.inject(204, body=b"", path="secret/data/app")
    assert one_error(p, plan).code == "EmptyResponse"
    vault.inject(200, body=b"<html>proxy</html>", content_type="text/html", path="secret/data/app")
    assert one_error(p, plan).code == "BadResponse"
    vault.inject(
        502,
        body=b"<html>secret-looking page</html>",
        content_type="text/html",
        path="secret/data/app",
    )
    err = one_error(p, plan)
    assert err.code == "ServerError" and "html" not in str(err)


def test_unreachable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = VaultProvider()
    plan = p.parse(params(f"http://127.0.0.1:{port}", KV2))
    err = one_error(p, plan)
    assert (err.code, err.transient) == ("Unreachable", True)
    assert "connection refused" in str(err) and f"127.0.0.1:{port}" in str(err)


def test_errors_and_values_never_leak(
    vault: VaultTestServer, caplog: pytest.LogCaptureFixture
) -> None:
    p = VaultProvider()
    plan = p.parse(params(vault.url, KV2))
    got = p.fetch_sync(plan, POD, plan.sources())
    text = repr(got) + repr(plan) + caplog.text
    vault.sealed = True
    text += repr(p.fetch_sync(plan, POD, plan.sources()))
    assert_clean(text)


# --- TLS ------------------------------------------------------------------------------------------


def _tls_fetch(url: str, **extra: str) -> dict[str, bytes] | FetchError:
    p = VaultProvider()
    plan = p.parse(params(url, KV2, **extra))
    try:
        return fetch_all(p, plan)
    except FetchError as err:
        return err


@pytest.fixture
def tls_vault(tmp_path: Path) -> Iterator[tuple[VaultTestServer, Any]]:
    tls = make_tls(tmp_path)
    with run_vault_server(tls=tls) as srv:
        srv.add_role("app", jwts={JWT}, policies=["secret/*"])
        srv.put_kv2("secret", "app", {"username": "admin", "password": "s3cret-pw"})
        yield srv, tls


def test_tls_with_ca_file_or_directory(tls_vault: tuple[VaultTestServer, Any]) -> None:
    srv, tls = tls_vault
    assert srv.url.startswith("https://")
    assert not isinstance(_tls_fetch(srv.url, vaultCACertPath=tls.ca_path), FetchError)
    assert not isinstance(_tls_fetch(srv.url, vaultCADirectory=tls.ca_dir), FetchError)


# vaultSkipTLSVerify makes urllib3 warn on every request; that warning is the point here.
@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_tls_untrusted_and_skip_verify(tls_vault: tuple[VaultTestServer, Any]) -> None:
    srv, _ = tls_vault
    err = _tls_fetch(srv.url)
    assert isinstance(err, FetchError) and (err.code, err.transient) == ("TLSError", True)
    assert "certificate verification failed" in str(err)
    assert not isinstance(_tls_fetch(srv.url, vaultSkipTLSVerify="true"), FetchError)


def test_tls_missing_ca_file(tls_vault: tuple[VaultTestServer, Any], tmp_path: Path) -> None:
    srv, _ = tls_vault
    err = _tls_fetch(srv.url, vaultCACertPath=str(tmp_path / "nope.pem"))
    assert isinstance(err, FetchError) and (err.code, err.transient) == ("TLSConfig", False)
    assert "vaultCACertPath" in str(err) and "nope.pem" in str(err)


def test_tls_ca_directory_with_a_non_certificate(
    tls_vault: tuple[VaultTestServer, Any], tmp_path: Path
) -> None:
    srv, tls = tls_vault
    (Path(tls.ca_dir) / "README").write_text("not a certificate\n")
    err = _tls_fetch(srv.url, vaultCADirectory=tls.ca_dir)
    assert isinstance(err, FetchError) and (err.code, err.transient) == ("TLSConfig", False)
    assert "vaultCADirectory" in str(err) and "README" in str(err)


def test_tls_server_name(tmp_path: Path) -> None:
    tls = make_tls(tmp_path, names=("vault.test",))
    with run_vault_server(tls=tls) as srv:
        srv.add_role("app", jwts={JWT}, policies=["secret/*"])
        srv.put_kv2("secret", "app", {"username": "admin", "password": "s3cret-pw"})
        err = _tls_fetch(srv.url, vaultCACertPath=tls.ca_path)
        assert isinstance(err, FetchError) and err.code == "TLSError"
        ok = _tls_fetch(srv.url, vaultCACertPath=tls.ca_path, vaultTLSServerName="vault.test")
        assert not isinstance(ok, FetchError) and ok["user"] == b"admin"


def test_tls_client_certificate(tmp_path: Path) -> None:
    tls = make_tls(tmp_path, client_auth=True)
    with run_vault_server(tls=tls) as srv:
        srv.add_role("app", jwts={JWT}, policies=["secret/*"])
        srv.put_kv2("secret", "app", {"username": "admin", "password": "s3cret-pw"})
        err = _tls_fetch(srv.url, vaultCACertPath=tls.ca_path)
        assert isinstance(err, FetchError) and err.code in ("TLSError", "Unreachable")
        ok = _tls_fetch(
            srv.url,
            vaultCACertPath=tls.ca_path,
            vaultTLSClientCertPath=str(tls.client_cert_path),
            vaultTLSClientKeyPath=str(tls.client_key_path),
        )
        assert not isinstance(ok, FetchError) and ok["password"] == b"s3cret-pw"


def test_version_is_not_the_value(vault: VaultTestServer) -> None:
    p = VaultProvider()
    plan = p.parse(params(vault.url, "- {objectName: k, secretPath: kv/app, secretKey: api-key}"))
    value = p.fetch_sync(plan, POD, plan.sources())[plan.sources()[0]]
    assert isinstance(value, Fetched)
    assert "k-123" not in value.version
    assert json.loads(value.data)["data"] == {"api-key": "k-123"}
    # A different provider instance (process) keys its digests differently.
    other = VaultProvider().fetch_sync(plan, POD, plan.sources())[plan.sources()[0]]
    assert isinstance(other, Fetched) and other.version != value.version
