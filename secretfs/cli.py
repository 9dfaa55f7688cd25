"""The ``secretfs`` command."""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from providers import DISTRIBUTION, limits
from providers.base import OFFLINE, ParameterError
from secretfs import __version__
from secretfs.logs import setup_logging
from secretfs.readpath import READ_PATHS, choose_no_open

# The node daemon's control socket (secretfs daemon --socket; the chart's hostDir).
DAEMON_SOCKET = "/run/secretfs/daemon.sock"
# The extended attribute of a volume's directory that reloads the volume (secretfs/volumes.py).
REFRESH_XATTR = "user.secretfs.refresh"
# How long `secretfs refresh` waits for the daemon: a reload gives each volume up to 60 s.
REFRESH_TIMEOUT = 90.0


def _octal(text: str) -> int:
    return int(text, 8)


def _add_mount_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ttl", type=float, default=120.0, help="seconds a value is fresh (120)")
    p.add_argument(
        "--max-stale",
        type=float,
        default=86400.0,
        help="seconds a value may be served while its backend fails (86400); then EIO",
    )
    p.add_argument(
        "--min-ttl",
        type=float,
        default=10.0,
        help="lowest TTL a SecretProviderClass may set (annotation secretfs.io/ttl) (10)",
    )
    p.add_argument(
        "--max-ttl",
        type=float,
        default=None,
        help="highest TTL a SecretProviderClass may set (default: --max-stale)",
    )
    p.add_argument("--attr-timeout", type=float, default=60.0, help=argparse.SUPPRESS)
    p.add_argument(
        "--audit",
        action="store_true",
        help="log every open: path, version, caller uid/gid/pid, pod (off the request path)",
    )
    p.add_argument(
        "--read-path",
        choices=READ_PATHS,
        default="auto",
        help="how opens and warm reads are served. no-open: the kernel serves them from its page "
        "cache without asking the daemon (one version per read); open: every open asks the "
        "daemon (one version from open to close; what --audit needs). auto (the default): "
        "no-open where this pyfuse3 supports it and --audit is off",
    )
    p.add_argument(
        "--revoke-leases",
        action="store_true",
        help="revoke dynamic secrets' leases (Vault) when a volume goes away",
    )
    p.add_argument("--no-mlock", action="store_true", help="do not lock memory against swap")
    _add_plugin_options(p)


# External providers (providers/plugin): where their sockets are, and the bounds of a call.
PROVIDERS_DIRS_ENV = "SECRETFS_PROVIDERS_DIRS"


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _add_plugin_options(p: argparse.ArgumentParser) -> None:
    from providers.plugin.settings import DEFAULT_DIRS, DEFAULT_MAX_RECV, DEFAULT_TIMEOUT

    p.add_argument(
        "--providers-dir",
        dest="providers_dirs",
        action="append",
        default=None,
        metavar="DIR",
        help="where external providers' sockets (<provider>.sock) are, in order; repeatable "
        f"(default: ${PROVIDERS_DIRS_ENV}, a ':'-separated list, else "
        f"{' then '.join(DEFAULT_DIRS)})",
    )
    p.add_argument(
        "--max-call-recv-msg-size",
        type=_positive_int,
        default=DEFAULT_MAX_RECV,
        metavar="BYTES",
        help=f"largest answer accepted from an external provider ({DEFAULT_MAX_RECV})",
    )
    p.add_argument(
        "--provider-timeout",
        type=_positive_float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"how long one call to an external provider may take ({DEFAULT_TIMEOUT:g})",
    )


def providers_dirs(args: argparse.Namespace) -> list[str]:
    """The external providers' socket directories: the flags, else the environment, else
    upstream's two defaults."""
    from providers.plugin.settings import DEFAULT_DIRS

    if args.providers_dirs:
        return list(args.providers_dirs)
    env = [d for d in os.environ.get(PROVIDERS_DIRS_ENV, "").split(":") if d]
    return env or list(DEFAULT_DIRS)


