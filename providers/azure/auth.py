"""Who talks to Key Vault: operator settings, credentials from the pod's identity, SDK clients.

Modes, decided per fetch from the plan and the caller's :class:`Identity`:

* **Workload identity** (``clientID`` set): the pod's service-account token for audience
  ``api://AzureADTokenExchange`` is the client assertion of azure-identity's
  ``ClientAssertionCredential`` for ``clientID`` in ``tenantID`` (the federated-credential exchange
  upstream does).
* **Service principal** (no ``clientID``): ``clientid`` / ``clientsecret`` from the volume's
  ``nodePublishSecretRef`` Secret (keys case-insensitive, as upstream), ``ClientSecretCredential``.
* **Standalone** (``Identity.ambient``): the daemon's own environment, explicitly rather than a
  DefaultAzureCredential chain (no surprise IMDS or CLI logins): ``AZURE_FEDERATED_TOKEN_FILE``
  (the workload identity webhook's variables; client ID from ``clientID`` or ``AZURE_CLIENT_ID``)
  or ``AZURE_CLIENT_ID`` + ``AZURE_CLIENT_SECRET``. The tenant is always the SPC's ``tenantID``.

Operator settings (environment of the daemon):

* ``SECRETFS_AZURE_CLOUD_NAME``: default ``cloudName`` (upstream's ``--cloud-name`` flag).
* ``AZURE_ENVIRONMENT_FILEPATH``: go-autorest environment file for ``AzureStackCloud`` when the
  SPC has no ``cloudEnvFileName``; ``SECRETFS_AZURE_ENVIRONMENT_JSON``: the same JSON inline.
* ``SECRETFS_AZURE_CLOUD_ENV_DIRS``: ``:``-separated directories an SPC's ``cloudEnvFileName``
  may name a file in (default ``/etc/kubernetes``, where upstream's docs mount it).
  For custom and air-gapped clouds and private endpoints with their own DNS suffix.
* ``SECRETFS_AZURE_CA_BUNDLE``: CA bundle (PEM file) trusted for Key Vault and Entra ID, for
  clouds with a private CA (``REQUESTS_CA_BUNDLE`` works too, as for any requests user).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from azure.core.credentials import TokenCredential
from azure.core.pipeline.policies import RetryPolicy
from azure.identity import (
    ClientAssertionCredential,
    ClientSecretCredential,
    WorkloadIdentityCredential,
)
from azure.keyvault.certificates import CertificateClient
from azure.keyvault.keys import KeyClient
from azure.keyvault.secrets import SecretClient

from providers.base import CONNECT_TIMEOUT, READ_TIMEOUT, Identity

WORKLOAD_AUDIENCE = "api://AzureADTokenExchange"


@dataclass(frozen=True)
class Settings:
    """Operator-level configuration read once from the daemon's environment."""

    default_cloud: str = ""
    env_file: str = ""
    env_json: str = ""
    # Directories a SecretProviderClass's cloudEnvFileName may point into (operator's choice):
    # without this, whoever writes a class could make the daemon open any path it can see.
    cloud_env_dirs: tuple[str, ...] = ("/etc/kubernetes",)
    ca_bundle: str = ""
    # Standalone mode only.
    client_id: str = ""
    client_secret: str = field(default="", repr=False)
    federated_token_file: str = ""
    # Throttling: attempts after the first, and the longest Retry-After honoured (seconds).
    retry_total: int = 3
    backoff_factor: float = 0.8
    max_retry_after: float = 10.0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        return cls(
            default_cloud=env.get("SECRETFS_AZURE_CLOUD_NAME", ""),
            env_file=env.get("AZURE_ENVIRONMENT_FILEPATH", ""),
            env_json=env.get("SECRETFS_AZURE_ENVIRONMENT_JSON", ""),
            cloud_env_dirs=tuple(
                d
                for d in env.get("SECRETFS_AZURE_CLOUD_ENV_DIRS", "/etc/kubernetes").split(":")
                if d
            ),
            ca_bundle=env.get("SECRETFS_AZURE_CA_BUNDLE", ""),
            client_id=env.get("AZURE_CLIENT_ID", ""),
            client_secret=env.get("AZURE_CLIENT_SECRET", ""),
            federated_token_file=env.get("AZURE_FEDERATED_TOKEN_FILE", ""),
        )

    def cloud_settings(self) -> dict[str, str]:
        return {
            "default_cloud": self.default_cloud,
            "env_file": self.env_file,
            "env_json": self.env_json,
            "env_dirs": ":".join(self.cloud_env_dirs),
        }


@dataclass(frozen=True)
class AzureAuth:
    """``Plan.auth``: the vault and the identity parameters; part of every cache key."""

    vault_url: str
    tenant_id: str
    client_id: str
    authority: str
    custom_cloud: bool


