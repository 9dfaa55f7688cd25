"""A small Azure Key Vault + Entra ID server for tests, speaking the real wire protocols over HTTPS.

Start it with :func:`serve` (a context manager)::

    with serve(tmp_path, vaults=("kv-test",), tenant=TENANT) as srv:
        srv.vault_url("kv-test")  # https://kv-test.localhost:<port>/
        srv.authority             # https://localhost:<port>/   (Entra ID authority host)
        srv.ca_path               # trustme CA bundle (PEM file in tmp_path) for the client
        srv.cloud_env_json        # go-autorest environment JSON for cloudName AzureStackCloud
        srv.add_secret("kv-test", "db", "s3cret")          # -> version id; also add_key,
        srv.add_certificate(...)                           #    add_certificate
        srv.federate(client_id, pod_token)                 # accept this client assertion
        srv.add_app(client_id, client_secret)              # a service principal
        srv.allow("kv-test", client_id)                    # access policy
        srv.throttle(n, retry_after="1")                   # next n vault calls answer 429 (-1: all)
        srv.token_outage = True; srv.challenge_resource = "https://x"  # more failure knobs
        srv.calls["get_secret"], srv.token_requests         # counters and recorded token forms

Key Vault: ``GET /{secrets,keys,certificates}/{name}[/{version}]`` and ``.../versions`` (paged
with ``nextLink``, ``page_size`` per page), the 401 challenge ``WWW-Authenticate: Bearer
authorization="<authority><tenant>", resource="https://localhost:<port>"`` to unauthenticated
requests, bearer tokens checked against those the token endpoint issued (tenant, scope), 403 for
clients without access, KV-style ``{"error": {"code", "message"}}`` bodies.

Entra ID: ``POST /{tenant}/oauth2/v2.0/token`` (client credentials with ``client_assertion`` or
``client_secret``, AADSTS-style errors) and ``GET /{tenant}/v2.0/.well-known/openid-configuration``
for MSAL.

Vault hosts are ``<vault>.localhost``; while the server runs, ``socket.getaddrinfo`` resolves
``localhost`` and ``*.localhost`` to 127.0.0.1 (RFC 6761 loopback names, which this container's
resolver does not implement). Everything else resolves as usual. Bound to 127.0.0.1 only.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import secrets
import socket
import ssl
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import trustme

_COLLECTIONS = {"secrets": "secret", "keys": "key", "certificates": "certificate"}
_NOT_FOUND = {
    "secrets": "SecretNotFound",
    "keys": "KeyNotFound",
    "certificates": "CertificateNotFound",
}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class Version:
    id: str
    created: int
    enabled: bool
    body: dict[str, Any]  # collection-specific fields (value/contentType/kid, key, cer)


@dataclass
class Vault:
    name: str
    objects: dict[tuple[str, str], list[Version]] = field(default_factory=dict)
    allowed: set[str] = field(default_factory=set)


class AzureTestServer:
    def __init__(self, tenant: str, vaults: tuple[str, ...], page_size: int) -> None:
        self.tenant = tenant
        self.vaults = {v: Vault(v) for v in vaults}
        self.page_size = page_size
        self.port = 0
        self.ca_path = ""
        self.calls: Counter[str] = Counter()
        self.token_requests: list[dict[str, str]] = []
        self.federated: dict[str, set[str]] = {}
        self.apps: dict[str, str] = {}
        self.tokens: dict[str, tuple[str, str, str]] = {}  # access token -> (tenant, client, scope)
        self._throttle = 0
        self.retry_after = "1"
        self.challenge_resource = ""  # override the resource the 401 challenge names
        self.token_outage = False  # the token endpoint answers 503
        self._clock = itertools.count(1_700_000_000, 10)
        self.lock = threading.Lock()

    # --- setup API ----------------------------------------------------------------------------

    @property
    def authority(self) -> str:
        return f"https://localhost:{self.port}/"

    @property
    def resource(self) -> str:
        return f"https://localhost:{self.port}"

    def vault_url(self, vault: str) -> str:
        return f"https://{vault}.localhost:{self.port}/"

    @property
    def cloud_env_json(self) -> str:
        return json.dumps(
            {
                "name": "AzureStackCloud",
                "keyVaultDNSSuffix": f"localhost:{self.port}",
                "activeDirectoryEndpoint": self.authority,
                "keyVaultEndpoint": self.resource,
            }
        )

    def federate(self, client_id: str, assertion: str) -> None:
        self.federated.setdefault(client_id, set()).add(assertion)

    def add_app(self, client_id: str, client_secret: str) -> None:
        self.apps[client_id] = client_secret

    def allow(self, vault: str, client_id: str) -> None:
        self.vaults[vault].allowed.add(client_id)

    def throttle(self, n: int, retry_after: str = "1") -> None:
        """The next ``n`` authorized vault requests answer 429 (``-1``: all of them)."""
        self._throttle, self.retry_after = n, retry_after

    def _add(self, vault: str, coll: str, name: str, body: dict[str, Any], **kw: Any) -> str:
        created = kw.get("created")
        ver = Version(uuid.uuid4().hex, created or next(self._clock), kw.get("enabled", True), body)
        self.vaults[vault].objects.setdefault((coll, name), []).append(ver)
        return ver.id

    def add_secret(
        self,
        vault: str,
        name: str,
        value: str,
        *,
        content_type: str | None = None,
        kid: str | None = None,
        **kw: Any,
    ) -> str:
        body: dict[str, Any] = {"value": value}
        if content_type:
            body["contentType"] = content_type
        if kid:
            body["kid"] = kid
        return self._add(vault, "secrets", name, body, **kw)

    def add_key(self, vault: str, name: str, jwk: dict[str, Any], **kw: Any) -> str:
        return self._add(vault, "keys", name, {"key": jwk}, **kw)

    def add_certificate(self, vault: str, name: str, der: bytes, **kw: Any) -> str:
        return self._add(vault, "certificates", name, {"cer": der}, **kw)

    # --- request handling (called by the handler) -------------------------------------------

    def take_throttle(self) -> bool:
        with self.lock:
            if self._throttle == 0:
                return False
            if self._throttle > 0:
                self._throttle -= 1
            return True

    def issue(self, tenant: str, client_id: str, scope: str) -> str:
        tok = "at-" + secrets.token_hex(16)
        self.tokens[tok] = (tenant, client_id, scope)
        return tok


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _kv_error(self, status: int, code: str, message: str, **headers: str) -> None:
        self._send(status, {"error": {"code": code, "message": message}}, headers)

    def do_GET(self) -> None:
        st = self.server.state
        url = urlsplit(self.path)
        host = (self.headers.get("Host") or "").split(":")[0]
        if host == "localhost":
            parts = url.path.strip("/").split("/")
            if parts[1:] == ["v2.0", ".well-known", "openid-configuration"]:
                st.calls["openid"] += 1
                base = f"{st.authority}{parts[0]}"
                return self._send(
                    200,
                    {
                        "token_endpoint": f"{base}/oauth2/v2.0/token",
                        "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                        "issuer": f"{base}/v2.0",
                        "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
                    },
                )
            return self._send(404, {"error": "not_found"})
        vault = st.vaults.get(host.removesuffix(".localhost"))
        if vault is None:
            return self._kv_error(404, "VaultNotFound", f"no vault at {host}")
        auth = self.headers.get("Authorization", "")
        grant = st.tokens.get(auth.removeprefix("Bearer ")) if auth.startswith("Bearer ") else None
        if grant is None or grant[0] != st.tenant or grant[2] != st.resource + "/.default":
            st.calls["challenge"] += 1
            challenge = (
                f'Bearer authorization="{st.authority}{st.tenant}", '
                f'resource="{st.challenge_resource or st.resource}"'
            )
            return self._kv_error(
                401,
                "Unauthorized",
                "AKV10000: Request is missing a Bearer or PoP token.",
                **{"WWW-Authenticate": challenge},
            )
        if st.take_throttle():
            st.calls["throttled"] += 1
            return self._kv_error(
                429,
                "Throttled",
                "Request was not processed because too many requests were "
                "received. Reason: VaultRequestTypeLimitReached",
                **{"Retry-After": st.retry_after},
            )
        parts = url.path.strip("/").split("/")
        coll = parts[0] if parts else ""
        if coll not in _COLLECTIONS or len(parts) < 2:
            return self._kv_error(400, "BadParameter", "unsupported operation")
        name = parts[1]
        if grant[1] not in vault.allowed:
            st.calls["forbidden"] += 1
            perm = "list" if parts[2:] == ["versions"] else "get"
            return self._kv_error(
                403,
                "Forbidden",
                f"The user, group or application 'appid={grant[1]};oid=0000' does not have "
                f"{coll} {perm} permission on key vault '{vault.name};location=testregion'.",
            )
        versions = vault.objects.get((coll, name), [])
        if parts[2:] == ["versions"]:
            st.calls[f"list_{_COLLECTIONS[coll]}_versions"] += 1
            if not versions:
                return self._kv_error(404, _NOT_FOUND[coll], f"{name} was not found")
            return self._list(coll, name, versions, url.query)
        st.calls[f"get_{_COLLECTIONS[coll]}"] += 1
        wanted = parts[2] if len(parts) > 2 else ""
        ver = None
        if wanted:
            ver = next((v for v in versions if v.id == wanted), None)
        elif versions:
            ver = max(versions, key=lambda v: v.created)
        if ver is None:
            return self._kv_error(
                404,
                _NOT_FOUND[coll],
                f"A {_COLLECTIONS[coll]} with (name/id) {name}/{wanted} was not found in this key "
                "vault.",
            )
        if not ver.enabled:
            return self._kv_error(
                403,
                "Forbidden",
                f"Operation get is not allowed on a disabled {_COLLECTIONS[coll]}.",
            )
        self._send(200, self._bundle(coll, name, ver))

    def _id(self, coll: str, name: str, ver: Version) -> str:
        return f"{self.server.state.vault_url(self._vault())}{coll}/{name}/{ver.id}"

    def _vault(self) -> str:
        return (self.headers.get("Host") or "").split(":")[0].removesuffix(".localhost")

    def _attrs(self, ver: Version) -> dict[str, Any]:
        return {
            "enabled": ver.enabled,
            "created": ver.created,
            "updated": ver.created,
            "recoveryLevel": "Recoverable+Purgeable",
        }

    def _bundle(self, coll: str, name: str, ver: Version) -> dict[str, Any]:
        ident = self._id(coll, name, ver)
        if coll == "secrets":
            return {"id": ident, "attributes": self._attrs(ver), **ver.body}
        if coll == "keys":
            return {"key": {"kid": ident, **ver.body["key"]}, "attributes": self._attrs(ver)}
        der: bytes = ver.body["cer"]
        base = self.server.state.vault_url(self._vault())
        return {
            "id": ident,
            "kid": f"{base}keys/{name}/{ver.id}",
            "sid": f"{base}secrets/{name}/{ver.id}",
            "x5t": b64url(hashlib.sha1(der).digest()),
            "cer": base64.b64encode(der).decode(),
            "attributes": self._attrs(ver),
        }

    def _list(self, coll: str, name: str, versions: list[Version], query: str) -> None:
        st = self.server.state
        start = int(parse_qs(query).get("$skiptoken", ["0"])[0])
        page = versions[start : start + st.page_size]
        items = []
        for ver in page:
            ident = self._id(coll, name, ver)
            item: dict[str, Any] = {"attributes": self._attrs(ver)}
            item["kid" if coll == "keys" else "id"] = ident
            if coll == "secrets" and "contentType" in ver.body:
                item["contentType"] = ver.body["contentType"]
            items.append(item)
        nxt = None
        if start + st.page_size < len(versions):
            nxt = (
                f"{st.vault_url(self._vault())}{coll}/{name}/versions?api-version=7.6"
                f"&$skiptoken={start + st.page_size}"
            )
        self._send(200, {"value": items, "nextLink": nxt})

    def do_POST(self) -> None:
        st = self.server.state
        length = int(self.headers.get("Content-Length") or 0)
        form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
        parts = urlsplit(self.path).path.strip("/").split("/")
        if parts[1:] != ["oauth2", "v2.0", "token"]:
            return self._send(404, {"error": "not_found"})
        st.calls["token"] += 1
        if st.token_outage:
            return self._send(
                503,
                {
                    "error": "temporarily_unavailable",
                    "error_description": "AADSTS90033: A transient error has "
                    "occurred. Please try again.",
                },
            )
        tenant = parts[0]
        st.token_requests.append({"tenant": tenant, **form})

        def aad(status: int, error: str, desc: str) -> None:
            self._send(
                status,
                {
                    "error": error,
                    "error_description": desc,
                    "error_codes": [int(desc[6 : desc.index(":")])],
                },
            )

        if tenant != st.tenant:
            return aad(400, "invalid_request", f"AADSTS90002: Tenant '{tenant}' not found.")
        client = form.get("client_id", "")
        if client not in st.federated and client not in st.apps:
            return aad(
                400,
                "unauthorized_client",
                f"AADSTS700016: Application with identifier "
                f"'{client}' was not found in the directory '{tenant}'.",
            )
        if "client_assertion" in form:
            if form.get("client_assertion_type") != (
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
            ) or form["client_assertion"] not in st.federated.get(client, set()):
                return aad(
                    401,
                    "invalid_client",
                    "AADSTS70021: No matching federated identity "
                    "record found for presented assertion.",
                )
        elif "client_secret" in form:
            if st.apps.get(client) != form["client_secret"]:
                return aad(401, "invalid_client", "AADSTS7000215: Invalid client secret provided.")
        else:
            return aad(
                400,
                "invalid_request",
                "AADSTS900144: The request body must contain client_secret or client_assertion.",
            )
        scope = form.get("scope", "").split(" ")[0]
        tok = st.issue(tenant, client, scope)
        self._send(
            200,
            {
                "token_type": "Bearer",
                "expires_in": 3599,
                "ext_expires_in": 3599,
                "access_token": tok,
            },
        )


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: AzureTestServer


@contextlib.contextmanager
def loopback_localhost() -> Iterator[None]:
    """Resolve ``localhost`` and ``*.localhost`` to 127.0.0.1 in this process (RFC 6761)."""
    real = socket.getaddrinfo

    def resolve(host: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, str) and (host == "localhost" or host.endswith(".localhost")):
            host = "127.0.0.1"
        return real(host, *args, **kwargs)

    socket.getaddrinfo = resolve
    try:
        yield
    finally:
        socket.getaddrinfo = real


@contextlib.contextmanager
def serve(
    ca_dir: Path,
    *,
    vaults: tuple[str, ...] = ("kv-test",),
    tenant: str = "tenant-1",
    page_size: int = 2,
) -> Iterator[AzureTestServer]:
    state = AzureTestServer(tenant, vaults, page_size)
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1", *(f"{v}.localhost" for v in vaults))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    ca_path = ca_dir / "azure-test-ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    state.ca_path = str(ca_path)
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.state = state
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    state.port = httpd.server_address[1]
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    with loopback_localhost():
        thread.start()
        try:
            yield state
        finally:
            httpd.shutdown()
            httpd.server_close()
            thread.join(5)
