"""The keeper: the csi process holds the node's FUSE connection so that it outlives any daemon.

A container sees its volume through a bind mount copied into its own mount namespace: if the FUSE
connection died with a daemon, that copy would stay dead until the pod is recreated. The kernel
keeps a connection while one open file of /dev/fuse refers to it, so this process keeps the file
it mounted with, the kernel's one ``FUSE_INIT`` request (read right after the mount), the first
generation's INIT reply, and every published volume's record (the daemon's ``add`` request, with
tokens and nodePublishSecretRef data, and the volume's inode numbers) — in memory only.

When a daemon generation goes (crash, OOM kill, upgrade), requests wait in the kernel. The next
daemon gets every volume (``restore``) and then the connection (``attach``); readers saw a stall,
not an error. If this process restarts, it takes the same state back from the daemon
(``handback``, ``export``). Only both processes gone at once loses the connection.

``takeover_timeout`` (0: never) bounds how long readers may wait for a daemon: past it the keeper
closes its fd, the kernel aborts the connection and readers get ENOTCONN (then only a new pod
helps). Waiting is the default: like an NFS hard mount, a node whose daemon comes back (a
rollback, a crash loop that ends) recovers every pod without recreating any.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from csi import metrics, mounts
from secretfs import announce, control, fusewire
from secretfs.control import ControlError
from secretfs.logs import log_unexpected

log = logging.getLogger(__name__)

# How often a keeper with no daemon looks for the next generation.
POLL = 0.05
# The key of a record's "spc" holding the value of the SecretProviderClass's secretfs.io/refresh
# annotation the volume last honoured (the daemon ignores it and hands it back in ``export``).
REFRESH_MARK = "refresh"
# Change announcements waiting for the toucher thread (then they are dropped, with a warning).
TOUCH_BACKLOG = 1024


@dataclass
class Connection:
    fd: int
    device: str  # major:minor of the node root mount
    init: bytes = field(repr=False)
    init_reply: bytes | None = field(repr=False)
    generation: int
    next_inode: int
    # volume id -> {"record": the add request, "inodes": {path: inode}}; holds tokens: never log.
    volumes: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)


class Keeper:
    def __init__(self, client: control.Client, takeover_timeout: float = 0.0) -> None:
        self.client = client
        self.takeover_timeout = takeover_timeout
        self.conn: Connection | None = None
        self.lock = threading.Lock()
        self._refused: object = None  # the daemon pid we last said no to
        # A private writable clone of the node root: changed files are touched through it so
        # watchers get IN_ATTRIB (secretfs/announce.py). Touched in its own thread, never the
        # daemon's: a daemon killed mid-SETATTR must not wait for itself.
        self.clone: announce.Clone | None = None
        self._clone_lock = threading.Lock()  # held while touching through the clone
        self._touches: queue.Queue[list[str]] = queue.Queue(maxsize=TOUCH_BACKLOG)
        self._erofs_said = False
        threading.Thread(target=self._toucher, name="announce", daemon=True).start()
        # Handlers of the daemon's other watch events by kind ("versions", "event": csi/status.py
        # installs them). Called on the watch thread: they only queue work, never block.
        self.handlers: dict[str, Callable[[dict[str, Any]], None]] = {}

    def alive(self) -> bool:
        """False once the kernel has aborted our connection (fusectl abort, a forced unmount):
        a dead connection is not worth handing to anyone."""
        conn = self.conn
        if conn is None:
            return False
        poller = select.poll()
        poller.register(conn.fd, select.POLLERR)
        return not any(ev & (select.POLLERR | select.POLLNVAL) for _, ev in poller.poll(0))

    @property
    def generation(self) -> int:
        conn = self.conn
        return conn.generation if conn is not None else 0

    # --- volume records (publish, republish, unpublish) ---

    def record(self, volume_id: str, record: dict[str, Any], answer: dict[str, Any]) -> None:
        with self.lock:
            if self.conn is None:
                return
            if isinstance(answer.get("plugin_files"), list):
                # An external provider's files, as it returned them: a new daemon generation
                # rebuilds the volume from them without a call.
                record = {**record, "files": answer["plugin_files"]}
            self.conn.volumes[volume_id] = {
                "record": record,
                "inodes": dict(answer.get("inodes") or {}),
            }
            self.conn.next_inode = max(self.conn.next_inode, int(answer.get("next_inode") or 0))

    def update_identity(
        self,
        volume_id: str,
        *,
        tokens: dict[str, Any] | None = None,
        secrets: dict[str, str] | None = None,
    ) -> None:
        """A republish renewed the tokens (empty or None: kept) and brought the
        nodePublishSecretRef data the daemon now serves with (None: unchanged)."""
        with self.lock:
            entry = self.conn.volumes.get(volume_id) if self.conn else None
            if entry is None:
                return
            identity = entry["record"]["identity"]
            if tokens:
                identity["tokens"] = tokens
            if secrets is not None:
                identity["secrets"] = secrets

    def refresh_mark(self, volume_id: str) -> str | None:
        """The SecretProviderClass's ``secretfs.io/refresh`` annotation as this volume last
        honoured it ("" if there was none); None if the volume has no record here."""
        with self.lock:
            entry = self.conn.volumes.get(volume_id) if self.conn else None
            if entry is None:
                return None
            spc = entry["record"].get("spc")
            return str(spc.get(REFRESH_MARK) or "") if isinstance(spc, dict) else ""

    def set_refresh_mark(self, volume_id: str, value: str) -> None:
        with self.lock:
            entry = self.conn.volumes.get(volume_id) if self.conn else None
            if entry is not None and isinstance(entry["record"].get("spc"), dict):
                entry["record"]["spc"][REFRESH_MARK] = value

    def forget(self, volume_id: str) -> None:
        with self.lock:
            if self.conn is not None:
                self.conn.volumes.pop(volume_id, None)

    # --- the connection ---

    def mount_fresh(self, mount_root: str, uid: int, gid: int) -> None:
        """Mount a new node root, read its FUSE_INIT and hand it to the daemon (generation 1)."""
        self.drop("a new node root is mounted")
        os.makedirs(mount_root, mode=0o755, exist_ok=True)
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        try:
            mounts.mount_fuse_root(mount_root, fd, uid, gid)
            try:
                self._clone(mount_root)
                init = fusewire.read_init(fd)
                root = mounts.node_root(mounts.read_mountinfo(), mount_root)
                if root is None:
                    raise OSError(f"{mount_root} is not mounted after mount(2)")
                answer = self.client.attach(fd, init, None, 1, [])
            except BaseException:
                mounts.unmount_all(mount_root)
                raise
        except BaseException:
            os.close(fd)
            raise
        reply = control.b64(answer.get("init_reply"))
        with self.lock:
            self.conn = Connection(fd, root.device, init, reply, 1, int(answer["next_inode"]))
        log.info("node root %s mounted and handed to the daemon", mount_root)

    def take_over(self, status: dict[str, Any]) -> dict[str, Any]:
        """Give the held connection and every volume to a daemon that serves nothing yet."""
        conn = self.conn
        assert conn is not None
        if status.get("proto") != control.PROTOCOL:
            message = (
                f"the daemon speaks hand-over protocol {status.get('proto')!r}, this csi process "
                f"{control.PROTOCOL}: it is not given the FUSE connection (readers keep waiting); "
                "run matching releases of both"
            )
            if self._refused != status.get("pid"):
                self._refused = status.get("pid")
                log.error("%s", message)
            raise ControlError(control.FAILED_PRECONDITION, message)
        with self.lock:
            volumes = {vid: dict(v) for vid, v in conn.volumes.items()}
            next_inode = conn.next_inode
        start = time.monotonic()
        restored = []
        for vid, entry in volumes.items():
            try:
                answer = self.client.restore(vid, entry["record"], entry["inodes"], next_inode)
            except control.Unreachable:
                raise
            except ControlError as exc:
                if exc.code == control.ALREADY_EXISTS:  # restored by an attempt that failed later
                    restored.append(vid)
                    continue
                # This generation cannot parse what an earlier one accepted (an upgrade that is
                # stricter): the volume's files answer ENOENT; every other volume carries on.
                log.error("volume %s could not be restored: %s", vid, exc.message)
                metrics.takeover_volume_errors.inc()
                continue
            restored.append(vid)
            lost = set(entry["inodes"].values()) - set((answer.get("inodes") or {}).values())
            if lost:
                log.warning("volume %s: %d path(s) are gone after the takeover", vid, len(lost))
        waiting = fusewire.waiting(conn.device)
        answer = self.client.attach(
            conn.fd, conn.init, conn.init_reply, conn.generation + 1, restored
        )
        with self.lock:
            conn.generation += 1
            conn.next_inode = max(conn.next_inode, int(answer.get("next_inode") or 0))
        metrics.takeovers.inc()
        if waiting is not None:
            metrics.takeover_waiting.set(waiting)
        if answer.get("resent"):
            metrics.takeover_resends.inc()
        log.info(
            "FUSE connection handed to daemon generation %d: %d volume(s) in %.0f ms%s",
            conn.generation,
            len(restored),
            (time.monotonic() - start) * 1e3,
            f", {waiting} request(s) were waiting" if waiting is not None else "",
        )
        return answer

    def reclaim(self, root: mounts.MountInfo) -> None:
        """This process restarted while a daemon served: take the connection and records back."""
        answer, fd = self.client.handback()
        try:
            conn = Connection(
                fd,
                root.device,
                control.b64(answer.get("init")) or b"",
                control.b64(answer.get("init_reply")),
                int(answer["generation"]),
                int(answer["next_inode"]),
            )
            for vid in answer.get("volumes") or ():
                conn.volumes[vid] = self.client.export(vid)
        except BaseException:
            os.close(fd)
            raise
        with self.lock:
            self.conn = conn
        try:
            self._clone(root.mountpoint)
        except OSError as exc:
            log.error("the node root %s could not be made read-only: %s", root.mountpoint, exc)
        log.info(
            "took the FUSE connection back from daemon generation %d (%d volume(s))",
            conn.generation,
            len(conn.volumes),
        )

    def drop(self, why: str) -> None:
        """Let go of the connection: if no daemon holds it either, the kernel aborts it."""
        with self.lock:
            conn, self.conn = self.conn, None
        if conn is not None:
            log.warning("letting go of the FUSE connection: %s", why)
            with contextlib.suppress(OSError):
                os.close(conn.fd)
        # After the connection: a touch blocked on it ends when the kernel aborts it.
        with self._clone_lock:
            clone, self.clone = self.clone, None
        if clone is not None:
            clone.close()

    # --- change announcements ---

    def _clone(self, mount_root: str) -> None:
        """Make the node root announce (a private writable clone) and read-only again; raises
        OSError only if it cannot be made read-only."""
        fd, why = announce.announcing(mount_root)
        if fd is None:
            log.warning("no change announcements (inotify events): %s", why)
            return
        clone = announce.Clone(fd)
        with self._clone_lock:
            old, self.clone = self.clone, clone
        if old is not None:
            old.close()

    def _on_event(self, event: dict[str, Any]) -> None:
        paths = event.get("touch")
        if not isinstance(paths, list):
            for kind, payload in event.items():
                handler = self.handlers.get(kind)
                if handler is None or not isinstance(payload, dict):
                    continue
                try:
                    handler(payload)
                except Exception:  # a handler bug must not end the watch
                    log_unexpected(log, "handling a %r event from the daemon failed", kind)
            return
        try:
            self._touches.put_nowait([str(p) for p in paths])
        except queue.Full:
            log.warning("change announcements are backing up; %d dropped", len(paths))

    def _toucher(self) -> None:
        while True:
            paths = self._touches.get()
            with self._clone_lock:
                fd = self.clone.fd if self.clone is not None else None
                failed = announce.touch(fd, paths) if fd is not None else []
            for path, err in failed:
                if err == errno.EROFS:
                    if not self._erofs_said:
                        self._erofs_said = True
                        log.warning(
                            "no change announcements: the node root's superblock is read-only "
                            "(mounted so by an earlier release, and remounting it failed); they "
                            "start with the next node root"
                        )
                else:
                    log.warning("announcing a change of %s failed: %s", path, os.strerror(err))
            metrics.announcements.inc(len(paths))

    # --- the watch ---

    def watch(self, ensure: Any, stop: threading.Event) -> None:
        """Run in a thread: whenever the daemon serving our connection goes, hand the connection
        to the next one (``ensure`` is ``Node.ensure_root``) as soon as it answers."""
        while not stop.is_set():
            if self.conn is None:
                stop.wait(0.5)
                continue
            try:
                status = self.client.status(2.0)
            except ControlError:
                status = {}
            if status.get("serving"):
                with contextlib.suppress(ControlError):
                    self.client.watch(self._on_event)  # returns when that daemon is gone
                stop.wait(POLL)
                continue
            self._recover(ensure, stop)

    def _recover(self, ensure: Any, stop: threading.Event) -> None:
        gone = time.monotonic()
        before = self.generation
        while not stop.is_set() and self.conn is not None:
            try:
                ensure()
            except Exception as exc:
                message = getattr(exc, "message", type(exc).__name__)
                log.debug("takeover not possible yet: %s", message)
            else:
                if self.conn is not None and self.generation != before:
                    stall = time.monotonic() - gone
                    metrics.takeover_stall.set(stall)
                    log.info("the FUSE connection is served again after %.2f s", stall)
                return
            if self.takeover_timeout and time.monotonic() - gone > self.takeover_timeout:
                self.drop(
                    f"no daemon took it over within --takeover-timeout "
                    f"{self.takeover_timeout:g} s; readers get ENOTCONN"
                )
                metrics.connection_aborts.inc()
                return
            stop.wait(POLL)
