"""End to end: upstream's documented SecretProviderClass examples, mounted for real.

Standalone mode (``secretfs mount SPC MOUNTPOINT``, a real FUSE mount in a daemon subprocess run
through :mod:`tests.e2e_harness`) against the protocol test servers of the provider tests: the
Azure Key Vault + Entra ID server (:mod:`tests.azure_server`) and the Google Secret Manager + STS
servers (:mod:`tests.gcp_server`). The SecretProviderClasses are upstream's own text; where a line
differs, the test says which and why. Everything else the daemon needs reaches it the way it would
on a laptop or VM: operator environment variables (endpoints, CA bundle, custom cloud) and the
ambient credentials each provider documents (an Azure service principal in
``AZURE_CLIENT_ID``/``AZURE_CLIENT_SECRET``; Google application default credentials through
``GOOGLE_APPLICATION_CREDENTIALS``).

Each example is checked for file names, modes (``os.stat`` and ``ls -l``), content rules, lazy
fetching (the test server's call counters do not move while values are fresh, nor after the TTL
while nobody reads) and rotation after ``--ttl 1`` without a remount.
"""

# ruff: noqa: E501, W291  (upstream's examples are quoted verbatim, long comments and all)

from __future__ import annotations

import base64
import datetime
import json
import os
import stat
import string
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from tests.azure_server import AzureTestServer, serve
from tests.gcp_server import LOCATION, PROJECT, STS_AUDIENCE, GcpServers, pod_principal
from tests.mounting import Mount, mounted, needs_fuse, wait_for

pytestmark = [needs_fuse, pytest.mark.fuse]

HARNESS = "tests.e2e_harness"
T = TypeVar("T")
IDLE = 2.0  # seconds of nobody reading: twice the --ttl 1 of the rotation tests
# A read past the TTL is answered at once and starts a refresh in the background; this long is
# plenty for such a refresh against a test server on loopback to finish before counting starts.
SETTLE = 1.0

# --- upstream's examples ------------------------------------------------------------------------

# Azure/secrets-store-csi-driver-provider-azure @ d5f7cf5b (v1.8.2),
# examples/keyvault-certs/v1alpha1_secretproviderclass_certs.yaml: every object type (secret, key,
# cert) of one Key Vault certificate, plus a PFX in both encodings. Unchanged: the test server
# serves vault "kvname" in tenant "tid". What the SPC leaves to the cluster (the cloud: no
# cloudName means the driver's default) is the operator's environment here, see azure_env().
AZURE_CERTS_SPC = """\
apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: azure-certs
spec:
  provider: azure
  parameters:
    usePodIdentity: "false"
    useVMManagedIdentity: "false"
    userAssignedIdentityID: ""
    keyvaultName: "kvname"
    objects: |
      array:
        - |
          objectName: cert1
          objectType: cert                      # Setting objectType: cert will fetch and write only the certificate from keyvault
          objectVersion: ""                     # [OPTIONAL] object versions, default to latest if empty
        - |
          objectName: cert1
          objectAlias: cert1-pub-key
          objectType: key                       # Setting objectType: key will fetch and write only the public key from keyvault
          objectVersion: ""                     # [OPTIONAL] object versions, default to latest if empty
        - |
          objectName: cert1
          objectAlias: cert1-secret
          objectType: secret                    # Setting objectType: secret will fetch and write the certificate and private key from keyvault. The private key and certificate are written to a single file.
          objectVersion: ""                     # [OPTIONAL] object versions, default to latest if empty
        - |
          objectName: cert2-pfx
          objectAlias: cert2-secret-pfx
          objectType: secret
          objectVersion: ""                     # [OPTIONAL] object versions, default to latest if empty
          objectFormat: pfx                     # [OPTIONAL] the format of the Azure Key Vault object, supported types are pem and pfx. objectFormat: pfx is only supported with objectType: secret and PKCS12 or ECC certificates. Default format for certificates is pem.
        - |
          objectName: cert2-pfx
          objectAlias: cert2-secret-pfx-binary
          objectType: secret
          objectVersion: ""                     # [OPTIONAL] object versions, default to latest if empty
          objectFormat: pfx
          objectEncoding: base64                # Setting object encoding to base64 and object format to pfx will fetch and write the base64 decoded pfx binary
    tenantId: "tid"                             # the tenant ID of the KeyVault
"""