def _configure_plugins(args: argparse.Namespace) -> None:
    from providers import plugin

    plugin.configure(
        dirs=providers_dirs(args),
        max_recv=args.max_call_recv_msg_size,
        timeout=args.provider_timeout,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="secretfs",
        description="Serve secrets from external managers as read-only files, from memory.",
    )
    parser.add_argument("--version", action="version", version=f"secretfs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    m = sub.add_parser("mount", help="mount a SecretProviderClass file at a directory")
    m.add_argument("spc", help="SecretProviderClass YAML file")
    m.add_argument("mountpoint", help="an empty directory to mount the files on")
    m.add_argument("--uid", type=int, default=os.getuid(), help="owner of the files")
    m.add_argument("--gid", type=int, default=os.getgid(), help="group of the files")
    m.add_argument(
        "--default-mode", type=_octal, default=0o644, help="mode of files without one (0644)"
    )
    m.add_argument(
        "--allow-other",
        action=argparse.BooleanOptionalAction,
        default=os.getuid() == 0,
        help="let other users reach the mount (modes still apply); default when root",
    )
    m.add_argument("-f", "--foreground", action="store_true", help="do not go to the background")
    m.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    m.add_argument("--detach", action="store_true", help=argparse.SUPPRESS)
    m.add_argument(
        "--log-file",
        default=None,
        help="in the background, append the log here (default: discard it once mounted)",
    )
    _add_mount_options(m)
    m.add_argument(
        "--metrics-addr", default="", help="Prometheus /metrics, e.g. 127.0.0.1:9100 (default: off)"
    )
    _add_log_options(m)

    c = sub.add_parser("check", help="validate a SecretProviderClass file offline")
    c.add_argument("spc", help="SecretProviderClass YAML file to validate (offline)")
    c.add_argument(
        "--default-mode", type=_octal, default=0o644, help="mode of files without one (0644)"
    )

    u = sub.add_parser("umount", help="unmount a secretfs mount")
    u.add_argument("mountpoint", help="a directory `secretfs mount` mounted")

    r = sub.add_parser(
        "refresh",
        help="fetch a volume's values now, bypassing the TTL",
        description="Fetch the values of a mounted directory (a standalone mount, or a CSI "
        "volume's directory), or of volumes of the node daemon, now. Prints how many values were "
        "fetched, changed and failed; exits 1 if any failed.",
    )
    r.add_argument("mountpoint", nargs="?", help="a secretfs mount or a CSI volume's directory")
    which = r.add_mutually_exclusive_group()
    which.add_argument("--volume", help="a volume of the node daemon (its CSI volume id)")
    which.add_argument("--all", action="store_true", help="every volume of the node daemon")
    r.add_argument(
        "--socket", default=DAEMON_SOCKET, help=f"the node daemon's socket ({DAEMON_SOCKET})"
    )

    d = sub.add_parser("daemon", help="node daemon: serve the FUSE session the csi process mounts")
    _add_daemon_options(d)
    d.add_argument(
        "--metrics-addr", default="", help="Prometheus /metrics, e.g. :8096 (default: off)"
    )
    _add_log_options(d)

    k = sub.add_parser("csi", help="CSI node plugin (kubelet-facing gRPC; mounts; privileged)")
    _add_csi_options(k)
    _add_log_options(k)

    n = sub.add_parser("node", help="run daemon and csi together (development and tests)")
    _add_daemon_options(n)
    _add_csi_options(n, with_daemon_socket=False)  # --socket/--daemon-socket come with the daemon
    n.add_argument("--daemon-metrics-addr", default="", help="the daemon's --metrics-addr (off)")
    _add_log_options(n)
    return parser


def _add_log_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="the least severe lines logged (INFO)",
    )
    p.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="text, or one JSON object per line (text)",
    )


def _add_daemon_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--socket",
        "--daemon-socket",
        dest="daemon_socket",
        default=DAEMON_SOCKET,
        help="control socket (owner-only) the csi process talks to",
    )
    _add_mount_options(p)


