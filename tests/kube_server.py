"""A small Kubernetes API server for tests: real HTTP on 127.0.0.1, the API's paths and JSON.

Serves GET of namespaced SecretProviderClasses
(``/apis/secrets-store.csi.x-k8s.io/v1/namespaces/NS/secretproviderclasses/NAME``) and
ServiceAccounts (``/api/v1/namespaces/NS/serviceaccounts/NAME``), answering a missing object with
a 404 ``Status`` object as the real API does, so the official ``kubernetes`` client library is
exercised end to end. ``kubeconfig(path)`` writes a kubeconfig pointing at it (no credentials:
the server does not authenticate). ``requests`` records every path asked for.

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
        self.requests: list[str] = []
        self.fail_with: int | None = None  # answer every request with this HTTP status
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

    def answer(self, path: str) -> tuple[int, dict[str, Any]]:
        self.requests.append(path)
        if self.fail_with is not None:
            return self.fail_with, _status(self.fail_with, "InternalError", "injected failure")
        parts = path.split("?", 1)[0].strip("/").split("/")
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
        return 404, _status(404, "NotFound", "the server could not find the requested resource")


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
            code, body = api.answer(self.path)
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
