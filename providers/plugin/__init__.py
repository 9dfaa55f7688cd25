"""External providers through upstream's provider plugin API (``v1alpha1.CSIDriverProvider``).

Any ``provider:`` without a built-in implementation (Akeyless, Conjur, Infisical, OpenBao, in-house
ones) is served by calling ``Mount`` on ``<dir>/<provider>.sock`` (client.py), sending what upstream
sends: ``attributes`` (JSON of the SPC parameters with the volume attributes over them, plus the
pod's tokens under ``csi.storage.k8s.io/serviceAccount.tokens``), ``secrets`` (JSON of the
nodePublishSecretRef data), ``targetPath``, ``permission`` (the JSON of the default mode, "420")
and the object versions last seen.

**Nothing at rest.** Only the file contents of the response (``files``) are used; the provider is
never asked, nor allowed, to write anywhere for us to read. A provider that answers with no files
(a legacy "writes to the target path" provider) is refused, naming the requirement.

The files of a volume are only known once the provider answered, so this provider plans no files
(``parse``) and the daemon asks it to expand the plan with one ``Mount`` call when the volume is
added (:meth:`PluginProvider.expand_sync`, whose values are the volume's first fetch). After that
one ``Mount`` call is one fetch of all the volume's files, refreshed on the TTL like any value. The
set of files stays what it was at mount: a file the provider stops returning is an error (gone),
a new one appears at the next mount.
"""

from __future__ import annotations

from providers.plugin.settings import (
    DEFAULT_DIRS,
    DEFAULT_MAX_RECV,
    DEFAULT_TIMEOUT,
    Settings,
    configure,
    current,
)

__all__ = [
    "DEFAULT_DIRS",
    "DEFAULT_MAX_RECV",
    "DEFAULT_TIMEOUT",
    "Settings",
    "configure",
    "current",
]