# The same repository's getting-started guide (website/content/en/getting-started/usage/_index.md,
# "Create your own SecretProviderClass Object"), the YAML block as printed, indentation removed.
# Unchanged as well: clientID and userAssignedIdentityID name identities of modes standalone does
# not use (standalone takes the service principal from AZURE_CLIENT_ID/AZURE_CLIENT_SECRET), and
# cloudName "" selects the operator's default cloud.
AZURE_USAGE_SPC = """\
apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: azure-kvname
spec:
  provider: azure
  parameters:
    usePodIdentity: "false"               # [OPTIONAL] if not provided, will default to "false"
    useVMManagedIdentity: "false"         # [OPTIONAL available for version > 0.0.4] if not provided, will default to "false"
    userAssignedIdentityID: "client_id"   # [OPTIONAL available for version > 0.0.4] use the client id to specify which user assigned managed identity to use. If using a user assigned identity as the VM's managed identity, then specify the identity's client id. If empty, then defaults to use the system assigned identity on the VM
    clientID: "client_id"                 # [OPTIONAL available for version > 1.1.0] client id of the Azure AD Application or managed identity to use for workload identity
    keyvaultName: "kvname"                # the name of the KeyVault
    cloudName: ""                         # [OPTIONAL available for version > 0.0.4] if not provided, azure environment will default to AzurePublicCloud
    cloudEnvFileName: ""                  # [OPTIONAL available for version > 0.0.7] use to define path to file for populating azure environment
    objects:  |
      array:
        - |
          objectName: secret1
          objectAlias: SECRET_1           # [OPTIONAL available for version > 0.0.4] object alias
          objectType: secret              # object types: secret, key or cert. For Key Vault certificates, refer to https://azure.github.io/secrets-store-csi-driver-provider-azure/docs/configurations/getting-certs-and-keys/ for the object type to use
          objectVersion: ""               # [OPTIONAL] object versions, default to latest if empty
          objectVersionHistory: 5         # [OPTIONAL] if greater than 1, the number of versions to sync starting at the specified version.
          filePermission: 0755                # [OPTIONAL] permission for secret file being mounted into the pod, default is 0644 if not specified.
        - |
          objectName: key1
          objectAlias: ""                 # If provided then it has to be referenced in [secretObjects].[objectName] to sync with Kubernetes secrets 
          objectType: key
          objectVersion: ""
    tenantID: "tid"                       # the tenant ID of the KeyVault
"""

# GoogleCloudPlatform/secrets-store-csi-driver-provider-gcp @ 00779883 (v1.15.0),
# examples/app-secrets.yaml.tmpl: a template; $PROJECT_ID is substituted as upstream's README does
# with envsubst. No `auth`: in standalone mode the daemon's own ADC are used (provider-adc).
GCP_APP_SECRETS_TMPL = """\
apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: app-secrets
spec:
  provider: gcp
  parameters:
    secrets: |
      - resourceName: "projects/$PROJECT_ID/secrets/testsecret/versions/latest"
        path: "good1.txt"
      - resourceName: "projects/$PROJECT_ID/secrets/testsecret/versions/latest"
        path: "good2.txt"
"""

# examples/app-secrets-with-extract-key.yaml.tmpl of the same repository. One change besides
# $PROJECT_ID: the regional secret's location us-central1 becomes the test server's regional
# endpoint's location (europe-west1), which the example's own NOTE allows.
GCP_EXTRACT_TMPL = """\
apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: app-secrets-with-extract-key
spec:
  provider: gcp
  parameters:
    secrets: |
      - resourceName: "projects/$PROJECT_ID/secrets/testsecret/versions/latest"
        path: "good1.txt"
        extractJSONKey: "user"
      - resourceName: "projects/$PROJECT_ID/locations/us-central1/secrets/testsecret/versions/latest"
        path: "good2.txt"
        extractJSONKey: "user"

# NOTE: Please provide the secret and regional secret in JSON format, including the key for "user" 
# to ensure this example functions correctly. The regional secret must either be located in the 
# `us-central1` region or you need to change the location in the resourceName.
"""


def gcp_spc(template: str) -> str:
    return string.Template(template).substitute(PROJECT_ID=PROJECT)


