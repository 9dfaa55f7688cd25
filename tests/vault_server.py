"""A small HashiCorp Vault API server for tests, speaking real HTTP/JSON on 127.0.0.1.

Start it with :func:`run_vault_server` (a context manager)::

    with run_vault_server() as vault:                     # http://127.0.0.1:<port>
        vault.url
        vault.add_role("app", jwts={"jwt-app"}, policies=["secret/data/*"])   # kubernetes auth
        vault.put_kv2("secret", "app", {"password": "s3cret"})                 # -> version 1
        vault.put_kv1("kv", "app", {"user": "me"})
        vault.add_db_role("database", "app", ttl=3600)    # GET database/creds/app: new creds each
        vault.add_db_role("database", "short", ttl=3, max_ttl=5)  # renewals capped at 5 s of age
        vault.add_pki_role("pki", "web", generate_lease=True)   # PUT/POST pki/issue/web
        vault.add_token("root", policies=["*"])           # a token for standalone-mode tests
        vault.grant("app", "sys/leases/revoke")           # extend a role's policy (live)
        vault.sealed = True                               # every request: 503 "Vault is sealed"
        vault.inject(500, errors=["boom"], count=1)       # the next request(s) get this answer
        vault.revoke_token(token); vault.advance(seconds)  # token/lease expiry on a test clock
        vault.calls["GET secret/data/app"], vault.requests[-1].namespace   # what was asked
        vault.logins, vault.issued_leases, vault.renewed_leases, vault.revoked_leases
        vault.issued_at[lease], vault.revoked_at[lease], vault.issued_data[lease]  # server clock

    tls = make_tls(tmp_path, client_auth=True)            # trustme CA, server + client certs
    with run_vault_server(tls=tls) as vault:              # https://127.0.0.1:<port>
        tls.ca_path, tls.ca_dir, tls.client_cert_path, tls.client_key_path

What it implements: ``POST auth/<mount>/login {role, jwt}`` (the role's accepted JWTs are fixed
strings: 400 ``invalid role name``, 403 ``permission denied``), ``X-Vault-Token`` checks with
glob-path policies (``sys/leases/renew`` and ``auth/token/renew-self`` are always allowed, like
Vault's default policy; ``sys/leases/revoke`` must be granted), ``X-Vault-Namespace`` (roles,
tokens, mounts and data live in a namespace), KV v1 (GET, LIST) and KV v2 (``data/<path>``,
``?version=N``), database-style ``creds/<role>`` and PKI-style ``issue/<role>`` endpoints that
answer new material on every call, ``sys/leases/renew`` / ``sys/leases/revoke``,
``auth/token/renew-self``. Leases die when they expire or their token does (as in Vault). A
database role's ``max_ttl`` (default: Vault's system maximum, 32 days) caps renewals as Vault
does: ``sys/leases/renew`` grants ``min(increment, max_ttl - age)`` seconds (truncated, with
Vault's "capped" warning), and past ``max_ttl`` the lease is gone (400 ``lease not found or lease
is not renewable``). Error bodies are Vault's ``{"errors": [...]}``.
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import json
import secrets
import ssl
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import trustme

# Vault's default system max TTL (768h): what caps a lease whose role sets no max_ttl.
SYSTEM_MAX_TTL = 32 * 86400

# --- TLS ------------------------------------------------------------------------------------------


@dataclass
class ServerTLS:
    ca_path: str  # PEM of the CA that signed the server certificate
    ca_dir: str  # a directory holding only that CA (for vaultCADirectory)
    context: ssl.SSLContext  # the server's context
    client_cert_path: str | None = None  # a client certificate the server accepts
    client_key_path: str | None = None


def make_tls(
    directory: Path,
    *,
    names: tuple[str, ...] = ("127.0.0.1", "localhost"),
    client_auth: bool = False,
) -> ServerTLS:
    """A trustme CA and a server certificate for ``names``; with ``client_auth`` the server also
    demands a client certificate from a second CA, and one is written for the client."""
    ca = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(ctx)
    ca_path = directory / "vault-ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    ca_dir = directory / "vault-ca.d"
    ca_dir.mkdir(exist_ok=True)
    ca.cert_pem.write_to_path(str(ca_dir / "ca.pem"))
    tls = ServerTLS(str(ca_path), str(ca_dir), ctx)
    if client_auth:
        client_ca = trustme.CA()
        client_ca.configure_trust(ctx)
        ctx.verify_mode = ssl.CERT_REQUIRED
        leaf = client_ca.issue_cert("secretfs-client")
        tls.client_cert_path = str(directory / "client.pem")
        tls.client_key_path = str(directory / "client.key")
        leaf.cert_chain_pems[0].write_to_path(tls.client_cert_path)
        leaf.private_key_pem.write_to_path(tls.client_key_path)
    return tls


# --- state ----------------------------------------------------------------------------------------


@dataclass
class Role:
    jwts: set[str]
    policies: list[str]
    ttl: int


@dataclass
class TokenInfo:
    namespace: str
    policies: list[str]
    ttl: int
    expires: float | None  # None: never


@dataclass
class LeaseInfo:
    path: str
    token: str
    ttl: int
    renewable: bool
    expires: float
    issued: float = 0.0
    max_ttl: int = SYSTEM_MAX_TTL


@dataclass
class Recorded:
    method: str
    path: str  # without /v1/
    query: dict[str, list[str]]
    namespace: str
    token: str | None
    body: Any


@dataclass
class _Injected:
    status: int
    body: bytes
    content_type: str
    count: int
    path: str | None


def _uid() -> str:
    return str(uuid.uuid4())


class VaultError(Exception):
    def __init__(self, status: int, *errors: str) -> None:
        self.status = status
        self.errors = list(errors)


class VaultTestServer:
    """State and knobs; see the module docstring."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.url = ""
        self.sealed = False
        self._offset = 0.0
        self.mounts: dict[tuple[str, str], str] = {}  # (namespace, mount) -> kind
        self.roles: dict[tuple[str, str, str], Role] = {}  # (namespace, auth mount, role)
        self.tokens: dict[str, TokenInfo] = {}
        self.kv1: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.kv2: dict[tuple[str, str, str], list[tuple[dict[str, Any], str]]] = {}
        self.kv2_custom: dict[tuple[str, str, str], dict[str, str] | None] = {}
        self.db_roles: dict[tuple[str, str, str], tuple[int, bool, int]] = {}  # ttl, renew, max
        self.pki_roles: dict[tuple[str, str, str], tuple[int, bool]] = {}
        self.leases: dict[str, LeaseInfo] = {}
        self.calls: Counter[str] = Counter()
        self.requests: list[Recorded] = []
        self.logins: list[tuple[str, str]] = []  # (role, jwt)
        self.issued_leases: list[str] = []
        self.renewed_leases: list[str] = []
        self.revoked_leases: list[str] = []
        # Server-clock times of each lease's issue and revocation, and the data it was issued with.
        self.issued_at: dict[str, float] = {}
        self.revoked_at: dict[str, float] = {}
        self.issued_data: dict[str, dict[str, Any]] = {}
        self.renewed_tokens: list[str] = []
        self._injected: list[_Injected] = []
        self.server_errors: list[str] = []

    # knobs
    def now(self) -> float:
        return time.monotonic() + self._offset

    def advance(self, seconds: float) -> None:
        with self.lock:
            self._offset += seconds

    def mount(self, path: str, kind: str, namespace: str = "") -> None:
        assert kind in ("kv1", "kv2", "database", "pki")
        with self.lock:
            self.mounts[(namespace, path.strip("/"))] = kind

    def add_role(
        self,
        role: str,
        *,
        jwts: set[str],
        policies: list[str],
        mount: str = "kubernetes",
        namespace: str = "",
        ttl: int = 3600,
    ) -> None:
        with self.lock:
            self.roles[(namespace, mount, role)] = Role(set(jwts), list(policies), ttl)

    def grant(
        self, role: str, pattern: str, *, mount: str = "kubernetes", namespace: str = ""
    ) -> None:
        """Allow ``pattern`` to a role, for its existing tokens too."""
        with self.lock:
            self.roles[(namespace, mount, role)].policies.append(pattern)

    def add_token(
        self, token: str, *, policies: list[str] | None = None, namespace: str = "", ttl: int = 0
    ) -> None:
        with self.lock:
            expires = self.now() + ttl if ttl else None
            self.tokens[token] = TokenInfo(namespace, list(policies or ["*"]), ttl, expires)

    def revoke_token(self, token: str) -> None:
        with self.lock:
            self.tokens.pop(token, None)

    def put_kv1(self, mount: str, path: str, data: dict[str, Any], namespace: str = "") -> None:
        with self.lock:
            self.mounts.setdefault((namespace, mount), "kv1")
            self.kv1[(namespace, mount, path)] = dict(data)

    def put_kv2(
        self,
        mount: str,
        path: str,
        data: dict[str, Any],
        namespace: str = "",
        custom_metadata: dict[str, str] | None = None,
    ) -> int:
        with self.lock:
            self.mounts.setdefault((namespace, mount), "kv2")
            versions = self.kv2.setdefault((namespace, mount, path), [])
            created = time.strftime("%Y-%m-%dT%H:%M:%S.000000000Z", time.gmtime())
            versions.append((dict(data), created))
            self.kv2_custom[(namespace, mount, path)] = custom_metadata
            return len(versions)

    def add_db_role(
        self,
        mount: str,
        role: str,
        *,
        ttl: int = 3600,
        renewable: bool = True,
        max_ttl: int = 0,
        namespace: str = "",
    ) -> None:
        """``max_ttl`` 0: the system maximum. Vault refuses a role whose ttl exceeds its max_ttl."""
        max_ttl = max_ttl or SYSTEM_MAX_TTL
        assert ttl <= max_ttl, "ttl cannot be greater than max_ttl"
        with self.lock:
            self.mounts.setdefault((namespace, mount), "database")
            self.db_roles[(namespace, mount, role)] = (ttl, renewable, max_ttl)

    def add_pki_role(
        self,
        mount: str,
        role: str,
        *,
        ttl: int = 3600,
        generate_lease: bool = False,
        namespace: str = "",
    ) -> None:
        with self.lock:
            self.mounts.setdefault((namespace, mount), "pki")
            self.pki_roles[(namespace, mount, role)] = (ttl, generate_lease)

    def inject(
        self,
        status: int,
        *,
        errors: list[str] | None = None,
        body: bytes | None = None,
        content_type: str = "application/json",
        count: int = 1,
        path: str | None = None,
    ) -> None:
        """Answer the next ``count`` requests (to ``path`` if given) with this instead."""
        raw = body if body is not None else json.dumps({"errors": errors or []}).encode()
        with self.lock:
            self._injected.append(_Injected(status, raw, content_type, count, path))

    def lease_alive(self, lease_id: str) -> bool:
        with self.lock:
            return self._lease(lease_id) is not None

    # internals
    def _token_alive(self, token: str) -> TokenInfo | None:
        info = self.tokens.get(token)
        if info is None or (info.expires is not None and info.expires <= self.now()):
            return None
        return info

    def _lease(self, lease_id: str) -> LeaseInfo | None:
        lease = self.leases.get(lease_id)
        if lease is None or lease.expires <= self.now() or not self._token_alive(lease.token):
            return None
        return lease

    def _take_injected(self, path: str) -> _Injected | None:
        for inj in self._injected:
            if inj.path is None or inj.path == path:
                inj.count -= 1
                if inj.count <= 0:
                    self._injected.remove(inj)
                return inj
        return None

    def _new_lease(
        self,
        path: str,
        token: str,
        ttl: int,
        renewable: bool,
        data: dict[str, Any],
        max_ttl: int = SYSTEM_MAX_TTL,
    ) -> str:
        lease_id = f"{path}/{secrets.token_urlsafe(12)}"
        now = self.now()
        self.leases[lease_id] = LeaseInfo(path, token, ttl, renewable, now + ttl, now, max_ttl)
        self.issued_leases.append(lease_id)
        self.issued_at[lease_id] = now
        self.issued_data[lease_id] = data
        return lease_id

    # --- request handling (under self.lock) -------------------------------------------------------

    def handle(self, rec: Recorded) -> tuple[int, dict[str, Any] | None]:
        ns, path, method = rec.namespace, rec.path, rec.method
        if self.sealed:
            raise VaultError(503, "Vault is sealed")
        if path.startswith("auth/") and path.endswith("/login") and method in ("POST", "PUT"):
            return 200, self._login(ns, path[len("auth/") : -len("/login")], rec.body)
        info = self._token_alive(rec.token or "")
        if info is None or info.namespace != ns:
            raise VaultError(403, "permission denied")
        token = rec.token or ""
        if path == "auth/token/renew-self" and method in ("POST", "PUT"):
            return 200, self._renew_self(token, info, rec.body)
        if path == "sys/leases/renew" and method in ("POST", "PUT"):
            return 200, self._renew_lease(rec.body)
        if not any(fnmatch.fnmatchcase(path, p) for p in info.policies):
            raise VaultError(403, "1 error occurred:\n\t* permission denied\n\n")
        if path == "sys/leases/revoke" and method in ("POST", "PUT"):
            lease_id = str((rec.body or {}).get("lease_id", ""))
            if self.leases.pop(lease_id, None) is not None:
                self.revoked_leases.append(lease_id)
                self.revoked_at[lease_id] = self.now()
            return 204, None
        for (mns, mount), kind in sorted(self.mounts.items(), key=lambda m: -len(m[0][1])):
            if mns == ns and (path == mount or path.startswith(mount + "/")):
                return self._engine(kind, ns, mount, path[len(mount) + 1 :], rec, token)
        raise VaultError(404, f'no handler for route "{path}". route entry not found.')

    def _response(
        self,
        data: Any,
        *,
        lease_id: str = "",
        ttl: int = 0,
        renewable: bool = False,
        auth: Any = None,
        warnings: list[str] | None = None,
    ) -> dict[str, Any]:
        return {
            "request_id": _uid(),
            "lease_id": lease_id,
            "renewable": renewable,
            "lease_duration": ttl,
            "data": data,
            "wrap_info": None,
            "warnings": warnings,
            "auth": auth,
        }

    def _login(self, ns: str, mount: str, body: Any) -> dict[str, Any]:
        body = body if isinstance(body, dict) else {}
        name, jwt = str(body.get("role") or ""), str(body.get("jwt") or "")
        if not any(k[0] == ns and k[1] == mount for k in self.roles):
            raise VaultError(
                404, f'no handler for route "auth/{mount}/login". route entry not found.'
            )
        if not name:
            raise VaultError(400, "missing role")
        role = self.roles.get((ns, mount, name))
        if role is None:
            raise VaultError(400, f'invalid role name "{name}"')
        if jwt not in role.jwts:
            raise VaultError(403, "permission denied")
        token = "hvs." + secrets.token_urlsafe(18)
        # The role's list itself: grant() changes what existing tokens may do, like a Vault policy.
        self.tokens[token] = TokenInfo(ns, role.policies, role.ttl, self.now() + role.ttl)
        self.logins.append((name, jwt))
        auth = {
            "client_token": token,
            "accessor": secrets.token_urlsafe(12),
            "policies": ["default", *role.policies],
            "token_policies": ["default", *role.policies],
            "metadata": {"role": name, "service_account_name": "app"},
            "lease_duration": role.ttl,
            "renewable": True,
            "entity_id": _uid(),
            "token_type": "service",
            "orphan": True,
            "mfa_requirement": None,
            "num_uses": 0,
        }
        return self._response(None, auth=auth)

    def _renew_self(self, token: str, info: TokenInfo, body: Any) -> dict[str, Any]:
        inc = int((body or {}).get("increment") or info.ttl) if isinstance(body, dict) else info.ttl
        if info.expires is not None:
            info.expires = self.now() + inc
        self.renewed_tokens.append(token)
        auth = {
            "client_token": token,
            "policies": info.policies,
            "lease_duration": inc,
            "renewable": True,
        }
        return self._response(None, auth=auth)

    def _renew_lease(self, body: Any) -> dict[str, Any]:
        body = body if isinstance(body, dict) else {}
        lease_id = str(body.get("lease_id") or "")
        lease = self._lease(lease_id)
        if lease is None:  # expired (past its TTL or max_ttl), revoked, or never issued
            raise VaultError(400, "lease not found or lease is not renewable")
        if not lease.renewable:
            raise VaultError(400, "lease is not renewable")
        inc = int(body.get("increment") or lease.ttl)
        now = self.now()
        left = lease.issued + lease.max_ttl - now
        warnings = None
        if inc > left:  # Vault caps the TTL at what max_ttl leaves and says so
            warnings = [
                f'TTL of "{inc}s" exceeded the effective max_ttl of "{int(left)}s"; TTL value '
                "is capped accordingly"
            ]
            lease.expires, granted = now + left, int(left)
        else:
            lease.expires, granted = now + inc, inc
        self.renewed_leases.append(lease_id)
        return self._response(
            None, lease_id=lease_id, ttl=granted, renewable=True, warnings=warnings
        )

    def _engine(
        self, kind: str, ns: str, mount: str, rest: str, rec: Recorded, token: str
    ) -> tuple[int, dict[str, Any]]:
        m = rec.method
        if kind == "kv1":
            if m == "LIST" or rec.query.get("list") == ["true"]:
                prefix = rest.rstrip("/") + "/" if rest else ""
                keys = sorted(
                    {
                        k[2][len(prefix) :].split("/")[0]
                        + ("/" if "/" in k[2][len(prefix) :] else "")
                        for k in self.kv1
                        if k[:2] == (ns, mount) and k[2].startswith(prefix)
                    }
                )
                if not keys:
                    raise VaultError(404)
                return 200, self._response({"keys": keys})
            if m != "GET":
                raise VaultError(405, "unsupported operation")
            data = self.kv1.get((ns, mount, rest))
            if data is None:
                raise VaultError(404)
            return 200, self._response(data, ttl=2764800)
        if kind == "kv2":
            if not rest.startswith("data/") or m != "GET":
                raise VaultError(405, "unsupported operation")
            key = (ns, mount, rest[len("data/") :])
            versions = self.kv2.get(key)
            wanted = int((rec.query.get("version") or ["0"])[0])
            if not versions or wanted > len(versions):
                raise VaultError(404)
            n = wanted or len(versions)
            data, created = versions[n - 1]
            meta = {
                "created_time": created,
                "custom_metadata": self.kv2_custom.get(key),
                "deletion_time": "",
                "destroyed": False,
                "version": n,
            }
            return 200, self._response({"data": data, "metadata": meta})
        if kind == "database":
            role = rest.removeprefix("creds/")
            if not rest.startswith("creds/") or m != "GET":
                raise VaultError(405, "unsupported operation")
            spec = self.db_roles.get((ns, mount, role))
            if spec is None:
                raise VaultError(400, f"unknown role: {role}")
            ttl, renewable, max_ttl = spec
            data = {
                "username": f"v-k8s-{role}-{secrets.token_hex(6)}",
                "password": secrets.token_urlsafe(15),
            }
            lease_id = self._new_lease(
                f"{mount}/creds/{role}", token, ttl, renewable, data, max_ttl
            )
            return 200, self._response(data, lease_id=lease_id, ttl=ttl, renewable=renewable)
        # pki
        role = rest.removeprefix("issue/")
        if not rest.startswith("issue/") or m not in ("PUT", "POST"):
            raise VaultError(405, "unsupported operation")
        pki = self.pki_roles.get((ns, mount, role))
        if pki is None:
            raise VaultError(400, f"unknown role: {role}")
        body = rec.body if isinstance(rec.body, dict) else {}
        if not body.get("common_name"):
            raise VaultError(
                400,
                "the common_name field is required, or must be provided in a "
                'CSR with "use_csr_common_name" set to true, unless "require_cn" '
                "is set to false",
            )
        ttl, lease = pki

        def pem(kind: str) -> str:
            blob = base64.b64encode(secrets.token_bytes(48) + body["common_name"].encode())
            return f"-----BEGIN {kind}-----\n{blob.decode()}\n-----END {kind}-----"

        ca = "-----BEGIN CERTIFICATE-----\nVEVTVCBDQQ==\n-----END CERTIFICATE-----"
        data = {
            "certificate": pem("CERTIFICATE"),
            "issuing_ca": ca,
            "ca_chain": [ca],
            "private_key": pem("RSA PRIVATE KEY"),
            "private_key_type": "rsa",
            "serial_number": ":".join(secrets.token_hex(1) for _ in range(16)),
            "expiration": int(time.time()) + ttl,
        }
        lease_id = (
            self._new_lease(f"{mount}/issue/{role}", token, ttl, False, data) if lease else ""
        )
        return 200, self._response(data, lease_id=lease_id, ttl=ttl if lease else 0)


