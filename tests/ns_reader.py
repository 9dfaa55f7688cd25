"""A container's view of a volume: run inside ``unshare -m --propagation private``.

    unshare -m --propagation private python -m tests.ns_reader TARGET BIND FILE [--threads N]

Bind-mounts TARGET at BIND inside this private mount namespace (as the container runtime does at
container start; a later remount of TARGET on the host never reaches it), opens BIND/FILE once
and keeps that fd, then until its stdin closes, loops in each of N threads: open+read+close of
BIND/FILE and a pread on the long-lived fd. Prints one JSON line on stdout: reads, errors by errno
name, every distinct content seen, and every operation that took longer than 50 ms (start time
on CLOCK_MONOTONIC, duration) — the stalls. A line "ready" on stderr says the loop runs.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import threading
import time
from collections import Counter

from csi import mounts

SLOW = 0.05


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("target")
    p.add_argument("bind")
    p.add_argument("file")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    mounts.mount(args.target, args.bind, None, mounts.MS_BIND, None)
    path = os.path.join(args.bind, args.file)
    held = os.open(path, os.O_RDONLY)
    stop = threading.Event()
    lock = threading.Lock()
    reads = 0
    errors: Counter[str] = Counter()
    seen: Counter[bytes] = Counter()
    slow: list[tuple[float, float]] = []

    def one(op: str) -> None:
        nonlocal reads
        start = time.monotonic()
        try:
            if op == "open":
                fd = os.open(path, os.O_RDONLY)
                try:
                    data = os.read(fd, 1 << 20)
                finally:
                    os.close(fd)
            else:
                data = os.pread(held, 1 << 20, 0)
        except OSError as exc:
            took = time.monotonic() - start
            with lock:
                errors[f"{op}:{errno.errorcode.get(exc.errno or 0, exc.errno)}"] += 1
            time.sleep(0.01)
            return
        took = time.monotonic() - start
        with lock:
            reads += 1
            seen[data] += 1
            if took > SLOW:
                slow.append((start, took))

    def loop() -> None:
        while not stop.is_set():
            one("open")
            one("pread")

    threads = [threading.Thread(target=loop) for _ in range(args.threads)]
    for t in threads:
        t.start()
    print("ready", file=sys.stderr, flush=True)
    sys.stdin.read()  # until the test closes our stdin
    stop.set()
    for t in threads:
        t.join()
    os.close(held)
    out = {
        "reads": reads,
        "errors": dict(errors),
        "seen": {k.decode(errors="replace"): v for k, v in seen.items()},
        "slow": slow,
    }
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())


class NsReader:
    """Start ``ns_reader`` in a private mount namespace; ``finish()`` stops it and returns its
    summary. ``bind`` must be an empty directory (only the reader's namespace mounts it)."""

    def __init__(self, target: str, bind: str, file: str, threads: int = 1) -> None:
        import subprocess

        os.makedirs(bind, exist_ok=True)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.proc = subprocess.Popen(
            [
                *("unshare", "-m", "--propagation", "private"),
                *(sys.executable, "-m", "tests.ns_reader", target, bind, file),
                *("--threads", str(threads)),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=root,
        )
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()
        if line.strip() != b"ready":
            self.proc.kill()
            raise AssertionError(f"reader did not start: {line!r} {self.proc.stderr.read()!r}")

    def finish(self, timeout: float = 60.0) -> dict[str, object]:
        out, err = self.proc.communicate(timeout=timeout)
        if self.proc.returncode != 0:
            raise AssertionError(f"reader failed ({self.proc.returncode}): {err!r}")
        result: dict[str, object] = json.loads(out)
        return result

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
