"""Operator settings of the GCP provider (environment variables of the daemon).

- ``SECRETFS_GCP_SECRETMANAGER_ENDPOINT``: Secret Manager gRPC endpoint for global secrets (default
  ``secretmanager.googleapis.com:443``); set it for Private Service Connect.
- ``SECRETFS_GCP_SECRETMANAGER_REGIONAL_ENDPOINT``: the same for regional secrets, ``{location}``
  replaced (default ``secretmanager.{location}.rep.googleapis.com:443``).
- ``SECRETFS_GCP_STS_ENDPOINT``: token exchange (default ``https://sts.googleapis.com/v1/token``).
- ``SECRETFS_GCP_IAMCREDENTIALS_ENDPOINT``: IAM Credentials base URL (default
  ``https://iamcredentials.googleapis.com``).
- ``SECRETFS_GCP_CA_FILE``: a PEM bundle trusted for all of the above instead of the system roots
  (TLS-inspecting proxies, tests). Connections are always TLS; plaintext is not offered.
- ``SECRETFS_GCP_PROJECT``, ``SECRETFS_GCP_CLUSTER_LOCATION``, ``SECRETFS_GCP_CLUSTER_NAME``: the
  cluster whose workload identity pool pods use; each is read from the GKE metadata server
  (``GCE_METADATA_HOST``, default ``metadata.google.internal``) when unset, as upstream does.
- ``SECRETFS_GCP_WORKLOAD_IDENTITY_POOL``: audience of the pod token (default
  ``<project>.svc.id.goog``).
- ``SECRETFS_GCP_STS_AUDIENCE``: the full exchange audience, for fleet or other federated pools
  (default ``identitynamespace:<pool>:https://container.googleapis.com/v1/projects/<project>/
  locations/<location>/clusters/<name>``, upstream's GKE audience).

Which pod token is used (as upstream ``auth/auth.go``): the kubelet hands over one token per
audience listed in the CSIDriver's ``tokenRequests``; the provider takes the one for the workload
identity pool, else the one for the full exchange audience (federated pools use the provider as
audience).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from google.auth import exceptions as auth_exceptions
from google.auth.compute_engine import _metadata

from providers.base import CONNECT_TIMEOUT, FetchError

CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
GKE_PROVIDER_BASE = "https://container.googleapis.com/v1"


@dataclass(frozen=True)
class GcpSettings:
    secretmanager_endpoint: str = "secretmanager.googleapis.com:443"
    regional_endpoint: str = "secretmanager.{location}.rep.googleapis.com:443"
    sts_endpoint: str = "https://sts.googleapis.com/v1/token"
    iamcredentials_endpoint: str = "https://iamcredentials.googleapis.com"
    ca_file: str | None = None
    project: str | None = None
    cluster_location: str | None = None
    cluster_name: str | None = None
    pool: str | None = None
    sts_audience: str | None = None
    metadata_host: str = "metadata.google.internal"
    # Backoff for throttling and outages, and the total time one call may spend retrying.
    retry_initial: float = 0.5
    retry_maximum: float = 5.0
    retry_deadline: float = 30.0
    # Exchanged tokens are reused until this many seconds before they expire.
    token_margin: float = 300.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> GcpSettings:
        env = os.environ if env is None else env
        d = cls()

        def get(name: str, default: str | None) -> str | None:
            return env.get(name) or default

        return cls(
            secretmanager_endpoint=get(
                "SECRETFS_GCP_SECRETMANAGER_ENDPOINT", d.secretmanager_endpoint
            )
            or d.secretmanager_endpoint,
            regional_endpoint=get("SECRETFS_GCP_SECRETMANAGER_REGIONAL_ENDPOINT", None)
            or d.regional_endpoint,
            sts_endpoint=get("SECRETFS_GCP_STS_ENDPOINT", None) or d.sts_endpoint,
            iamcredentials_endpoint=get("SECRETFS_GCP_IAMCREDENTIALS_ENDPOINT", None)
            or d.iamcredentials_endpoint,
            ca_file=get("SECRETFS_GCP_CA_FILE", None),
            project=get("SECRETFS_GCP_PROJECT", None),
            cluster_location=get("SECRETFS_GCP_CLUSTER_LOCATION", None),
            cluster_name=get("SECRETFS_GCP_CLUSTER_NAME", None),
            pool=get("SECRETFS_GCP_WORKLOAD_IDENTITY_POOL", None),
            sts_audience=get("SECRETFS_GCP_STS_AUDIENCE", None),
            metadata_host=get("GCE_METADATA_HOST", None) or d.metadata_host,
        )

    def read_ca(self, obj: str) -> bytes | None:
        """The configured CA bundle, or None for the system roots; FetchError if unreadable."""
        if not self.ca_file:
            return None
        try:
            with open(self.ca_file, "rb") as f:
                return f.read()
        except OSError as exc:
            raise FetchError(
                obj,
                f"cannot read SECRETFS_GCP_CA_FILE {self.ca_file!r}: {exc.strerror}",
                transient=False,
                code="BadConfig",
            ) from None

    def endpoint_for(self, location: str | None) -> str:
        """The gRPC target serving secrets of ``location`` (None: global secrets)."""
        if location is None:
            return self.secretmanager_endpoint
        return self.regional_endpoint.replace("{location}", location)

    def generate_access_token_url(self, service_account: str) -> str:
        base = self.iamcredentials_endpoint.rstrip("/")
        return f"{base}/v1/projects/-/serviceAccounts/{service_account}:generateAccessToken"


@dataclass(frozen=True)
class WorkloadPool:
    """Which pod token to take and what to exchange it for."""

    token_audiences: tuple[str, ...]  # in order of preference
    sts_audience: str


class PoolResolver:
    """Works out the workload identity pool once, from settings or the metadata server."""

    def __init__(self, settings: GcpSettings, request: Callable[..., object]) -> None:
        self._settings = settings
        self._request = request
        self._lock = threading.Lock()
        self._pool: WorkloadPool | None = None

    def get(self, obj: str) -> WorkloadPool:
        with self._lock:
            if self._pool is None:
                self._pool = self._resolve(obj)
            return self._pool

    def _metadata(self, path: str, setting: str, obj: str) -> str:
        root = f"http://{self._settings.metadata_host}/computeMetadata/v1/"
        try:
            value = _metadata.get(  # type: ignore[no-untyped-call]
                self._request, path, root=root, retry_count=2, timeout=CONNECT_TIMEOUT
            )
        except auth_exceptions.GoogleAuthError as exc:
            raise FetchError(
                obj,
                f"cannot determine the workload identity pool: set {setting} on the daemon "
                f"(the metadata server did not answer {path}: {type(exc).__name__})",
                transient=True,
                code="WorkloadIdentityConfig",
            ) from None
        return str(value).strip()

    def _resolve(self, obj: str) -> WorkloadPool:
        s = self._settings
        if s.sts_audience:
            return WorkloadPool(tuple(a for a in (s.pool, s.sts_audience) if a), s.sts_audience)
        project = s.project or self._metadata("project/project-id", "SECRETFS_GCP_PROJECT", obj)
        location = s.cluster_location or self._metadata(
            "instance/attributes/cluster-location", "SECRETFS_GCP_CLUSTER_LOCATION", obj
        )
        name = s.cluster_name or self._metadata(
            "instance/attributes/cluster-name", "SECRETFS_GCP_CLUSTER_NAME", obj
        )
        pool = s.pool or f"{project}.svc.id.goog"
        provider = f"{GKE_PROVIDER_BASE}/projects/{project}/locations/{location}/clusters/{name}"
        return WorkloadPool((pool,), f"identitynamespace:{pool}:{provider}")
