"""Secret sync (csi --sync-secrets): spec.secretObjects written as Kubernetes Secrets, updated on
rotation, owned by the pods that mount the class, deleted when none is left.

End to end through ``secretfs node`` (daemon + csi), the test Kubernetes API server (the real
client library on the wire, with the API's optimistic concurrency) and moto; the parsing and the
``kubernetes.io/tls`` conversion directly.
"""

from __future__ import annotations

import base64
import datetime
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from csi.sync import MANAGED_LABEL, SyncError, tls_part
from secretfs import spc as spc_mod
from tests.csi_node import ROLE_ANNOTATION, CsiNode, Pod, role_arn
from tests.kube_server import KubeServer, kube_api  # noqa: F401
from tests.mounting import needs_fuse, wait_for

PASSWORD = "MyDatabasePassword"
TLS = "MyTls"


def _cert(key: Any, name: str = "web.example") -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256())
    )


def _pem_key(key: Any) -> bytes:
    return key.private_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


PEM = serialization.Encoding.PEM


def spc_with_sync(name: str, secret_objects: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "secrets-store.csi.x-k8s.io/v1",
        "kind": "SecretProviderClass",
        "metadata": {"name": name},
        "spec": {
            "provider": "aws",
            "parameters": {
                "objects": (
                    f'- objectName: "{PASSWORD}"\n  objectType: "secretsmanager"\n'
                    f'- objectName: "{TLS}"\n  objectType: "secretsmanager"\n'
                )
            },
            "secretObjects": secret_objects,
        },
    }


SECRET_OBJECTS: list[dict[str, Any]] = [
    {
        "secretName": "db-creds",
        "type": "Opaque",
        "labels": {"app": "web"},
        "annotations": {"team": "payments"},
        "data": [{"objectName": PASSWORD, "key": "password"}],
    },
    {
        "secretName": "web-tls",
        "type": "kubernetes.io/tls",
        "data": [
            {"objectName": TLS, "key": "tls.crt"},
            {"objectName": TLS, "key": "tls.key"},
        ],
    },
]


def decoded(secret: dict[str, Any], key: str) -> bytes:
    return base64.b64decode(secret["data"][key])


def owners(secret: dict[str, Any]) -> list[str]:
    return [r["name"] for r in secret["metadata"].get("ownerReferences") or []]


@pytest.fixture
def sync_node(
    tmp_path: Path,
    kube_api: KubeServer,  # noqa: F811
    aws_env: dict[str, str],
) -> Iterator[Callable[..., CsiNode]]:
    kube_api.add_service_account("default", "app", {ROLE_ANNOTATION: role_arn("app")})
    made: list[CsiNode] = []

    def make(ttl: float = 120.0) -> CsiNode:
        node = CsiNode(
            tmp_path,
            kube_api.kubeconfig(tmp_path / "kubeconfig"),
            ttl=ttl,
            csi_extra=("--sync-secrets",),
        )
        made.append(node)
        node.start_pair()
        return node

    try:
        yield make
    finally:
        for node in made:
            node.close()
            assert not node.our_mounts(), "mounts left behind"


