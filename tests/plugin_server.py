"""A provider plugin for tests: upstream's ``v1alpha1.CSIDriverProvider`` over a real unix socket.

Shaped like upstream's mock/e2e provider (test/e2eprovider): it answers ``Mount`` with the files and
object versions it is configured with, and can be told to fail (a gRPC status, or an ``error.code``
in the answer), to act as a legacy provider (no files) or to be slow (``gate``).
Every request is recorded (tests only: they hold tokens). Runs in the test process on gRPC's
threads (a daemon in another process reaches it through the socket); tests change its state
directly.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from providers.plugin.pb import service_pb2, service_pb2_grpc


@dataclass(eq=False)
class MockProvider(service_pb2_grpc.CSIDriverProviderServicer):  # type: ignore[misc]
    name: str = "e2e-provider"
    # path -> (contents, mode)
    files: dict[str, tuple[bytes, int]] = field(default_factory=dict)
    # object id -> version (sent as object_version)
    versions: dict[str, str] = field(default_factory=dict)
    fail: tuple[grpc.StatusCode, str] | None = None
    fail_version: tuple[grpc.StatusCode, str] | None = None
    error_code: str = ""
    legacy: bool = False  # answer with versions but no files, as a provider that writes itself
    gate: threading.Event | None = None  # when set, Mount waits (at most 10 s) until it is set
    requests: list[Any] = field(default_factory=list, repr=False)
    version_calls: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def set(self, path: str, contents: bytes, version: str, mode: int = 0o644) -> None:
        with self.lock:
            self.files[path] = (contents, mode)
            self.versions[path] = version

    def Version(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self.lock:
            self.version_calls += 1
            fail = self.fail_version
        if fail is not None:
            context.abort(*fail)
        return service_pb2.VersionResponse(
            version="v1alpha1", runtime_name=self.name, runtime_version="0.0.1"
        )

    def Mount(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self.lock:
            self.requests.append(request)
            fail, code, legacy, gate = self.fail, self.error_code, self.legacy, self.gate
            files = dict(self.files)
            versions = dict(self.versions)
        if gate is not None:
            gate.wait(10)
        if fail is not None:
            context.abort(*fail)
        answer = service_pb2.MountResponse(
            object_version=[
                service_pb2.ObjectVersion(id=k, version=v) for k, v in sorted(versions.items())
            ]
        )
        if code:
            answer.error.code = code
            return answer
        if not legacy:
            for path, (contents, mode) in sorted(files.items()):
                answer.files.append(service_pb2.File(path=path, mode=mode, contents=contents))
        return answer


@contextlib.contextmanager
def serving(directory: Path, name: str = "e2e-provider") -> Iterator[MockProvider]:
    """A MockProvider listening on ``<directory>/<name>.sock`` until the block ends."""
    mock = MockProvider(name)
    with serve_mock(mock, directory / f"{name}.sock"):
        yield mock


@contextlib.contextmanager
def serve_mock(mock: MockProvider, socket_path: Path) -> Iterator[grpc.Server]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    service_pb2_grpc.add_CSIDriverProviderServicer_to_server(mock, server)
    with contextlib.suppress(FileNotFoundError):
        socket_path.unlink()
    server.add_insecure_port(f"unix:{socket_path}")
    server.start()
    try:
        yield server
    finally:
        server.stop(grace=None).wait(5)
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()
