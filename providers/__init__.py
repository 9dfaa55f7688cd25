"""Secret backends. Each module offers one :class:`providers.base.Provider`.

Modules are imported on first use so that, say, checking an AWS class never loads the Azure SDK.
Any other provider name is an external provider reached through upstream's provider plugin API
(:mod:`providers.plugin`), if it is a name upstream accepts.
"""

from __future__ import annotations

import importlib
import threading

from providers.base import Provider
from providers.limits import quote
from providers.plugin.settings import NAME, NAME_RULE

# provider name (spec.provider in a SecretProviderClass) -> "module:class"
REGISTRY: dict[str, str] = {
    "aws": "providers.aws:AwsProvider",
    "vault": "providers.vault:VaultProvider",
    "azure": "providers.azure:AzureProvider",
    "gcp": "providers.gcp:GcpProvider",
}

_instances: dict[str, Provider] = {}
_plugins: dict[str, Provider] = {}  # external providers by name, oldest first
_lock = threading.Lock()
# External provider instances kept; SPC authors choose the names, so their number is bounded (a
# volume keeps using the instance it got; a name asked for again gets a new one).
MAX_PLUGINS = 256


class UnknownProvider(LookupError):
    def __init__(self, name: str) -> None:
        known = ", ".join(sorted(REGISTRY))
        super().__init__(
            f"invalid provider name {quote(name)} in spec.provider: built in are {known}; any "
            "other is an external provider reached at <providers dir>/<name>.sock and its name "
            f"must match {NAME_RULE} (letters, digits, '_' and '-', at most 30)"
        )


def get_provider(name: str) -> Provider:
    """The shared instance of provider ``name``; raises UnknownProvider."""
    with _lock:
        inst = _instances.get(name)
        if inst is None:
            target = REGISTRY.get(name)
            if target is None:
                return _plugin(name)
            module_name, _, cls_name = target.partition(":")
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                if exc.name == module_name:
                    raise UnknownProvider(name) from None
                raise
            inst = getattr(module, cls_name)()
            _instances[name] = inst
        return inst


def _plugin(name: str) -> Provider:
    """The external provider ``name`` (a plugin socket); called with _lock held."""
    if not name or not NAME.fullmatch(name):
        raise UnknownProvider(name)
    inst = _plugins.get(name)
    if inst is None:
        module = importlib.import_module("providers.plugin.provider")
        inst = _plugins[name] = module.PluginProvider(name)
        while len(_plugins) > MAX_PLUGINS:
            del _plugins[next(iter(_plugins))]
    return inst
