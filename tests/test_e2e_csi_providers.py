"""The CSI node plugin end to end with Vault, Azure Key Vault and Google Secret Manager.

The kubelet's part is played as in :mod:`tests.test_csi_e2e`: NodePublishVolume over the real CSI
unix socket with the kubelet's volume_context, the pod's service-account tokens per audience in
``csi.storage.k8s.io/serviceAccount.tokens``, reads through the bind mount at the target path,
NodeUnpublishVolume, and nothing left mounted. The SecretProviderClasses are the documented
examples in ``examples/`` (the providers' own), served unchanged by the Kubernetes API test server
except where a value is a backend address; pods, service accounts and volume names come from the
matching ``examples/*-pod.yaml``.

The two processes are started the way production runs them (two containers): ``secretfs csi``,
and the daemon through :mod:`tests.e2e_harness` (``python -m tests.e2e_harness daemon ...``) with
the providers' operator environment (Azure custom cloud and CA bundle, GCP endpoints and CA), so
the Azure test server's ``*.localhost`` vault hosts resolve inside the daemon. ``secretfs node``
cannot be used for that: it starts its daemon as ``python -m secretfs`` itself.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from csi.server import TOKENS_KEY
from secretfs import control
from tests.azure_server import AzureTestServer, serve
from tests.csi_node import CsiNode, Pod
from tests.gcp_server import STS_AUDIENCE, GcpServers, pod_principal
from tests.kube_server import KubeServer, kube_api  # noqa: F401
from tests.mounting import ROOT, is_mounted, needs_fuse
from tests.test_e2e_vault import TUTORIAL_ADDRESS, TUTORIAL_SPC
from tests.vault_server import VaultTestServer, run_vault_server

pytestmark = [needs_fuse, pytest.mark.fuse, pytest.mark.slow]

EXAMPLES = ROOT / "examples"
EXPIRES = "2099-01-01T00:00:00Z"


def example(name: str) -> str:
    return (EXAMPLES / name).read_text()


def changed_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"{old!r} is not in the example exactly once"
    return text.replace(old, new)


def example_pod(name: str, uid: str) -> Pod:
    """The Pod of ``examples/<name>`` (its name, service account and csi volume), with ``uid``."""
    docs = [d for d in yaml.safe_load_all(example(name)) if d]
    [pod] = [d for d in docs if d["kind"] == "Pod"]
    [volume] = [v for v in pod["spec"]["volumes"] if "csi" in v]
    return Pod(
        pod["metadata"]["name"],
        uid,
        namespace=pod["metadata"].get("namespace", "default"),
        service_account=pod["spec"]["serviceAccountName"],
        volume=volume["name"],
    )


def spc_name(text: str) -> str:
    return str(yaml.safe_load(text)["metadata"]["name"])


# --- the node: daemon (with the operator's provider environment) + csi ----------------------------


@dataclass
class ProviderNode(CsiNode):
    """A CsiNode whose daemon runs through tests.e2e_harness with ``env`` added."""

    env: dict[str, str] = field(default_factory=dict)

    def start(self) -> None:
        if os.path.exists(self.daemon_socket):
            os.unlink(self.daemon_socket)
        argv = ["-m", "tests.e2e_harness", "daemon", *self.daemon_args()]
        proc = self._run("daemon", argv, {**os.environ, **self.env})
        self._wait(lambda: os.path.exists(self.daemon_socket), proc, "daemon")
        csi = self._run("csi", ["-m", "secretfs", "csi", *self.csi_args()], dict(os.environ))
        self._wait(self._answers, csi, "csi")

    def _run(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        with open(self.tmp_path / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, *argv, "--log-level", self.log_level],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=ROOT,
                env=env,
                start_new_session=True,
            )
        self.procs[name] = proc
        return proc

    def publish_tokens(self, pod: Pod, spc: str, tokens: dict[str, str]) -> Path:
        """NodePublishVolume with the kubelet's token JSON for exactly these audiences."""
        req = self.publish_request(pod, spc)
        req.volume_context[TOKENS_KEY] = json.dumps(
            {aud: {"token": tok, "expirationTimestamp": EXPIRES} for aud, tok in tokens.items()}
        )
        self.node().NodePublishVolume(req, timeout=60)
        return self.target(pod)

    def daemon_volumes(self) -> list[str]:
        return list(control.Client(self.daemon_socket).status(5).get("volumes", ()))