def changed_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"{old!r} is not in the example exactly once"
    return text.replace(old, new)


# --- helpers --------------------------------------------------------------------------------------


def ls_l(directory: Path) -> dict[str, str]:
    """``ls -l``'s mode column by file name (what a user would look at)."""
    out = subprocess.run(
        ["ls", "-l", str(directory)], capture_output=True, text=True, check=True
    ).stdout
    modes = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 9:  # skip "total N"
            modes[fields[-1]] = fields[0].rstrip(".+")
    return modes


def idle_calls(calls: Callable[[], T]) -> tuple[T, T]:
    """A backend's call counters before and after IDLE seconds in which nobody reads."""
    time.sleep(SETTLE)
    before = calls()
    time.sleep(IDLE)
    return before, calls()


def mode_of(m: Mount, name: str) -> int:
    st = os.stat(m.file(name))
    assert stat.S_ISREG(st.st_mode), name
    return stat.S_IMODE(st.st_mode)


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def public_pem(key: Any) -> bytes:
    return bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def b64url(n: int, size: int) -> str:
    return base64.urlsafe_b64encode(n.to_bytes(size, "big")).rstrip(b"=").decode()


# --- Azure Key Vault ------------------------------------------------------------------------------

SP_ID, SP_SECRET = "e2e-sp-app", "e2e-Sp-Secret-Value-0815"
PFX_TYPE = "application/x-pkcs12"


def make_cert(
    cn: str, key: Any, issuer: tuple[x509.Certificate, Any] | None = None, ca: bool = False
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_cert.subject if issuer_cert else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
        .sign(issuer_key, hashes.SHA256())
    )