@pytest.mark.fuse
@pytest.mark.slow
@needs_fuse
def test_secrets_synced_rotated_owned_and_removed(
    sync_node: Callable[..., CsiNode],
    kube_api: KubeServer,  # noqa: F811
    aws_env: dict[str, str],
) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert_pem = _cert(key).public_bytes(PEM)
    sm = boto3.client(
        "secretsmanager", region_name=aws_env["region"], endpoint_url=aws_env["endpoint_url"]
    )
    sm.create_secret(Name=PASSWORD, SecretString="v1-password")
    sm.create_secret(Name=TLS, SecretString=(_pem_key(key) + cert_pem).decode())
    kube_api.add_spc("default", spc_with_sync("web", SECRET_OBJECTS))
    node = sync_node(ttl=1.0)
    a = Pod("web-a", "a1111111-2222-3333-4444-555555555555")
    b = Pod("web-b", "b1111111-2222-3333-4444-555555555555")
    target = node.publish(a, "web")
    db, tls = ("default", "db-creds"), ("default", "web-tls")
    assert wait_for(lambda: db in kube_api.secrets and tls in kube_api.secrets, timeout=10), (
        node.logs()
    )
    secret = kube_api.secrets[db]
    assert secret["type"] == "Opaque"
    assert decoded(secret, "password") == b"v1-password"
    assert secret["metadata"]["labels"] == {"app": "web", MANAGED_LABEL: "true"}
    assert secret["metadata"]["annotations"] == {"team": "payments"}
    assert secret["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Pod", "name": "web-a", "uid": a.uid}
    ]
    web = kube_api.secrets[tls]
    assert web["type"] == "kubernetes.io/tls"
    assert decoded(web, "tls.crt") == cert_pem  # the certificate only, not the key
    tls_key = decoded(web, "tls.key")
    assert tls_key.startswith(b"-----BEGIN RSA PRIVATE KEY-----")  # PKCS#1, as upstream
    loaded = serialization.load_pem_private_key(tls_key, None)
    assert isinstance(loaded, rsa.RSAPrivateKey)
    assert loaded.private_numbers() == key.private_numbers()

    # A rotation: the daemon reports new versions; csi writes the Secret again.
    sm.put_secret_value(SecretId=PASSWORD, SecretString="v2-password")
    time.sleep(1.1)
    assert wait_for(lambda: (target / PASSWORD).read_bytes() == b"v2-password", timeout=10)
    assert wait_for(
        lambda: decoded(kube_api.secrets[db], "password") == b"v2-password", timeout=10
    ), node.logs()

    # A second pod is a second owner; the first pod leaving keeps the Secret for the second.
    node.publish(b, "web")
    assert wait_for(lambda: owners(kube_api.secrets[db]) == ["web-a", "web-b"], timeout=10)
    node.unpublish(a)
    assert wait_for(lambda: owners(kube_api.secrets[db]) == ["web-b"], timeout=10), node.logs()
    assert wait_for(lambda: owners(kube_api.secrets[tls]) == ["web-b"], timeout=10)
    # The last one leaving deletes them.
    node.unpublish(b)
    assert wait_for(lambda: db not in kube_api.secrets and tls not in kube_api.secrets, timeout=10)
    # Values reach the Secrets (base64) and nowhere else: not the logs, not the Events.
    logs = node.logs()
    assert "v1-password" not in logs and "v2-password" not in logs
    assert "PRIVATE KEY" not in logs
    assert not [e for e in kube_api.events.values() if e["reason"] == "FailedToCreateSecret"]


@pytest.mark.fuse
@pytest.mark.slow
@needs_fuse
def test_a_foreign_secret_is_not_overwritten_and_a_missing_file_is_reported(
    sync_node: Callable[..., CsiNode],
    kube_api: KubeServer,  # noqa: F811
    aws_env: dict[str, str],
) -> None:
    sm = boto3.client(
        "secretsmanager", region_name=aws_env["region"], endpoint_url=aws_env["endpoint_url"]
    )
    sm.create_secret(Name=PASSWORD, SecretString="v1-password")
    sm.create_secret(Name=TLS, SecretString="not a certificate")
    foreign = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "db-creds", "namespace": "default", "resourceVersion": "7"},
        "type": "Opaque",
        "data": {"password": base64.b64encode(b"hand-made").decode()},
    }
    kube_api.secrets[("default", "db-creds")] = foreign
    kube_api.add_spc(
        "default",
        spc_with_sync(
            "web",
            [
                SECRET_OBJECTS[0],
                {
                    "secretName": "other",
                    "type": "Opaque",
                    "data": [{"objectName": "NoSuchFile", "key": "x"}],
                },
                SECRET_OBJECTS[1],
            ],
        ),
    )
    node = sync_node()
    pod = Pod("web-a", "c1111111-2222-3333-4444-555555555555")
    node.publish(pod, "web")  # the publish itself succeeds: a Secret is a by-product

    def messages() -> str:
        found = [e for e in kube_api.events.values() if e["reason"] == "FailedToCreateSecret"]
        return " | ".join(e["message"] for e in found)

    # Each is logged; the pod gets an Event (one write per reason a minute: the recorder's
    # rate limit folds the others into the next write).
    for said in ("not created by the driver", "no such file", "no certificate"):
        assert wait_for(lambda said=said: said in node.log("node"), timeout=15), node.logs()
    assert wait_for(lambda: messages(), timeout=10)
    assert kube_api.secrets[("default", "db-creds")] == foreign
    assert ("default", "other") not in kube_api.secrets
    assert ("default", "web-tls") not in kube_api.secrets
    assert "v1-password" not in messages() and "not a certificate" not in messages()
    path = "/api/v1/namespaces/default/secrets/db-creds"
    reads = kube_api.requests.count(path)
    node.unpublish(pod)
    # The unpublish's write reads the Secret again, finds it foreign and leaves it alone.
    assert wait_for(lambda: kube_api.requests.count(path) > reads, timeout=10), node.logs()
    assert kube_api.secrets[("default", "db-creds")] == foreign


