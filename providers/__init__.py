"""Secret backends. Each module offers one :class:`providers.base.Provider`.

Modules are imported on first use so that, say, checking an AWS class never loads the Azure SDK.
"""

from __future__ import annotations

import importlib
import threading

from providers.base import Provider

# provider name (spec.provider in a SecretProviderClass) -> "module:class"
REGISTRY: dict[str, str] = {
    "aws": "providers.aws:AwsProvider",
    "vault": "providers.vault:VaultProvider",
    "azure": "providers.azure:AzureProvider",
    "gcp": "providers.gcp:GcpProvider",
}

_instances: dict[str, Provider] = {}
_lock = threading.Lock()


class UnknownProvider(LookupError):
    def __init__(self, name: str) -> None:
        known = ", ".join(sorted(REGISTRY))
        super().__init__(f"unknown provider {name!r} in spec.provider (supported: {known})")


def get_provider(name: str) -> Provider:
    """The shared instance of provider ``name``; raises UnknownProvider."""
    with _lock:
        inst = _instances.get(name)
        if inst is None:
            target = REGISTRY.get(name)
            if target is None:
                raise UnknownProvider(name)
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