def _add_csi_options(p: argparse.ArgumentParser, with_daemon_socket: bool = True) -> None:
    p.add_argument("--endpoint", default="unix:///csi/csi.sock", help="CSI socket for the kubelet")
    p.add_argument("--nodeid", required=True, help="this node's name (NodeGetInfo)")
    p.add_argument(
        "--drivername",
        default="secrets-store.csi.k8s.io",
        help="the CSI driver name (GetPluginInfo; the CSIDriver object's name)",
    )
    if with_daemon_socket:  # else these come with the daemon's options (secretfs node)
        p.add_argument("--daemon-socket", default=DAEMON_SOCKET, help="the daemon's socket")
        p.add_argument(
            "--lock-memory",
            action="store_true",
            help="lock this process's memory against swap (costs ~70 MiB resident)",
        )
    p.add_argument(
        "--mount-root",
        default="/run/secretfs/mnt",
        help="where the node's secretfs root is mounted (volumes are bind-mounted from it)",
    )
    p.add_argument("--metrics-addr", default=":8095", help="Prometheus /metrics; empty: off")
    p.add_argument("--kubeconfig", default=None, help="default: in-cluster configuration")
    p.add_argument(
        "--sync-secrets",
        action="store_true",
        help="write the Kubernetes Secrets a class's secretObjects asks for (stores those "
        "values in etcd; default: off, with a warning per class)",
    )
    p.add_argument(
        "--kubelet-root",
        default="/var/lib/kubelet",
        help="the kubelet's root directory: target paths must lie in its pods/ (/var/lib/kubelet)",
    )
    p.add_argument(
        "--takeover-timeout",
        type=float,
        default=0.0,
        help="seconds readers may wait for a new daemon after one died; then the FUSE "
        "connection is aborted and they get ENOTCONN (0: wait for it, the default)",
    )


def cmd_check(args: argparse.Namespace) -> int:
    from secretfs import spc as spc_mod

    try:
        spc = spc_mod.load(args.spc)
        # Offline: what only a node knows (the AWS region from its label) is a warning.
        plan = spc_mod.plan(spc, default_mode=args.default_mode, node=OFFLINE)
    except spc_mod.SpcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ParameterError as exc:
        print(f"{args.spc}: {len(exc.problems)} error(s):", file=sys.stderr)
        for p in exc.problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    print(f"{args.spc}: provider {plan.provider}, {len(plan.files)} file(s)")
    for note in plan.notes:
        print(f"{args.spc}: warning: {note}", file=sys.stderr)
    if spc.secret_objects or spc.secret_object_problems:
        print(
            f"{args.spc}: warning: {spc_mod.SECRET_OBJECTS}; a node with secret sync on "
            "(syncSecret.enabled) writes them",
            file=sys.stderr,
        )
        paths = {f.path for f in plan.files}
        for so in spc.secret_objects:
            for key, name in so.data:
                if name not in paths:
                    print(
                        f"{args.spc}: warning: secret {so.secret_name} key {key}: objectName "
                        f"{limits.quote(name)} is no file of this volume (files: "
                        f"{', '.join(sorted(paths)[:10]) or 'none'})",
                        file=sys.stderr,
                    )
        for problem in spc.secret_object_problems:
            print(f"{args.spc}: warning: not synced: {problem}", file=sys.stderr)
    if plan.ttl is not None:
        print(
            f"  ttl: {plan.ttl:g} s (annotation {spc_mod.TTL_ANNOTATION}; a node keeps it within "
            "its --min-ttl and --max-ttl)"
        )
    width = max((len(f.path) for f in plan.files), default=4)
    print(f"  {'PATH':<{width}}  MODE        SOURCE")
    for f in plan.files:
        kind = " (dynamic)" if f.dynamic else ""
        mode = stat.filemode(stat.S_IFREG | f.mode)
        print(f"  {f.path:<{width}}  {mode}  {f.object_name}{kind}")
    return 0


