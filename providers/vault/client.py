"""Talking to Vault through hvac: sessions with the volume's TLS settings, login, token cache.

* One ``requests.Session`` per (address, TLS settings), rebuilt when a CA, client certificate or
  key file named in the parameters changes on disk (certificates rotate). TLS is set up in one
  ``ssl.SSLContext``: ``vaultCACertPath`` (else every file under ``vaultCADirectory``, as Vault's Go
  client reads it, no ``c_rehash`` needed; else the system roots), the client certificate and key,
  ``vaultSkipTLSVerify``, and ``vaultTLSServerName`` as SNI and the name checked in the server's
  certificate. The session ignores ``REQUESTS_CA_BUNDLE``/``.netrc`` but honours proxy variables.
* Logging in: the pod's token for the plan's audience, ``POST auth/<mount>/login {role, jwt}``. The
  client token is cached per (pod identity, Plan.auth) until 80% of its lease has passed (no expiry:
  kept until Vault answers 403); the caller logs in again once on a 403 from a cached token.
* Standalone mode (ambient identity): ``VAULT_TOKEN``, else ``~/.vault-token`` (what ``vault login``
  writes), read on every call through hvac's own helper; no login, no cache.
"""

from __future__ import annotations

import os
import ssl
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import hvac
import hvac.adapters
import hvac.utils
import requests
import requests.adapters
import requests.utils

from providers.base import CONNECT_TIMEOUT, READ_TIMEOUT, FetchError, Identity
from providers.vault.config import VaultAuth, VaultTLS
from providers.vault.errors import from_response, from_transport, tls_config

MAX_TOKENS = 1000  # cached client tokens, one per identity (upstream: -cache-size 1000)
REFRESH_FRACTION = 0.8


class _TLSAdapter(requests.adapters.HTTPAdapter):
    """Every connection uses our SSLContext; what requests/hvac derive from env is ignored."""

    def __init__(self, ctx: ssl.SSLContext, server_name: str | None, verify: bool) -> None:
        self._tls_kw: dict[str, Any] = {"ssl_context": ctx}
        if server_name:
            self._tls_kw["server_hostname"] = server_name
        self._verify = verify
        super().__init__(max_retries=0)

    def init_poolmanager(
        self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any
    ) -> None:
        super().init_poolmanager(connections, maxsize, block, **{**pool_kwargs, **self._tls_kw})

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        return super().proxy_manager_for(proxy, **{**proxy_kwargs, **self._tls_kw})

    def send(
        self,
        request: requests.PreparedRequest,
        stream: bool = False,
        timeout: Any = None,
        verify: Any = True,
        cert: Any = None,
        proxies: dict[str, str] | None = None,
    ) -> requests.Response:
        return super().send(
            request,
            stream=stream,
            timeout=timeout,
            verify=self._verify,
            cert=None,
            proxies=proxies,
        )


def _files(tls: VaultTLS) -> list[tuple[str, str]]:
    """(setting, path) of every file the TLS settings read, CA directory expanded."""
    out: list[tuple[str, str]] = []
    if tls.ca_cert:
        out.append(("vaultCACertPath", tls.ca_cert))
    elif tls.ca_dir:
        for root, dirs, names in os.walk(tls.ca_dir):
            dirs.sort()
            out.extend(("vaultCADirectory", os.path.join(root, n)) for n in sorted(names))
    if tls.client_cert and tls.client_key:
        out.append(("vaultTLSClientCertPath", tls.client_cert))
        out.append(("vaultTLSClientKeyPath", tls.client_key))
    return out


def _stamp(tls: VaultTLS, obj: str) -> tuple[Hashable, ...]:
    if tls.ca_dir and not tls.ca_cert and not os.path.isdir(tls.ca_dir):
        raise tls_config(
            obj, "vaultCADirectory", tls.ca_dir, NotADirectoryError(20, "not a directory")
        )
    stamp: list[Hashable] = []
    for setting, path in _files(tls):
        try:
            st = os.stat(path)
        except OSError as exc:
            raise tls_config(obj, setting, path, exc) from None
        stamp.append((path, st.st_mtime_ns, st.st_size))
    return tuple(stamp)


