"""Read latency of secretfs against tmpfs: open + read(whole file) + close, warm.

Run as root from the project root (it mounts a tmpfs and FUSE filesystems, and unmounts them)::

    .venv/bin/python bench/read_latency.py [--iterations N] [--repeats N] [--pin] [--audit]
                                           [--daemon-arg=ARG ...]

Files of 100 B, 4 KiB and 64 KiB, each read by 1, 4 and 16 parallel readers (processes on the
same file), on a tmpfs and on two real secretfs mounts (``python -m secretfs mount`` against a
local moto server, long TTL so every open is a cache hit), one per read path:
``--read-path=no-open`` (the kernel serves opens and warm reads, the daemon never sees them) and
``--read-path=open`` (every open asks the daemon). The timing loop is a small C program
(bench/readclient.c, compiled into bench/.build/) so the client costs nanoseconds, not the
microseconds of a Python loop. The same files are also served by a bare pyfuse3 filesystem
(bench/bare_fs.py: answers from memory, keep_cache, no checks), the floor for any pyfuse3
filesystem that answers opens. The whole measurement runs ``--repeats`` times with the mounts up;
prints per configuration the min and median over the runs of the p50, the p99 over all rounds of
all runs and the ratios to tmpfs, then opens per second, as Markdown tables. With ``--audit``, a
third secretfs mount with ``--audit`` (open path: audit lines are written at opens; they go to a
file, as the daemon's log does) is measured alongside, with the ratio of its p50 and its daemon
CPU per round to the open-path mount's.
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
import statistics
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
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
READERS = (1, 4, 16)
# Fewer timed rounds than this per reader and batch and a fast filesystem's loops last less than
# the readers take to start (the barrier releases them one by one): opens/s then understates.
# Warned about on stderr.
FEW_ROUNDS = 100

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
class Target:
    """One filesystem under test: where its files are and its daemon's pid (None: no daemon)."""

    key: str
    root: Path
    pid: int | None


@dataclass
class Run:
    """One target's share of one ``compare`` call (one run of one configuration)."""

    samples: list[int] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)  # opens/s of each batch, readers summed
    cpu_ns: int = 0  # the daemon's CPU time during the batches (0 without a daemon)
    rounds: int = 0  # rounds the daemon served, warm-up included


@dataclass(frozen=True)
class Result:
    """A configuration over all runs."""

    runs: int
    p50_min_ns: int
    p50_median_ns: int
    p99_ns: int
    samples: int
    opens_per_s: float  # median over all batches of all runs
    cpu_per_round_ns: float


def summarize(runs: list[Run]) -> Result:
    p50s = [_pct(sorted(r.samples), 50) for r in runs]
    everything = sorted(x for r in runs for x in r.samples)
    return Result(
        runs=len(runs),
        p50_min_ns=min(p50s),
        p50_median_ns=round(statistics.median(p50s)),
        p99_ns=_pct(everything, 99),
        samples=len(everything),
        opens_per_s=statistics.median(x for r in runs for x in r.rates),
        cpu_per_round_ns=sum(r.cpu_ns for r in runs) / sum(r.rounds for r in runs),
    )


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
def moto_backend(files: dict[str, str]) -> Iterator[dict[str, str]]:
    """A local moto server holding ``files`` as Secrets Manager secrets; yields the environment
    for a daemon that reads them (shared by every secretfs mount of the run)."""
    import boto3

    with start_moto() as url:
        sm = boto3.client(
            "secretsmanager",
            region_name=REGION,
            endpoint_url=url,
            aws_access_key_id=FAKE_KEYS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=FAKE_KEYS["AWS_SECRET_ACCESS_KEY"],
        )
        for name, text in files.items():
            sm.create_secret(Name=name, SecretString=text)
        yield {
            "AWS_ENDPOINT_URL": url,
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            **FAKE_KEYS,
        }


@contextlib.contextmanager
def secretfs_mount(
    tmp: Path, env: dict[str, str], files: dict[str, str], ttl: float, extra: list[str]
) -> Iterator[Mount]:
    """``secretfs mount`` of ``files`` at ``tmp``/mnt (spc and daemon log in ``tmp`` too)."""
    objects = [
        f'      - objectName: "{name}"\n        objectType: "secretsmanager"' for name in files
    ]
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