def cmd_mount(args: argparse.Namespace) -> int:
    args.spc, args.mountpoint = os.path.abspath(args.spc), os.path.abspath(args.mountpoint)
    if not args.foreground:
        return _mount_in_background(args)
    import trio

    from secretfs import standalone

    _configure_plugins(args)
    opts = standalone.MountOptions(
        ttl=args.ttl,
        max_stale=args.max_stale,
        uid=args.uid,
        gid=args.gid,
        default_mode=args.default_mode,
        allow_other=args.allow_other,
        attr_timeout=args.attr_timeout,
        lock_memory=not args.no_mlock,
        revoke_leases=args.revoke_leases,
        min_ttl=args.min_ttl,
        max_ttl=args.max_ttl,
        metrics_addr=args.metrics_addr,
        no_open=args.no_open,
    )

    def ready(error: str | None) -> None:
        if error is not None:
            print(f"secretfs: {error}", file=sys.stderr)
        if args.ready_fd is not None:
            os.write(args.ready_fd, b"ok\n" if error is None else f"error: {error}\n".encode())
            os.close(args.ready_fd)
            args.ready_fd = None  # answered: the number may be reused from now on
        if args.detach and error is None:
            # Let go of the terminal (or a caller's pipes) now that the mount is up.
            target = os.open(
                args.log_file or os.devnull, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600
            )
            os.dup2(target, 1)
            os.dup2(target, 2)
            os.close(target)
            os.chdir("/")  # do not keep the caller's directory (and its filesystem) busy

    return trio.run(standalone.run, args.spc, args.mountpoint, opts, ready)


def _mount_in_background(args: argparse.Namespace) -> int:
    """Run ``mount --foreground`` as a new session and wait until it is mounted or failed; its
    error reaches us through a pipe and becomes our own message and exit status.

    Forked: this process has only the command line and pyfuse3 loaded (no thread, no trio run, no
    FUSE session, no secret), so the child carries on from here instead of starting an interpreter
    and importing again (240-330 ms of a 1.0-1.15 s mount measured here, bench/startup.py). Should
    a thread exist (an embedding caller), a fresh interpreter is started instead: a fork copies no
    thread but every lock a thread may hold."""
    import threading

    if threading.active_count() != 1:
        return _spawn_in_background(args)
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child; tests see it as the daemon it becomes
        os.close(r)
        _exit_now(_background_child(args, w))  # the parent's atexit handlers are not ours
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        answer = pipe.read().decode(errors="replace").strip()
    if answer == "ok":
        if args.program:
            # Done: the daemon is up. Tearing this interpreter down (trio, pyfuse3 and the rest
            # loaded) would only keep the user waiting: 80-100 ms measured here, 110-130 with
            # the daemon still sharing its pages (each write copies one).
            _exit_now(0)
        return 0
    _, status = os.waitpid(pid, 0)
    if not answer:
        code = os.waitstatus_to_exitcode(status)
        print(f"secretfs: mount process exited with status {code}", file=sys.stderr)
    return 1


def _exit_now(code: int) -> NoReturn:
    """End this process without the interpreter's teardown, output flushed."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _background_child(args: argparse.Namespace, ready_fd: int) -> int:
    """The forked daemon: its own session, stdin from /dev/null, then ``mount --foreground
    --detach`` answering on ``ready_fd``. Returns the exit status."""
    code = 1
    args.foreground, args.detach, args.ready_fd = True, True, ready_fd
    try:
        os.setsid()
        # Only what a fresh interpreter would get (subprocess's close_fds): a descriptor the
        # caller let us inherit (a pipe someone reads to its end) must not live as long as us.
        os.closerange(3, ready_fd)
        os.closerange(ready_fd + 1, os.sysconf("SC_OPEN_MAX"))
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        code = cmd_mount(args)
    except BaseException as exc:  # whatever it was, the caller must hear of it
        import traceback

        traceback.print_exc()
        if args.ready_fd == ready_fd:  # not answered yet (a crash before the mount was up)
            with contextlib.suppress(OSError):  # the caller is gone: nobody to tell
                os.write(ready_fd, f"error: {type(exc).__name__}: {exc}\n".encode())
    return code


def _spawn_in_background(args: argparse.Namespace) -> int:
    """``_mount_in_background`` through a fresh interpreter (no state of ours is inherited)."""
    r, w = os.pipe()
    argv = [sys.executable, "-m", "secretfs", *args.argv, "--foreground", "--detach"]
    argv += ["--ready-fd", str(w)]
    proc = subprocess.Popen(argv, pass_fds=(w,), start_new_session=True, stdin=subprocess.DEVNULL)
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        answer = pipe.read().decode(errors="replace").strip()
    if answer == "ok":
        return 0
    proc.wait()
    if not answer:
        print(f"secretfs: mount process exited with status {proc.returncode}", file=sys.stderr)
    return 1


def cmd_refresh(args: argparse.Namespace) -> int:
    """``secretfs refresh``: a directory through its extended attribute, or the daemon's socket."""
    if (args.mountpoint is not None) + (args.volume is not None) + args.all != 1:
        print("secretfs refresh: give a MOUNTPOINT, --volume ID or --all", file=sys.stderr)
        return 2
    if args.mountpoint is not None:
        return _refresh_directory(args.mountpoint)
    from secretfs import control

    try:
        counts = control.Client(args.socket).reload(args.volume, timeout=REFRESH_TIMEOUT)
    except control.ControlError as exc:
        print(f"secretfs refresh: {exc.message}", file=sys.stderr)
        return 1
    summary = " ".join(f"{k}={int(counts.get(k) or 0)}" for k in ("fetched", "changed", "failed"))
    return _report_refresh(summary, int(counts.get("failed") or 0), "the daemon's log")


