"""Azure Key Vault (``provider: azure``) with the official SDKs.

Parameters and file rules follow upstream (Azure/secrets-store-csi-driver-provider-azure); see
:mod:`providers.azure.params` for the schema, :mod:`providers.azure.content` for what each object
type becomes and :mod:`providers.azure.auth` for credentials and operator settings.

Sources are :class:`Source` tuples. A single object is one source; ``objectVersionHistory: N``
plans N files ``<alias>/<index>`` (index 0 is the newest enabled version, or ``objectVersion``
when set, then older ones by creation time) with one source each; fetching any of them lists the
versions once per call. Upstream's loop mounts N+1 files when more versions exist than asked for;
we mount the N asked for. Each source's bytes are final (conversion and ``objectEncoding`` are
applied at fetch, so a bad value is a FetchError, not a read error); ``render`` is the identity.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Hashable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple

from azure.core.exceptions import ResourceNotFoundError
from cachetools import TTLCache

from providers.azure import content as content
from providers.azure.auth import (
    AuthFailure,
    AzureAuth,
    Clients,
    Material,
    Settings,
    build_clients,
    material_for,
)
from providers.azure.errors import map_error
from providers.azure.params import (
    AzureObject,
    identity_mode_problems,
    load_objects,
    parse_cloud,
    parse_object,
    parse_tenant,
    parse_vault_name,
)
from providers.base import (
    DEFAULT_MODE,
    Fetched,
    FetchError,
    FileSpec,
    Identity,
    ParameterError,
    Plan,
    Problem,
    check_files,
)

log = logging.getLogger(__name__)

_EPOCH = datetime.fromtimestamp(0, UTC)
_KIND = {"secret": "secret", "key": "key", "cert": "certificate"}


class Source(NamedTuple):
    """What one file is read from. ``version`` "" is the latest; for a history entry it is the
    version the history starts at, and ``entry`` the file's position (0 = that start)."""

    type: str
    name: str
    version: str
    format: str
    encoding: str
    entry: int | None = None

    @property
    def uid(self) -> str:
        base = f"{self.type}/{self.name}"
        return base if self.entry is None else f"{base}/{self.entry}"


