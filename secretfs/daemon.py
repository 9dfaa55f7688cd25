"""``secretfs daemon``: the node's FUSE server, driven by the csi process over a control socket.

Needs no mount privilege: the csi process opens /dev/fuse, mounts the node root with
``fd=N`` and hands the fd over (``attach``); the daemon serves it with
``pyfuse3.init(ops, "/dev/fd/N")``. One FUSE session per process (pyfuse3's rule), a directory per
volume (``/<volume_id>/``) that the csi process bind-mounts onto each pod's target path.

Everything runs on the trio thread except provider calls and kernel invalidations (worker threads,
see fs.py).

**The connection outlives the daemon.** The csi process (the keeper) holds the /dev/fuse fd, the
kernel's recorded FUSE_INIT and every volume's record (in memory). A new daemon generation is
given them: first each volume (``restore``: rebuilt with the inode numbers it had, values fetched
again on first use), then the connection (``attach``: takeover.py). Only one generation runs at a
time: a daemon takes the node lock (``<socket>.lock``, flock) before it listens and holds it until
it dies, so a generation that holds it knows every earlier one is dead and may ask the kernel to
resend what its predecessor had read (``FUSE_NOTIFY_RESEND``). If the csi process restarts, it
takes the same things back (``handback``, ``export``). SIGTERM (an upgrade) stops serving without
touching the connection or revoking anything: the next generation carries on.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import logging
import os
import signal
import socket
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import pyfuse3
import trio

from providers.base import FetchError, Identity, ParameterError, Plan, Token
from secretfs import control, fusewire, metrics, takeover
from secretfs import spc as spc_mod
from secretfs.control import ControlError
from secretfs.fs import ATTR_TIMEOUT, ROOT_INODE, SecretFS
from secretfs.hardening import describe, harden
from secretfs.logs import fields as log_fields
from secretfs.logs import log_unexpected
from secretfs.readpath import describe_read_path
from secretfs.standalone import fuse_options
from secretfs.volumes import DEFAULT_MIN_TTL, Volume, VolumeError, Volumes

log = logging.getLogger(__name__)

# How long a connected client may take to send its request.
REQUEST_DEADLINE = 10.0
# Change announcements queued for a keeper that is slow to take them (then they are dropped).
WATCH_BACKLOG = 1024
# FetchError codes that mean "the backend refused this identity" (PERMISSION_DENIED).
DENIED_CODES = frozenset({"AccessDenied", "PermissionDenied", "AuthFailed", "Forbidden"})
# After SIGTERM, requests already being served get this long; what is left unanswered is resent
# to the next generation by the kernel (Linux 6.9+). Without resend an unanswered request would
# hang its caller, so they get as long as a read may wait for a fetch (READ_DEADLINE, 30 s) within
# Kubernetes' default grace period.
TERM_GRACE = 2.0
# How long a new daemon waits for the previous one to be gone (normally milliseconds).
LOCK_WAIT = 5.0
TERM_GRACE_NO_RESEND = 25.0


@dataclass(frozen=True)
class DaemonOptions:
    ttl: float = 120.0
    max_stale: float = 86400.0
    revoke_leases: bool = False
    lock_memory: bool = True
    attr_timeout: float = ATTR_TIMEOUT
    # Bounds of a SecretProviderClass's own TTL (secretfs.io/ttl); max_ttl None: max_stale.
    min_ttl: float = DEFAULT_MIN_TTL
    max_ttl: float | None = None
    # Prometheus /metrics (":8096", "127.0.0.1:8096"); empty: off (secretfs/metrics.py).
    metrics_addr: str = ""
    # Serve opens and warm reads without OPEN (fs.choose_no_open; the CLI's --read-path).
    no_open: bool = False


def identity_from(d: Any) -> Identity:
    """The pod identity of an ``add`` request; never the daemon's ambient identity."""
    if not isinstance(d, dict) or not d.get("namespace"):
        raise ControlError(control.INVALID_ARGUMENT, "the volume's pod namespace is missing")
    return Identity(
        namespace=str(d["namespace"]),
        service_account=str(d.get("service_account") or "") or None,
        pod_name=str(d.get("pod_name") or "") or None,
        pod_uid=str(d.get("pod_uid") or "") or None,
        tokens=tokens_from(d.get("tokens")),
        secrets={str(k): str(v) for k, v in (d.get("secrets") or {}).items()},
        sa_annotations={str(k): str(v) for k, v in (d.get("sa_annotations") or {}).items()},
    )