# --- HTTP -----------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _serve(self) -> None:
        vault = self.server.vault
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        if not url.path.startswith("/v1/"):
            self._send(404, b'{"errors":[]}', "application/json")
            return
        rec = Recorded(
            method=self.command,
            path=url.path[len("/v1/") :],
            query=parse_qs(url.query, keep_blank_values=True),
            namespace=(self.headers.get("X-Vault-Namespace") or "").strip("/"),
            token=self.headers.get("X-Vault-Token"),
            body=body,
        )
        with vault.lock:
            vault.requests.append(rec)
            vault.calls[f"{rec.method} {rec.path}"] += 1
            inj = vault._take_injected(rec.path)
            if inj is not None:
                self._send(inj.status, inj.body, inj.content_type)
                return
            try:
                status, answer = vault.handle(rec)
            except VaultError as err:
                status, answer = err.status, {"errors": err.errors}
            except Exception as exc:  # a bug in this server: make it visible to the test
                vault.server_errors.append(repr(exc))
                status, answer = 500, {"errors": [f"test server bug: {exc!r}"]}
        out = b"" if answer is None else json.dumps(answer).encode()
        self._send(status, out, "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        if status != 204:
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if status != 204:
            self.wfile.write(body)

    do_GET = do_PUT = do_POST = do_LIST = do_DELETE = _serve


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    vault: VaultTestServer

    def finish_request(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            try:
                request.do_handshake()
            except (OSError, ssl.SSLError):
                return  # a client that failed TLS (tests for exactly that)
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients hanging up mid-request are not test failures


@contextlib.contextmanager
def run_vault_server(tls: ServerTLS | None = None) -> Iterator[VaultTestServer]:
    """A running server on 127.0.0.1 and a free port; stopped on exit."""
    vault = VaultTestServer()
    httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
    httpd.vault = vault
    scheme = "http"
    if tls is not None:
        httpd.socket = tls.context.wrap_socket(
            httpd.socket, server_side=True, do_handshake_on_connect=False
        )
        scheme = "https"
    vault.url = f"{scheme}://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(
        target=httpd.serve_forever, args=(0.05,), name="vault-test-server", daemon=True
    )
    thread.start()
    try:
        yield vault
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)
