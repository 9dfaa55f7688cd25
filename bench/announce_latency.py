"""How soon a watcher hears of a new version: standalone mount (root), moto backend.

    sudo .venv/bin/python bench/announce_latency.py [--rounds 30]

Each round changes the secret in the backend, then asks for a refresh (the ``user.secretfs.refresh``
attribute of the mount, what ``secretfs refresh DIR`` reads) and times, from that request: the
refresh's answer, the inotify ``IN_ATTRIB`` on a watch of the file, and the first ``stat`` that
shows the new size. A second table times a stat poller that never reads (TTL 2 s, stat every
50 ms): from the backend change to the new size, which is the TTL's remainder + the attribute
cache (1 s) + the fetch.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inotify_simple import INotify, flags

from bench.common import REGION, needs_root, pct
from tests.moto_server import FAKE_KEYS, start_moto
from tests.mounting import mounted
from tests.test_fuse_mount import DB, spc

NAME = "MyDatabasePassword"


def row(label: str, values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return f"| {label} | {len(ms)} | {pct(ms, 50):.1f} | {pct(ms, 99):.1f} | {max(ms):.1f} |"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=30)
    args = p.parse_args()
    if needs_root():
        return 1
    import boto3

    with start_moto() as url, tempfile.TemporaryDirectory(prefix="sfs-bench-") as tmp:
        os.environ.update(FAKE_KEYS, AWS_ENDPOINT_URL=url, AWS_REGION=REGION)
        sm = boto3.client("secretsmanager", region_name=REGION, endpoint_url=url)
        sm.create_secret(Name=NAME, SecretString="v0")
        answered, heard, stated = [], [], []
        work = Path(tmp) / "refresh"
        work.mkdir()
        with mounted(spc(DB), work, "--ttl", "3600") as m:
            ino = INotify()
            ino.add_watch(m.file(NAME), flags.ATTRIB)
            for i in range(1, args.rounds + 1):
                value = f"v{i}" + "x" * i
                sm.put_secret_value(SecretId=NAME, SecretString=value)
                time.sleep(5.1)  # past the refresh coalescing window (5 s)
                t0 = time.monotonic()
                os.getxattr(m.path, "user.secretfs.refresh")
                answered.append(time.monotonic() - t0)
                if not ino.read(timeout=5000):
                    print(f"round {i}: no IN_ATTRIB within 5 s", file=sys.stderr)
                    return 1
                heard.append(time.monotonic() - t0)
                while os.stat(m.file(NAME)).st_size != len(value):
                    time.sleep(0.001)
                stated.append(time.monotonic() - t0)
        polled = []
        work = Path(tmp) / "poll"
        work.mkdir()
        with mounted(spc(DB), work, "--ttl", "2") as m:
            f = m.file(NAME)
            for i in range(1, min(args.rounds, 10) + 1):
                value = f"poll{i}" + "y" * i
                sm.put_secret_value(SecretId=NAME, SecretString=value)
                t0 = time.monotonic()
                while os.stat(f).st_size != len(value):
                    time.sleep(0.05)
                polled.append(time.monotonic() - t0)
    print("| from the refresh request (ms) | rounds | p50 | p99 | max |")
    print("|---|---:|---:|---:|---:|")
    print(row("refresh answered", answered))
    print(row("IN_ATTRIB heard by a watch of the file", heard))
    print(row("stat shows the new size", stated))
    print()
    print("| stat poller, TTL 2 s, no reads (ms) | rounds | p50 | p99 | max |")
    print("|---|---:|---:|---:|---:|")
    print(row("backend change to new size", polled))
    return 0


if __name__ == "__main__":
    sys.exit(main())