def tokens_from(d: Any) -> dict[str, Token]:
    """The kubelet's ``{audience: {token, expirationTimestamp}}`` map."""
    out: dict[str, Token] = {}
    for aud, tok in (d or {}).items():
        if isinstance(tok, dict) and isinstance(tok.get("token"), str):
            out[str(aud)] = Token(tok["token"], tok.get("expirationTimestamp"))
    return out


def classify(exc: VolumeError) -> str:
    """The answer code of a failed prefetch: retryable outage, refusal, or a fixable mistake."""
    errors: tuple[FetchError, ...] = exc.errors
    if not errors or any(e.transient for e in errors):
        return control.UNAVAILABLE
    if any(e.code in DENIED_CODES for e in errors):
        return control.PERMISSION_DENIED
    return control.FAILED_PRECONDITION


def record_of(vol: Volume) -> dict[str, Any]:
    """What the keeper needs to add ``vol`` to the next generation (it holds tokens: never log)."""
    return {"record": vol.record, "inodes": vol.inodes}


class Daemon:
    def __init__(self, volumes: Volumes, fs: SecretFS, nursery: trio.Nursery) -> None:
        self.volumes = volumes
        self.fs = fs
        self.nursery = nursery
        self.attached = False
        self.serving = False
        self.terminating = False
        self.refused = False
        self.exit_code = 0
        self.generation = 0
        self.fuse_fd = -1
        self.init = b""
        self.init_reply = b""
        self.kernel_resend = False
        self._pending: set[str] = set()
        # Keepers watching with events: changed files go to them to announce (the daemon never
        # touches its own mount: secretfs/announce.py).
        self._watchers: set[trio.MemorySendChannel[dict[str, Any]]] = set()
        fs.announcer = self._announce
        # Object versions and Kubernetes Events for csi to write (csi/status.py, csi/events.py).
        volumes.on_event.append(self._on_volume_event)

    def _on_volume_event(self, kind: str, payload: dict[str, Any]) -> None:
        """``{"versions": {...}}`` or ``{"event": {...}}`` on every keeper's watch; dropped (with
        a warning) when a keeper does not take them: they are reports, nothing waits for them."""
        for ch in list(self._watchers):
            try:
                ch.send_nowait({kind: payload})
            except trio.WouldBlock:
                log.warning("the keeper is not taking events; a %r event was dropped", kind)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._watchers.discard(ch)

    def _announce(self, paths: list[str]) -> None:
        for ch in list(self._watchers):
            try:
                ch.send_nowait({"touch": paths})
            except trio.WouldBlock:
                log.warning("the keeper is not taking change announcements; %d dropped", len(paths))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._watchers.discard(ch)

    async def _stream_events(self, conn: trio.socket.SocketType) -> None:
        """A keeper's watch with events: never answered, it carries announcements until one
        side goes (EOF tells the keeper this daemon is gone)."""
        send, receive = trio.open_memory_channel[dict[str, Any]](WATCH_BACKLOG)
        self._watchers.add(send)
        try:
            async with receive:
                async for event in receive:
                    data = control.encode(event)
                    while data:
                        data = data[await conn.send(data) :]
        except OSError:
            pass
        finally:
            self._watchers.discard(send)
            send.close()

    # --- connections ---

    async def handle(self, conn: trio.socket.SocketType) -> None:
        reader = control.FrameReader()
        send_fds: list[int] = []
        with conn:
            try:
                pid, uid, _ = struct.unpack(
                    "3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
                )
                if uid not in (0, os.getuid()):
                    log.warning("refused a control connection from pid %d uid %d", pid, uid)
                    raise ControlError(control.PERMISSION_DENIED, "not allowed")
                with trio.fail_after(REQUEST_DEADLINE):
                    while (msg := reader.frame()) is None:
                        data, anc, _, _ = await conn.recvmsg(65536, control.ANC_SPACE)
                        if not data:
                            return
                        reader.feed(data, anc)
                if msg.get("op") == "watch" and msg.get("events"):
                    await self._stream_events(conn)
                    return
                if msg.get("op") == "handback":
                    answer = {"ok": True, **self.handback()}
                    send_fds = [self.fuse_fd]
                else:
                    answer = {"ok": True, **await self.dispatch(msg, reader.fds)}
            except ControlError as exc:
                answer = {"ok": False, "code": exc.code, "message": exc.message}
            except trio.TooSlowError:
                return
            except Exception as exc:
                log_unexpected(log, "control request failed")
                answer = {"ok": False, "code": control.INTERNAL, "message": type(exc).__name__}
            finally:
                for fd in reader.fds:
                    os.close(fd)
            try:
                data = control.encode(answer)
                if send_fds:
                    data = data[await conn.sendmsg([data], control.fd_ancillary(send_fds)) :]
                while data:
                    data = data[await conn.send(data) :]
            except (OSError, ControlError):
                pass
        if self.refused:
            # The keeper has our answer; a daemon that refused a hand-over serves nothing.
            self.exit_code = 3
            self.nursery.cancel_scope.cancel()

    async def dispatch(self, msg: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        op = msg.get("op")
        if op == "status":
            return {
                "attached": self.attached,
                "serving": self.serving,
                "generation": self.generation,
                "proto": control.PROTOCOL,
                "volumes": sorted(self.volumes.volumes),
                "uid": os.getuid(),
                "gid": os.getgid(),
                "pid": os.getpid(),
            }
        if op == "attach":
            return await self.attach(msg, fds)
        if op == "watch":
            # Never answered: the keeper learns that this generation is gone when it sees EOF.
            await trio.sleep_forever()
        if op == "reload":
            return await self.reload(msg.get("volume_id"))
        volume_id = str(msg.get("volume_id") or "")
        problem = control.check_volume_id(volume_id)
        if problem:
            raise ControlError(control.INVALID_ARGUMENT, problem)
        if op == "add":
            if not self.attached:
                # Before attach, inode numbers are not known yet (the keeper restores first).
                raise ControlError(
                    control.UNAVAILABLE, "the secretfs daemon is starting; not serving yet"
                )
            return await self.add(volume_id, msg)
        if op == "restore":
            return await self.restore(volume_id, msg)
        if op == "export":
            vol = self.volumes.volumes.get(volume_id)
            if vol is None:
                raise ControlError(control.NOT_FOUND, f"volume {volume_id} is not published")
            return record_of(vol)
        if op == "refresh":
            return await self.refresh(volume_id, msg)
        if op == "remove":
            removed = await self.volumes.remove(volume_id)
            if removed:
                log.info("volume %s removed", volume_id, extra=log_fields(volume=volume_id))
                if self.serving:
                    self.fs.forget_entry(ROOT_INODE, volume_id.encode())
            return {"removed": removed, "next_inode": self.volumes.tree.next_inode}
        raise ControlError(control.INVALID_ARGUMENT, f"unknown operation {op!r}")

    # --- the connection ---

    async def attach(self, msg: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        """Serve the keeper's connection: its first generation, or the next one."""
        if len(fds) != 1:
            raise ControlError(control.INVALID_ARGUMENT, "attach needs exactly one /dev/fuse fd")
        if msg.get("proto") != control.PROTOCOL:
            raise ControlError(
                control.FAILED_PRECONDITION,
                f"hand-over protocol {msg.get('proto')!r} is not spoken here "
                f"(this daemon speaks {control.PROTOCOL})",
            )
        if self.attached or self.refused:
            raise ControlError(control.ALREADY_EXISTS, "already serving a FUSE session")
        if not stat.S_ISCHR(os.fstat(fds[0]).st_mode):
            raise ControlError(control.INVALID_ARGUMENT, "attach: not a character device")
        try:
            init = base64.b64decode(str(msg.get("init", "")), validate=True)
            reply = msg.get("init_reply")
            expected = None if reply is None else base64.b64decode(str(reply), validate=True)
            generation = int(msg.get("generation", 1))
            wanted = {str(v) for v in msg.get("volumes") or ()}
            kernel = fusewire.parse_init(init)
        except (ValueError, TypeError, fusewire.WireError) as exc:
            raise ControlError(control.INVALID_ARGUMENT, f"attach: {exc}") from None
        missing = wanted - set(self.volumes.volumes)
        if missing:
            raise ControlError(
                control.FAILED_PRECONDITION,
                f"attach: {len(missing)} volume(s) were not restored first",
            )
        try:
            fd, reply = await takeover.take_over(
                self.fs, fds[0], init, fuse_options(True), expected
            )
        except takeover.TakeoverError as exc:
            log.error("refusing the FUSE connection: %s; exiting", exc)
            self.refused = True
            raise ControlError(control.FAILED_PRECONDITION, str(exc)) from None
        self.fuse_fd, self.init, self.init_reply = fd, init, reply
        self.kernel_resend = kernel.resend
        self.generation = generation
        self.attached = self.serving = True
        resent = False
        if generation > 1:
            # We hold the node lock: every earlier generation is dead, so nothing runs twice.
            if kernel.resend:
                resent = fusewire.resend(fd)
            if not resent:
                log.warning(
                    "this kernel cannot resend the requests the previous daemon had read "
                    "(FUSE_NOTIFY_RESEND needs Linux 6.9); their callers wait until aborted"
                )
        self.fs.start(self.nursery, generation)
        self.nursery.start_soon(self._main)
        if self.volumes.volumes:
            self.fs.invalidate_files()
            for vid in list(self.volumes.volumes):
                self.nursery.start_soon(self._warm, vid)
        log.info(
            "serving the node FUSE connection: generation %d, %d volume(s)%s",
            generation,
            len(self.volumes.volumes),
            ", unanswered requests resent" if resent else "",
        )
        return {
            "init_reply": base64.b64encode(reply).decode(),
            "resent": resent,
            "next_inode": self.volumes.tree.next_inode,
        }

    async def _warm(self, volume_id: str) -> None:
        """Fetch a restored volume's values, then announce all its files once: this generation
        cannot know whether a value changed while no daemon served, and a watcher that reloads
        once too often loses nothing, while one that misses a change serves stale credentials."""
        await self.volumes.warm(volume_id)
        vol = self.volumes.volumes.get(volume_id)
        if vol is not None:
            files = {ino for path, ino in vol.inodes.items() if path and self.fs.tree.get(ino)}
            self.fs.announce({i for i in files if not self.fs.tree[i].is_dir})

    def handback(self) -> dict[str, Any]:
        """Give a restarted keeper what it lost: the connection (its fd goes with the answer)."""
        if not self.attached or not self.serving:
            raise ControlError(control.FAILED_PRECONDITION, "no FUSE connection to hand back")
        return {
            "proto": control.PROTOCOL,
            "init": base64.b64encode(self.init).decode(),
            "init_reply": base64.b64encode(self.init_reply).decode(),
            "generation": self.generation,
            "next_inode": self.volumes.tree.next_inode,
            "volumes": sorted(self.volumes.volumes),
        }

    async def _main(self) -> None:
        try:
            await pyfuse3.main()
        except Exception:
            log_unexpected(log, "the FUSE session failed")
        finally:
            self.serving = False
            # Our copy of the fd goes; the keeper's keeps the connection alive.
            pyfuse3.close(unmount=False)
            if not self.terminating:
                log.warning("the node FUSE session ended; exiting")
                self.exit_code = 1
            self.nursery.cancel_scope.cancel()

    def terminate(self) -> None:
        """SIGTERM: stop reading requests; leave the connection and the volumes to the next
        generation (nothing is revoked: the volumes live on)."""
        self.terminating = True
        if not self.serving:
            self.nursery.cancel_scope.cancel()
            return
        pyfuse3.terminate()  # _main() returns once the requests being served are answered
        grace = TERM_GRACE if self.kernel_resend else TERM_GRACE_NO_RESEND
        self.nursery.cancel_scope.deadline = trio.current_time() + grace

    async def reload(self, volume_id: Any) -> dict[str, Any]:
        """Fetch a volume's values now (absent or "": every volume's), bypassing the TTL."""
        vid = str(volume_id or "") or None
        if vid is not None:
            problem = control.check_volume_id(vid)
            if problem:
                raise ControlError(control.INVALID_ARGUMENT, problem)
            if vid not in self.volumes.volumes:
                raise ControlError(control.NOT_FOUND, f"volume {vid} is not published")
        return await self.volumes.reload(vid)

    # --- volumes ---

    def _spc(self, msg: dict[str, Any], identity: Identity) -> spc_mod.SecretProviderClass:
        raw = msg.get("spc") or {}
        try:
            ttl = spc_mod.ttl_value(raw.get("ttl"))  # absent in records of older releases
        except ValueError as exc:
            raise ControlError(control.INVALID_ARGUMENT, f"spc: {exc}") from None
        return spc_mod.SecretProviderClass(
            name=str(raw.get("name", "")),
            namespace=identity.namespace,
            provider=str(raw.get("provider", "")),
            parameters={str(k): str(v) for k, v in (raw.get("parameters") or {}).items()},
            ttl=ttl,
        )

    async def _plan(self, spc: spc_mod.SecretProviderClass, msg: dict[str, Any]) -> Plan:
        attributes = {str(k): str(v) for k, v in (msg.get("attributes") or {}).items()}
        node = spc_mod.node_value(msg.get("node"))  # csi's Node facts (the AWS region label)
        try:
            # parse() may import a provider SDK the first time: keep that off the trio thread.
            return await trio.to_thread.run_sync(lambda: spc_mod.plan(spc, attributes, node=node))
        except ParameterError as exc:
            problems = "; ".join(str(p) for p in exc.problems)
            raise ControlError(
                control.INVALID_ARGUMENT,
                f"SecretProviderClass {spc.namespace}/{spc.name}: {problems}",
            ) from None

    async def add(self, volume_id: str, msg: dict[str, Any]) -> dict[str, Any]:
        identity = identity_from(msg.get("identity"))
        spc = self._spc(msg, identity)
        where = f"SecretProviderClass {spc.namespace}/{spc.name}"
        existing = self.volumes.volumes.get(volume_id)
        if existing is not None:
            if existing.identity.key() != identity.key():
                raise ControlError(
                    control.ALREADY_EXISTS, f"volume {volume_id} exists for another identity"
                )
            self.volumes.refresh_identity(volume_id, identity)
            return {
                "existing": True,
                "objects": self.volumes.versions(existing),
                "files": len(existing.plan.files),
                "inodes": existing.inodes,
                "next_inode": self.volumes.tree.next_inode,
            }
        if volume_id in self._pending:
            raise ControlError(control.ABORTED, f"volume {volume_id} is being added already")
        gid = int(msg.get("gid") or 0)
        self._pending.add(volume_id)
        try:
            plan = await self._plan(spc, msg)
            try:
                vol = await self.volumes.add(
                    volume_id, plan, identity, uid=0, gid=gid, target=target_of(msg, volume_id)
                )
            except VolumeError as exc:
                raise ControlError(classify(exc), f"{where}: {exc}") from None
        finally:
            self._pending.discard(volume_id)
        record = record_request(msg)
        plan = vol.plan  # an external provider's plan has its files only now
        if hasattr(vol.provider, "expand_sync"):
            # The files the provider returned: the next generation rebuilds them without a call.
            record["files"] = [[f.path, f.mode] for f in plan.files]
        vol.record = record
        log.info(
            "volume %s added: %s for %s/%s, %d file(s), gid %d",
            volume_id,
            where,
            identity.namespace,
            identity.service_account,
            len(plan.files),
            gid,
            extra=log_fields(vol),
        )
        answer = {
            "existing": False,
            "objects": self.volumes.versions(vol),
            "files": len(plan.files),
            "inodes": vol.inodes,
            "next_inode": self.volumes.tree.next_inode,
        }
        if "files" in record:
            answer["plugin_files"] = record["files"]
        return answer

    async def restore(self, volume_id: str, msg: dict[str, Any]) -> dict[str, Any]:
        """A volume of an earlier generation, before ``attach``: same inode numbers, no fetch
        (values come on first use, or from ``warm`` once attached)."""
        if self.attached:
            raise ControlError(control.FAILED_PRECONDITION, "restore comes before attach")
        if volume_id in self.volumes.volumes or volume_id in self._pending:
            raise ControlError(control.ALREADY_EXISTS, f"volume {volume_id} exists")
        record = msg.get("record")
        inodes = msg.get("inodes")
        if not isinstance(record, dict) or not isinstance(inodes, dict):
            raise ControlError(control.INVALID_ARGUMENT, "restore needs a record and inodes")
        self.volumes.tree.reserve(int(msg.get("next_inode") or 0))
        identity = identity_from(record.get("identity"))
        self._pending.add(volume_id)
        try:
            plan = await self._plan(self._spc(record, identity), record)
            vol = await self.volumes.add(
                volume_id,
                plan,
                identity,
                uid=0,
                gid=int(record.get("gid") or 0),
                restore={str(k): int(v) for k, v in inodes.items()},
                target=target_of(record, volume_id),
                files=record.get("files"),
            )
        finally:
            self._pending.discard(volume_id)
        vol.record = record
        return {"files": len(vol.plan.files), "inodes": vol.inodes}

    async def refresh(self, volume_id: str, msg: dict[str, Any]) -> dict[str, Any]:
        """A republish: fresh ``tokens``, and the nodePublishSecretRef data as it is now
        (``secrets``; absent: unchanged). Data that changes the identity key re-keys the volume:
        every value is fetched with the new data first; if that fails, the volume keeps serving
        the values it has and the answer says what failed (the kubelet republishes again)."""
        vol = self.volumes.volumes.get(volume_id)
        if vol is None:
            raise ControlError(control.NOT_FOUND, f"volume {volume_id} is not published")
        tokens = msg.get("tokens")
        fresh = tokens_from(tokens)
        raw = msg.get("secrets")
        if raw is not None and not isinstance(raw, dict):
            raise ControlError(control.INVALID_ARGUMENT, "refresh: secrets must be an object")
        ident = vol.identity
        if fresh:
            # The tokens are renewed even if the new Secret data below cannot be used.
            ident = replace(ident, tokens=fresh)
            self.volumes.refresh_identity(volume_id, ident)
            self._record_identity(vol, tokens=tokens)
        answer: dict[str, Any] = {
            "tokens": len(fresh),
            "provider": vol.plan.provider,
            "objects": self.volumes.versions(vol),  # for a csi that restarted (csi/status.py)
        }
        if raw is None:
            return answer
        identity = replace(ident, secrets={str(k): str(v) for k, v in raw.items()})
        if identity.key() == ident.key():
            return answer
        if volume_id in self._pending:
            raise ControlError(control.ABORTED, f"volume {volume_id} is being changed already")
        self._pending.add(volume_id)
        try:
            changed = await self.volumes.rekey(volume_id, identity)
        except VolumeError as exc:
            spc = vol.record.get("spc") or {}
            code = classify(exc)
            fix = (
                "the kubelet retries at its next republish"
                if code == control.UNAVAILABLE
                else "fix the Secret's data or the backend's access for it; the kubelet retries "
                "at its next republish"
            )
            message = (
                f"volume {volume_id}: the data of its nodePublishSecretRef Secret changed and "
                f"cannot fetch every object with it (SecretProviderClass {ident.namespace}/"
                f"{spc.get('name', '?')}: {exc}); the volume keeps serving the values fetched "
                f"with the previous data: {fix}"
            )
            first = exc.errors[0] if exc.errors else None
            log.warning(
                "%s",
                message,
                extra=log_fields(vol, error=first, error_type=None if first else code),
            )
            raise ControlError(code, message) from None
        finally:
            self._pending.discard(volume_id)
        vol = self.volumes.volumes[volume_id]
        self._record_identity(vol, secrets=dict(identity.secrets))
        log.info(
            "volume %s: nodePublishSecretRef data changed; now served with the new data "
            "(%d of %d file(s) changed)",
            volume_id,
            changed,
            len(vol.plan.files),
            extra=log_fields(vol),
        )
        return {**answer, "rekeyed": True, "changed": changed}

    @staticmethod
    def _record_identity(vol: Volume, **fields: Any) -> None:
        """Keep the record a restarted keeper gets back (``export``) up to date."""
        record = vol.record
        identity = record.get("identity")
        if isinstance(identity, dict):
            identity.update(fields)
            vol.record = record


def target_of(msg: dict[str, Any], volume_id: str) -> str:
    """Where a volume is published, for external providers (their Mount's ``target_path``):
    the pod's target path when csi sends it (``target``), else the volume's directory as the
    daemon serves it. Never written to: only a provider's returned files are used."""
    target = msg.get("target")
    if isinstance(target, str) and target.startswith("/") and len(target) <= 4096:
        return target
    return f"/{volume_id}"


def record_request(msg: dict[str, Any]) -> dict[str, Any]:
    """The parts of an ``add`` request that rebuild the volume in another generation."""
    record = {k: msg.get(k) for k in ("spc", "attributes", "identity", "gid")}
    if isinstance(msg.get("target"), str):
        record["target"] = msg["target"]
    if "node" in msg:  # what csi read of its Node (the AWS region): the same plan again
        record["node"] = msg["node"]
    return record


def _listen(path: str) -> socket.socket:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if os.path.exists(path):
        os.unlink(path)  # a stale socket of a previous daemon
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)  # owner-only from the first moment
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(64)
    return sock


def _lock(path: str) -> int:
    """The node lock: held from before we listen until this process is gone (the kernel drops
    it however we die), so a daemon that holds it knows no earlier generation still runs.

    A previous daemon that cannot finish dying (a thread in uninterruptible sleep on its own
    connection) would hold it forever while it waits for a request only the next generation can
    answer: after LOCK_WAIT we go on without it. Every operation is read-only, so a request the
    resend makes run twice does no harm."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                log.warning(
                    "another secretfs daemon still holds %s after %.0f s; taking over anyway",
                    path,
                    LOCK_WAIT,
                )
                return fd
            time.sleep(0.05)


async def serve(socket_path: str, opts: DaemonOptions, ready: Callable[[Daemon], None]) -> int:
    log.info("process hardening: %s", describe(harden(opts.lock_memory)))
    os.makedirs(os.path.dirname(socket_path) or ".", exist_ok=True)
    lock = await trio.to_thread.run_sync(_lock, socket_path + ".lock", abandon_on_cancel=True)
    try:
        return await _serve(socket_path, opts, ready)
    finally:
        os.close(lock)


async def _serve(socket_path: str, opts: DaemonOptions, ready: Callable[[Daemon], None]) -> int:
    volumes = Volumes(
        ttl=opts.ttl,
        max_stale=opts.max_stale,
        revoke_leases=opts.revoke_leases,
        min_ttl=opts.min_ttl,
        max_ttl=opts.max_ttl,
    )
    fs = SecretFS(volumes, attr_timeout=opts.attr_timeout, no_open=opts.no_open)
    log.info("read path: %s", describe_read_path(opts.no_open))
    listener = trio.socket.from_stdlib_socket(_listen(socket_path))
    async with trio.open_nursery() as nursery:
        volumes.start(nursery)
        metrics.serve(opts.metrics_addr, volumes)  # its own thread; scrapes hop here briefly
        daemon = Daemon(volumes, fs, nursery)

        async def accept_loop() -> None:
            with listener:
                while True:
                    conn, _ = await listener.accept()
                    nursery.start_soon(daemon.handle, conn)

        async def on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    daemon.terminate()
                    return

        async def on_hangup(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            """SIGHUP: fetch every volume's values now (as ``secretfs refresh --all``)."""
            with trio.open_signal_receiver(signal.SIGHUP) as signals:
                task_status.started()
                async for _ in signals:
                    try:
                        n = await volumes.reload(None)
                    except Exception:  # a bug here must not end the daemon
                        log_unexpected(log, "SIGHUP: the reload failed")
                        continue
                    log.info(
                        "SIGHUP: reloaded %d volume(s): %d value(s) fetched, %d changed, %d failed",
                        len(volumes.volumes),
                        n["fetched"],
                        n["changed"],
                        n["failed"],
                    )

        nursery.start_soon(accept_loop)
        nursery.start_soon(on_signal)
        await nursery.start(on_hangup)  # installed before anyone is told we are ready
        log.info("control socket %s ready", socket_path)
        ready(daemon)
    # The volumes are not removed (no lease is revoked): the keeper gives them to the next
    # generation. They leave memory with this process.
    with contextlib.suppress(OSError):
        os.unlink(socket_path)
    return daemon.exit_code
