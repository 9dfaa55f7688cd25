"""A small Kubernetes API server for tests: real HTTP on 127.0.0.1, the API's paths and JSON.

Serves GET of namespaced SecretProviderClasses
(``/apis/secrets-store.csi.x-k8s.io/v1/namespaces/NS/secretproviderclasses/NAME``),
ServiceAccounts (``/api/v1/namespaces/NS/serviceaccounts/NAME``) and Nodes
(``/api/v1/nodes/NAME``), answering a missing object with
a 404 ``Status`` object as the real API does, so the product's client library (lightkube) is
exercised end to end. ``kubeconfig(path)`` writes a kubeconfig pointing at it (no credentials:
the server does not authenticate). ``requests`` records every path asked for.

Writes: SecretProviderClassPodStatuses (POST, GET, PATCH as a JSON merge patch (other patch content
types get the API's 415), DELETE under
``/apis/secrets-store.csi.x-k8s.io/v1/namespaces/NS/secretproviderclasspodstatuses``) and Events
(POST, PATCH under ``/api/v1/namespaces/NS/events``), stored in ``pod_statuses`` and ``events``;
Secrets (POST, GET, PUT with the API's optimistic concurrency: a stale ``resourceVersion`` gets
409, DELETE honouring ``preconditions.resourceVersion``) under ``/api/v1/namespaces/NS/secrets``,
stored in ``secrets``;
``writes`` records each write as (method, path, body). ``fail_writes`` answers every write with
that HTTP status (reads still work).

Fixture: ``kube_api`` (function scope) yields a running :class:`KubeServer`.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

GROUP = "secrets-store.csi.x-k8s.io"
CREATED = "2026-01-01T00:00:00Z"
PLURAL_STATUS = "secretproviderclasspodstatuses"
MERGE_PATCH = "application/merge-patch+json"


def _meta(namespace: str, name: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": namespace,
        "uid": str(uuid.uuid4()),
        "resourceVersion": "1",
        "creationTimestamp": CREATED,
        **extra,
    }


class KubeServer:
    def __init__(self) -> None:
        self.spcs: dict[tuple[str, str], dict[str, Any]] = {}
        self.service_accounts: dict[tuple[str, str], dict[str, Any]] = {}
        self.nodes: dict[str, dict[str, Any]] = {}
        self.requests: list[str] = []
        self.fail_with: int | None = None  # answer every request with this HTTP status
        self.fail_writes: int | None = None  # answer every write with this HTTP status
        self.pod_statuses: dict[tuple[str, str], dict[str, Any]] = {}
        self.events: dict[tuple[str, str], dict[str, Any]] = {}
        self.secrets: dict[tuple[str, str], dict[str, Any]] = {}
        self.writes: list[tuple[str, str, Any]] = []
        self._lock = threading.Lock()
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        server.daemon_threads = True
        self._server = server
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # --- objects ---

    def add_spc(self, namespace: str, obj: dict[str, Any] | str) -> dict[str, Any]:
        """Store a SecretProviderClass (a dict or YAML text) in ``namespace``."""
        if isinstance(obj, str):
            obj = yaml.safe_load(obj)
        assert isinstance(obj, dict)
        name = obj["metadata"]["name"]
        stored = {**obj, "metadata": _meta(namespace, name)}
        stored.setdefault("apiVersion", f"{GROUP}/v1")
        stored.setdefault("kind", "SecretProviderClass")
        self.spcs[(namespace, name)] = stored
        return stored

    def add_service_account(
        self, namespace: str, name: str, annotations: dict[str, str] | None = None
    ) -> None:
        meta = _meta(namespace, name, **({"annotations": annotations} if annotations else {}))
        self.service_accounts[(namespace, name)] = {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": meta,
        }

    def add_node(self, name: str, labels: dict[str, str] | None = None) -> None:
        """A Node (cluster-scoped, ``/api/v1/nodes/NAME``) with ``labels``."""
        meta = _meta("", name, labels=labels or {})
        del meta["namespace"]
        self.nodes[name] = {"apiVersion": "v1", "kind": "Node", "metadata": meta}

    def kubeconfig(self, path: Path) -> Path:
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "test", "cluster": {"server": self.url}}],
            "users": [{"name": "test", "user": {}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
            "current-context": "test",
        }
        path.write_text(yaml.safe_dump(cfg))
        return path

    # --- HTTP ---

    def answer(
        self, path: str, method: str = "GET", body: Any = None, content_type: str = ""
    ) -> tuple[int, dict[str, Any]]:
        self.requests.append(path)
        if self.fail_with is not None:
            return self.fail_with, _status(self.fail_with, "InternalError", "injected failure")
        if method == "PATCH" and content_type.split(";")[0].strip() != MERGE_PATCH:
            # As the API server answers a strategic merge patch of a custom resource; here every
            # patch type but the merge patch, the one this server implements.
            accepted = f"application/json-patch+json, {MERGE_PATCH}, application/apply-patch+yaml"
            return 415, _status(
                415,
                "UnsupportedMediaType",
                f"the body of the request was in an unknown format - accepted media types "
                f"include: {accepted}",
            )
        parts = path.split("?", 1)[0].strip("/").split("/")
        if method != "GET" or _collection(parts) is not None:
            with self._lock:
                if method != "GET":
                    self.writes.append((method, path, body))
                if self.fail_writes is not None and method != "GET":
                    code = self.fail_writes
                    return code, _status(code, "InternalError", "injected failure")
                return self._write(parts, method, body)
        if (
            len(parts) == 7
            and parts[:3] == ["apis", GROUP, "v1"]
            and parts[3] == "namespaces"
            and parts[5] == "secretproviderclasses"
        ):
            obj = self.spcs.get((parts[4], parts[6]))
            if obj is None:
                return 404, _not_found(f"secretproviderclasses.{GROUP}", parts[6], GROUP)
            return 200, obj
        if (
            len(parts) == 6
            and parts[:3] == ["api", "v1", "namespaces"]
            and parts[4] == "serviceaccounts"
        ):
            obj = self.service_accounts.get((parts[3], parts[5]))
            if obj is None:
                return 404, _not_found("serviceaccounts", parts[5], "")
            return 200, obj
        if len(parts) == 4 and parts[:3] == ["api", "v1", "nodes"]:
            node = self.nodes.get(parts[3])
            if node is None:
                return 404, _not_found("nodes", parts[3], "")
            return 200, node
        return 404, _status(404, "NotFound", "the server could not find the requested resource")

    def _write(self, parts: list[str], method: str, body: Any) -> tuple[int, dict[str, Any]]:
        found = _collection(parts)
        if found is None:
            return 405, _status(405, "MethodNotAllowed", "not supported by the test server")
        store, resource, group, namespace, name = found
        objects = {
            "pod_statuses": self.pod_statuses,
            "events": self.events,
            "secrets": self.secrets,
        }[store]
        if method == "POST" and name is None:
            if not isinstance(body, dict) or not (body.get("metadata") or {}).get("name"):
                return 422, _status(422, "Invalid", "metadata.name is required")
            key = (namespace, body["metadata"]["name"])
            if key in objects:
                return 409, _status(409, "AlreadyExists", f'{resource} "{key[1]}" already exists')
            stored = {**body, "metadata": {**body["metadata"], **_meta(namespace, key[1])}}
            objects[key] = stored
            return 201, stored
        if name is None:
            return 405, _status(405, "MethodNotAllowed", "not supported by the test server")
        obj = objects.get((namespace, name))
        if obj is None:
            return 404, _not_found(resource, name, group)
        if method == "GET":
            return 200, obj
        if method == "PATCH":
            patched = _merge(obj, body)
            meta = patched.setdefault("metadata", {})
            meta["resourceVersion"] = str(int(obj["metadata"].get("resourceVersion", "1")) + 1)
            objects[(namespace, name)] = patched
            return 200, patched
        version = str(obj["metadata"].get("resourceVersion", "1"))
        if method == "PUT":
            asked = ((body or {}).get("metadata") or {}).get("resourceVersion")
            if asked and str(asked) != version:
                return 409, _conflict(resource, name)
            meta = {
                **body["metadata"],
                **{k: obj["metadata"][k] for k in ("uid", "creationTimestamp")},
            }
            meta["resourceVersion"] = str(int(version) + 1)
            objects[(namespace, name)] = {**body, "metadata": meta}
            return 200, objects[(namespace, name)]
        if method == "DELETE":
            asked = ((body or {}).get("preconditions") or {}).get("resourceVersion")
            if asked and str(asked) != version:
                return 409, _conflict(resource, name)
            del objects[(namespace, name)]
            return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success"}
        return 405, _status(405, "MethodNotAllowed", "not supported by the test server")


def _collection(parts: list[str]) -> tuple[str, str, str, str, str | None] | None:
    """(store, resource, group, namespace, name or None) of a writable path, else None."""
    pod_statuses = ["apis", GROUP, "v1", "namespaces"]
    if len(parts) in (6, 7) and parts[:4] == pod_statuses and parts[5] == PLURAL_STATUS:
        name = parts[6] if len(parts) == 7 else None
        return "pod_statuses", f"{PLURAL_STATUS}.{GROUP}", GROUP, parts[4], name
    if len(parts) in (5, 6) and parts[:3] == ["api", "v1", "namespaces"] and parts[4] == "events":
        return "events", "events", "", parts[3], parts[5] if len(parts) == 6 else None
    if len(parts) in (5, 6) and parts[:3] == ["api", "v1", "namespaces"] and parts[4] == "secrets":
        return "secrets", "secrets", "", parts[3], parts[5] if len(parts) == 6 else None
    return None


def _merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merge(out.get(k), v)
    return out


def _status(code: int, reason: str, message: str, **details: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        out["details"] = details
    return out


def _conflict(resource: str, name: str) -> dict[str, Any]:
    return _status(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {resource} "{name}": the object has been modified; '
        "please apply your changes to the latest version and try again",
    )


def _not_found(resource: str, name: str, group: str) -> dict[str, Any]:
    kind = resource.split(".", 1)[0]
    return _status(
        404, "NotFound", f'{resource} "{name}" not found', name=name, group=group, kind=kind
    )


def _handler(api: KubeServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in two writes: without this, Nagle's algorithm and the
        # client's delayed ACK add 40 ms to every answer (a real API server has no such delay).
        disable_nagle_algorithm = True

        def do_GET(self) -> None:
            self._reply(*api.answer(self.path))

        def do_POST(self) -> None:
            self._reply(*api.answer(self.path, "POST", self._body()))

        def do_PATCH(self) -> None:
            content_type = self.headers.get("Content-Type") or ""
            self._reply(*api.answer(self.path, "PATCH", self._body(), content_type))

        def do_PUT(self) -> None:
            self._reply(*api.answer(self.path, "PUT", self._body()))

        def do_DELETE(self) -> None:
            self._reply(*api.answer(self.path, "DELETE", self._body()))

        def _body(self) -> Any:
            n = int(self.headers.get("Content-Length") or 0)
            data = self.rfile.read(n) if n else b""
            return json.loads(data) if data else None

        def _reply(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def kube_api() -> Iterator[KubeServer]:
    server = KubeServer()
    try:
        yield server
    finally:
        server.close()