def per_reader(iterations: int, batches: int, readers: int) -> int:
    """Timed rounds of each reader in one batch."""
    return max(1, max(readers, iterations // batches) // readers)


def compare(
    client: Path,
    targets: list[tuple[Path, int | None]],
    readers: int,
    iterations: int,
    warmup: int,
    batches: int,
    cpus: list[int] | None,
    full_warmup: bool = True,
) -> list[Run]:
    """Measure each ``(path, daemon pid or None)`` in turn, in ``batches`` alternating batches,
    so a burst of load on a shared machine hits every target alike. Per target: all its rounds,
    the opens/s of each batch, and its daemon's CPU time and the rounds it served (warm-up rounds
    included). Only the first batch has the full warm-up, and only if ``full_warmup``."""
    runs = [Run() for _ in targets]
    rounds = per_reader(iterations, batches, readers)
    for i in range(batches):
        w = warmup if i == 0 and full_warmup else min(warmup, 50)
        order = list(enumerate(targets))
        for j, (path, pid) in order if i % 2 == 0 else reversed(order):
            cpu0 = daemon_cpu_ns(pid) if pid else 0
            got, rate = run_clients(client, path, readers, rounds, w, cpus)
            run = runs[j]
            if pid:
                run.cpu_ns += daemon_cpu_ns(pid) - cpu0
            run.rounds += len(got) + w * readers
            run.samples.extend(got)
            run.rates.append(rate)
    return runs


def run_clients(
    client: Path, path: Path, readers: int, rounds: int, warmup: int, cpus: list[int] | None
) -> tuple[list[int], float]:
    """Run ``readers`` clients at once on ``path``, ``rounds`` timed rounds each, reader k on CPU
    ``cpus[k % len(cpus)]`` if ``cpus``. Returns the times of all their rounds (ns) and the opens
    per second of all of them together: all their rounds / the wall time from the first timed
    loop's start to the last one's end. (Not the sum of each reader's rounds / its own loop's
    time: that assumes the loops overlap, and short ones on few CPUs do not. 16 readers of 125
    rounds each on tmpfs, 2 CPUs: the loops ran about two at a time, and that sum said 1.7M/s
    where the machine did 150k/s.)"""
    procs = []
    for k in range(readers):
        p = subprocess.Popen(
            [str(client), str(path), str(rounds), str(warmup), "--barrier"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        procs.append(p)
        if cpus:
            # Before the barrier: the timed loop runs on that CPU from its first round.
            os.sched_setaffinity(p.pid, {cpus[k % len(cpus)]})
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
    starts: list[int] = []
    ends: list[int] = []
    for p in procs:
        assert p.stdout is not None and p.stderr is not None
        out, err = p.stdout.read(), p.stderr.read()
        p.wait(timeout=120)
        if p.returncode != 0:
            raise RuntimeError(f"readclient failed on {path}: {err.decode(errors='replace')}")
        # "size <bytes>", "elapsed <ns>", "start <ns>" (any "<word> <number>" lines), then one
        # line per round.
        lines = out.split(b"\n")
        head: dict[bytes, int] = {}
        while lines and lines[0][:1].isalpha():
            key, _, value = lines.pop(0).partition(b" ")
            head[key] = int(value)
        if not {b"size", b"elapsed", b"start"} <= head.keys():
            raise RuntimeError(
                f"readclient on {path}: size, elapsed or start missing: {out[:100]!r}"
            )
        if head[b"size"] != path.stat().st_size:
            raise RuntimeError(
                f"{path}: read {head[b'size']} bytes, expected {path.stat().st_size}"
            )
        got = [int(x) for x in lines if x]
        if len(got) != rounds:
            raise RuntimeError(f"readclient on {path}: {len(got)} rounds, expected {rounds}")
        samples.extend(got)
        starts.append(head[b"start"])
        ends.append(head[b"start"] + head[b"elapsed"])
    return samples, len(samples) / (max(1, max(ends) - min(starts)) / 1e9)


def is_audit_line(line: str) -> bool:
    """An audit line of an open (text or JSON log format), as secretfs/logs.py writes it."""
    return "secretfs.audit: open " in line or '"logger": "secretfs.audit", "msg": "open"' in line


def _pct(sorted_samples: list[int], p: float) -> int:
    # Nearest rank.
    k = max(0, min(len(sorted_samples) - 1, round(p / 100 * len(sorted_samples) + 0.5) - 1))
    return sorted_samples[k]


def _num(v: float) -> str:
    return f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:.0f}"


def us(ns: float) -> str:
    return f"{_num(ns / 1000)} µs"


def p50s(r: Result) -> str:
    """The p50 cell: "min / median µs" over the runs (one figure with a single run)."""
    if r.runs == 1:
        return us(r.p50_median_ns)
    return f"{_num(r.p50_min_ns / 1000)} / {us(r.p50_median_ns)}"


def per_s(v: float) -> str:
    if v >= 1e6:
        return f"{v / 1e6:.2f}M"
    if v >= 1e4:
        return f"{v / 1e3:.0f}k"
    if v >= 1e3:
        return f"{v / 1e3:.1f}k"
    return f"{v:.0f}"


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
        default=10000,
        help="timed rounds per configuration and run, split between the readers (10000)",
    )
    ap.add_argument(
        "--warmup",
        type=int,
        default=500,
        help="untimed rounds per reader before the first batch of the first run (500; at "
        "most 50 before the others)",
    )
    ap.add_argument(
        "--batches",
        type=int,
        default=5,
        help="the rounds of each configuration are run in this many batches, alternating "
        "between the filesystems (5)",
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="run the whole measurement this many times, the mounts staying up; p50 is "
        "reported as min / median over the runs (3)",
    )
    ap.add_argument(
        "--pin",
        action="store_true",
        help="pin reader k to CPU k mod the number of CPUs this process may use (less noise)",
    )
    ap.add_argument("--ttl", type=float, default=3600.0, help="secretfs --ttl (3600)")
    ap.add_argument(
        "--daemon-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for `secretfs mount` (repeatable, every secretfs mount), e.g. "
        "--daemon-arg=--attr-timeout=60",
    )
    ap.add_argument(
        "--audit",
        action="store_true",
        help="also measure a secretfs mount with --audit --read-path=open (audit / open columns)",
    )
    ap.add_argument(
        "--hold",
        action="store_true",
        help="after the tables, keep the mounts until Enter (for profiling the daemons)",
    )
    args = ap.parse_args()
    if args.iterations < 1 or args.batches < 1 or args.repeats < 1 or args.warmup < 0:
        sys.exit("read_latency: --iterations, --batches, --repeats >= 1 and --warmup >= 0")
    if os.geteuid() != 0:
        sys.exit("read_latency: needs root (mounts a tmpfs and FUSE filesystems)")
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        sys.exit("read_latency: needs /dev/fuse and fusermount3")
    client = build_client()
    cpus = sorted(os.sched_getaffinity(0)) if args.pin else None
    for readers in READERS[1:]:
        if (each := per_reader(args.iterations, args.batches, readers)) < FEW_ROUNDS:
            print(
                f"read_latency: warning: {readers} readers get only {each} timed rounds each per "
                f"batch (fewer than {FEW_ROUNDS}): on a fast filesystem their start skew weighs "
                "on opens/s; raise --iterations or lower --batches",
                file=sys.stderr,
            )
    files = {name_for(n): fake_text(n, n) for n in SIZES.values()}
    began = time.monotonic()
    keys = ["tmpfs", "no-open", "open", "bare"] + (["audit"] if args.audit else [])
    # (size label, readers) -> target key -> one Run per repeat
    runs: dict[tuple[str, int], dict[str, list[Run]]] = {
        (label, readers): {k: [] for k in keys} for label in SIZES for readers in READERS
    }
    logs: dict[str, str] = {}
    audit_lines = 0
    with tempfile.TemporaryDirectory(prefix="secretfs-bench-") as d:
        tmp = Path(d)
        bare = tmp / "bare"
        with (
            tmpfs(tmp / "tmpfs", files) as t,
            bare_mount(bare, files) as bare_proc,
            moto_backend(files) as env,
            contextlib.ExitStack() as stack,
        ):

            def mount(sub: str, *extra: str) -> Mount:
                more = [*args.daemon_arg, *extra]
                return stack.enter_context(secretfs_mount(tmp / sub, env, files, args.ttl, more))

            # Explicit --read-path=no-open: the mount fails (and so the bench) if this pyfuse3
            # cannot serve it, rather than measuring the open path twice.
            no_open = mount("no-open", "--read-path=no-open")
            opened = mount("open", "--read-path=open")
            mounts = {"no-open": no_open, "open": opened}
            if args.audit:
                mounts["audit"] = mount("audit", "--read-path=open", "--audit")
            targets = [Target("tmpfs", t, None), Target("bare", bare, bare_proc.pid)]
            targets[2:2] = [Target(k, m.path, m.proc.pid) for k, m in mounts.items()]
            for name, text in files.items():
                for target in targets[1:]:
                    if (target.root / name).read_bytes() != text.encode():
                        raise RuntimeError(
                            f"{target.key} serves other bytes than stored for {name}"
                        )
            for rep in range(args.repeats):
                for label, size in SIZES.items():
                    for readers in READERS:
                        got = compare(
                            client,
                            [(x.root / name_for(size), x.pid) for x in targets],
                            readers,
                            args.iterations,
                            args.warmup,
                            args.batches,
                            cpus,
                            full_warmup=rep == 0,
                        )
                        for x, run in zip(targets, got, strict=True):
                            runs[(label, readers)][x.key].append(run)
            if args.hold:
                where = ", ".join(
                    f"secretfs {k} {m.path} (daemon pid {m.proc.pid})" for k, m in mounts.items()
                )
                print(
                    f"mounted: tmpfs {t}, bare pyfuse3 {bare} (pid {bare_proc.pid}), {where}; "
                    "press Enter to unmount",
                    file=sys.stderr,
                )
                sys.stdin.readline()
            for k, m in mounts.items():
                # The audit mount's log holds its audit lines: count them, show the rest.
                lines = m.log().splitlines()
                audit_lines += sum(map(is_audit_line, lines))
                logs[k] = "\n".join(x for x in lines if not is_audit_line(x)).strip()
        for p in (t, bare, *(tmp / k / "mnt" for k in ("no-open", "open", "audit"))):
            if is_mounted(p):
                print(f"read_latency: {p} is still mounted", file=sys.stderr)
    elapsed = time.monotonic() - began
    res = {cfg: {k: summarize(r) for k, r in by_key.items()} for cfg, by_key in runs.items()}

    print("# secretfs read latency: open + read(whole file) + close, warm")
    print()
    print(f"Machine: {machine()}")
    print(f"Command: {shlex.join([sys.executable, *sys.argv])}")
    split = ", ".join(
        f"{per_reader(args.iterations, args.batches, n) * args.batches} each with {n}"
        for n in READERS
    )
    pinned = (
        f"readers pinned (reader k on CPU k mod {len(cpus)}, CPUs {cpus})"
        if cpus
        else "readers not pinned"
    )
    print(
        f"Rounds per configuration and run: {args.iterations}, split between the readers "
        f"({split}), in {args.batches} batches alternating between the filesystems; "
        f"{args.repeats} runs, the mounts staying up; warm-up {args.warmup} per reader; "
        f"{pinned}; total {elapsed:.1f} s"
    )
    print()
    print(
        "p50: min / median over the runs of each run's p50; p99: over all rounds of all runs; "
        "ratios: of the median p50s. no-open: `--read-path=no-open` (the kernel serves opens "
        "and warm reads); open: `--read-path=open` (every open asks the daemon)."
    )
    print()
    head = (
        "| file size | readers | tmpfs p50 | tmpfs p99 | no-open p50 | no-open p99 "
        "| no-open / tmpfs | open p50 | open p99 | open / tmpfs | bare pyfuse3 p50 |"
    )
    rule = "|---|---|---|---|---|---|---|---|---|---|---|"
    if args.audit:
        head += " open --audit p50 | audit / open |"
        rule += "---|---|"
    print(head)
    print(rule)
    for (label, readers), r in res.items():
        tm, no, op, ba = r["tmpfs"], r["no-open"], r["open"], r["bare"]
        row = (
            f"| {label} | {readers} | {p50s(tm)} | {us(tm.p99_ns)} | {p50s(no)} | "
            f"{us(no.p99_ns)} | {no.p50_median_ns / tm.p50_median_ns:.1f}x | {p50s(op)} | "
            f"{us(op.p99_ns)} | {op.p50_median_ns / tm.p50_median_ns:.1f}x | {p50s(ba)} |"
        )
        if args.audit:
            au = r["audit"]
            row += f" {p50s(au)} | {au.p50_median_ns / op.p50_median_ns:.2f}x |"
        print(row)
    print()
    print(
        "Opens per second (each batch: the rounds of all its readers / the wall time from the "
        "first reader's start to the last one's end; median over all batches of all runs):"
    )
    print()
    head = "| file size | readers | tmpfs | secretfs no-open | secretfs open | bare pyfuse3 |"
    rule = "|---|---|---|---|---|---|"
    if args.audit:
        head += " secretfs open --audit |"
        rule += "---|"
    print(head)
    print(rule)
    for (label, readers), r in res.items():
        print(
            f"| {label} | {readers} | " + " | ".join(per_s(r[k].opens_per_s) for k in keys) + " |"
        )
    print()

    def cpu(key: str) -> list[str]:
        return [f"{label}: {us(res[(label, 1)][key].cpu_per_round_ns)}" for label in SIZES]

    print(
        "Daemon CPU per round, single reader: secretfs no-open (warm opens and reads never "
        "reach it): " + ", ".join(cpu("no-open"))
    )
    print("secretfs open (OPEN + RELEASE requests): " + ", ".join(cpu("open")))
    print("bare pyfuse3: " + ", ".join(cpu("bare")))
    if args.audit:
        ratios = []
        for label in SIZES:
            au, o = res[(label, 1)]["audit"], res[(label, 1)]["open"]
            ratios.append(
                f"{label}: {us(au.cpu_per_round_ns)} "
                f"({au.cpu_per_round_ns / o.cpu_per_round_ns:.2f}x)"
            )
        print(
            "secretfs open --audit (all threads, the audit writer's included; ratio to open "
            "without audit): " + ", ".join(ratios)
        )
        print(f"audit lines written: {audit_lines}")
    for key, log in logs.items():
        if log:
            print(f"\nsecretfs {key} daemon log:\n{log}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