def _ssl_context(tls: VaultTLS, obj: str) -> ssl.SSLContext:
    if tls.ca_cert or tls.ca_dir:
        # Like Vault's client: a CA file or directory replaces the system roots.
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    else:
        ctx = ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    loaded_ca = False
    for setting, path in _files(tls):
        try:
            if setting in ("vaultCACertPath", "vaultCADirectory"):
                ctx.load_verify_locations(cafile=path)
                loaded_ca = True
            elif setting == "vaultTLSClientCertPath":
                ctx.load_cert_chain(path, tls.client_key)
        except (OSError, ssl.SSLError) as exc:
            raise tls_config(obj, setting, path, exc) from None
    if tls.ca_dir and not tls.ca_cert and not loaded_ca:
        raise tls_config(obj, "vaultCADirectory", tls.ca_dir, ValueError("holds no certificates"))
    if tls.skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class Transport:
    """hvac clients over shared sessions (connection pools), one per address and TLS settings."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[tuple[str, VaultTLS], tuple[Hashable, requests.Session]] = {}

    def session(self, auth: VaultAuth, obj: str) -> requests.Session:
        stamp = _stamp(auth.tls, obj)
        key = (auth.address, auth.tls)
        with self._lock:
            hit = self._sessions.get(key)
            if hit is not None and hit[0] == stamp:
                return hit[1]
        ctx = _ssl_context(auth.tls, obj)
        session = requests.Session()
        session.trust_env = False  # no REQUESTS_CA_BUNDLE or .netrc; proxies set explicitly:
        session.proxies = dict(requests.utils.get_environ_proxies(auth.address))
        adapter = _TLSAdapter(ctx, auth.tls.server_name, not auth.tls.skip_verify)
        session.mount("https://", adapter)
        session.mount("http://", adapter)
        with self._lock:
            self._sessions[key] = (stamp, session)
        return session

    def client(self, auth: VaultAuth, token: str, obj: str) -> Any:
        """An hvac client that returns every answer (errors included) as a requests.Response."""
        return hvac.Client(
            url=auth.address,
            token=token,  # "" (never None: hvac would pick up VAULT_TOKEN) sends no token
            verify=not auth.tls.skip_verify,
            timeout=(CONNECT_TIMEOUT, READ_TIMEOUT),
            session=self.session(auth, obj),
            adapter=hvac.adapters.RawAdapter,
            namespace=auth.namespace,
            ignore_exceptions=True,
        )


class LoginFailed(FetchError):
    """No client token for this identity: the same answer holds for every source of a call."""


def _login_failed(err: FetchError) -> LoginFailed:
    message = str(err).removeprefix(f"object {err.obj!r}: ")
    return LoginFailed(err.obj, message, transient=err.transient, code=err.code)


@dataclass
class _Entry:
    token: str = field(repr=False)
    refresh_at: float


@dataclass(frozen=True)
class Login:
    """A client token to use, and whether a 403 with it is worth one fresh login."""

    token: str = field(repr=False)
    retry_on_403: bool
    scrub: tuple[str, ...] = field(default=(), repr=False)


class Tokens:
    """Client tokens per (identity, Plan.auth); see the module docstring."""

    def __init__(self, transport: Transport, clock: Callable[[], float] = time.monotonic) -> None:
        self._transport = transport
        self._clock = clock
        self._mutex = threading.Lock()
        self._cache: dict[Hashable, _Entry] = {}
        # Logins for one key are serialised so a burst of pods logs in once; striped locks keep
        # different identities from waiting on each other.
        self._stripes = [threading.Lock() for _ in range(64)]
        self.logins = 0  # how many logins this process performed (tests, metrics)

    def get(
        self, auth: VaultAuth, identity: Identity, obj: str, failed: str | None = None
    ) -> Login:
        """A token for ``identity``; LoginFailed if there is none. ``failed`` is a token Vault just
        refused: a cached token equal to it is replaced by a new login."""
        try:
            return self._get(auth, identity, obj, failed)
        except LoginFailed:
            raise
        except FetchError as err:
            raise _login_failed(err) from None

    def _get(self, auth: VaultAuth, identity: Identity, obj: str, failed: str | None) -> Login:
        if identity.ambient:
            token = hvac.utils.get_token_from_env()
            if not token:
                raise FetchError(
                    obj,
                    "standalone mode needs a Vault token: set VAULT_TOKEN or "
                    "run `vault login` (which writes ~/.vault-token)",
                    transient=False,
                    code="MissingToken",
                )
            return Login(token, retry_on_403=False, scrub=(token,))
        if not auth.role:
            raise FetchError(
                obj,
                "parameter 'roleName' is required: it names the Vault role "
                f"of auth mount {auth.mount!r} that this pod logs in with",
                transient=False,
                code="MissingRole",
            )
        # Asked on every call, cached token or not: a pod without a token for the audience must
        # not ride on another pod's login.
        jwt = identity.token_for(auth.audience, obj)
        key = (identity.key(), auth)
        with self._stripes[hash(key) % len(self._stripes)]:
            with self._mutex:
                entry = self._cache.get(key)
            if entry is not None and entry.refresh_at > self._clock() and entry.token != failed:
                return Login(entry.token, retry_on_403=True, scrub=(entry.token, jwt))
            token, lease = self._login(auth, identity, jwt, obj)
            refresh_at = self._clock() + lease * REFRESH_FRACTION if lease > 0 else float("inf")
            with self._mutex:
                self._cache.pop(key, None)
                self._cache[key] = _Entry(token, refresh_at)
                self._prune()
        return Login(token, retry_on_403=False, scrub=(token, jwt))

    def forget_identity(self, identity_key: Hashable) -> None:
        with self._mutex:
            for key in [k for k in self._cache if isinstance(k, tuple) and k[0] == identity_key]:
                self._cache.pop(key, None)

    def forget(self, auth: VaultAuth, identity: Identity) -> None:
        with self._mutex:
            self._cache.pop((identity.key(), auth), None)

    def _prune(self) -> None:
        if len(self._cache) <= MAX_TOKENS:
            return
        now = self._clock()
        for k in [k for k, e in self._cache.items() if e.refresh_at <= now]:
            del self._cache[k]
        while len(self._cache) > MAX_TOKENS:
            del self._cache[next(iter(self._cache))]

    def _login(self, auth: VaultAuth, identity: Identity, jwt: str, obj: str) -> tuple[str, int]:
        what = f"login at auth/{auth.mount} with role {auth.role!r}"
        client = self._transport.client(auth, "", obj)
        try:
            resp = client.auth.kubernetes.login(
                auth.role, jwt, use_token=False, mount_point=auth.mount
            )
        except requests.RequestException as exc:
            raise from_transport(exc, obj, what, auth.address) from None
        self.logins += 1
        if not resp.ok:
            who = f"{identity.namespace}/{identity.service_account}"
            hint = (
                f"check that role {auth.role!r} binds service account {who} and accepts "
                f"tokens with audience {auth.audience!r}"
            )
            raise from_response(resp, obj, what, (jwt,), hint=hint)
        try:
            body = resp.json()
            token = body["auth"]["client_token"]
            lease = int(body["auth"].get("lease_duration") or 0)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise FetchError(
                obj,
                f"Vault's answer to {what} holds no client token",
                transient=False,
                code="BadResponse",
            ) from None
        if not isinstance(token, str) or not token:
            raise FetchError(
                obj,
                f"Vault's answer to {what} holds no client token",
                transient=False,
                code="BadResponse",
            )
        return token, lease