# --- parsing and the tls conversion ---


def test_secret_objects_are_parsed_and_bad_entries_named() -> None:
    good, problems = spc_mod.parse_secret_objects(SECRET_OBJECTS)
    assert [s.secret_name for s in good] == ["db-creds", "web-tls"]
    assert good[0].data == (("password", PASSWORD),)
    assert good[0].labels == {"app": "web"}
    assert problems == ()
    bad: list[dict[str, Any]] = [
        {"secretName": "Bad_Name", "type": "Opaque", "data": [{"objectName": "a", "key": "k"}]},
        {"secretName": "ok", "type": "Opaque", "data": [{"objectName": "../x", "key": "k"}]},
        {"secretName": "ok2", "type": "Opaque", "data": [{"objectName": "a", "key": "a b"}]},
        {"secretName": "ok3", "data": [{"objectName": "a", "key": "k"}]},
        {"secretName": "ok4", "type": "Opaque", "data": []},
        {
            "secretName": "ok5",
            "type": "Opaque",
            "labels": {"n": 1},
            "data": [{"objectName": "a", "key": "k"}],
        },
        {"secretName": "fine", "type": "Opaque", "data": [{"objectName": "a/b", "key": "k"}]},
    ]
    good, problems = spc_mod.parse_secret_objects(bad)
    assert [s.secret_name for s in good] == ["fine"]
    text = "\n".join(problems)
    assert "spec.secretObjects[0].secretName 'Bad_Name' is not a valid Secret name" in text
    assert "spec.secretObjects[1].data[0].objectName" in text and "'..'" in text
    assert "spec.secretObjects[2].data[0].key 'a b' is not a valid Secret key" in text
    assert "spec.secretObjects[3].type is required" in text
    assert "spec.secretObjects[4].data must list" in text
    assert "spec.secretObjects[5].labels" in text
    assert len(problems) == 6
    # Bounded before any per-entry work.
    many = [{"secretName": f"s{i}", "type": "Opaque"} for i in range(10_000)]
    good, problems = spc_mod.parse_secret_objects(many)
    assert good == () and "at most 64" in problems[0]
    # A class with bad entries still mounts: the problems are reported, not raised.
    obj = spc_with_sync("web", bad)
    parsed = spc_mod.from_object(obj)
    assert len(parsed.secret_object_problems) == 6


def test_tls_conversion_pem_pkcs12_and_refusals() -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ed_key = ed25519.Ed25519PrivateKey.generate()
    leaf, ca = _cert(rsa_key), _cert(ec_key, "ca.example")
    bundle = _pem_key(rsa_key) + leaf.public_bytes(PEM) + ca.public_bytes(PEM)
    assert tls_part("tls.crt", bundle, "w") == leaf.public_bytes(PEM) + ca.public_bytes(PEM)
    assert tls_part("tls.key", bundle, "w").startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    ec_pem = tls_part("tls.key", _pem_key(ec_key), "w")
    assert ec_pem.startswith(b"-----BEGIN EC PRIVATE KEY-----")  # SEC1, as upstream
    assert tls_part("tls.key", _pem_key(ed_key), "w").startswith(b"-----BEGIN PRIVATE KEY-----")
    p12 = pkcs12.serialize_key_and_certificates(
        b"web", rsa_key, leaf, [ca], serialization.NoEncryption()
    )
    assert tls_part("tls.crt", p12, "w") == leaf.public_bytes(PEM) + ca.public_bytes(PEM)
    key_from_p12 = serialization.load_pem_private_key(tls_part("tls.key", p12, "w"), None)
    assert isinstance(key_from_p12, rsa.RSAPrivateKey)
    assert key_from_p12.private_numbers() == rsa_key.private_numbers()
    with pytest.raises(SyncError, match=r"tls\.crt and tls\.key only"):
        tls_part("ca.crt", bundle, "w")
    with pytest.raises(SyncError, match="no private key"):
        tls_part("tls.key", leaf.public_bytes(PEM), "w")
    with pytest.raises(SyncError, match="no certificate") as err:
        tls_part("tls.crt", b"secret-bytes-not-pem", "w")
    assert "secret-bytes" not in str(err.value)
