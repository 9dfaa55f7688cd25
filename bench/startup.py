"""Start-up: `secretfs mount` to the first read of a file, standalone, against a local moto.

Each run starts ``python -m secretfs mount SPC MNT --foreground --ready-fd W`` (the product path,
one Secrets Manager secret), waits for its "mounted" answer, reads the file, and unmounts. The
clock starts before the process is spawned and stops when the read returns the secret, so the
figure is what a user or an init container waits for: interpreter start, imports, hardening
(mlockall), the mount-time fetch and the mount. Also measured, in fresh interpreters, for the
breakdown: ``python -c pass``, the imports a standalone AWS mount needs, and the floor: a bare
pyfuse3 filesystem (bench/bare_fs.py) from start to its first read; and ``secretfs mount SPC MNT``
as typed (it returns once its background daemon has mounted). Prints min and median of each as a
Markdown table. Needs root and /dev/fuse.

    sudo .venv/bin/python bench/startup.py [--runs 10]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import needs_root  # noqa: E402
from tests.moto_server import FAKE_KEYS, REGION, start_moto  # noqa: E402
from tests.mounting import is_mounted, unmount_and_stop  # noqa: E402

SPC = """\
apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: startup
spec:
  provider: aws
  parameters:
    objects: |
      - objectName: "startup/db"
        objectType: "secretsmanager"
        objectAlias: "db"
"""
VALUE = "startup-secret-value"
# What `secretfs mount` of an AWS class imports before it can mount.
IMPORTS = "import secretfs.cli, secretfs.standalone, providers.aws.provider"


def time_cmd(argv: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, env=env, cwd=ROOT)
    return time.perf_counter() - t0


def first_read(mnt: Path, t0: float, who: str) -> float:
    """Seconds from ``t0`` until the mounted file reads back the secret."""
    data = (mnt / "db").read_bytes()
    elapsed = time.perf_counter() - t0
    if data != VALUE.encode():
        raise RuntimeError(f"{who} served other bytes than stored")
    return elapsed


def mount_to_first_read(spc: Path, mnt: Path, extra: list[str], env: dict[str, str]) -> float:
    r, w = os.pipe()
    argv = [sys.executable, "-m", "secretfs", "mount", str(spc), str(mnt), "--foreground"]
    argv += ["--ready-fd", str(w), "--log-level", "WARNING", *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        argv, pass_fds=(w,), stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT
    )
    os.close(w)
    try:
        with os.fdopen(r, "rb") as pipe:
            answer = pipe.readline().strip()
        if answer != b"ok":
            raise RuntimeError(f"mount failed: {answer!r}")
        return first_read(mnt, t0, "secretfs")
    finally:
        unmount_and_stop(mnt, proc)


def background_to_first_read(spc: Path, mnt: Path, env: dict[str, str]) -> float:
    """``secretfs mount SPC MNT`` as a user types it: the command returns once the background
    daemon has mounted; then the first read."""
    argv = [sys.executable, "-m", "secretfs", "mount", str(spc), str(mnt), "--log-level", "WARNING"]
    run_id = str(time.monotonic_ns())  # marks this run's daemon in /proc/PID/environ
    mark = f"SECRETFS_BENCH_RUN={run_id}".encode()
    t0 = time.perf_counter()
    env = {**env, "SECRETFS_BENCH_RUN": run_id}
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, env=env, cwd=ROOT)
    try:
        return first_read(mnt, t0, "secretfs")
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
        # The daemon notices the unmount and exits; the next case must not share the CPU with it.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(mark in environ for environ in _environs()):
            time.sleep(0.02)


def _environs() -> list[bytes]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            found.append(Path(f"/proc/{pid}/environ").read_bytes())
        except OSError:
            continue
    return found


def bare_to_first_read(mnt: Path, env: dict[str, str]) -> float:
    """The floor: bench/bare_fs.py (a minimal pyfuse3 filesystem on trio) to its first read."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "bare_fs.py"), str(mnt)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        cwd=ROOT,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps({"db": VALUE}).encode())
        proc.stdin.close()
        if proc.stdout.readline() != b"ready\n":
            raise RuntimeError("bench/bare_fs.py did not mount")
        return first_read(mnt, t0, "bench/bare_fs.py")
    finally:
        unmount_and_stop(mnt, proc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10, help="runs of each measurement (10)")
    args = ap.parse_args()
    if needs_root():
        return 2
    # An installed secretfs (a wheel, the image) has its bytecode compiled at install; a checkout
    # may have none, and with PYTHONDONTWRITEBYTECODE set (as on some dev machines) every run
    # would compile our sources again (~150 ms measured). Compile them once, as pip does.
    compileall = [sys.executable, "-m", "compileall", "-q", "secretfs", "csi", "providers"]
    subprocess.run(compileall, cwd=ROOT, check=True)
    import boto3

    rows: list[tuple[str, list[float]]] = []
    with start_moto() as url, tempfile.TemporaryDirectory(prefix="sfs-startup-") as d:
        env = {
            **os.environ,
            **FAKE_KEYS,
            "AWS_ENDPOINT_URL": url,
            "AWS_REGION": REGION,
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }
        sm = boto3.client(
            "secretsmanager",
            region_name=REGION,
            endpoint_url=url,
            aws_access_key_id=FAKE_KEYS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=FAKE_KEYS["AWS_SECRET_ACCESS_KEY"],
        )
        sm.create_secret(Name="startup/db", SecretString=VALUE)
        spc = Path(d) / "spc.yaml"
        spc.write_text(SPC)
        mnt = Path(d) / "mnt"
        mnt.mkdir()
        cases: list[tuple[str, object]] = [
            ("python -c pass", lambda: time_cmd([sys.executable, "-c", "pass"], env)),
            (f"python -c '{IMPORTS}'", lambda: time_cmd([sys.executable, "-c", IMPORTS], env)),
            ("bare pyfuse3 (bench/bare_fs.py) to first read", lambda: bare_to_first_read(mnt, env)),
            (
                "mount to first read, memory locked (default)",
                lambda: mount_to_first_read(spc, mnt, [], env),
            ),
            (
                "mount to first read, --no-mlock",
                lambda: mount_to_first_read(spc, mnt, ["--no-mlock"], env),
            ),
            (
                "`secretfs mount` as typed (background daemon) to first read",
                lambda: background_to_first_read(spc, mnt, env),
            ),
        ]
        samples: dict[str, list[float]] = {name: [] for name, _ in cases}
        mount_to_first_read(spc, mnt, [], env)  # warm the page cache and moto
        for _ in range(args.runs):  # interleaved, so drift hits every case alike
            for name, run in cases:
                assert callable(run)
                samples[name].append(run())
        rows = [(name, samples[name]) for name, _ in cases]
        if is_mounted(mnt):
            print(f"startup: {mnt} is still mounted", file=sys.stderr)
    print("# secretfs start-up: `secretfs mount` to the first read, standalone")
    print()
    print(f"Command: {shlex.join([sys.executable, *sys.argv])}; {args.runs} runs each, interleaved")
    print()
    print("| what | min | median |")
    print("|---|---:|---:|")
    for name, got in rows:
        print(f"| {name} | {min(got) * 1000:.0f} ms | {statistics.median(got) * 1000:.0f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
