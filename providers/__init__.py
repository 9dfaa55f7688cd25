"""Secret backends. Each module offers one :class:`providers.base.Provider`.

Modules are imported on first use so that, say, checking an AWS class never loads the Azure SDK.
Any other provider name is an external provider reached through upstream's provider plugin API
(:mod:`providers.plugin`), if it is a name upstream accepts.
"""

from __future__ import annotations

import importlib
import threading
from typing import Any

from providers.base import Provider
from providers.limits import quote
from providers.plugin.settings import NAME, NAME_RULE

PLUGIN = "<plugin>"  # any provider name without a built-in: providers.plugin
# provider name (spec.provider in a SecretProviderClass) -> "module:class"
REGISTRY: dict[str, str] = {
    "aws": "providers.aws.provider:AwsProvider",
    "vault": "providers.vault.provider:VaultProvider",
    "azure": "providers.azure.provider:AzureProvider",
    "gcp": "providers.gcp.provider:GcpProvider",
}

_instances: dict[str, Provider] = {}
_plugins: dict[str, Provider] = {}  # external providers by name, oldest first
_lock = threading.Lock()
# External provider instances kept; SPC authors choose the names, so their number is bounded (a
# volume keeps using the instance it got; a name asked for again gets a new one).
MAX_PLUGINS = 256


# The distribution, and the extra that brings each provider's libraries (the top-level modules it
# imports): a provider whose libraries are missing names the extra to install.
DISTRIBUTION = "secretfs-csi"
EXTRAS: dict[str, tuple[str, frozenset[str]]] = {
    "aws": ("aws", frozenset({"botocore", "jmespath"})),
    "vault": ("vault", frozenset({"hvac", "requests"})),
    "azure": ("azure", frozenset({"azure", "msal", "cryptography"})),
    "gcp": ("gcp", frozenset({"google", "grpc", "proto"})),
    PLUGIN: ("plugin", frozenset({"grpc", "google"})),
}


class UnknownProvider(LookupError):
    def __init__(self, name: str) -> None:
        known = ", ".join(sorted(REGISTRY))
        super().__init__(
            f"invalid provider name {quote(name)} in spec.provider: built in are {known}; any "
            "other is an external provider reached at <providers dir>/<name>.sock and its name "
            f"must match {NAME_RULE} (letters, digits, '_' and '-', at most 30)"
        )


class MissingExtra(UnknownProvider):
    """The provider's libraries are not installed here (a base install without its extra)."""

    def __init__(self, name: str, extra: str, module: str) -> None:
        LookupError.__init__(
            self,
            f"provider {quote(name)} is not installed on this node: its library {module} is "
            f"missing; install the {extra} extra: pip install '{DISTRIBUTION}[{extra}]'",
        )
        self.extra = extra


def _import(name: str, module_name: str) -> object:
    """Import a provider's module; a missing library of its extra is MissingExtra."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        top = (exc.name or "").split(".")[0]
        extra, libraries = EXTRAS.get(name, EXTRAS[PLUGIN] if name not in REGISTRY else ("", ()))
        if top in libraries:
            raise MissingExtra(name, extra, top) from None
        raise


def get_provider(name: str) -> Provider:
    """The shared instance of provider ``name``; raises UnknownProvider."""
    with _lock:
        inst = _instances.get(name)
        if inst is None:
            target = REGISTRY.get(name)
            if target is None:
                return _plugin(name)
            module_name, _, cls_name = target.partition(":")
            inst = getattr(_import(name, module_name), cls_name)()
            _instances[name] = inst
        return inst


def _plugin(name: str) -> Provider:
    """The external provider ``name`` (a plugin socket); called with _lock held."""
    if not name or not NAME.fullmatch(name):
        raise UnknownProvider(name)
    inst = _plugins.get(name)
    if inst is None:
        module: Any = _import(name, "providers.plugin.provider")
        inst = _plugins[name] = module.PluginProvider(name)
        while len(_plugins) > MAX_PLUGINS:
            del _plugins[next(iter(_plugins))]
    return inst
