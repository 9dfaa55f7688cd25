"""Azure SDK exceptions as (message, code, transient) for FetchError, with advice for the user.

Messages name the vault, the authority and the identity (client and tenant IDs), and quote the
service's own error code and text (Key Vault's ``Forbidden: ...``, Entra ID's ``AADSTS...``),
which never contain credentials; anything equal to the caller's assertion or client secret is
redacted regardless.
"""

from __future__ import annotations

import logging
import re
from typing import NamedTuple

from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)

from providers.azure.auth import WORKLOAD_AUDIENCE, AzureAuth, Material

log = logging.getLogger(__name__)

_OTHER_TENANT = re.compile(r"not configured to acquire tokens for tenant (\S+?)\.? ")


class Mapped(NamedTuple):
    message: str
    code: str
    transient: bool = False


def _detail(exc: Exception) -> str:
    """The service's own error code and message, without the SDK's long preamble."""
    err = getattr(exc, "error", None)
    code, message = getattr(err, "code", None), getattr(err, "message", None)
    if code and message:
        return f"{code}: {message}"
    text = getattr(exc, "message", None) or str(exc)
    return str(text).splitlines()[0][:500] if text else type(exc).__name__


def _entra_hint(detail: str, auth: AzureAuth, m: Material) -> str:
    if "AADSTS700016" in detail:
        return "; check clientID (the app's or managed identity's client ID) and tenantID"
    if "AADSTS90002" in detail:
        return "; check tenantID"
    if "AADSTS7000215" in detail or "AADSTS7000222" in detail:
        return "; check (or renew) clientsecret in the nodePublishSecretRef Secret"
    if m.mode in ("workload-identity", "standalone-federated"):
        return (
            "; check the federated identity credential of the client (issuer = the cluster's "
            "OIDC issuer, subject = system:serviceaccount:<namespace>:<name>, audience = "
            f"{WORKLOAD_AUDIENCE})"
        )
    return ""


def map_error(exc: Exception, what: str, uid: str, auth: AzureAuth, m: Material) -> Mapped:
    """``what`` names the object (``secret 'db' version '...'``), ``uid`` is for the log."""
    vault = auth.vault_url
    status = getattr(exc, "status_code", None)
    response = getattr(exc, "response", None)
    url = str(getattr(getattr(response, "request", None), "url", ""))
    from_vault = url.startswith(vault.rstrip("/"))
    detail = m.redact(_detail(exc))
    if isinstance(exc, ClientAuthenticationError) and not from_vault:
        other = _OTHER_TENANT.search(detail)
        if other:
            return Mapped(
                f"key vault {vault} belongs to tenant {other.group(1)!r} (its authentication "
                f"challenge says so) but tenantID is {auth.tenant_id!r}; set tenantID to the "
                "vault's tenant",
                "AccessDenied",
            )
        transient = status is not None and (status >= 500 or status == 429)
        return Mapped(
            f"Entra ID ({auth.authority}) refused a token to the {m.describe(auth)}: "
            f"{detail}{_entra_hint(detail, auth, m)}",
            "Unavailable" if transient else "AccessDenied",
            transient,
        )
    if isinstance(exc, ResourceNotFoundError):
        return Mapped(f"{what} not found in key vault {vault}: {detail}", "NotFound")
    if isinstance(exc, HttpResponseError) and status is not None:
        if status == 429:
            return Mapped(
                f"key vault {vault} is throttling requests (429) after retries; try again later",
                "Throttled",
                True,
            )
        if status >= 500 or status == 408:
            return Mapped(f"key vault {vault} answered {status}: {detail}", "Unavailable", True)
        if status in (401, 403):
            return Mapped(
                f"access to {what} denied by key vault {vault} to the {m.describe(auth)}: {detail}",
                "AccessDenied",
            )
        return Mapped(f"key vault {vault} refused {what} ({status}): {detail}", "BadRequest")
    if isinstance(exc, ServiceRequestError | ServiceResponseError):
        return Mapped(
            f"cannot reach {vault} or {auth.authority}: {type(exc).__name__}: {detail}",
            "Unavailable",
            True,
        )
    if isinstance(exc, ValueError) and "does not match the requested domain" in str(exc):
        return Mapped(
            f"key vault {vault} asked for a token for a resource its host is not part of (the "
            "challenge resource does not match the requested domain); no token was sent. Check "
            "keyvaultName, cloudName or the custom cloud's keyVaultDNSSuffix",
            "ChallengeRejected",
        )
    if isinstance(exc, ValueError):
        return Mapped(f"key vault {vault}: {detail}", "BadResponse")
    log.warning("unexpected %s fetching %s from %s", type(exc).__name__, uid, vault)
    return Mapped(f"unexpected {type(exc).__name__} from the Azure SDK", "ProviderError")