class AuthFailure(Exception):
    """Credentials cannot be built for this caller; the message is safe to show."""

    def __init__(self, message: str, code: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.transient = transient


@dataclass(frozen=True)
class Material:
    """What a credential is made of. Secret parts are kept out of repr and of ``describe``."""

    mode: str  # workload-identity | service-principal | standalone-secret | standalone-federated
    client_id: str
    secret: str = field(default="", repr=False)  # client assertion or client secret
    token_file: str = ""

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        for part in (self.mode, self.client_id, self.secret, self.token_file):
            h.update(part.encode() + b"\0")
        return h.hexdigest()

    def describe(self, auth: AzureAuth) -> str:
        what = {
            "workload-identity": "workload identity",
            "service-principal": "service principal (nodePublishSecretRef)",
            "standalone-secret": "service principal (AZURE_CLIENT_SECRET)",
            "standalone-federated": "workload identity (AZURE_FEDERATED_TOKEN_FILE)",
        }[self.mode]
        return f"{what} of client ID {self.client_id!r} in tenant {auth.tenant_id!r}"

    def redact(self, text: str) -> str:
        return text.replace(self.secret, "[REDACTED]") if self.secret else text


def material_for(auth: AzureAuth, identity: Identity, settings: Settings) -> Material:
    """The credential material for ``identity``; AuthFailure says what to configure."""
    if identity.ambient:
        if settings.federated_token_file:
            client_id = auth.client_id or settings.client_id
            if not client_id:
                raise AuthFailure(
                    "AZURE_FEDERATED_TOKEN_FILE is set but no client ID: set clientID in the "
                    "parameters or AZURE_CLIENT_ID",
                    "MissingCredentials",
                )
            return Material(
                "standalone-federated", client_id, token_file=settings.federated_token_file
            )
        if settings.client_id and settings.client_secret:
            return Material("standalone-secret", settings.client_id, settings.client_secret)
        raise AuthFailure(
            "standalone mode has no Azure credentials: set AZURE_CLIENT_ID and AZURE_CLIENT_SECRET "
            "(service principal) or AZURE_FEDERATED_TOKEN_FILE (workload identity)",
            "MissingCredentials",
        )
    if auth.client_id:
        tok = identity.tokens.get(WORKLOAD_AUDIENCE)
        if tok is None or not tok.token:
            have = ", ".join(sorted(repr(a) for a in identity.tokens)) or "none"
            raise AuthFailure(
                f"workload identity (clientID {auth.client_id!r}) needs the pod's service-account "
                f"token for audience {WORKLOAD_AUDIENCE!r} (have: {have}); add "
                f"{{audience: {WORKLOAD_AUDIENCE}}} to tokenRequests of the CSIDriver "
                "secrets-store.csi.k8s.io",
                "MissingToken",
            )
        return Material("workload-identity", auth.client_id, tok.token)
    lowered = {k.lower(): v for k, v in identity.secrets.items()}
    client_id, secret = lowered.get("clientid", ""), lowered.get("clientsecret", "")
    if not identity.secrets:
        raise AuthFailure(
            "no credentials: set clientID for workload identity (and add audience "
            f"{WORKLOAD_AUDIENCE} to tokenRequests of the CSIDriver), or reference a Secret with "
            "keys clientid and clientsecret in the volume's nodePublishSecretRef",
            "MissingCredentials",
        )
    missing = [k for k, v in (("clientid", client_id), ("clientsecret", secret)) if not v]
    if missing:
        raise AuthFailure(
            f"the nodePublishSecretRef Secret has no {' or '.join(missing)} key "
            "(a service principal needs clientid and clientsecret)",
            "MissingCredentials",
        )
    return Material("service-principal", client_id, secret)


class _RetryPolicy(RetryPolicy):  # type: ignore[type-arg]
    """azure-core's retries (429, 408, 5xx, with backoff) with Retry-After capped, so a throttled
    worker thread waits a bounded time and the daemon serves its cached value meanwhile."""

    def __init__(self, max_retry_after: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._max_retry_after = max_retry_after

    def get_retry_after(self, response: Any) -> float | None:
        after = super().get_retry_after(response)
        return None if after is None else min(after, self._max_retry_after)


@dataclass
class Clients:
    """A credential and the three Key Vault clients sharing it."""

    credential: TokenCredential
    secrets: SecretClient
    keys: KeyClient
    certs: CertificateClient

    def close(self) -> None:
        for c in (self.secrets, self.keys, self.certs):
            c.close()


def build_clients(auth: AzureAuth, material: Material, settings: Settings) -> Clients:
    transport: dict[str, Any] = {
        "connection_timeout": CONNECT_TIMEOUT,
        "read_timeout": READ_TIMEOUT,
        "user_agent": "secretfs",
    }
    if settings.ca_bundle:
        transport["connection_verify"] = settings.ca_bundle
    retry = {
        "retry_total": settings.retry_total,
        "retry_backoff_factor": settings.backoff_factor,
        "retry_backoff_max": 8,
    }
    cred_kw: dict[str, Any] = {"authority": auth.authority, **transport, **retry}
    credential: TokenCredential
    if material.mode == "workload-identity":
        assertion = material.secret
        credential = ClientAssertionCredential(
            auth.tenant_id, material.client_id, lambda: assertion, **cred_kw
        )
    elif material.mode == "standalone-federated":
        credential = WorkloadIdentityCredential(
            tenant_id=auth.tenant_id,
            client_id=material.client_id,
            token_file_path=material.token_file,
            **cred_kw,
        )
    else:
        # MSAL would ask login.microsoftonline.com to validate a custom cloud's authority.
        if auth.custom_cloud:
            cred_kw["disable_instance_discovery"] = True
        credential = ClientSecretCredential(
            auth.tenant_id, material.client_id, material.secret, **cred_kw
        )

    def kv(cls: Any) -> Any:
        # verify_challenge_resource stays on: the vault's 401 challenge must name a resource
        # whose domain the vault host belongs to, so a rogue host cannot collect our token.
        return cls(
            auth.vault_url,
            credential,
            retry_policy=_RetryPolicy(settings.max_retry_after, **retry),
            **transport,
        )

    return Clients(credential, kv(SecretClient), kv(KeyClient), kv(CertificateClient))
