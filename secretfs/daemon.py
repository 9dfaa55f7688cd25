"""``secretfs daemon``: the node's FUSE server, driven by the csi process over a control socket.

Needs no mount privilege: the csi process opens /dev/fuse, mounts the node root with
``fd=N`` and hands the fd over (``attach``); the daemon serves it with
``pyfuse3.init(ops, "/dev/fd/N")``. One FUSE session per process (pyfuse3's rule), a directory per
volume (``/<volume_id>/``) that the csi process bind-mounts onto each pod's target path.

Everything runs on the trio thread except provider calls and kernel invalidations (worker threads,
see fs.py). When the session ends (the node mount was unmounted or aborted) the daemon exits so
its supervisor restarts it; the csi side then mounts a fresh root and attaches again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyfuse3
import trio

from providers.base import FetchError, Identity, ParameterError, Token
from secretfs import control
from secretfs import spc as spc_mod
from secretfs.control import ControlError
from secretfs.fs import ATTR_TIMEOUT, ROOT_INODE, SecretFS
from secretfs.hardening import harden
from secretfs.logs import log_unexpected
from secretfs.standalone import fuse_options
from secretfs.volumes import VolumeError, Volumes

log = logging.getLogger(__name__)

# How long a connected client may take to send its request.
REQUEST_DEADLINE = 10.0
# FetchError codes that mean "the backend refused this identity" (PERMISSION_DENIED).
DENIED_CODES = frozenset({"AccessDenied", "PermissionDenied", "AuthFailed", "Forbidden"})


@dataclass(frozen=True)
class DaemonOptions:
    ttl: float = 120.0
    max_stale: float = 86400.0
    revoke_leases: bool = False
    lock_memory: bool = True
    attr_timeout: float = ATTR_TIMEOUT


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


class Daemon:
    def __init__(self, volumes: Volumes, fs: SecretFS, nursery: trio.Nursery) -> None:
        self.volumes = volumes
        self.fs = fs
        self.nursery = nursery
        self.attached = False
        self.serving = False
        self.terminating = False
        self.exit_code = 0
        self._pending: set[str] = set()

    # --- connections ---

    async def handle(self, conn: trio.socket.SocketType) -> None:
        reader = control.FrameReader()
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
                while data:
                    data = data[await conn.send(data) :]
            except OSError:
                pass

    async def dispatch(self, msg: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        op = msg.get("op")
        if op == "status":
            return {
                "attached": self.attached,
                "serving": self.serving,
                "volumes": sorted(self.volumes.volumes),
                "uid": os.getuid(),
                "gid": os.getgid(),
                "pid": os.getpid(),
            }
        if op == "attach":
            return self.attach(fds)
        volume_id = str(msg.get("volume_id") or "")
        problem = control.check_volume_id(volume_id)
        if problem:
            raise ControlError(control.INVALID_ARGUMENT, problem)
        if op == "add":
            return await self.add(volume_id, msg)
        if op == "refresh":
            return self.refresh(volume_id, msg.get("tokens"))
        if op == "remove":
            removed = await self.volumes.remove(volume_id)
            if removed:
                log.info("volume %s removed", volume_id)
                if self.serving:
                    self.fs.forget_entry(ROOT_INODE, volume_id.encode())
            return {"removed": removed}
        raise ControlError(control.INVALID_ARGUMENT, f"unknown operation {op!r}")

    # --- operations ---

    def attach(self, fds: list[int]) -> dict[str, Any]:
        if len(fds) != 1:
            raise ControlError(control.INVALID_ARGUMENT, "attach needs exactly one /dev/fuse fd")
        if self.attached:
            raise ControlError(control.ALREADY_EXISTS, "already serving a FUSE session")
        fd = os.dup(fds[0])  # the received copy is closed by handle(); libfuse keeps this one
        try:
            if not stat.S_ISCHR(os.fstat(fd).st_mode):
                raise ControlError(control.INVALID_ARGUMENT, "attach: not a character device")
            pyfuse3.init(self.fs, f"/dev/fd/{fd}", fuse_options(True))
        except ControlError:
            os.close(fd)
            raise
        except RuntimeError as exc:
            os.close(fd)
            raise ControlError(control.INTERNAL, f"cannot start the FUSE session: {exc}") from None
        self.attached = self.serving = True
        self.fs.start(self.nursery)
        self.nursery.start_soon(self._main)
        log.info("serving the node FUSE session (fd %d)", fd)
        return {}

    async def _main(self) -> None:
        try:
            await pyfuse3.main()
        except Exception:
            log_unexpected(log, "the FUSE session failed")
        finally:
            self.serving = False
            # With an fd-passed session there is nothing for us to unmount: the csi side does it.
            pyfuse3.close(unmount=False)
            if not self.terminating:
                log.warning("the node FUSE session ended (unmounted or aborted); exiting")
                self.exit_code = 1
            self.nursery.cancel_scope.cancel()

    async def add(self, volume_id: str, msg: dict[str, Any]) -> dict[str, Any]:
        identity = identity_from(msg.get("identity"))
        raw = msg.get("spc") or {}
        spc = spc_mod.SecretProviderClass(
            name=str(raw.get("name", "")),
            namespace=identity.namespace,
            provider=str(raw.get("provider", "")),
            parameters={str(k): str(v) for k, v in (raw.get("parameters") or {}).items()},
        )
        where = f"SecretProviderClass {spc.namespace}/{spc.name}"
        existing = self.volumes.volumes.get(volume_id)
        if existing is not None:
            if existing.identity.key() != identity.key():
                raise ControlError(
                    control.ALREADY_EXISTS, f"volume {volume_id} exists for another identity"
                )
            self.volumes.refresh_identity(volume_id, identity)
            return {"existing": True, "files": len(existing.plan.files)}
        if volume_id in self._pending:
            raise ControlError(control.ABORTED, f"volume {volume_id} is being added already")
        attributes = {str(k): str(v) for k, v in (msg.get("attributes") or {}).items()}
        gid = int(msg.get("gid") or 0)
        self._pending.add(volume_id)
        try:
            try:
                # parse() may import a provider SDK the first time: keep that off the trio thread.
                plan = await trio.to_thread.run_sync(spc_mod.plan, spc, attributes)
            except ParameterError as exc:
                problems = "; ".join(str(p) for p in exc.problems)
                raise ControlError(control.INVALID_ARGUMENT, f"{where}: {problems}") from None
            try:
                await self.volumes.add(volume_id, plan, identity, uid=0, gid=gid)
            except VolumeError as exc:
                raise ControlError(classify(exc), f"{where}: {exc}") from None
        finally:
            self._pending.discard(volume_id)
        log.info(
            "volume %s added: %s for %s/%s, %d file(s), gid %d",
            volume_id,
            where,
            identity.namespace,
            identity.service_account,
            len(plan.files),
            gid,
        )
        return {"existing": False, "files": len(plan.files)}

    def refresh(self, volume_id: str, tokens: Any) -> dict[str, Any]:
        vol = self.volumes.volumes.get(volume_id)
        if vol is None:
            raise ControlError(control.NOT_FOUND, f"volume {volume_id} is not published")
        fresh = tokens_from(tokens)
        if fresh:
            ident = vol.identity
            self.volumes.refresh_identity(
                volume_id,
                Identity(
                    namespace=ident.namespace,
                    service_account=ident.service_account,
                    pod_name=ident.pod_name,
                    pod_uid=ident.pod_uid,
                    tokens=fresh,
                    secrets=ident.secrets,
                    sa_annotations=ident.sa_annotations,
                ),
            )
        return {"tokens": len(fresh), "provider": vol.plan.provider}


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


async def serve(socket_path: str, opts: DaemonOptions, ready: Callable[[], None]) -> int:
    log.info("process hardening: %s", harden(opts.lock_memory))
    volumes = Volumes(ttl=opts.ttl, max_stale=opts.max_stale, revoke_leases=opts.revoke_leases)
    fs = SecretFS(volumes, attr_timeout=opts.attr_timeout)
    listener = trio.socket.from_stdlib_socket(_listen(socket_path))
    async with trio.open_nursery() as nursery:
        volumes.start(nursery)
        daemon = Daemon(volumes, fs, nursery)

        async def accept_loop() -> None:
            with listener:
                while True:
                    conn, _ = await listener.accept()
                    nursery.start_soon(daemon.handle, conn)

        async def on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    daemon.terminating = True
                    if daemon.serving:
                        pyfuse3.terminate()  # _main() then cancels everything
                    else:
                        nursery.cancel_scope.cancel()
                    return

        nursery.start_soon(accept_loop)
        nursery.start_soon(on_signal)
        log.info("control socket %s ready", socket_path)
        ready()
    with trio.CancelScope(shield=True):
        for vid in list(volumes.volumes):
            await volumes.remove(vid)
    with contextlib.suppress(OSError):
        os.unlink(socket_path)
    return daemon.exit_code
