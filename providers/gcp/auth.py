"""Access tokens for Secret Manager calls: the pod's workload identity, or the daemon's own ADC.

``pod-adc`` (upstream ``auth/auth.go``): the pod's token for the workload identity pool audience is
exchanged at Google's Security Token Service (RFC 8693, through ``google.oauth2.sts``) for a
federated access token; if the Kubernetes service account is annotated
``iam.gke.io/gcp-service-account`` (optionally with ``iam.gke.io/gcp-service-account-delegates``),
that token then buys an access token of the Google service account from IAM Credentials
``generateAccessToken`` (through ``google.auth.impersonated_credentials``). Otherwise the federated
token is used directly, which works with ``principal://`` IAM bindings.

Upstream repeats the whole exchange on every mount; here the resulting access token is cached per
(pod identity, exchange audience, service account, delegates) until ``token_margin`` seconds before
it expires. Upstream posts a JSON body to ``securetoken.googleapis.com/v1/identitybindingtoken``;
this uses the public STS endpoint with the same grant, token types, audience and scope.

``provider-adc`` (and standalone mode): ``google.auth.default()`` of the daemon.
"""

from __future__ import annotations

import datetime
import json
import threading
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

import google.auth
import google.auth.credentials
import requests
from cachetools import TLRUCache
from google.api_core.retry import exponential_sleep_generator
from google.auth import exceptions as auth_exceptions
from google.auth import impersonated_credentials
from google.auth import transport as auth_transport
from google.auth.transport.requests import Request as RequestsRequest
from google.oauth2 import credentials as oauth2_credentials
from google.oauth2 import sts

from providers.base import CONNECT_TIMEOUT, READ_TIMEOUT, FetchError, Identity
from providers.gcp.params import AUTH_PROVIDER_ADC
from providers.gcp.settings import CLOUD_PLATFORM_SCOPE, GcpSettings, PoolResolver

GSA_ANNOTATION = "iam.gke.io/gcp-service-account"
DELEGATES_ANNOTATION = "iam.gke.io/gcp-service-account-delegates"
_GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
_JWT = "urn:ietf:params:oauth:token-type:jwt"
_ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
_DETAIL_MAX = 300


@dataclass(frozen=True)
class _Cached:
    token: str = field(repr=False)
    expires_at: float  # on the broker's clock


class _Http(auth_transport.Request):
    """google-auth's requests transport with our timeouts, retrying throttling and outages.

    One instance per operation, so ``status``/``body`` describe that operation's last answer.
    """

    def __init__(self, session: requests.Session, settings: GcpSettings) -> None:
        self._inner = RequestsRequest(session)
        self._settings = settings
        self.status: int | None = None
        self.body = ""

    def __call__(
        self,
        url: str,
        method: str = "GET",
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: object = None,
        **kwargs: Any,
    ) -> Any:
        s = self._settings
        if s.ca_file:
            # Per request: requests lets REQUESTS_CA_BUNDLE override a session's `verify`.
            kwargs["verify"] = s.ca_file
        deadline = time.monotonic() + s.retry_deadline
        sleeps = exponential_sleep_generator(s.retry_initial, s.retry_maximum, 2.0)
        while True:
            delay = next(sleeps)
            try:
                resp = self._inner(
                    url, method, body, headers, timeout=(CONNECT_TIMEOUT, READ_TIMEOUT), **kwargs
                )
            except auth_exceptions.TransportError:
                self.status, self.body = None, ""
                if time.monotonic() + delay > deadline:
                    raise
            else:
                self.status = resp.status
                data = resp.data
                self.body = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
                if resp.status not in auth_transport.DEFAULT_RETRYABLE_STATUS_CODES:
                    return resp
                if time.monotonic() + delay > deadline:
                    return resp
            time.sleep(delay)


def _detail(body: str, secrets: tuple[str, ...]) -> str:
    """A short reason from an error body (OAuth or Google JSON error), with no token in it."""
    text = body
    try:
        data = json.loads(body)
    except ValueError:
        pass
    else:
        if isinstance(data, dict):
            err = data.get("error")
            if isinstance(err, dict):
                text = str(err.get("message") or err.get("status") or "")
            elif err is not None:
                desc = data.get("error_description")
                text = f"{err}: {desc}" if desc else str(err)
    for s in secrets:
        if s:
            text = text.replace(s, "<redacted>")
    text = " ".join(text.split())
    return text[:_DETAIL_MAX] or "no details"


