"""Read latency of secretfs against tmpfs: open + read(whole file) + close, warm.

Run as root from the project root (it mounts a tmpfs and a FUSE filesystem, and unmounts both)::

    .venv/bin/python bench/read_latency.py [--iterations N] [--audit] [--daemon-arg=ARG ...]

Files of 100 B, 4 KiB and 64 KiB, each read by one reader and by four parallel readers (four
processes on the same file), on a tmpfs and on a real secretfs mount (``python -m secretfs mount``
against a local moto server, long TTL so every open is a cache hit). The timing loop is a small
C program (bench/readclient.c, compiled into bench/.build/) so the client costs nanoseconds, not
the microseconds of a Python loop. The same files are also served by a bare pyfuse3 filesystem
(bench/bare_fs.py: answers from memory, keep_cache, no checks), the floor for any pyfuse3
filesystem on this machine. Prints p50/p99 per configuration, the ratio to tmpfs and the ratio to
the bare pyfuse3 filesystem as a Markdown table. With ``--audit``, a second secretfs mount with
``--audit`` (its audit lines go to a file, as the daemon's log does) is measured alongside, with
the ratio of its p50 and its daemon CPU per round to the first mount's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shlex
import shutil
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.moto_server import FAKE_KEYS, REGION, start_moto  # noqa: E402
from tests.mounting import Mount, is_mounted, mounted, unmount_and_stop  # noqa: E402

BUILD = ROOT / "bench" / ".build"
CLIENT_SRC = ROOT / "bench" / "readclient.c"
BARE_FS = ROOT / "bench" / "bare_fs.py"
# Secrets Manager's SecretString limit is 65536 bytes; moto enforces it too.
SIZES = {"100 B": 100, "4 KiB": 4096, "64 KiB": 65536}
READERS = (1, 4)

SPC = """\
apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: bench
spec:
  provider: aws
  parameters:
    objects: |
{objects}
"""


@dataclass(frozen=True)
class Result:
    p50_ns: int
    p99_ns: int
    samples: int


def build_client() -> Path:
    """Compile readclient.c (again only if the source is newer)."""
    BUILD.mkdir(parents=True, exist_ok=True)
    exe = BUILD / "readclient"
    if not exe.exists() or exe.stat().st_mtime < CLIENT_SRC.stat().st_mtime:
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            sys.exit("read_latency: no C compiler (cc) found")
        subprocess.run([cc, "-O2", "-Wall", "-o", str(exe), str(CLIENT_SRC)], check=True)
    return exe


def fake_text(n: int, seed: int) -> str:
    rnd = random.Random(seed)
    return "".join(rnd.choices(string.ascii_letters + string.digits, k=n))


def name_for(size: int) -> str:
    return f"bench-{size}"


@contextlib.contextmanager
def tmpfs(where: Path, files: dict[str, str]) -> Iterator[Path]:
    where.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0755", "secretfs-bench", str(where)],
        check=True,
    )
    try:
        for name, text in files.items():
            (where / name).write_text(text)
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


@contextlib.contextmanager
def secretfs_mount(
    tmp: Path, files: dict[str, str], ttl: float, extra: list[str]
) -> Iterator[Mount]:
    import boto3

    with start_moto() as url:
        env = {
            "AWS_ENDPOINT_URL": url,
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            **FAKE_KEYS,
        }
        sm = boto3.client(
            "secretsmanager",
            region_name=REGION,
            endpoint_url=url,
            aws_access_key_id=FAKE_KEYS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=FAKE_KEYS["AWS_SECRET_ACCESS_KEY"],
        )
        objects = []
        for name, text in files.items():
            sm.create_secret(Name=name, SecretString=text)
            objects.append(f'      - objectName: "{name}"\n        objectType: "secretsmanager"')
        spc = SPC.format(objects="\n".join(objects))
        args = ["--ttl", str(ttl), "--max-stale", str(ttl * 2), "--log-level", "WARNING", *extra]
        tmp.mkdir(exist_ok=True)
        with mounted(spc, tmp, *args, env=env) as m:
            yield m


@contextlib.contextmanager
def bare_mount(where: Path, files: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """bench/bare_fs.py mounted at ``where`` (a subprocess, like the secretfs daemon)."""
    where.mkdir()
    proc = subprocess.Popen(
        [sys.executable, str(BARE_FS), str(where)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(files).encode())
        proc.stdin.close()
        if proc.stdout.readline() != b"ready\n" or not is_mounted(where):
            raise RuntimeError("bench/bare_fs.py did not mount")
        yield proc
    finally:
        unmount_and_stop(where, proc)


def daemon_cpu_ns(pid: int) -> int:
    """CPU time the daemon (all its threads) has used so far."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            total += int(f.read().split()[0])
    return total


