"""Google Cloud test doubles speaking the real wire protocols, on 127.0.0.1 only.

- Secret Manager: a gRPC server (TLS) implementing
  ``google.cloud.secretmanager.v1.SecretManagerService/AccessSecretVersion`` with the protobuf
  messages shipped in google-cloud-secret-manager. A second instance plays a regional endpoint.
- Security Token Service ``POST /v1/token`` (RFC 8693 form body) and IAM Credentials
  ``POST /v1/projects/-/serviceAccounts/<email>:generateAccessToken`` (JSON), over HTTPS.
- The GKE metadata server (plain HTTP, ``Metadata-Flavor: Google``): project id, cluster name and
  location.

Start API::

    with GcpServers.start(tmp_dir) as gcp:        # tmp_dir receives ca.pem (the trustme CA)
        provider = GcpProvider(gcp.settings())     # endpoints, CA file, project and cluster set
        gcp.add_secret("projects/p/secrets/db", b"v1", b"v2")  # versions 1 and 2
        tok = gcp.pod_token("ns", "ksa")           # a pod token for audience gcp.pool
        gcp.bind("ns", "ksa", "projects/p/secrets/db")          # grant access to the pod principal
        gcp.allow_impersonation("gsa@p.iam.gserviceaccount.com", "ns", "ksa")

Knobs on ``gcp.state`` (under ``state.lock`` when threads may run): ``sm_fail``/``sts_fail``/
``iam_fail`` (status codes answered by the next calls, popped in order), ``sts_echo_token``
(the STS error echoes the subject token, to test scrubbing), ``sts_expires_in``,
``iam_expire_in``. Counters: ``sm_calls`` (names; one list per server, ``gcp.global_sm`` and
``gcp.regional_sm``), ``sts_calls`` (form bodies), ``iam_calls`` (paths, bodies),
``metadata_calls``.
"""

from __future__ import annotations

import contextlib
import datetime
import http.server
import json
import re
import ssl
import threading
import urllib.parse
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import trustme
from google.cloud.secretmanager_v1 import types as sm_types

from providers.gcp.settings import CLOUD_PLATFORM_SCOPE, GcpSettings

PROJECT = "test-project"
PROJECT_NUMBER = "123456789"
LOCATION = "europe-west1"
CLUSTER = "c1"
CLUSTER_LOCATION = "us-central1"
POOL = f"{PROJECT}.svc.id.goog"
STS_AUDIENCE = (
    f"identitynamespace:{POOL}:https://container.googleapis.com/v1/projects/{PROJECT}"
    f"/locations/{CLUSTER_LOCATION}/clusters/{CLUSTER}"
)
_METHOD = "/google.cloud.secretmanager.v1.SecretManagerService/AccessSecretVersion"
_REQ = sm_types.AccessSecretVersionRequest.pb()
_RESP = sm_types.AccessSecretVersionResponse.pb()
_NAME = re.compile(r"^projects/([^/]+)/(?:locations/([^/]+)/)?secrets/([^/]+)/versions/([^/]+)$")


@dataclass
class State:
    lock: threading.Lock = field(default_factory=threading.Lock)
    secrets: dict[str, list[bytes]] = field(default_factory=dict)  # "projects/p/secrets/s" ->
    grants: dict[str, set[str]] = field(default_factory=dict)  # secret -> principals
    pod_tokens: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # tok->(aud,ns,ksa)
    access_tokens: dict[str, str] = field(default_factory=dict)  # token -> principal
    token_creators: dict[str, set[str]] = field(default_factory=dict)  # gsa -> principals
    expected_audience: str = STS_AUDIENCE
    sm_fail: list[grpc.StatusCode] = field(default_factory=list)
    sts_fail: list[int] = field(default_factory=list)
    iam_fail: list[int] = field(default_factory=list)
    sts_echo_token: bool = False
    sts_expires_in: int = 3600
    iam_expire_in: int = 3600
    sts_calls: list[dict[str, str]] = field(default_factory=list)
    iam_calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    metadata_calls: list[str] = field(default_factory=list)
    issued: int = 0

    def new_token(self, prefix: str, principal: str) -> str:
        self.issued += 1
        token = f"{prefix}-{self.issued}-secret-token"
        self.access_tokens[token] = principal
        return token


def pod_principal(ns: str, ksa: str) -> str:
    return f"principal://iam.googleapis.com/{POOL}/subject/ns/{ns}/sa/{ksa}"


# --- Secret Manager (gRPC) ------------------------------------------------------------------------


