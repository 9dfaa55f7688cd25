"""Where external providers' sockets are and the bounds of a call: set by the mount and daemon
flags (``--providers-dir``, ``--max-call-recv-msg-size``, ``--provider-timeout``). No gRPC here, so
the command line can read the defaults without loading it."""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass

# Upstream's defaults: --provider-volume, then --additional-provider-volume-paths.
DEFAULT_DIRS = (
    "/var/run/secrets-store-csi-providers",
    "/etc/kubernetes/secrets-store-csi-providers",
)
DEFAULT_MAX_RECV = 4 * 1024 * 1024  # upstream's --max-call-recv-msg-size
DEFAULT_TIMEOUT = 20.0  # seconds per call: within READ_DEADLINE (30 s) of a waiting open()
# Upstream's rule for a provider name (it names the socket); use fullmatch.
NAME = re.compile(r"[a-zA-Z0-9_-]{0,30}")
NAME_RULE = "^[a-zA-Z0-9_-]{0,30}$"


@dataclass(frozen=True)
class Settings:
    dirs: tuple[str, ...] = DEFAULT_DIRS
    max_recv: int = DEFAULT_MAX_RECV
    timeout: float = DEFAULT_TIMEOUT


_settings = Settings()
_lock = threading.Lock()


def configure(
    dirs: Sequence[str] | None = None,
    max_recv: int | None = None,
    timeout: float | None = None,
) -> Settings:
    """Set where sockets are looked for and the call bounds (None: unchanged)."""
    global _settings
    with _lock:
        s = _settings
        _settings = Settings(
            dirs=tuple(dirs) if dirs else s.dirs,
            max_recv=max_recv if max_recv is not None else s.max_recv,
            timeout=timeout if timeout is not None else s.timeout,
        )
        return _settings


def current() -> Settings:
    return _settings
