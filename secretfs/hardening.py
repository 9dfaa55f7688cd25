"""Keep secret bytes off the disk: no core dumps, no ptrace-style peeking, no swap where allowed."""

from __future__ import annotations

import ctypes
import errno
import logging
import resource

log = logging.getLogger(__name__)

PR_SET_DUMPABLE = 4
M_ARENA_MAX = -8
# glibc gives each thread that allocates its own malloc arena (up to 8 per core); with mlockall
# every one of them stays resident and locked. Provider calls run in many short-lived threads:
# two arenas hold them all.
ARENAS = 2
MCL_CURRENT = 1
MCL_FUTURE = 2
# Lock each page when it is first touched instead of faulting in every mapped page now (Linux
# 4.4+). Every page that ever holds a secret is touched, so it is locked all the same; what is
# never touched (most of each shared library, unused thread stacks, reserved heap) stays out of
# memory instead of being read in and pinned: measured, that alone was most of the daemon's
# locked RSS (bench/daemon_memory.py).
MCL_ONFAULT = 4
CAP_IPC_LOCK = 14


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)  # the process's own symbols: libc, no ldconfig run


def _has_cap(cap: int) -> bool:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) & (1 << cap))
    except OSError:
        pass
    return False


_SAID = {
    "core_dumps_off": ("core dumps off", "core dumps ON"),
    "not_dumpable": ("not dumpable", "DUMPABLE"),
    "memory_locked": ("memory locked", "memory not locked"),
}


def describe(done: dict[str, bool]) -> str:
    """What ``harden`` did, for a log line: "core dumps off, not dumpable, memory locked"."""
    return ", ".join(_SAID[k][0 if on else 1] if k in _SAID else k for k, on in done.items())


def harden(lock_memory: bool = True) -> dict[str, bool]:
    """Apply what the process is allowed to; returns what took effect (for the log and tests)."""
    done = {"core_dumps_off": False, "not_dumpable": False, "memory_locked": False}
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        done["core_dumps_off"] = True
    except (OSError, ValueError) as exc:
        log.warning("could not disable core dumps: %s", exc)
    libc = _libc()
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0:
        done["not_dumpable"] = True
    else:
        log.warning("prctl(PR_SET_DUMPABLE, 0) failed: errno %d", ctypes.get_errno())
    if lock_memory:
        mallopt = getattr(libc, "mallopt", None)
        if mallopt is not None:
            mallopt(M_ARENA_MAX, ARENAS)
        soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        # With MCL_FUTURE and a small RLIMIT_MEMLOCK, later allocations would fail outright, so
        # lock only when the limit cannot bite.
        if _has_cap(CAP_IPC_LOCK) or soft == resource.RLIM_INFINITY:
            if libc.mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) == 0 or (
                ctypes.get_errno() == errno.EINVAL and libc.mlockall(MCL_CURRENT | MCL_FUTURE) == 0
            ):
                done["memory_locked"] = True
            else:
                log.warning("mlockall failed: errno %d; memory may be swapped", ctypes.get_errno())
        else:
            log.info("memory not locked: no CAP_IPC_LOCK and RLIMIT_MEMLOCK is limited")
    return done
