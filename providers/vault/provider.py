"""HashiCorp Vault (``provider: vault``), compatible with hashicorp/vault-csi-provider's parameters.

Parameters and the static/dynamic rule: :mod:`providers.vault.config`. Transport, TLS, login and
the token cache: :mod:`providers.vault.client`. Output format: :mod:`providers.vault.gojson`.

A source is one request: (API path, method, secretArgs). Its value is Vault's whole answer
marshalled the way upstream writes it when an object has no ``secretKey``, except that
``request_id`` is left empty (Vault sends a new one with every answer; keeping it would make an
unchanged secret look new on every refresh). So a version identifies the bytes: versions are
``v<KV v2 version>-<digest>`` or ``<digest>``, the digest an HMAC under a per-process random key of
the source and the bytes (it reveals nothing about short secrets). Objects with a ``secretKey``
render from that value: KV v2's ``data.data`` is descended automatically, strings are written
plainly and anything else as JSON, then ``encoding`` (utf-8, base64, hex) is applied.

Leases: an answer carrying a ``lease_id`` comes back with :attr:`Fetched.lease`.
:meth:`VaultProvider.renew_sync` first renews the token that issued the lease (Vault revokes a
token's leases when the token expires), then the lease, asking for its current duration again
(``increment``), and returns the duration Vault granted: shorter than asked once the role's
``max_ttl`` caps it, which tells the daemon to re-issue the material before the lease ends;
:meth:`VaultProvider.revoke_sync` revokes it, which needs a policy granting ``update`` on
``sys/leases/revoke``. Both use the issuing token while it works and fall back to a login with the
pod's current token. Error messages never carry a token or a lease id.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import requests

from providers.base import (
    DEFAULT_MODE,
    Fetched,
    FetchError,
    FileSpec,
    Identity,
    Lease,
    ParameterError,
    Plan,
    Problem,
    check_files,
)
from providers.vault.client import Login, LoginFailed, Tokens, Transport
from providers.vault.config import VaultAuth, VaultSelect, VaultSource, parse_auth, parse_objects
from providers.vault.errors import from_response, from_transport
from providers.vault.gojson import (
    BadResponse,
    decode_value,
    key_from_data,
    kv2_version,
    loads,
    parse_secret,
)

log = logging.getLogger(__name__)

_UNKNOWN_LEASE_TTL = 3600.0  # how long to remember the issuing token of a lease without a TTL


@dataclass
class _Held:
    """The token that issued a lease (kept alive by renewals) and the object it serves."""

    token: str = field(repr=False)
    obj: str
    expires: float


def _first(held: _Held | None) -> Login | None:
    # The issuing token first; on a 403 the pod's own login takes over.
    return Login(held.token, retry_on_403=True, scrub=(held.token,)) if held else None


def _lease_path(lease: Lease) -> str:
    # A lease id is "<path>/<random>": the path names it well enough, without the random part.
    return lease.lease_id.rpartition("/")[0] or "lease"


def _relabel(err: FetchError, obj: str) -> FetchError:
    message = str(err).removeprefix(f"object {err.obj!r}: ")
    return FetchError(obj, message, transient=err.transient, code=err.code)


class VaultProvider:
    name = "vault"
    max_concurrency = 16

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._transport = Transport()
        self.tokens = Tokens(self._transport, clock)
        self._hmac_key = os.urandom(32)
        self._lock = threading.Lock()
        self._held: dict[str, _Held] = {}

    def release_identity(self, identity_key: Hashable) -> None:
        self.tokens.forget_identity(identity_key)

    # --- parameters -------------------------------------------------------------------------------

    def parse(self, parameters: Mapping[str, str], default_mode: int = DEFAULT_MODE) -> Plan:
        problems: list[Problem] = []
        auth = parse_auth(parameters, problems)
        files = parse_objects(parameters.get("objects"), default_mode, problems)
        problems.extend(check_files(files))
        if problems:
            raise ParameterError(problems)
        return Plan(provider=self.name, files=tuple(files), auth=auth)

    # --- fetching ---------------------------------------------------------------------------------

    def fetch_sync(
        self, plan: Plan, identity: Identity, sources: Sequence[Hashable]
    ) -> Mapping[Hashable, Fetched | FetchError]:
        auth = plan.auth
        assert isinstance(auth, VaultAuth)
        names: dict[Hashable, str] = {}
        for f in plan.files:
            names.setdefault(f.source, f.object_name)
        results: dict[Hashable, Fetched | FetchError] = {}
        login: Login | None = None
        login_error: FetchError | None = None
        for src in sources:
            obj = names.get(src, str(src))
            if login_error is not None:  # one failed login answers for every source
                results[src] = _relabel(login_error, obj)
                continue
            if not isinstance(src, VaultSource):
                results[src] = FetchError(obj, "not a source of this plan", transient=False)
                continue
            try:
                results[src], login = self._fetch_one(auth, identity, src, obj, login)
            except LoginFailed as err:
                results[src] = login_error = err
            except FetchError as err:
                results[src] = err
        return results

    def _fetch_one(
        self, auth: VaultAuth, identity: Identity, src: VaultSource, obj: str, first: Login | None
    ) -> tuple[Fetched, Login]:
        path, params = src.split()
        what = f"{src.method} {src.path}"
        kwargs: dict[str, Any] = {}
        if params:
            kwargs["params"] = params
        if src.args is not None:
            kwargs["data"] = src.args.encode()
            kwargs["headers"] = {"Content-Type": "application/json"}

        def call(client: Any) -> requests.Response:
            resp: requests.Response = client.adapter.request(src.method, "v1/" + path, **kwargs)
            return resp

        resp, login = self._call(auth, identity, obj, what, first, call)
        if not resp.ok:
            who = f"role {auth.role!r}" if not identity.ambient else "the token"
            hint = f"the policies of {who} must allow {src.method} on {path!r}"
            raise from_response(resp, obj, what, login.scrub, hint=hint)
        try:
            secret = parse_secret(resp.content, request_id="")
        except BadResponse as exc:
            raise FetchError(
                obj,
                f"Vault's answer to {what} is not usable: {exc}",
                transient=False,
                code="BadResponse",
            ) from None
        if secret is None or secret.data is None:
            raise FetchError(
                obj, f"Vault returned no data for {what}", transient=False, code="EmptyResponse"
            )
        for w in secret.warnings:
            log.warning("Vault warns about %s (object %r): %s", what, obj, w[:300])
        data = secret.to_json()
        mac = hmac.new(
            self._hmac_key, json.dumps(list(src)).encode() + b"\0" + data, hashlib.sha256
        ).digest()
        version = base64.urlsafe_b64encode(mac[:12]).decode()
        kv2 = kv2_version(secret.data)
        if kv2 is not None:
            version = f"v{kv2}-{version}"
        lease = None
        if secret.lease_id:
            lease = Lease(secret.lease_id, float(secret.lease_duration), secret.renewable)
            self._hold(secret.lease_id, login.token, obj, lease.duration)
        return Fetched(data, version, lease), login

    def _call(
        self,
        auth: VaultAuth,
        identity: Identity,
        obj: str,
        what: str,
        first: Login | None,
        call: Callable[[Any], requests.Response],
    ) -> tuple[requests.Response, Login]:
        """Run ``call`` with ``first`` (a token that worked before) or the identity's token; on a
        403 from a token that may have expired, log in again and retry once."""
        try:
            login = first or self.tokens.get(auth, identity, obj)
            resp = call(self._transport.client(auth, login.token, obj))
            if resp.status_code == 403 and login.retry_on_403:
                used = login.scrub
                login = self.tokens.get(auth, identity, obj, failed=login.token)
                login = Login(login.token, False, (*login.scrub, *used))
                resp = call(self._transport.client(auth, login.token, obj))
        except requests.RequestException as exc:
            raise from_transport(exc, obj, what, auth.address) from None
        return resp, login

    # --- rendering --------------------------------------------------------------------------------

    def render(self, spec: FileSpec, value: Fetched) -> bytes:
        sel, src = spec.select, spec.source
        if not isinstance(sel, VaultSelect) or not isinstance(src, VaultSource):
            raise FetchError(spec.object_name, "not a file of a vault plan", transient=False)
        if sel.key is None:
            return value.data
        try:
            root = loads(value.data)
        except BadResponse:
            root = None
        data = root.get("data") if isinstance(root, dict) else None
        if not isinstance(data, dict):
            raise FetchError(
                spec.object_name,
                f"Vault returned no data at {src.path!r}",
                transient=False,
                code="EmptyResponse",
            )
        try:
            raw = key_from_data(data, sel.key)
        except KeyError:
            raise FetchError(
                spec.object_name,
                f"secretKey {sel.key!r} does not exist at secret path {src.path!r}",
                transient=False,
                code="KeyNotFound",
            ) from None
        try:
            return decode_value(raw, sel.encoding)
        except ValueError as exc:
            raise FetchError(
                spec.object_name,
                f"secretKey {sel.key!r} at {src.path!r}: {exc}",
                transient=False,
                code="DecodeError",
            ) from None

    # --- leases -----------------------------------------------------------------------------------

    def _hold(self, lease_id: str, token: str, obj: str, duration: float) -> None:
        now = self._clock()
        with self._lock:
            for k in [k for k, h in self._held.items() if h.expires <= now]:
                del self._held[k]
            self._held[lease_id] = _Held(token, obj, now + (duration or _UNKNOWN_LEASE_TTL))

    def _held_for(self, lease: Lease) -> tuple[_Held | None, str]:
        with self._lock:
            held = self._held.get(lease.lease_id)
        return held, held.obj if held else _lease_path(lease)

    def renew_sync(self, plan: Plan, identity: Identity, lease: Lease) -> Lease:
        auth = plan.auth
        assert isinstance(auth, VaultAuth)
        held, obj = self._held_for(lease)
        if held is not None and not identity.ambient:
            self._renew_token(auth, held.token, obj)
        what = f"renewal of the lease on {_lease_path(lease)!r}"
        # The same duration again: an answer below it means max_ttl capped the lease.
        increment = int(lease.duration) if lease.duration >= 1 else None

        def call(client: Any) -> requests.Response:
            resp: requests.Response = client.sys.renew_lease(lease.lease_id, increment=increment)
            return resp

        resp, login = self._call(auth, identity, obj, what, _first(held), call)
        if not resp.ok:
            err = from_response(
                resp,
                obj,
                what,
                (*login.scrub, lease.lease_id),  # Vault may quote the lease id
                lease=True,
                hint="renewing needs update on sys/leases/renew",
            )
            if not err.transient:
                self._drop(lease.lease_id)
            raise err
        try:
            body = resp.json()
            new = Lease(
                str(body.get("lease_id") or lease.lease_id),
                float(body.get("lease_duration") or 0),
                bool(body.get("renewable")),
            )
        except (ValueError, TypeError, AttributeError):
            raise FetchError(
                obj,
                f"Vault's answer to the {what} is not usable",
                transient=False,
                code="BadResponse",
            ) from None
        self._hold(new.lease_id, held.token if held else login.token, obj, new.duration)
        return new

    def _renew_token(self, auth: VaultAuth, token: str, obj: str) -> None:
        """Best effort: extend the issuing token so Vault does not revoke its leases with it."""
        try:
            resp = self._transport.client(auth, token, obj).auth.token.renew_self()
        except (requests.RequestException, FetchError) as exc:
            log.info(
                "could not renew the Vault token behind a lease of %r: %s", obj, type(exc).__name__
            )
            return
        if not resp.ok:
            log.info(
                "Vault refused to renew the token behind a lease of %r (%s)", obj, resp.status_code
            )

    def revoke_sync(self, plan: Plan, identity: Identity, lease: Lease) -> None:
        auth = plan.auth
        assert isinstance(auth, VaultAuth)
        held, obj = self._held_for(lease)
        what = f"revocation of the lease on {_lease_path(lease)!r}"

        def call(client: Any) -> requests.Response:
            resp: requests.Response = client.sys.revoke_lease(lease.lease_id)
            return resp

        resp, login = self._call(auth, identity, obj, what, _first(held), call)
        if resp.ok or resp.status_code == 404:  # already gone is gone
            self._drop(lease.lease_id)
            return
        raise from_response(
            resp,
            obj,
            what,
            (*login.scrub, lease.lease_id),
            lease=True,
            hint="revoking needs a policy granting update on sys/leases/revoke",
        )

    def _drop(self, lease_id: str) -> None:
        with self._lock:
            self._held.pop(lease_id, None)