class SecretManagerServer:
    """One Secret Manager endpoint; ``location`` None serves global secrets only."""

    def __init__(self, state: State, location: str | None, creds: grpc.ServerCredentials) -> None:
        self.state = state
        self.location = location
        self.sm_calls: list[str] = []
        self.server = grpc.server(futures.ThreadPoolExecutor(8))
        handler = grpc.method_handlers_generic_handler(
            "google.cloud.secretmanager.v1.SecretManagerService",
            {
                "AccessSecretVersion": grpc.unary_unary_rpc_method_handler(
                    self._access,
                    request_deserializer=_REQ.FromString,
                    response_serializer=_RESP.SerializeToString,
                )
            },
        )
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_secure_port("127.0.0.1:0", creds)
        self.server.start()

    def _access(self, request: Any, context: grpc.ServicerContext) -> Any:
        name = request.name
        st = self.state
        auth = dict(context.invocation_metadata()).get("authorization", "")
        with st.lock:
            self.sm_calls.append(name)
            if st.sm_fail:
                code = st.sm_fail.pop(0)
                context.abort(code, f"injected {code.name}")
            principal = st.access_tokens.get(auth.removeprefix("Bearer "))
            if not auth.startswith("Bearer ") or principal is None:
                context.abort(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "Request had invalid authentication credentials.",
                )
            m = _NAME.match(name)
            if m is None or m.group(2) != self.location:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"Invalid resource name [{name}]")
            assert m is not None  # abort() raised otherwise
            project, _, secret, version = m.groups()
            key = (
                f"projects/{project}/"
                + (f"locations/{self.location}/" if self.location else "")
                + f"secrets/{secret}"
            )
            if principal not in st.grants.get(key, set()):
                context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"Permission 'secretmanager.versions.access' denied for resource '{name}' "
                    "(or it may not exist).",
                )
            versions = st.secrets.get(key)
            n = len(versions or ()) if version == "latest" else int(version or 0)
            if not versions or not 1 <= n <= len(versions):
                context.abort(grpc.StatusCode.NOT_FOUND, f"Secret Version [{name}] not found.")
            assert versions is not None
            data = versions[n - 1]
        resolved = key.replace(f"projects/{project}/", f"projects/{PROJECT_NUMBER}/", 1)
        return _RESP(name=f"{resolved}/versions/{n}", payload={"data": data})


# --- STS, IAM Credentials, metadata (HTTP) --------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    state: State

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self, status: int, body: object, headers: dict[str, str] | None = None) -> None:
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_GET(self) -> None:
        st = self.state
        values = {
            "/computeMetadata/v1/project/project-id": PROJECT,
            "/computeMetadata/v1/instance/attributes/cluster-name": CLUSTER,
            "/computeMetadata/v1/instance/attributes/cluster-location": CLUSTER_LOCATION,
        }
        path = self.path.split("?")[0]
        with st.lock:
            st.metadata_calls.append(path)
        if self.headers.get("Metadata-Flavor") != "Google" or path not in values:
            self._reply(404, "not found")
            return
        data = values[path].encode()
        self.send_response(200)
        self.send_header("Metadata-Flavor", "Google")
        self.send_header("Content-Type", "application/text")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        if self.path == "/v1/token":
            self._sts()
        elif self.path.startswith("/v1/projects/-/serviceAccounts/"):
            self._iam()
        else:
            self._reply(404, {"error": {"code": 404, "message": "no such method"}})

    def _sts(self) -> None:
        st = self.state
        form = dict(urllib.parse.parse_qsl(self._body().decode()))
        with st.lock:
            st.sts_calls.append(form)
            if st.sts_fail:
                status = st.sts_fail.pop(0)
                self._reply(status, {"error": "rate_limit_exceeded" if status == 429 else "x"})
                return
            subject = form.get("subject_token", "")
            pod = st.pod_tokens.get(subject)

            def reject(desc: str) -> None:
                if st.sts_echo_token:
                    desc += f" (token {subject})"
                self._reply(400, {"error": "invalid_grant", "error_description": desc})

            if (
                form.get("grant_type") != "urn:ietf:params:oauth:grant-type:token-exchange"
                or form.get("subject_token_type") != "urn:ietf:params:oauth:token-type:jwt"
                or form.get("requested_token_type")
                != "urn:ietf:params:oauth:token-type:access_token"
                or form.get("scope") != CLOUD_PLATFORM_SCOPE
            ):
                reject("malformed token exchange request")
            elif form.get("audience") != st.expected_audience:
                reject(f"The audience {form.get('audience')} is not a known pool provider.")
            elif pod is None:
                reject("The subject token is invalid or expired.")
            else:
                _, ns, ksa = pod
                token = st.new_token("fed", pod_principal(ns, ksa))
                self._reply(
                    200,
                    {
                        "access_token": token,
                        "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
                        "token_type": "Bearer",
                        "expires_in": st.sts_expires_in,
                    },
                )

    def _iam(self) -> None:
        st = self.state
        path = self.path
        m = re.match(r"^/v1/projects/-/serviceAccounts/([^/:]+):generateAccessToken$", path)
        body = json.loads(self._body() or b"{}")
        auth = self.headers.get("Authorization", "")
        with st.lock:
            st.iam_calls.append((path, body))
            if st.iam_fail:
                status = st.iam_fail.pop(0)
                self._reply(status, {"error": {"code": status, "message": "injected"}})
                return
            caller = st.access_tokens.get(auth.removeprefix("Bearer "))
            if m is None:
                self._reply(404, {"error": {"code": 404, "message": "not found"}})
            elif caller is None:
                self._reply(401, {"error": {"code": 401, "message": "invalid credentials"}})
            elif caller not in st.token_creators.get(
                m.group(1), set()
            ) or CLOUD_PLATFORM_SCOPE not in (body.get("scope") or []):
                self._reply(
                    403,
                    {
                        "error": {
                            "code": 403,
                            "message": "Permission 'iam.serviceAccounts.getAccessToken' denied "
                            "on resource (or it may not exist).",
                            "status": "PERMISSION_DENIED",
                        }
                    },
                )
            else:
                token = st.new_token("gsa", f"serviceAccount:{m.group(1)}")
                expire = datetime.datetime.now(datetime.UTC) + datetime.timedelta(
                    seconds=st.iam_expire_in
                )
                self._reply(
                    200,
                    {"accessToken": token, "expireTime": expire.strftime("%Y-%m-%dT%H:%M:%SZ")},
                )


