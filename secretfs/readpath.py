"""The read path (``--read-path``): whether opens and warm reads reach the daemon.

no-open: the first OPEN is answered ENOSYS and the kernel then serves opens, and reads of what its
page cache holds, without the daemon (secretfs/fs.py, docs/INTERNALS.md "No-open reads"). It
needs a pyfuse3 that passes the inode to ``read`` when the kernel sends file handle 0: the build
of scripts/build-pyfuse3.sh (docs/pyfuse3-read-inode.md). open: today's path, every open asks the
daemon. No heavy imports here: the command line resolves the choice before anything else loads.
"""

from __future__ import annotations

# --read-path: how opens and warm reads are served (see the module doc and docs/INTERNALS.md).
READ_PATHS = ("auto", "no-open", "open")


def choose_no_open(read_path: str, *, audit: bool) -> bool:
    """Resolve ``--read-path``: True for no-open mode. ``auto`` is no-open where this pyfuse3
    supports it and --audit is off (audit lines are written at opens, which no-open mode never
    sees). ValueError, naming the fix, for a choice that cannot be served."""
    if read_path == "open":
        return False
    if read_path == "auto":
        return no_open_supported() and not audit
    if read_path != "no-open":
        raise ValueError(f"--read-path must be one of {', '.join(READ_PATHS)}")
    if audit:
        raise ValueError(
            "--read-path=no-open cannot be used with --audit: audit lines are written at each "
            "open, and in no-open mode no open reaches the daemon (use --read-path=open or auto)"
        )
    if not no_open_supported():
        raise ValueError(
            f"--read-path=no-open needs pyfuse3 built with secretfs's change "
            f"(scripts/build-pyfuse3.sh, which `make setup` and the image run); this pyfuse3 "
            f"{_pyfuse3_version()} serves the open path only"
        )
    return True


def describe_read_path(no_open: bool) -> str:
    if no_open:
        return "no-open (opens and cached reads never reach the daemon; one version per read)"
    return "open (every open asks the daemon; one version from open to close)"


def no_open_supported() -> bool:
    """Whether the pyfuse3 in use passes the inode to ``read`` when the kernel sends file handle
    0, which no-open mode needs: the build scripts/build-pyfuse3.sh makes (its marker attribute;
    docs/pyfuse3-read-inode.md). A stock pyfuse3 serves the OPEN path."""
    import pyfuse3

    return getattr(pyfuse3, "READ_INODE_WITHOUT_FH", False) is True


def _pyfuse3_version() -> str:
    import pyfuse3

    return str(getattr(pyfuse3, "__version__", "?"))