@pytest.fixture
def make_node(
    tmp_path: Path,
    kube_api: KubeServer,  # noqa: F811
) -> Iterator[Callable[..., ProviderNode]]:
    made: list[ProviderNode] = []

    def make(env: dict[str, str], ttl: float = 120.0) -> ProviderNode:
        node = ProviderNode(tmp_path, kube_api.kubeconfig(tmp_path / "kubeconfig"), ttl=ttl)
        node.env = env
        made.append(node)
        node.start()
        return node

    try:
        yield make
    finally:
        for node in made:
            node.close()
            assert not node.our_mounts(), "mounts left behind"


def unpublish_all(node: ProviderNode, *pods: Pod) -> None:
    for pod in pods:
        node.unpublish(pod)
        target = node.target(pod)
        assert not is_mounted(target) and not target.exists()
    assert node.daemon_volumes() == []
    assert not [m for m in node.our_mounts() if m != node.mount_root]


# --- Vault: Kubernetes auth --------------------------------------------------------------------

# HashiCorp's tutorial class (KV v2), the same one tests/test_e2e_vault.py mounts standalone.
VAULT_EXAMPLE_ADDRESS = TUTORIAL_ADDRESS


@pytest.fixture
def vault() -> Iterator[VaultTestServer]:
    with run_vault_server() as v:
        yield v
        assert not v.server_errors


def creds_calls(vault: VaultTestServer) -> int:
    return vault.calls["GET database/creds/db-app"]


def test_vault_kubernetes_auth_dynamic_creds_once_per_volume(
    make_node: Callable[..., ProviderNode],
    kube_api: KubeServer,  # noqa: F811
    vault: VaultTestServer,
) -> None:
    spc = changed_once(example("vault-spc.yaml"), VAULT_EXAMPLE_ADDRESS, vault.url)
    kube_api.add_spc("default", spc)
    pod_a = example_pod("vault-pod.yaml", "a0000000-0000-0000-0000-00000000000a")
    pod_b = dataclasses.replace(
        pod_a, name="secretfs-vault-example-2", uid="b0000000-0000-0000-0000-00000000000b"
    )
    kube_api.add_service_account("default", pod_a.service_account)
    # The role "app" accepts these pods' tokens (Vault would check them at the TokenReview API).
    jwt_a, jwt_a2, jwt_b = "pod-a.vault.jwt", "pod-a.vault.jwt-fresh", "pod-b.vault.jwt"
    vault.add_role("app", jwts={jwt_a, jwt_a2, jwt_b}, policies=["database/creds/*"])
    vault.add_db_role("database", "db-app", ttl=3600)
    name = spc_name(spc)
    node = make_node({}, ttl=1.0)

    target = node.publish_tokens(pod_a, name, {"vault": jwt_a, "sts.amazonaws.com": "x.y.z"})
    assert is_mounted(target)
    assert sorted(os.listdir(target)) == ["dbPassword", "dbUsername"]
    user, password = (target / "dbUsername").read_bytes(), (target / "dbPassword").read_bytes()
    # The pod's own token for audience "vault" logged in with the class's roleName.
    assert vault.logins == [("app", jwt_a)]
    assert user.startswith(b"v-k8s-db-app-")
    assert creds_calls(vault) == 1  # one lease answered both files: they belong together
    [lease] = vault.issued_leases
    [login_token] = [t for t in vault.tokens if t.startswith("hvs.")]
    assert {r.token for r in vault.requests if r.path == "database/creds/db-app"} == {login_token}

    time.sleep(1.5)  # past the TTL: a static value would be refreshed, credentials are not
    assert (target / "dbUsername").read_bytes() == user
    assert (target / "dbPassword").read_bytes() == password

    # requiresRepublish with a fresh token: same volume, same credentials, nothing issued.
    assert node.publish_tokens(pod_a, name, {"vault": jwt_a2}) == target
    assert (target / "dbUsername").read_bytes() == user
    assert (target / "dbPassword").read_bytes() == password
    assert creds_calls(vault) == 1 and vault.issued_leases == [lease]

    # A second pod of the same service account: its own credentials, never the first pod's.
    target_b = node.publish_tokens(pod_b, name, {"vault": jwt_b})
    user_b, password_b = (
        (target_b / "dbUsername").read_bytes(),
        (target_b / "dbPassword").read_bytes(),
    )
    assert user_b.startswith(b"v-k8s-db-app-")
    assert (user_b, password_b) != (user, password) and user_b != user
    assert creds_calls(vault) == 2 and len(vault.issued_leases) == 2
    # Pod B presented its own token; the login is shared within the identity (same service
    # account and role), the dynamic credentials never are.
    assert {role for role, _ in vault.logins} == {"app"}
    assert (target / "dbUsername").read_bytes() == user

    unpublish_all(node, pod_a, pod_b)
    logs = node.logs()
    for secret in (jwt_a, jwt_a2, jwt_b, login_token, password.decode(), password_b.decode()):
        assert secret not in logs


