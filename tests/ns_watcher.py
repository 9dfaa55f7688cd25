"""A container's watcher of a volume: run inside ``unshare -m --propagation private``.

    unshare -m --propagation private python -m tests.ns_watcher DIR FILE BIND_DIR BIND_FILE

Bind-mounts DIR at BIND_DIR and DIR/FILE at BIND_FILE (a ``subPath`` mount of one file) inside this
private mount namespace, as a container runtime does at container start, then watches both binds
with inotify and polls ``stat`` of BIND_FILE every 50 ms without ever reading it. Prints one JSON
line per event on stdout: ``{"watch": "file"|"dir", "events": [...], "name": ...}`` and
``{"stat": [size, mtime_ns]}`` whenever those change. A line "ready" on stderr says it watches.
Ends when its stdin closes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading

from inotify_simple import INotify, flags

from csi import mounts

ALL = 0xFFF  # every inotify event type


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("dir")
    p.add_argument("file")
    p.add_argument("bind_dir")
    p.add_argument("bind_file")
    args = p.parse_args()
    mounts.mount(args.dir, args.bind_dir, None, mounts.MS_BIND, None)
    mounts.mount(os.path.join(args.dir, args.file), args.bind_file, None, mounts.MS_BIND, None)
    ino = INotify()
    names = {
        ino.add_watch(args.bind_file, ALL): "file",
        ino.add_watch(args.bind_dir, ALL): "dir",
    }
    out = threading.Lock()
    stop = threading.Event()

    def emit(obj: object) -> None:
        with out:
            print(json.dumps(obj), flush=True)

    def poll_stat() -> None:
        last = None
        while not stop.is_set():
            st = os.stat(args.bind_file)
            now = (st.st_size, st.st_mtime_ns)
            if now != last:
                emit({"stat": list(now)})
                last = now
            stop.wait(0.05)

    def until_eof() -> None:
        sys.stdin.read()
        stop.set()
        os._exit(0)

    threading.Thread(target=poll_stat, daemon=True).start()
    threading.Thread(target=until_eof, daemon=True).start()
    print("ready", file=sys.stderr, flush=True)
    while True:
        for ev in ino.read(timeout=200):
            events = sorted(f.name for f in flags.from_mask(ev.mask))
            emit({"watch": names.get(ev.wd, "?"), "events": events, "name": ev.name})


if __name__ == "__main__":
    sys.exit(main())