class _HttpServer(http.server.ThreadingHTTPServer):
    daemon_threads = True


def _serve_http(state: State, ctx: ssl.SSLContext | None) -> _HttpServer:
    handler = type("Handler", (_Handler,), {"state": state})
    server = _HttpServer(("127.0.0.1", 0), handler)
    if ctx is not None:
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server


@dataclass
class GcpServers:
    state: State
    global_sm: SecretManagerServer
    regional_sm: SecretManagerServer
    https: _HttpServer
    metadata: _HttpServer
    ca_file: str
    pool: str = POOL

    @classmethod
    @contextlib.contextmanager
    def start(cls, tmp_dir: Path) -> Iterator[GcpServers]:
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        ca_file = tmp_dir / "ca.pem"
        ca_file.write_bytes(ca.cert_pem.bytes())  # the SDKs take a CA bundle by path
        chain = b"".join(p.bytes() for p in cert.cert_chain_pems)
        creds = grpc.ssl_server_credentials([(cert.private_key_pem.bytes(), chain)])
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(ctx)
        state = State()
        servers = cls(
            state,
            SecretManagerServer(state, None, creds),
            SecretManagerServer(state, LOCATION, creds),
            _serve_http(state, ctx),
            _serve_http(state, None),
            str(ca_file),
        )
        try:
            yield servers
        finally:
            for s in (servers.https, servers.metadata):
                s.shutdown()
                s.server_close()
            servers.global_sm.server.stop(None)
            servers.regional_sm.server.stop(None)

    def settings(self, **overrides: Any) -> GcpSettings:
        https = f"https://127.0.0.1:{self.https.server_address[1]}"
        base = GcpSettings(
            secretmanager_endpoint=f"127.0.0.1:{self.global_sm.port}",
            regional_endpoint=f"127.0.0.1:{self.regional_sm.port}",
            sts_endpoint=f"{https}/v1/token",
            iamcredentials_endpoint=https,
            ca_file=self.ca_file,
            project=PROJECT,
            cluster_location=CLUSTER_LOCATION,
            cluster_name=CLUSTER,
            metadata_host=f"127.0.0.1:{self.metadata.server_address[1]}",
            retry_initial=0.01,
            retry_maximum=0.05,
            retry_deadline=5.0,
        )
        return replace(base, **overrides)

    def add_secret(self, secret: str, *versions: bytes) -> None:
        with self.state.lock:
            self.state.secrets.setdefault(secret, []).extend(versions)

    def pod_token(self, ns: str, ksa: str, audience: str = POOL) -> str:
        with self.state.lock:
            self.state.issued += 1
            token = f"k8s-{ns}-{ksa}-{self.state.issued}-jwt"
            self.state.pod_tokens[token] = (audience, ns, ksa)
        return token

    def bind(self, principal: str, *secrets: str) -> None:
        """Grant ``principal`` (pod_principal(...) or "serviceAccount:<email>") secret access."""
        with self.state.lock:
            for s in secrets:
                self.state.grants.setdefault(s, set()).add(principal)

    def allow_impersonation(self, gsa: str, ns: str, ksa: str) -> None:
        with self.state.lock:
            self.state.token_creators.setdefault(gsa, set()).add(pod_principal(ns, ksa))