def compare(
    client: Path,
    targets: list[tuple[Path, int | None]],
    readers: int,
    iterations: int,
    warmup: int,
    batches: int,
) -> list[tuple[Result, float]]:
    """Measure each ``(path, daemon pid or None)`` in turn, in ``batches`` alternating batches,
    so a burst of load on a shared machine hits every target alike. Per target: percentiles
    over all its rounds, and its daemon's CPU time per round (warm-up rounds included; 0 with
    no daemon). Only the first batch has the full warm-up."""
    samples: list[list[int]] = [[] for _ in targets]
    cpu = [0] * len(targets)
    rounds = [0] * len(targets)
    per_batch = max(readers, iterations // batches)
    for i in range(batches):
        w = warmup if i == 0 else min(warmup, 50)
        order = list(enumerate(targets))
        for j, (path, pid) in order if i % 2 == 0 else reversed(order):
            cpu0 = daemon_cpu_ns(pid) if pid else 0
            got = run_clients(client, path, readers, per_batch, w)
            if pid:
                cpu[j] += daemon_cpu_ns(pid) - cpu0
            rounds[j] += len(got) + w * readers
            samples[j].extend(got)
    out = []
    for j, got in enumerate(samples):
        got.sort()
        result = Result(_pct(got, 50), _pct(got, 99), len(got))
        out.append((result, cpu[j] / rounds[j]))
    return out


def run_clients(client: Path, path: Path, readers: int, iterations: int, warmup: int) -> list[int]:
    """Run ``readers`` clients at once on ``path``; the times of all their rounds (ns)."""
    per_reader = max(1, iterations // readers)
    procs = [
        subprocess.Popen(
            [str(client), str(path), str(per_reader), str(warmup), "--barrier"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(readers)
    ]
    # Everyone warms up first, then all start timing at once.
    for p in procs:
        assert p.stdout is not None
        if p.stdout.readline() != b"ready\n":
            msg = p.communicate(timeout=60)[1].decode(errors="replace")
            raise RuntimeError(f"readclient failed on {path}: {msg}")
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(b"g")
        p.stdin.close()
    samples: list[int] = []
    for p in procs:
        assert p.stdout is not None and p.stderr is not None
        out, err = p.stdout.read(), p.stderr.read()
        p.wait(timeout=120)
        if p.returncode != 0:
            raise RuntimeError(f"readclient failed on {path}: {err.decode(errors='replace')}")
        lines = out.split()
        assert lines[0] == b"size", lines[:2]
        if int(lines[1]) != path.stat().st_size:
            raise RuntimeError(
                f"{path}: read {int(lines[1])} bytes, expected {path.stat().st_size}"
            )
        samples.extend(int(x) for x in lines[2:])
    return samples


def _pct(sorted_samples: list[int], p: float) -> int:
    # Nearest rank.
    k = max(0, min(len(sorted_samples) - 1, round(p / 100 * len(sorted_samples) + 0.5) - 1))
    return sorted_samples[k]


def us(ns: int) -> str:
    v = ns / 1000
    return f"{v:.2f} µs" if v < 10 else f"{v:.1f} µs" if v < 100 else f"{v:.0f} µs"


def machine() -> str:
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (
        f"nproc {len(os.sched_getaffinity(0))}, kernel {platform.release()}, {cpu}, "
        f"Python {platform.python_version()}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--iterations",
        type=int,
        default=20000,
        help="timed rounds per configuration, split between the readers (20000)",
    )
    ap.add_argument("--warmup", type=int, default=500, help="untimed rounds per reader (500)")
    ap.add_argument(
        "--batches",
        type=int,
        default=5,
        help="the rounds of each configuration are run in this many batches, alternating "
        "between tmpfs, bare pyfuse3 and secretfs (5)",
    )
    ap.add_argument("--ttl", type=float, default=3600.0, help="secretfs --ttl (3600)")
    ap.add_argument(
        "--daemon-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for `secretfs mount` (repeatable), e.g. --daemon-arg=--audit",
    )
    ap.add_argument(
        "--audit",
        action="store_true",
        help="also measure a second secretfs mount with --audit (audit / no audit columns)",
    )
    ap.add_argument(
        "--hold",
        action="store_true",
        help="after the table, keep the mounts until Enter (for profiling the daemon)",
    )
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("read_latency: needs root (mounts a tmpfs and a FUSE filesystem)")
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        sys.exit("read_latency: needs /dev/fuse and fusermount3")
    client = build_client()
    files = {name_for(n): fake_text(n, n) for n in SIZES.values()}
    began = time.monotonic()
    rows: list[str] = []
    cpu_notes: list[str] = []
    bare_cpu: list[str] = []
    audit_cpu: list[str] = []
    with tempfile.TemporaryDirectory(prefix="secretfs-bench-") as d:
        tmp = Path(d)
        bare = tmp / "bare"
        with (
            tmpfs(tmp / "tmpfs", files) as t,
            bare_mount(bare, files) as bare_proc,
            secretfs_mount(tmp, files, args.ttl, args.daemon_arg) as m,
            contextlib.ExitStack() as stack,
        ):
            audited: Mount | None = None
            if args.audit:
                extra = [*args.daemon_arg, "--audit"]
                audited = stack.enter_context(secretfs_mount(tmp / "audit", files, args.ttl, extra))
            for label, size in SIZES.items():
                name = name_for(size)
                if m.read(name) != files[name].encode():
                    raise RuntimeError(f"secretfs serves other bytes than stored for {name}")
                if (bare / name).read_bytes() != files[name].encode():
                    raise RuntimeError(f"bare_fs serves other bytes than stored for {name}")
                for readers in READERS:
                    targets = [
                        (t / name, None),
                        (bare / name, bare_proc.pid),
                        (m.file(name), m.proc.pid),
                    ]
                    if audited is not None:
                        if audited.read(name) != files[name].encode():
                            raise RuntimeError(f"secretfs --audit serves other bytes for {name}")
                        targets.append((audited.file(name), audited.proc.pid))
                    (a, _), (c, c_cpu), (b, b_cpu), *more = compare(
                        client,
                        targets,
                        readers,
                        args.iterations,
                        args.warmup,
                        args.batches,
                    )
                    if readers == 1:
                        bare_cpu.append(f"{label}: {us(round(c_cpu))}")
                        cpu_notes.append(f"{label}: {us(round(b_cpu))}")
                    row = (
                        f"| {label} | {readers} | {us(a.p50_ns)} | {us(a.p99_ns)} | "
                        f"{us(b.p50_ns)} | {us(b.p99_ns)} | {b.p50_ns / a.p50_ns:.1f}x | "
                        f"{us(c.p50_ns)} | {b.p50_ns / c.p50_ns:.2f}x |"
                    )
                    if more:
                        (d, d_cpu) = more[0]
                        row += f" {us(d.p50_ns)} | {d.p50_ns / b.p50_ns:.2f}x |"
                        if readers == 1:
                            audit_cpu.append(f"{label}: {us(round(d_cpu))} ({d_cpu / b_cpu:.2f}x)")
                    rows.append(row)
            if args.hold:
                print(
                    f"mounted: tmpfs {t}, bare pyfuse3 {bare}, secretfs {m.path} "
                    f"(daemon pid {m.proc.pid}); "
                    "press Enter to unmount",
                    file=sys.stderr,
                )
                sys.stdin.readline()
            daemon_log = m.log().strip()
            audit_lines = audited.log().count(" open ") if audited is not None else 0
        for p in (tmp / "tmpfs", bare, tmp / "mnt", tmp / "audit" / "mnt"):
            if is_mounted(p):
                print(f"read_latency: {p} is still mounted", file=sys.stderr)
    elapsed = time.monotonic() - began
    print("# secretfs read latency: open + read(whole file) + close, warm")
    print()
    print(f"Machine: {machine()}")
    print(f"Command: {shlex.join([sys.executable, *sys.argv])}")
    print(
        f"Rounds per configuration: {args.iterations} (split between readers), in "
        f"{args.batches} batches alternating between the filesystems; warm-up {args.warmup} per "
        f"reader; total {elapsed:.1f} s"
    )
    print()
    head = (
        "| file size | readers | tmpfs p50 | tmpfs p99 | secretfs p50 | secretfs p99 | ratio p50 "
        "| bare pyfuse3 p50 | secretfs / bare |"
    )
    rule = "|---|---|---|---|---|---|---|---|---|"
    if args.audit:
        head += " secretfs --audit p50 | audit / no audit |"
        rule += "---|---|"
    print(head)
    print(rule)
    for r in rows:
        print(r)
    print()
    print(
        "secretfs daemon CPU per round, single reader (OPEN + RELEASE requests): "
        + ", ".join(cpu_notes)
    )
    print("bare pyfuse3 daemon CPU per round, single reader: " + ", ".join(bare_cpu))
    if args.audit:
        print(
            "secretfs --audit daemon CPU per round, single reader (all threads, the audit "
            "writer's included; ratio to no audit): " + ", ".join(audit_cpu)
        )
        print(f"audit lines written: {audit_lines}")
    if daemon_log:
        print(f"\nsecretfs daemon log:\n{daemon_log}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