def test_vault_republished_token_is_used_for_the_next_login(
    make_node: Callable[..., ProviderNode],
    kube_api: KubeServer,  # noqa: F811
    vault: VaultTestServer,
) -> None:
    spc = changed_once(TUTORIAL_SPC, VAULT_EXAMPLE_ADDRESS, vault.url)
    kube_api.add_spc("default", spc)
    pod = example_pod("vault-pod.yaml", "c0000000-0000-0000-0000-00000000000c")
    kube_api.add_service_account("default", pod.service_account)
    old, fresh = "pod.vault.jwt-1", "pod.vault.jwt-2"
    vault.add_role("database", jwts={old}, policies=["secret/data/*"])
    vault.put_kv2("secret", "db-pass", {"password": "db-secret-password"})
    node = make_node({}, ttl=1.0)

    target = node.publish_tokens(pod, spc_name(spc), {"vault": old})
    assert (target / "db-password").read_bytes() == b"db-secret-password"
    assert vault.logins == [("database", old)]

    # The kubelet republishes with a fresh token; then the old one expires and Vault forgets the
    # client token it issued: the next refresh logs in again, with the fresh token.
    node.publish_tokens(pod, spc_name(spc), {"vault": fresh})
    with vault.lock:
        vault.roles[("", "kubernetes", "database")].jwts = {fresh}
        for token in [t for t in vault.tokens if t.startswith("hvs.")]:
            vault.revoke_token(token)
    vault.put_kv2("secret", "db-pass", {"password": "rotated-password"})
    deadline = time.monotonic() + 20
    while (target / "db-password").read_bytes() != b"rotated-password":
        assert time.monotonic() < deadline, node.logs()
        time.sleep(0.2)
    assert vault.logins == [("database", old), ("database", fresh)]

    unpublish_all(node, pod)
    assert old not in node.logs() and fresh not in node.logs()


# --- Azure: workload identity ------------------------------------------------------------------

AZURE_AUDIENCE = "api://AzureADTokenExchange"


def azure_settings(srv: AzureTestServer) -> dict[str, str]:
    """The daemon's operator settings: the test server as a custom cloud, its CA; no ambient
    credentials (in CSI mode every volume uses its pod's identity)."""
    return {
        "SECRETFS_AZURE_CLOUD_NAME": "AzureStackCloud",
        "SECRETFS_AZURE_ENVIRONMENT_JSON": srv.cloud_env_json,
        "SECRETFS_AZURE_CA_BUNDLE": srv.ca_path,
        "AZURE_CLIENT_ID": "",
        "AZURE_CLIENT_SECRET": "",
        "AZURE_TENANT_ID": "",
        "AZURE_FEDERATED_TOKEN_FILE": "",
        "AZURE_ENVIRONMENT_FILEPATH": "",
    }


def ec_jwk(key: ec.EllipticCurvePrivateKey) -> dict[str, Any]:
    pub = key.public_key().public_numbers()

    def b64(n: int) -> str:
        return base64.urlsafe_b64encode(n.to_bytes(32, "big")).rstrip(b"=").decode()

    return {"kty": "EC", "crv": "P-256", "x": b64(pub.x), "y": b64(pub.y)}


