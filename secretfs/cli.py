"""The ``secretfs`` command."""

from __future__ import annotations

import argparse
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Sequence

from providers.base import ParameterError
from secretfs.logs import setup_logging


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
    p.add_argument("--attr-timeout", type=float, default=60.0, help=argparse.SUPPRESS)
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--log-format", default="text", choices=["text", "json"])
    p.add_argument(
        "--audit", action="store_true", help="log every open: path, uid, gid, pid and version"
    )
    p.add_argument(
        "--revoke-leases",
        action="store_true",
        help="revoke dynamic secrets' leases (Vault) when a volume goes away",
    )
    p.add_argument("--no-mlock", action="store_true", help="do not lock memory against swap")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="secretfs",
        description="Serve secrets from external managers as read-only files, from memory.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    m = sub.add_parser("mount", help="mount a SecretProviderClass file at a directory")
    m.add_argument("spc", help="SecretProviderClass YAML file")
    m.add_argument("mountpoint")
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

    c = sub.add_parser("check", help="validate a SecretProviderClass file offline")
    c.add_argument("spc")
    c.add_argument("--default-mode", type=_octal, default=0o644)

    u = sub.add_parser("umount", help="unmount a secretfs mount")
    u.add_argument("mountpoint")
    return parser


def cmd_check(args: argparse.Namespace) -> int:
    from secretfs import spc as spc_mod

    try:
        spc = spc_mod.load(args.spc)
        plan = spc_mod.plan(spc, default_mode=args.default_mode)
    except spc_mod.SpcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ParameterError as exc:
        print(f"{args.spc}: {len(exc.problems)} error(s):", file=sys.stderr)
        for p in exc.problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    print(f"{args.spc}: provider {plan.provider}, {len(plan.files)} file(s)")
    width = max((len(f.path) for f in plan.files), default=4)
    print(f"  {'PATH':<{width}}  MODE        SOURCE")
    for f in plan.files:
        kind = " (dynamic)" if f.dynamic else ""
        mode = stat.filemode(stat.S_IFREG | f.mode)
        print(f"  {f.path:<{width}}  {mode}  {f.object_name}{kind}")
    return 0


def cmd_mount(args: argparse.Namespace) -> int:
    if not args.foreground:
        return _mount_in_background(args)
    import trio

    from secretfs import standalone

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
    )

    def ready(error: str | None) -> None:
        if error is not None:
            print(f"secretfs: {error}", file=sys.stderr)
        if args.ready_fd is not None:
            os.write(args.ready_fd, b"ok\n" if error is None else f"error: {error}\n".encode())
            os.close(args.ready_fd)
        if args.detach and error is None:
            # Let go of the terminal (or a caller's pipes) now that the mount is up.
            target = os.open(
                args.log_file or os.devnull, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600
            )
            os.dup2(target, 1)
            os.dup2(target, 2)
            os.close(target)

    return trio.run(standalone.run, args.spc, args.mountpoint, opts, ready)


def _mount_in_background(args: argparse.Namespace) -> int:
    """Start ``mount --foreground`` as a new session and wait until it is mounted or failed.

    A fresh interpreter (not fork) so no thread state is inherited; its error reaches us through a
    pipe and becomes our own message and exit status.
    """
    r, w = os.pipe()
    argv = [sys.executable, "-m", "secretfs", *sys.argv[1:], "--foreground", "--detach"]
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


def cmd_umount(args: argparse.Namespace) -> int:
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    cmd = [tool, "-u", args.mountpoint] if tool else ["umount", args.mountpoint]
    return subprocess.call(cmd)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(
        getattr(args, "log_level", "WARNING"),
        getattr(args, "log_format", "text"),
        audit=getattr(args, "audit", False),
    )
    if args.command == "check":
        return cmd_check(args)
    if args.command == "mount":
        return cmd_mount(args)
    if args.command == "umount":
        return cmd_umount(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
