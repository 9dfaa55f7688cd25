"""Google Secret Manager (``provider: gcp``), compatible with secrets-store-csi-driver-provider-gcp.

Parameters (see :mod:`providers.gcp.params`)::

    auth: pod-adc            # default; or provider-adc (the daemon's own credentials)
    secrets: |
      - resourceName: projects/p/secrets/db/versions/latest
        path: db/password    # or fileName; path wins when both are set
        mode: 0400           # optional; else the volume's default mode
      - resourceName: projects/p/locations/europe-west1/secrets/cfg/versions/3
        path: cfg-user
        extractJSONKey: user # or extractYAMLKey: only that string value is written

Source of a file = its ``resourceName``; version = the resolved version name Secret Manager returns
(``projects/<number>/secrets/<s>/versions/<n>``). All sources of one call are fetched in parallel.
Authentication: :mod:`providers.gcp.auth`; endpoints and operator settings:
:mod:`providers.gcp.settings`; the gRPC clients: :mod:`providers.gcp.client`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

from providers.base import DEFAULT_MODE, Fetched, FetchError, FileSpec, Identity, Plan
from providers.gcp.auth import TokenBroker
from providers.gcp.client import SecretClients
from providers.gcp.params import AUTH_POD_ADC, Extract, extract, parse_parameters
from providers.gcp.settings import GcpSettings

# Upper bound on parallel AccessSecretVersion calls within one fetch_sync call.
MAX_PARALLEL = 8


def _refit(exc: FetchError, obj: str) -> FetchError:
    """The same failure, reported for another object (one auth failure fails every source)."""
    message = str(exc).removeprefix(f"object {exc.obj!r}: ")
    return FetchError(obj, message, transient=exc.transient, code=exc.code)


class GcpProvider:
    name = "gcp"
    max_concurrency = 4

    def __init__(
        self, settings: GcpSettings | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings or GcpSettings.from_env()
        self.broker = TokenBroker(self.settings, clock)
        self.clients = SecretClients(self.settings)

    def release_identity(self, identity_key: Hashable) -> None:
        self.broker.forget_identity(identity_key)

    def close(self) -> None:
        """Close the gRPC channels and HTTP connections (daemon shutdown, tests)."""
        self.clients.close()
        self.broker.close()

    def parse(self, parameters: Mapping[str, str], default_mode: int = DEFAULT_MODE) -> Plan:
        return parse_parameters(parameters, default_mode)

    def fetch_sync(
        self, plan: Plan, identity: Identity, sources: Sequence[Hashable]
    ) -> Mapping[Hashable, Fetched | FetchError]:
        names = [str(s) for s in dict.fromkeys(sources)]
        if not names:
            return {}
        auth = plan.auth[0] if isinstance(plan.auth, tuple) and plan.auth else AUTH_POD_ADC
        try:
            token, key = self.broker.token(str(auth), identity, names[0])
        except FetchError as exc:
            return {n: _refit(exc, n) for n in names}

        def one(name: str) -> Fetched | FetchError:
            try:
                data, version = self.clients.access(name, token)
            except FetchError as exc:
                if exc.code == "Unauthenticated":
                    self.broker.forget(key)  # a cached token was revoked: exchange again next time
                return exc
            try:
                for spec in plan.files:  # fail the source now rather than when a file is read
                    if spec.source == name and isinstance(spec.select, Extract):
                        extract(name, spec.select, data)
            except FetchError as exc:
                return exc
            return Fetched(data, version)

        if len(names) == 1:
            return {names[0]: one(names[0])}
        with ThreadPoolExecutor(min(MAX_PARALLEL, len(names)), "gcp-fetch") as pool:
            return dict(zip(names, pool.map(one, names), strict=True))

    def render(self, spec: FileSpec, value: Fetched) -> bytes:
        if isinstance(spec.select, Extract):
            return extract(spec.object_name, spec.select, value.data)
        return value.data
