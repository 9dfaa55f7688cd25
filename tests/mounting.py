"""Real FUSE mounts for tests: ``secretfs mount --foreground`` in a subprocess.

``mounted(spc_yaml, tmp_path, *args)`` is a context manager yielding a :class:`Mount` once the
filesystem is mounted (the daemon's readiness pipe said "ok"), and always cleaning up: lazy
unmount, then terminate/kill the daemon. ``module="tests.fuse_harness"`` runs the daemon through
the test harness instead (fault injection).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 60.0
# scripts/test-wheel.sh runs this suite from an unpacked sdist whose three packages it deleted, so
# that every import finds the installed wheel. Tests about the sources themselves (regenerating
# stubs, building the sdist) skip there; CI runs them in the checkout.
HAS_SOURCES = (ROOT / "secretfs" / "__init__.py").is_file()
needs_sources = pytest.mark.skipif(
    not HAS_SOURCES, reason="suite running against an installed wheel: no sources here"
)


def fuse_available() -> str | None:
    """None if real mounts can run here, else why not (used in skip messages)."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse on this machine"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed (apt-get install fuse3)"
    if os.geteuid() != 0:
        return "real mount tests need root (allow_other and other-uid checks)"
    return None


needs_fuse = pytest.mark.skipif(fuse_available() is not None, reason=str(fuse_available()))


def is_mounted(path: str | Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mounts", encoding="utf-8") as f:
        return any(line.split()[1] == target for line in f)


@dataclass
class Mount:
    path: Path
    proc: subprocess.Popen[bytes]
    stderr_path: Path
    _log: str | None = field(default=None, repr=False)

    def file(self, name: str) -> Path:
        return self.path / name

    def read(self, name: str) -> bytes:
        return (self.path / name).read_bytes()

    def log(self) -> str:
        """The daemon's log so far (stderr)."""
        return self.stderr_path.read_text(errors="replace")

    def unmount(self, timeout: float = 20.0) -> int:
        """Unmount like a user would and wait for the daemon to exit; returns its status."""
        subprocess.run(["fusermount3", "-u", str(self.path)], check=True)
        return self.proc.wait(timeout)


def write_spc(tmp_path: Path, text: str, name: str = "spc.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


@contextlib.contextmanager
def mounted(
    spc_yaml: str,
    tmp_path: Path,
    *args: str,
    module: str = "secretfs",
    env: dict[str, str] | None = None,
) -> Iterator[Mount]:
    spc = write_spc(tmp_path, spc_yaml)
    mnt = tmp_path / "mnt"
    mnt.mkdir(exist_ok=True)
    # The daemon's log goes to a file in the test's tmp dir: logs never carry secret bytes (one
    # test checks exactly that), and a pipe could fill up and stall the daemon.
    stderr_path = tmp_path / "daemon.log"
    r, w = os.pipe()
    argv = [
        sys.executable,
        "-m",
        module,
        "mount",
        str(spc),
        str(mnt),
        "--foreground",
        "--ready-fd",
        str(w),
        "--no-mlock",
        *args,
    ]
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            argv,
            pass_fds=(w,),
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=err,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
        )
    os.close(w)
    m = Mount(mnt, proc, stderr_path)
    try:
        answer = _read_ready(r)
        if answer != "ok":
            raise MountFailed(answer, m.log())
        assert is_mounted(mnt), "daemon said ok but nothing is mounted"
        yield m
    finally:
        unmount_and_stop(mnt, proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate ``proc`` if it still runs; kill it if it does not go within 10 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def unmount_and_stop(path: str | Path, proc: subprocess.Popen[bytes]) -> None:
    """Always-safe cleanup of a FUSE test mount: lazy unmount, then stop its server."""
    if is_mounted(path):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], check=False)
    stop(proc)


class MountFailed(AssertionError):
    def __init__(self, answer: str, log: str) -> None:
        super().__init__(f"mount failed: {answer!r}\n--- daemon log ---\n{log}")
        self.answer = answer
        self.daemon_log = log


def _read_ready(fd: int) -> str:
    deadline = time.monotonic() + READY_TIMEOUT
    chunks: list[bytes] = []
    os.set_blocking(fd, False)
    try:
        while time.monotonic() < deadline:
            try:
                data = os.read(fd, 4096)
            except BlockingIOError:
                time.sleep(0.02)
                continue
            if not data:
                break
            chunks.append(data)
        else:
            return "timeout waiting for the daemon"
    finally:
        os.close(fd)
    return b"".join(chunks).decode(errors="replace").strip()


def wait_for(predicate: object, timeout: float = 15.0, interval: float = 0.1) -> bool:
    """Poll ``predicate()`` until it is true or ``timeout`` passes."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