def _is_transient(status: int | None) -> bool:
    return (
        status is None or status in auth_transport.DEFAULT_RETRYABLE_STATUS_CODES or status >= 500
    )


class TokenBroker:
    """Hands out access tokens per (auth mode, identity), caching exchanged ones."""

    def __init__(self, settings: GcpSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self._settings = settings
        self._clock = clock
        self._session = requests.Session()
        self._pools = PoolResolver(settings, RequestsRequest())
        self._sts = sts.Client(settings.sts_endpoint)  # type: ignore[no-untyped-call]
        margin = settings.token_margin
        self._cache: TLRUCache[Hashable, _Cached] = TLRUCache(
            maxsize=4096, ttu=lambda _k, v, _now: v.expires_at - margin, timer=clock
        )
        self._lock = threading.Lock()
        self._key_locks: dict[Hashable, threading.Lock] = {}
        self._adc: Any = None
        self._adc_lock = threading.Lock()
        self.exchanges = 0  # token exchanges performed (for tests and metrics)

    def token(self, auth_mode: str, identity: Identity, obj: str) -> tuple[str, Hashable | None]:
        """An access token and the cache key it came from (None for ADC); raises FetchError."""
        if identity.ambient or auth_mode == AUTH_PROVIDER_ADC:
            return self._adc_token(obj), None
        return self._pod_token(identity, obj)

    def close(self) -> None:
        self._session.close()

    def forget_identity(self, identity_key: Hashable) -> None:
        with self._lock:
            for key in [k for k in self._cache if isinstance(k, tuple) and k[0] == identity_key]:
                self._cache.pop(key, None)

    def forget(self, key: Hashable | None) -> None:
        """Drop a cached token the backend refused (revoked, or its binding removed)."""
        if key is not None:
            with self._lock:
                self._cache.pop(key, None)

    # --- provider-adc -------------------------------------------------------------------------

    def _adc_token(self, obj: str) -> str:
        with self._adc_lock:
            try:
                if self._adc is None:
                    # No scopes here: with scopes, google-auth looks up a project id through its
                    # own transport (no CA setting, no timeout) for some credential types.
                    adc, _ = google.auth.default()
                    self._adc = google.auth.credentials.with_scopes_if_required(  # type: ignore[no-untyped-call]
                        adc, [CLOUD_PLATFORM_SCOPE]
                    )
                if not self._adc.valid:
                    self._adc.refresh(_Http(self._session, self._settings))
            except auth_exceptions.DefaultCredentialsError as exc:
                raise FetchError(
                    obj,
                    f"auth provider-adc: the daemon has no application default credentials ({exc})",
                    transient=False,
                    code="NoCredentials",
                ) from None
            except auth_exceptions.GoogleAuthError as exc:
                raise FetchError(
                    obj,
                    f"auth provider-adc: refreshing the daemon's credentials failed "
                    f"({type(exc).__name__})",
                    transient=True,
                    code="AuthFailed",
                ) from None
            return str(self._adc.token)

    # --- pod-adc --------------------------------------------------------------------------------

    def _pod_token(self, identity: Identity, obj: str) -> tuple[str, Hashable]:
        pool = self._pools.get(obj)
        subject = self._subject_token(identity, pool.token_audiences, obj)
        gsa = identity.sa_annotations.get(GSA_ANNOTATION, "").strip()
        delegates = self._delegates(identity, obj) if gsa else ()
        key = (identity.key(), pool.sts_audience, gsa, delegates)
        with self._lock:
            hit = self._cache.get(key)
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        if hit is not None:
            return hit.token, key
        with key_lock:  # one exchange per identity at a time; the others wait for its result
            with self._lock:
                hit = self._cache.get(key)
            if hit is not None:
                return hit.token, key
            try:
                fed, fed_expires = self._exchange(subject, pool.sts_audience, obj)
                entry = _Cached(fed, fed_expires)
                if gsa:
                    entry = self._impersonate(
                        fed, gsa, delegates, identity, pool.token_audiences, obj
                    )
                with self._lock:
                    self._cache[key] = entry
            finally:
                with self._lock:
                    self._key_locks.pop(key, None)
            return entry.token, key

    def _subject_token(self, identity: Identity, audiences: tuple[str, ...], obj: str) -> str:
        for aud in audiences[1:]:
            if aud in identity.tokens:
                return identity.tokens[aud].token
        return identity.token_for(audiences[0], obj)

    def _delegates(self, identity: Identity, obj: str) -> tuple[str, ...]:
        raw = identity.sa_annotations.get(DELEGATES_ANNOTATION)
        if raw is None:
            return ()
        try:
            names = json.loads(raw)
        except (ValueError, RecursionError):
            names = None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise FetchError(
                obj,
                f"service account annotation {DELEGATES_ANNOTATION} must be a JSON list of "
                "service account emails",
                transient=False,
                code="BadAnnotation",
            )
        return tuple(f"projects/-/serviceAccounts/{n}" for n in names)

    def _exchange(self, subject: str, audience: str, obj: str) -> tuple[str, float]:
        self._settings.read_ca(obj)  # a missing bundle is a configuration error, not an outage
        http = _Http(self._session, self._settings)
        self.exchanges += 1
        try:
            resp = self._sts.exchange_token(  # type: ignore[no-untyped-call]
                http,
                grant_type=_GRANT,
                subject_token=subject,
                subject_token_type=_JWT,
                audience=audience,
                scopes=[CLOUD_PLATFORM_SCOPE],
                requested_token_type=_ACCESS_TOKEN,
            )
            token = resp["access_token"]
            expires_in = float(resp.get("expires_in", 3600))
        except auth_exceptions.TransportError as exc:
            raise FetchError(
                obj,
                f"auth pod-adc: cannot reach the token exchange {self._settings.sts_endpoint} "
                f"({type(exc).__name__})",
                transient=True,
                code="AuthUnavailable",
            ) from None
        except (auth_exceptions.GoogleAuthError, KeyError, TypeError, ValueError):
            status = http.status
            raise FetchError(
                obj,
                f"auth pod-adc: the token exchange for audience {audience!r} failed "
                f"(HTTP {status}): {_detail(http.body, (subject,))}",
                transient=_is_transient(status),
                code="Throttled" if status == 429 else "AuthFailed",
            ) from None
        if not isinstance(token, str) or not token:
            raise FetchError(
                obj,
                "auth pod-adc: the token exchange returned no access token",
                transient=True,
                code="AuthFailed",
            )
        return token, self._clock() + expires_in

    def _impersonate(
        self,
        federated: str,
        gsa: str,
        delegates: tuple[str, ...],
        identity: Identity,
        audiences: tuple[str, ...],
        obj: str,
    ) -> _Cached:
        http = _Http(self._session, self._settings)
        source = oauth2_credentials.Credentials(token=federated)  # type: ignore[no-untyped-call]
        creds = impersonated_credentials.Credentials(  # type: ignore[no-untyped-call]
            source_credentials=source,
            target_principal=gsa,
            target_scopes=[CLOUD_PLATFORM_SCOPE],
            delegates=list(delegates) or None,
            iam_endpoint_override=self._settings.generate_access_token_url(gsa),
        )
        try:
            creds.refresh(http)  # type: ignore[no-untyped-call]
        except auth_exceptions.TransportError as exc:
            raise FetchError(
                obj,
                f"auth pod-adc: cannot reach IAM Credentials to impersonate {gsa} "
                f"({type(exc).__name__})",
                transient=True,
                code="AuthUnavailable",
            ) from None
        except auth_exceptions.GoogleAuthError:
            status = http.status
            hint = ""
            if status == 403:
                ksa = f"{identity.namespace}/{identity.service_account}"
                member = f"serviceAccount:{audiences[0]}[{ksa}]"
                hint = f"; grant roles/iam.workloadIdentityUser on {gsa} to {member}"
            raise FetchError(
                obj,
                f"auth pod-adc: impersonating {gsa} (annotation {GSA_ANNOTATION}) failed "
                f"(HTTP {status}): {_detail(http.body, (federated,))}{hint}",
                transient=_is_transient(status),
                code="Throttled" if status == 429 else "AuthFailed",
            ) from None
        now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
        expiry = creds.expiry
        if not isinstance(expiry, datetime.datetime):
            expiry = now
        remaining = (expiry - now).total_seconds()
        return _Cached(str(creds.token), self._clock() + remaining)
