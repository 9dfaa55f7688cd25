"""A moto server (AWS Secrets Manager, SSM, STS, ...) for tests, run as a subprocess on loopback.

Fixtures (import them into a test module or a conftest: ``from tests.moto_server import aws_env,
moto_url``):

- ``moto_url`` (session scope): starts ``python -m moto.server`` on 127.0.0.1 and a free port,
  waits until it answers, yields its base URL ("http://127.0.0.1:PORT"), terminates it at the end.
- ``aws_env`` (function scope): resets moto's state (POST /moto-api/reset), sets AWS_ENDPOINT_URL,
  AWS_REGION, AWS_DEFAULT_REGION and fake AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY via monkeypatch
  (and points AWS_CONFIG_FILE/AWS_SHARED_CREDENTIALS_FILE at nothing so a developer's profile
  cannot leak in), and yields a dict ready for boto3:
  ``{"endpoint_url": URL, "region": "us-east-1"}``, e.g.
  ``boto3.client("secretsmanager", region_name=env["region"], endpoint_url=env["endpoint_url"])``.
  Every test starts with an empty moto, so tests can run in any order.

``reset_moto(url)`` and ``start_moto()`` are plain functions for use outside pytest (benchmarks).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Iterator

import pytest

REGION = "us-east-1"
FAKE_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
START_TIMEOUT = 30.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/moto-api/data.json", timeout=1) as rsp:
            return bool(rsp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def reset_moto(url: str) -> None:
    req = urllib.request.Request(f"{url}/moto-api/reset", method="POST", data=b"")
    with urllib.request.urlopen(req, timeout=10) as rsp:
        rsp.read()


@contextlib.contextmanager
def start_moto() -> Iterator[str]:
    """Run a moto server until the block ends; yields its URL."""
    port = _free_port()
    env = dict(os.environ, **FAKE_KEYS)
    env.pop("AWS_ENDPOINT_URL", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    # moto logs every request on stderr: drain it (a full pipe would stall the server), keeping
    # the tail for the error message if it dies.
    tail: deque[bytes] = deque(maxlen=40)
    assert proc.stderr is not None
    drain = threading.Thread(target=tail.extend, args=(proc.stderr,), daemon=True)
    drain.start()
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not _answers(url):
            if proc.poll() is not None:
                drain.join(timeout=2)
                err = b"".join(tail).decode(errors="replace")
                raise RuntimeError(f"moto server exited with {proc.returncode}: {err[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"moto server did not answer on {url} in {START_TIMEOUT} s")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        drain.join(timeout=2)
        proc.stderr.close()


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    with start_moto() as url:
        yield url


@pytest.fixture
def aws_env(moto_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    reset_moto(moto_url)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_url)
    monkeypatch.setenv("AWS_REGION", REGION)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    for k, v in FAKE_KEYS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    yield {"endpoint_url": moto_url, "region": REGION}