class _Failed(Exception):
    def __init__(self, message: str, code: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.message, self.code, self.transient = message, code, transient


class AzureProvider:
    name = "azure"
    max_concurrency = 8

    def __init__(self, environ: Mapping[str, str] | None = None, **overrides: Any) -> None:
        """``environ`` (default ``os.environ``) holds the operator settings of
        :mod:`providers.azure.auth`; ``overrides`` replace single :class:`Settings` fields."""
        settings = Settings.from_env(os.environ if environ is None else environ)
        self.settings = dataclasses.replace(settings, **overrides)
        # Credentials and clients per (vault+identity parameters, credential digest): access
        # tokens are reused and connections stay open between refreshes. 30 minutes: a cached
        # credential must not outlive the pod token it holds as its assertion (the kubelet's are
        # valid for an hour at least), so it never asks Entra ID with a stale one.
        self._sessions: TTLCache[tuple[AzureAuth, str], Clients] = TTLCache(maxsize=64, ttl=1800)
        self._by_identity: dict[Hashable, set[tuple[AzureAuth, str]]] = {}
        self._lock = threading.Lock()

    # --- parse ------------------------------------------------------------------------------

    def parse(self, parameters: Mapping[str, str], default_mode: int = DEFAULT_MODE) -> Plan:
        problems: list[Problem] = []
        vault = parse_vault_name(parameters, problems)
        tenant = parse_tenant(parameters, problems)
        cloud = parse_cloud(parameters, self.settings.cloud_settings(), problems)
        identity_mode_problems(parameters, problems)
        files: list[FileSpec] = []
        raw_objects = load_objects(parameters.get("objects", ""), problems)
        for i, raw in enumerate(raw_objects):
            obj = parse_object(raw, i, default_mode, problems)
            if obj is not None:
                files.extend(_files_of(obj))
        problems.extend(check_files(files))
        if problems or cloud is None:
            raise ParameterError(problems)
        auth = AzureAuth(
            vault_url=f"https://{vault}.{cloud.vault_dns_suffix}/",
            tenant_id=tenant,
            client_id=parameters.get("clientID", "").strip(),
            authority=cloud.authority,
            custom_cloud=cloud.custom,
        )
        return Plan(self.name, tuple(files), auth)

    # --- fetch ------------------------------------------------------------------------------

    def fetch_sync(
        self, plan: Plan, identity: Identity, sources: Sequence[Hashable]
    ) -> Mapping[Hashable, Fetched | FetchError]:
        auth = plan.auth
        if not isinstance(auth, AzureAuth):
            raise TypeError("not an Azure plan")
        srcs = [s for s in sources if isinstance(s, Source)]
        try:
            material = material_for(auth, identity, self.settings)
            clients = self._clients(auth, material, identity.key())
        except AuthFailure as exc:
            return {s: _error(s, exc.message, exc.code, exc.transient) for s in srcs}
        results: dict[Hashable, Fetched | FetchError] = {}
        histories: dict[tuple[str, str, str], list[str] | Exception] = {}
        for src in srcs:
            try:
                version = src.version
                if src.entry is not None:
                    key = (src.type, src.name, src.version)
                    if key not in histories:
                        try:
                            histories[key] = self._history(clients, src)
                        except Exception as exc:  # one list call per history, even failing
                            histories[key] = exc
                    found = histories[key]
                    if isinstance(found, Exception):
                        raise found
                    if src.entry >= len(found):
                        raise _Failed(
                            f"objectVersionHistory asks for entry {src.entry} but "
                            f"{_KIND[src.type]} {src.name!r} has {len(found)} enabled version(s) "
                            "from the one asked for; lower objectVersionHistory",
                            "NoSuchVersion",
                        )
                    version = found[src.entry]
                results[src] = self._fetch_one(clients, src, version)
            except _Failed as exc:
                results[src] = _error(src, exc.message, exc.code, exc.transient)
            except Exception as exc:
                results[src] = self._mapped(exc, src, auth, material)
        return results

    def render(self, spec: FileSpec, value: Fetched) -> bytes:
        return value.data

    # --- internals --------------------------------------------------------------------------

    def _clients(self, auth: AzureAuth, material: Material, identity_key: Hashable) -> Clients:
        key = (auth, material.digest)
        with self._lock:
            clients = self._sessions.get(key)
            if clients is None:
                clients = build_clients(auth, material, self.settings)
                self._sessions[key] = clients
            self._by_identity.setdefault(identity_key, set()).add(key)
            return clients

    def release_identity(self, identity_key: Hashable) -> None:
        with self._lock:
            for key in self._by_identity.pop(identity_key, ()):
                self._sessions.pop(key, None)

    def _history(self, clients: Clients, src: Source) -> list[str]:
        """Enabled version ids, newest first, starting at ``src.version`` when given."""
        try:
            if src.type == "secret":
                items: Any = clients.secrets.list_properties_of_secret_versions(src.name)
            elif src.type == "key":
                items = clients.keys.list_properties_of_key_versions(src.name)
            else:
                items = clients.certs.list_properties_of_certificate_versions(src.name)
            found = [
                (p.created_on or _EPOCH, p.version)
                for p in items
                if p.enabled is not False and p.version
            ]
        except ResourceNotFoundError:
            what = f"{_KIND[src.type]} {src.name!r}"
            vault = clients.secrets.vault_url
            raise _Failed(f"{what} not found in key vault {vault}", "NotFound") from None
        found.sort(key=lambda cv: cv[0], reverse=True)  # stable: equal times keep list order
        versions = [v for _, v in found]
        if src.version:
            if src.version not in versions:
                raise _Failed(
                    f"version {src.version!r} of {_KIND[src.type]} {src.name!r} is not among its "
                    "enabled versions",
                    "NotFound",
                )
            versions = versions[versions.index(src.version) :]
        return versions

    def _fetch_one(self, clients: Clients, src: Source, version: str) -> Fetched:
        """One object version from the vault, converted to the file's bytes."""
        ver = version or None
        if src.type == "secret":
            secret = clients.secrets.get_secret(src.name, ver)
            props: Any = secret.properties

            def convert() -> bytes:
                text = secret.value or ""
                if props.key_id:  # the secret of a certificate
                    text = content.certificate_secret(text, props.content_type, src.format)
                return content.decode(text, src.encoding)

        elif src.type == "key":
            key = clients.keys.get_key(src.name, ver)
            props = key.properties
            jwk: Any = key.key  # JsonWebKey's fields are set dynamically

            def convert() -> bytes:
                kty = _enum_text(jwk.kty) or ""
                crv = _enum_text(jwk.crv)
                return content.public_key_pem(kty, n=jwk.n, e=jwk.e, crv=crv, x=jwk.x, y=jwk.y)

        else:
            if ver:
                cert = clients.certs.get_certificate_version(src.name, ver)
            else:
                cert = clients.certs.get_certificate(src.name)
            props = cert.properties

            def convert() -> bytes:
                if not cert.cer:
                    raise ValueError("the certificate has no content")
                return content.certificate_pem(bytes(cert.cer))

        try:
            data = convert()
        except ValueError as exc:  # our conversions word these without quoting content
            raise _Failed(str(exc), "BadContent") from None
        got = getattr(props, "version", None) or version
        log.debug("fetched %s version %s", src.uid, got)
        return Fetched(data, got)

    def _mapped(self, exc: Exception, src: Source, auth: AzureAuth, m: Material) -> FetchError:
        """A FetchError for an SDK exception, with no token or secret in its message."""
        what = f"{_KIND[src.type]} {src.name!r}"
        if src.version:
            what += f" version {src.version!r}"
        mapped = map_error(exc, what, src.uid, auth, m)
        return _error(src, mapped.message, mapped.code, mapped.transient)


def _enum_text(value: object) -> str | None:
    """The wire text of an SDK enum member (or plain string)."""
    if value is None:
        return None
    return str(getattr(value, "value", value))


def _error(src: Source, message: str, code: str, transient: bool = False) -> FetchError:
    return FetchError(src.uid, message, transient=transient, code=code)


def _files_of(obj: AzureObject) -> list[FileSpec]:
    fmt = obj.format if obj.type == "secret" else "pem"
    enc = obj.encoding if obj.type == "secret" else "utf-8"
    if obj.history <= 1:
        src = Source(obj.type, obj.name, obj.version, fmt, enc)
        return [FileSpec(obj.file_name, obj.mode, src, obj.uid)]
    out = []
    for i in range(obj.history):
        src = Source(obj.type, obj.name, obj.version, fmt, enc, i)
        out.append(FileSpec(f"{obj.file_name}/{i}", obj.mode, src, src.uid))
    return out