def test_azure_workload_identity(
    make_node: Callable[..., ProviderNode],
    kube_api: KubeServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    spc = example("azure-spc.yaml")  # unchanged: the cloud is the operator's setting
    params = yaml.safe_load(spc)["spec"]["parameters"]
    client_id, tenant = params["clientID"], params["tenantID"]
    pod = example_pod("azure-pod.yaml", "d0000000-0000-0000-0000-00000000000d")
    sa_doc = next(
        d for d in yaml.safe_load_all(example("azure-pod.yaml")) if d["kind"] == "ServiceAccount"
    )
    kube_api.add_spc("default", spc)
    kube_api.add_service_account("default", pod.service_account, sa_doc["metadata"]["annotations"])
    pod_token = "pod.azure-exchange.jwt"
    key1 = ec.generate_private_key(ec.SECP256R1())
    with serve(tmp_path, vaults=("kvname",), tenant=tenant) as srv:
        srv.federate(client_id, pod_token)  # the federated credential of the identity
        srv.allow("kvname", client_id)
        srv.add_secret("kvname", "secret1", "wi-secret-value")
        srv.add_key("kvname", "key1", ec_jwk(key1))
        node = make_node(azure_settings(srv))

        target = node.publish_tokens(pod, spc_name(spc), {AZURE_AUDIENCE: pod_token})
        assert is_mounted(target)
        assert sorted(os.listdir(target)) == ["key1", "secret1"]
        assert (target / "secret1").read_bytes() == b"wi-secret-value"
        assert (target / "key1").read_bytes() == key1.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        # Entra ID saw the pod's token as the client assertion of the class's client and tenant.
        [request] = srv.token_requests
        assert request["tenant"] == tenant and request["client_id"] == client_id
        assert request["client_assertion"] == pod_token
        assert request["client_assertion_type"] == (
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
        )
        assert "client_secret" not in request
        assert (srv.calls["get_secret"], srv.calls["get_key"]) == (1, 1)

        unpublish_all(node, pod)
        logs = node.logs()
        assert pod_token not in logs and "wi-secret-value" not in logs
        assert not any(tok in logs for tok in srv.tokens)


# --- Google: pod-adc ---------------------------------------------------------------------------

GSA = "secrets-reader@test-project.iam.gserviceaccount.com"
GSA_ANNOTATION = "iam.gke.io/gcp-service-account"


def gcp_settings(servers: GcpServers) -> dict[str, str]:
    """The daemon's operator settings: endpoints and CA; the cluster comes from the metadata
    server, as on GKE. No application default credentials: pod-adc uses the pod's token."""
    s = servers.settings()
    return {
        "SECRETFS_GCP_SECRETMANAGER_ENDPOINT": s.secretmanager_endpoint,
        "SECRETFS_GCP_SECRETMANAGER_REGIONAL_ENDPOINT": s.regional_endpoint,
        "SECRETFS_GCP_STS_ENDPOINT": s.sts_endpoint,
        "SECRETFS_GCP_IAMCREDENTIALS_ENDPOINT": s.iamcredentials_endpoint,
        "SECRETFS_GCP_CA_FILE": str(s.ca_file),
        "GCE_METADATA_HOST": s.metadata_host,
        "GOOGLE_APPLICATION_CREDENTIALS": "",
    }


def test_gcp_pod_adc_with_and_without_impersonation(
    make_node: Callable[..., ProviderNode],
    kube_api: KubeServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    spc = example("gcp-spc.yaml")  # unchanged: "my-project" is where the secret lives
    [secret] = {
        s["resourceName"].rsplit("/versions/", 1)[0]
        for s in yaml.safe_load(yaml.safe_load(spc)["spec"]["parameters"]["secrets"])
    }
    kube_api.add_spc("default", spc)
    pod = example_pod("gcp-pod.yaml", "e0000000-0000-0000-0000-00000000000e")
    # A second pod whose service account names a Google service account to impersonate.
    gsa_pod = dataclasses.replace(
        pod, name="gsa-pod", uid="f0000000-0000-0000-0000-00000000000f", service_account="reader"
    )
    kube_api.add_service_account("default", pod.service_account)
    kube_api.add_service_account("default", "reader", {GSA_ANNOTATION: GSA})
    with GcpServers.start(tmp_path) as gcp:
        gcp.add_secret(secret, b"gcp-secret-value")
        gcp.bind(pod_principal("default", pod.service_account), secret)
        gcp.bind(f"serviceAccount:{GSA}", secret)  # the "reader" principal itself is not bound
        gcp.allow_impersonation(GSA, "default", "reader")
        node = make_node(gcp_settings(gcp))

        # Direct workload identity: the pod token for the pool exchanged at STS, used as is.
        token = gcp.pod_token("default", pod.service_account)
        target = node.publish_tokens(pod, spc_name(spc), {gcp.pool: token})
        assert sorted(os.listdir(target)) == ["good1.txt", "good2.txt"]
        assert (target / "good1.txt").read_bytes() == b"gcp-secret-value"
        assert (target / "good2.txt").read_bytes() == b"gcp-secret-value"
        with gcp.state.lock:
            [exchange] = gcp.state.sts_calls
            assert exchange["subject_token"] == token and exchange["audience"] == STS_AUDIENCE
            assert gcp.state.iam_calls == []
            assert gcp.global_sm.sm_calls == [f"{secret}/versions/latest"]

        # Through the ServiceAccount's iam.gke.io/gcp-service-account: exchange, then impersonate.
        gsa_token = gcp.pod_token("default", "reader")
        target_gsa = node.publish_tokens(gsa_pod, spc_name(spc), {gcp.pool: gsa_token})
        assert (target_gsa / "good1.txt").read_bytes() == b"gcp-secret-value"
        with gcp.state.lock:
            assert [c["subject_token"] for c in gcp.state.sts_calls] == [token, gsa_token]
            [(path, body)] = gcp.state.iam_calls
        assert path == f"/v1/projects/-/serviceAccounts/{GSA}:generateAccessToken"
        assert "https://www.googleapis.com/auth/cloud-platform" in body["scope"]

        unpublish_all(node, pod, gsa_pod)
        logs = node.logs()
        assert token not in logs and gsa_token not in logs and "gcp-secret-value" not in logs
        assert "secret-token" not in logs


# --- a token audience the CSIDriver does not request ---------------------------------------------


def test_missing_token_audience_fails_clearly_and_leaves_nothing(
    make_node: Callable[..., ProviderNode],
    kube_api: KubeServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    vault_spc = example("vault-spc.yaml")  # never reached: the token is missing before login
    azure_spc, gcp_spc = example("azure-spc.yaml"), example("gcp-spc.yaml")
    cases = [(vault_spc, "vault"), (azure_spc, AZURE_AUDIENCE)]
    with GcpServers.start(tmp_path) as gcp, serve(tmp_path, vaults=("kvname",)) as azure:
        cases.append((gcp_spc, gcp.pool))
        node = make_node({**azure_settings(azure), **gcp_settings(gcp)})
        for i, (spc, audience) in enumerate(cases):
            kube_api.add_spc("default", spc)
            pod = Pod(f"pod-{i}", f"90000000-0000-0000-0000-00000000000{i}")
            kube_api.add_service_account("default", pod.service_account)
            with pytest.raises(grpc.RpcError) as info:
                # The CSIDriver requests only an AWS token: the kubelet hands over just that one.
                node.publish_tokens(pod, spc_name(spc), {"sts.amazonaws.com": "aws.pod.jwt"})
            err = info.value
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
            details = str(err.details())
            assert audience in details and "tokenRequests" in details, details
            assert "secrets-store.csi.k8s.io" in details and "aws.pod.jwt" not in details
            target = node.target(pod)
            assert not is_mounted(target) and not target.exists()
            assert node.daemon_volumes() == []
        with gcp.state.lock:
            assert gcp.state.sts_calls == []
        assert azure.token_requests == []
        assert not [m for m in node.our_mounts() if m != node.mount_root]
        assert "aws.pod.jwt" not in node.logs()