def rsa_jwk(key: rsa.RSAPrivateKey) -> dict[str, Any]:
    pub = key.public_key().public_numbers()
    return {"kty": "RSA", "n": b64url(pub.n, (pub.n.bit_length() + 7) // 8), "e": "AQAB"}


def ec_jwk(key: ec.EllipticCurvePrivateKey) -> dict[str, Any]:
    pub = key.public_key().public_numbers()
    return {"kty": "EC", "crv": "P-256", "x": b64url(pub.x, 32), "y": b64url(pub.y, 32)}


def key_pem(key: Any) -> bytes:
    return bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


@dataclass
class KeyVaultCertificate:
    """A certificate as Key Vault holds it: certificate, key and secret of one name."""

    name: str
    cert: x509.Certificate
    key: Any
    pfx: bytes

    def store(self, srv: AzureTestServer, vault: str = "kvname") -> None:
        base = srv.vault_url(vault)
        srv.add_certificate(vault, self.name, self.cert.public_bytes(serialization.Encoding.DER))
        if isinstance(self.key, rsa.RSAPrivateKey):
            srv.add_key(vault, self.name, rsa_jwk(self.key))
        else:
            srv.add_key(vault, self.name, ec_jwk(self.key))
        srv.add_secret(
            vault,
            self.name,
            base64.b64encode(self.pfx).decode(),
            content_type=PFX_TYPE,  # Key Vault's default for certificates
            kid=f"{base}keys/{self.name}/0",
        )


def issue_chain(name: str) -> tuple[KeyVaultCertificate, x509.Certificate, x509.Certificate]:
    """An RSA leaf under an EC intermediate and root; the PFX lists root before intermediate."""
    root_key = ec.generate_private_key(ec.SECP384R1())
    inter_key = ec.generate_private_key(ec.SECP256R1())
    leaf_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    root = make_cert("e2e root", root_key, ca=True)
    inter = make_cert("e2e intermediate", inter_key, (root, root_key), ca=True)
    leaf = make_cert(f"{name}.example", leaf_key, (inter, inter_key))
    pfx = pkcs12.serialize_key_and_certificates(
        name.encode(), leaf_key, leaf, [root, inter], serialization.NoEncryption()
    )
    return KeyVaultCertificate(name, leaf, leaf_key, pfx), inter, root


def self_signed_ec(name: str) -> KeyVaultCertificate:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = make_cert(f"{name}.example", key)
    pfx = pkcs12.serialize_key_and_certificates(
        name.encode(), key, cert, None, serialization.NoEncryption()
    )
    return KeyVaultCertificate(name, cert, key, pfx)


@pytest.fixture
def kv(tmp_path: Path) -> Iterator[AzureTestServer]:
    with serve(tmp_path, vaults=("kvname",), tenant="tid") as srv:
        srv.add_app(SP_ID, SP_SECRET)
        srv.allow("kvname", SP_ID)
        yield srv


def azure_env(srv: AzureTestServer) -> dict[str, str]:
    """The daemon's environment: the custom cloud, its CA, and a service principal.

    The examples name no cloud, so the operator's default applies (upstream: the provider's
    --cloud-name flag); the test server is an AzureStackCloud whose go-autorest environment JSON
    points Key Vault at ``*.localhost:<port>`` and Entra ID at ``https://localhost:<port>/``.
    """
    return {
        "SECRETFS_AZURE_CLOUD_NAME": "AzureStackCloud",
        "SECRETFS_AZURE_ENVIRONMENT_JSON": srv.cloud_env_json,
        "SECRETFS_AZURE_CA_BUNDLE": srv.ca_path,
        "AZURE_CLIENT_ID": SP_ID,
        "AZURE_CLIENT_SECRET": SP_SECRET,
        "AZURE_FEDERATED_TOKEN_FILE": "",
        "AZURE_ENVIRONMENT_FILEPATH": "",
    }


VAULT_CALLS = ("get_secret", "get_key", "get_certificate", "list_secret_versions", "token")


def vault_calls(srv: AzureTestServer) -> Counter[str]:
    return Counter({k: srv.calls[k] for k in VAULT_CALLS if srv.calls[k]})


def test_azure_certs_example(kv: AzureTestServer, tmp_path: Path) -> None:
    cert1, inter, root = issue_chain("cert1")
    cert1.store(kv)
    cert2 = self_signed_ec("cert2-pfx")
    cert2.store(kv)

    with mounted(AZURE_CERTS_SPC, tmp_path, module=HARNESS, env=azure_env(kv)) as m:
        # Fetched once per object at mount: one token, one call per file's source.
        at_mount = vault_calls(kv)
        assert at_mount == {"token": 1, "get_certificate": 1, "get_key": 1, "get_secret": 3}

        files = {
            "cert1",
            "cert1-pub-key",
            "cert1-secret",
            "cert2-secret-pfx",
            "cert2-secret-pfx-binary",
        }
        assert set(os.listdir(m.path)) == files
        assert {f: mode_of(m, f) for f in files} == dict.fromkeys(files, 0o644)
        assert ls_l(m.path) == dict.fromkeys(files, "-rw-r--r--")

        for _ in range(2):  # values are fresh (default TTL 120 s): no more vault calls
            # objectType cert: the certificate only, as PEM.
            assert m.read("cert1") == pem(cert1.cert)
            # objectType key: the certificate's public key, as PEM.
            assert m.read("cert1-pub-key") == public_pem(cert1.key)
            # objectType secret: private key, then the chain from leaf to root (the PFX had the
            # root first).
            assert m.read("cert1-secret") == key_pem(cert1.key) + pem(cert1.cert, inter, root)
            # objectFormat pfx: Key Vault's base64 text; with objectEncoding base64: the binary.
            assert m.read("cert2-secret-pfx") == base64.b64encode(cert2.pfx)
            binary = m.read("cert2-secret-pfx-binary")
            assert binary == cert2.pfx
            loaded = pkcs12.load_pkcs12(binary, None)
            assert loaded.cert is not None and loaded.cert.certificate == cert2.cert
            assert loaded.key is not None and public_pem(loaded.key) == public_pem(cert2.key)
            assert os.stat(m.file("cert1-secret")).st_size == len(m.read("cert1-secret"))
        assert vault_calls(kv) == at_mount

        log = m.log()
    assert SP_SECRET not in log and "PRIVATE KEY" not in log
    assert not any(tok in log for tok in kv.tokens)


def test_azure_usage_example_history_modes_and_rotation(
    kv: AzureTestServer, tmp_path: Path
) -> None:
    for i in range(1, 7):
        kv.add_secret("kvname", "secret1", f"secret1-v{i}")
    key1 = ec.generate_private_key(ec.SECP256R1())
    kv.add_key("kvname", "key1", ec_jwk(key1))

    with mounted(AZURE_USAGE_SPC, tmp_path, "--ttl", "1", module=HARNESS, env=azure_env(kv)) as m:
        # objectVersionHistory 5 under objectAlias SECRET_1: SECRET_1/0 is the newest version.
        assert sorted(os.listdir(m.path)) == ["SECRET_1", "key1"]
        assert sorted(os.listdir(m.file("SECRET_1"))) == ["0", "1", "2", "3", "4"]
        assert [m.read(f"SECRET_1/{i}") for i in range(5)] == [
            f"secret1-v{6 - i}".encode() for i in range(5)
        ]
        assert m.read("key1") == public_pem(key1)
        # filePermission 0755 applies to every file of secret1's history; key1 has the default.
        assert [mode_of(m, f"SECRET_1/{i}") for i in range(5)] == [0o755] * 5
        assert mode_of(m, "key1") == 0o644

        # Lazy: past the TTL, while nobody reads, nothing is fetched (no refresh timer).
        before, idle = idle_calls(lambda: vault_calls(kv))
        assert idle == before

        # Rotation: a new version shows up at SECRET_1/0, and shifts the history, without a
        # remount. The volume's values are due together, so reading one refreshes them all in one
        # provider call (key1 too).
        kv.add_secret("kvname", "secret1", "secret1-v7-rotated")
        assert wait_for(lambda: m.read("SECRET_1/0") == b"secret1-v7-rotated")
        assert wait_for(lambda: m.read("SECRET_1/1") == b"secret1-v6")
        assert os.stat(m.file("SECRET_1/0")).st_size == len(b"secret1-v7-rotated")
        after = vault_calls(kv)
        assert after["get_secret"] > before["get_secret"]
        assert after["get_key"] > before["get_key"]
        assert after["token"] == before["token"]  # the access token is reused

        assert ls_l(m.file("SECRET_1")) == dict.fromkeys("01234", "-rwxr-xr-x")
        assert ls_l(m.path)["key1"] == "-rw-r--r--"
        assert m.read("key1") == public_pem(key1)
        log = m.log()
    assert SP_SECRET not in log and "secret1-v" not in log


# --- Google Secret Manager ------------------------------------------------------------------------

GLOBAL = f"projects/{PROJECT}/secrets/testsecret"
REGIONAL = f"projects/{PROJECT}/locations/{LOCATION}/secrets/testsecret"


@dataclass
class Gcp:
    servers: GcpServers
    env: dict[str, str]

    def add(self, secret: str, value: bytes) -> None:
        self.servers.add_secret(secret, value)

    def calls(self) -> tuple[int, int]:
        """Secret Manager calls so far: (global endpoint, regional endpoint)."""
        with self.servers.state.lock:
            return len(self.servers.global_sm.sm_calls), len(self.servers.regional_sm.sm_calls)

    def token_exchanges(self) -> int:
        with self.servers.state.lock:
            return len(self.servers.state.sts_calls)


@pytest.fixture
def gcp(tmp_path: Path) -> Iterator[Gcp]:
    """The test servers and a daemon environment whose ADC they accept.

    ADC: ``GOOGLE_APPLICATION_CREDENTIALS`` names an external-account (workload identity
    federation) credentials file in tmp_path, as ``gcloud iam workload-identity-pools
    create-cred-config`` writes them: its subject token (a fake one the test STS knows, in a file
    next to it) is exchanged at the test STS for an access token of the federated principal, which
    the secrets are granted to. Both files hold test values only.
    """
    with GcpServers.start(tmp_path) as servers:
        subject = servers.pod_token("standalone", "laptop")
        token_file = tmp_path / "subject-token"
        token_file.write_text(subject)
        settings = servers.settings()
        adc = tmp_path / "adc.json"
        adc.write_text(
            json.dumps(
                {
                    "type": "external_account",
                    "audience": STS_AUDIENCE,
                    "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
                    "token_url": settings.sts_endpoint,
                    "credential_source": {"file": str(token_file)},
                }
            )
        )
        servers.bind(pod_principal("standalone", "laptop"), GLOBAL, REGIONAL)
        env = {
            "SECRETFS_GCP_SECRETMANAGER_ENDPOINT": settings.secretmanager_endpoint,
            "SECRETFS_GCP_SECRETMANAGER_REGIONAL_ENDPOINT": settings.regional_endpoint,
            "SECRETFS_GCP_STS_ENDPOINT": settings.sts_endpoint,
            "SECRETFS_GCP_IAMCREDENTIALS_ENDPOINT": settings.iamcredentials_endpoint,
            "SECRETFS_GCP_CA_FILE": str(settings.ca_file),
            "GCE_METADATA_HOST": settings.metadata_host,
            "GOOGLE_APPLICATION_CREDENTIALS": str(adc),
            # See test_gcp_adc_without_a_project_setting for why this is needed today.
            "GOOGLE_CLOUD_PROJECT": PROJECT,
        }
        yield Gcp(servers, env)


def test_gcp_extract_key_example(gcp: Gcp, tmp_path: Path) -> None:
    gcp.add(GLOBAL, json.dumps({"user": "global-user", "password": "global-Pw-1"}).encode())
    gcp.add(REGIONAL, json.dumps({"user": "regional-user", "password": "regional-Pw-2"}).encode())
    spc = changed_once(
        gcp_spc(GCP_EXTRACT_TMPL), "/locations/us-central1/", f"/locations/{LOCATION}/"
    )

    with mounted(spc, tmp_path, module=HARNESS, env=gcp.env) as m:
        assert gcp.calls() == (1, 1)  # one AccessSecretVersion per source, at mount
        assert gcp.token_exchanges() == 1
        assert sorted(os.listdir(m.path)) == ["good1.txt", "good2.txt"]
        assert ls_l(m.path) == {"good1.txt": "-rw-r--r--", "good2.txt": "-rw-r--r--"}
        assert mode_of(m, "good1.txt") == mode_of(m, "good2.txt") == 0o644
        for _ in range(2):  # fresh values: served without asking Secret Manager again
            # extractJSONKey: only the value of "user", as upstream writes it.
            assert m.read("good1.txt") == b"global-user"
            assert m.read("good2.txt") == b"regional-user"
            assert os.stat(m.file("good2.txt")).st_size == len(b"regional-user")
        assert gcp.calls() == (1, 1)
        log = m.log()
    assert "Pw-" not in log and "-user" not in log
    assert "secret-token" not in log and "jwt" not in log


def test_gcp_app_secrets_example_rotation(gcp: Gcp, tmp_path: Path) -> None:
    gcp.add(GLOBAL, b"first-value")

    with mounted(
        gcp_spc(GCP_APP_SECRETS_TMPL), tmp_path, "--ttl", "1", module=HARNESS, env=gcp.env
    ) as m:
        # Two files of one secret version: one call at mount serves both.
        assert gcp.calls() == (1, 0)
        assert m.read("good1.txt") == m.read("good2.txt") == b"first-value"
        assert ls_l(m.path) == {"good1.txt": "-rw-r--r--", "good2.txt": "-rw-r--r--"}

        # Lazy: past the TTL, while nobody reads, nothing is fetched.
        before, idle = idle_calls(gcp.calls)
        assert idle == before

        # Rotation: a new version behind versions/latest shows up without a remount.
        gcp.add(GLOBAL, b"second-value-is-longer")
        assert wait_for(lambda: m.read("good1.txt") == b"second-value-is-longer")
        assert wait_for(lambda: m.read("good2.txt") == b"second-value-is-longer")
        assert os.stat(m.file("good1.txt")).st_size == len(b"second-value-is-longer")
        assert gcp.calls()[0] > before[0]
        assert gcp.token_exchanges() == 1  # the ADC access token is reused across refreshes
        log = m.log()
    assert "first-value" not in log and "second-value" not in log


def test_gcp_adc_without_a_project_setting(gcp: Gcp, tmp_path: Path) -> None:
    # Standalone users should not need GOOGLE_CLOUD_PROJECT: every resourceName names its project.
    gcp.add(GLOBAL, b"no-project-needed")
    env = {**gcp.env, "GOOGLE_CLOUD_PROJECT": "", "GCLOUD_PROJECT": ""}
    with mounted(gcp_spc(GCP_APP_SECRETS_TMPL), tmp_path, module=HARNESS, env=env) as m:
        assert m.read("good1.txt") == b"no-project-needed"