def _refresh_directory(path: str) -> int:
    try:
        # The value of this attribute is the reload's summary; reading it is the request.
        summary = os.getxattr(path, REFRESH_XATTR).decode("ascii", "replace")
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.ENODATA):
            why = "not a secretfs volume directory"
        elif exc.errno == errno.EIO:
            why = "the refresh failed (EIO); the secretfs daemon's log says why"
        else:
            why = exc.strerror or type(exc).__name__
        print(f"secretfs refresh: {path}: {why}", file=sys.stderr)
        return 1
    fields = dict(part.partition("=")[::2] for part in summary.split())
    failed = int(fields["failed"]) if fields.get("failed", "").isdigit() else 0
    return _report_refresh(summary, failed, "the secretfs daemon's log")


def _report_refresh(summary: str, failed: int, log_name: str) -> int:
    print(summary)
    if failed:
        print(
            f"secretfs refresh: {failed} value(s) could not be fetched; {log_name} says why (the "
            "last good values are still served)",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    cmd = [tool, "-u", args.mountpoint] if tool else ["umount", args.mountpoint]
    if subprocess.call(cmd) == 0:
        return 0
    # A mount whose daemon was killed cannot be unmounted normally: detach it.
    lazy = [tool, "-u", "-z", args.mountpoint] if tool else ["umount", "-l", args.mountpoint]
    return subprocess.call(lazy)


def cmd_daemon(args: argparse.Namespace) -> int:
    import trio

    from secretfs import daemon
    from secretfs.volumes import ttl_problem

    problem = ttl_problem(args.ttl, args.max_stale, args.min_ttl, args.max_ttl)
    if problem:
        print(f"secretfs: {problem}", file=sys.stderr)
        return 2
    _configure_plugins(args)
    opts = daemon.DaemonOptions(
        ttl=args.ttl,
        max_stale=args.max_stale,
        revoke_leases=args.revoke_leases,
        lock_memory=not args.no_mlock,
        attr_timeout=args.attr_timeout,
        min_ttl=args.min_ttl,
        max_ttl=args.max_ttl,
        metrics_addr=args.metrics_addr,
        no_open=args.no_open,
    )
    return trio.run(daemon.serve, args.daemon_socket, opts, lambda _: None)


# Commands other packages add (entry points of this group): the dependency arrows stay one-way
# (csi -> secretfs -> providers) while `secretfs csi` is one command line with the others.
COMMANDS_GROUP = "secretfs.commands"


def plugged_command(name: str) -> Callable[[argparse.Namespace], int] | None:
    """The command ``name`` another package registered; None (said on stderr) if its package or
    its libraries are not installed."""
    from importlib.metadata import entry_points

    found = entry_points(group=COMMANDS_GROUP, name=name)
    hint = f"install the {name} extra: pip install '{DISTRIBUTION}[{name}]'"
    if not found:
        print(f"secretfs: no {name} command here; {hint}", file=sys.stderr)
        return None
    try:
        command: Callable[[argparse.Namespace], int] = next(iter(found)).load()
    except ModuleNotFoundError as exc:
        print(f"secretfs: the {name} command needs {exc.name}; {hint}", file=sys.stderr)
        return None
    return command


def cmd_csi(args: argparse.Namespace) -> int:
    command = plugged_command("csi")  # csi.app:command
    return 1 if command is None else command(args)


def node_argvs(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The command lines of the daemon and csi processes of ``secretfs node``."""
    base = [sys.executable, "-m", "secretfs"]
    logs = ["--log-level", args.log_level, "--log-format", args.log_format]
    daemon = [*base, "daemon", "--socket", args.daemon_socket, *logs]
    daemon += ["--ttl", str(args.ttl), "--max-stale", str(args.max_stale)]
    daemon += ["--min-ttl", str(args.min_ttl)]
    if args.max_ttl is not None:
        daemon += ["--max-ttl", str(args.max_ttl)]
    daemon += ["--attr-timeout", str(args.attr_timeout), "--read-path", args.read_path]
    for d in providers_dirs(args):
        daemon += ["--providers-dir", d]
    daemon += ["--max-call-recv-msg-size", str(args.max_call_recv_msg_size)]
    daemon += ["--provider-timeout", str(args.provider_timeout)]
    if args.daemon_metrics_addr:
        daemon += ["--metrics-addr", args.daemon_metrics_addr]
    for flag, on in (
        ("--audit", args.audit),
        ("--revoke-leases", args.revoke_leases),
        ("--no-mlock", args.no_mlock),
    ):
        if on:
            daemon.append(flag)
    csi = [*base, "csi", "--endpoint", args.endpoint, "--nodeid", args.nodeid, *logs]
    csi += ["--drivername", args.drivername, "--daemon-socket", args.daemon_socket]
    csi += ["--mount-root", args.mount_root, "--metrics-addr", args.metrics_addr]
    csi += ["--takeover-timeout", str(args.takeover_timeout), "--kubelet-root", args.kubelet_root]
    if args.kubeconfig:
        csi += ["--kubeconfig", args.kubeconfig]
    if args.sync_secrets:
        csi.append("--sync-secrets")
    return daemon, csi


def cmd_node(args: argparse.Namespace) -> int:
    """Start ``secretfs daemon`` and ``secretfs csi`` as two processes; stop both when one ends.

    Fresh interpreters (not fork): the csi process runs grpc threads. Mounts stay in place when
    both stop, as they would in a DaemonSet pod restart.
    """
    import signal
    import time

    daemon_argv, csi_argv = node_argvs(args)
    procs = [subprocess.Popen(daemon_argv, stdin=subprocess.DEVNULL)]
    deadline = time.monotonic() + 10
    while not os.path.exists(args.daemon_socket) and time.monotonic() < deadline:
        time.sleep(0.05)  # the csi process mounts the root as soon as the daemon answers
    procs.append(subprocess.Popen(csi_argv, stdin=subprocess.DEVNULL))
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop and all(p.poll() is None for p in procs):
        time.sleep(0.1)
    code = next((p.returncode for p in procs if p.returncode), 0)
    for p in reversed(procs):  # csi first, so it never sees the daemon vanish mid-call
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    return code


def run() -> NoReturn:
    """The program's entry point (the ``secretfs`` command, ``python -m secretfs``)."""
    sys.exit(main(program=True))


def main(argv: Sequence[str] | None = None, *, program: bool = False) -> int:
    """Run a command line; its exit status. ``program``: this process is the ``secretfs`` program
    itself, not a library call, so a background mount may end it as soon as its daemon answers."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # as given: a background mount in a fresh interpreter passes it on
    args.program = program
    setup_logging(
        getattr(args, "log_level", "WARNING"),
        getattr(args, "log_format", "text"),
        audit=getattr(args, "audit", False),
    )
    if args.command in ("mount", "daemon", "node"):
        try:
            args.no_open = choose_no_open(args.read_path, audit=args.audit)
        except ValueError as exc:
            print(f"secretfs: {exc}", file=sys.stderr)
            return 2
    if args.command == "check":
        return cmd_check(args)
    if args.command == "mount":
        return cmd_mount(args)
    if args.command == "umount":
        return cmd_umount(args)
    if args.command == "refresh":
        return cmd_refresh(args)
    if args.command == "daemon":
        return cmd_daemon(args)
    if args.command == "csi":
        return cmd_csi(args)
    if args.command == "node":
        return cmd_node(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
