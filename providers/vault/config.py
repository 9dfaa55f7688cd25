"""Parameters of ``provider: vault`` SecretProviderClasses, in upstream vault-csi-provider's format.

Top-level keys: ``roleName``, ``vaultAddress``, ``vaultNamespace``, ``vaultKubernetesMountPath`` or
``vaultAuthMountPath`` (not both), ``audience``, ``vaultSkipTLSVerify``, ``vaultCACertPath``,
``vaultCADirectory``, ``vaultTLSServerName``, ``vaultTLSClientCertPath``,
``vaultTLSClientKeyPath`` and ``objects`` (a YAML list). Where a key is absent, the daemon's
environment supplies the default the way Vault's own client does (``VAULT_ADDR``,
``VAULT_NAMESPACE``, ``VAULT_CACERT``, ``VAULT_CAPATH``, ``VAULT_CLIENT_CERT``,
``VAULT_CLIENT_KEY``, ``VAULT_TLS_SERVER_NAME``, ``VAULT_SKIP_VERIFY``); other keys (pod info and
the like) are ignored, as upstream does.

``roleName`` is only needed to log in with a pod's token, so it is checked at fetch time: the
standalone mode's ambient ``VAULT_TOKEN`` needs no role.

Static or dynamic: an object is dynamic (issued once per volume, never shared or refreshed on a
timer; issued anew only before its lease ends, see ``Volumes._renew_leases``) when its method is PUT
or POST, or when its path names an issuing endpoint: a ``creds``, ``issue``, ``sign`` or ``sts``
segment followed by a role (``database/creds/app``, ``pki/issue/web``, ``aws/sts/deploy``), or GCP's
``roleset|static-account|impersonated-account/<name>/token|key`` — unless a ``data`` segment comes
first (a KV v2 secret that happens to live under such a name). The extra object field ``dynamic:
true|false`` (ignored by upstream) overrides the guess. Objects that share (path, method,
secretArgs) share one fetch, and are all dynamic if any of them is.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, urlencode, urlsplit

import yaml

from providers import limits
from providers.base import FileSpec, Problem, check_path, parse_mode_number
from providers.vault.gojson import ENCODINGS

DEFAULT_ADDRESS = "https://127.0.0.1:8200"  # Vault's own client default
DEFAULT_MOUNT = "kubernetes"
DEFAULT_AUDIENCE = "vault"
METHODS = ("GET", "LIST", "PUT", "POST")
ISSUING = frozenset({"creds", "issue", "sign", "sts"})
GCP_ACCOUNTS = frozenset({"roleset", "static-account", "impersonated-account"})


@dataclass(frozen=True)
class VaultTLS:
    skip_verify: bool = False
    ca_cert: str | None = None
    ca_dir: str | None = None
    server_name: str | None = None
    client_cert: str | None = None
    client_key: str | None = None


@dataclass(frozen=True)
class VaultAuth:
    """Plan.auth: everything that decides which Vault, which login and which TLS apply."""

    address: str
    namespace: str | None
    mount: str
    role: str | None
    audience: str
    tls: VaultTLS


class VaultSource(NamedTuple):
    """What to request: API path (no ``/v1/``, query canonicalised), method, secretArgs JSON."""

    path: str
    method: str
    args: str | None

    def split(self) -> tuple[str, list[tuple[str, str]]]:
        path, _, query = self.path.partition("?")
        return path, parse_qsl(query, keep_blank_values=True)


class VaultSelect(NamedTuple):
    key: str | None  # None: the whole response as JSON
    encoding: str


# --- YAML the way upstream's yaml.v3 reads it into interface{} ------------------------------------


class _PyLoader(yaml.SafeLoader):
    """SafeLoader without YAML 1.1 yes/no/on/off booleans and without timestamps (yaml.v3 keeps
    both as strings), so secretArgs reach Vault as upstream would send them."""


_PyLoader.yaml_implicit_resolvers = {
    ch: [
        (tag, rx)
        for tag, rx in rs
        if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:timestamp")
    ]
    for ch, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_PyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Loader: type[Any] = _PyLoader
if yaml.__with_libyaml__:

    class _CLoader(yaml.CSafeLoader):
        """The same resolvers on libyaml's parser (small documents; limits.load_yaml)."""

    _CLoader.yaml_implicit_resolvers = _PyLoader.yaml_implicit_resolvers
    _Loader = _CLoader
    limits.slow_twin(_CLoader, _PyLoader)


def _parse_bool(value: str) -> bool | None:
    """Go's strconv.ParseBool."""
    if value in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if value in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    return None


def _scalar(value: Any) -> str | None:
    """A YAML scalar read into a Go string field (yaml.v3 accepts any scalar there)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    return None


def is_dynamic(path: str, method: str) -> bool:
    """The static/dynamic guess described in the module docstring."""
    if method in ("PUT", "POST"):
        return True
    segs = path.partition("?")[0].split("/")
    for i in range(1, len(segs) - 1):
        if segs[i] == "data":
            return False
        if segs[i] in ISSUING:
            return True
        if segs[i] in GCP_ACCOUNTS and i + 2 < len(segs) and segs[i + 2] in ("token", "key"):
            return True
    return False


def _clean_path(raw: str) -> str | None:
    """Upstream's ensureV1Prefix + path.Join, minus the ``v1/``; None if it escapes with '..'."""
    path, _, query = raw.partition("?")
    if ".." in path.split("/"):
        return None
    p = path.lstrip("/")
    p = p.removeprefix("v1/") if p != "v1" else ""
    p = posixpath.normpath("/" + p).lstrip("/")
    pairs = parse_qsl(query, keep_blank_values=True)
    if pairs:
        p += "?" + urlencode(sorted(pairs))
    return p


# --- parse ----------------------------------------------------------------------------------------


def _env_or(params: Mapping[str, str], key: str, env: str) -> str | None:
    value = params.get(key)
    if value is None:
        value = os.environ.get(env)
    return value or None


def parse_auth(params: Mapping[str, str], problems: list[Problem]) -> VaultAuth:
    address = _env_or(params, "vaultAddress", "VAULT_ADDR") or DEFAULT_ADDRESS
    try:
        url = urlsplit(address)
        usable = url.scheme in ("http", "https") and bool(url.hostname)
    except ValueError:  # e.g. "http://[" (an unclosed IPv6 bracket)
        usable = False
    if not usable:
        problems.append(
            Problem(
                None,
                "vaultAddress",
                f"{address!r} is not an http(s) URL such as https://vault.vault.svc:8200",
            )
        )
    if "vaultKubernetesMountPath" in params and "vaultAuthMountPath" in params:
        problems.append(
            Problem(
                None,
                "vaultAuthMountPath",
                "set either vaultKubernetesMountPath or vaultAuthMountPath, not both",
            )
        )
    mount = params.get("vaultKubernetesMountPath") or params.get("vaultAuthMountPath") or ""
    mount = mount.strip("/") or DEFAULT_MOUNT

    skip = False
    raw_skip, skip_field = params.get("vaultSkipTLSVerify"), "vaultSkipTLSVerify"
    if raw_skip is None:
        raw_skip, skip_field = (
            os.environ.get("VAULT_SKIP_VERIFY"),
            "VAULT_SKIP_VERIFY (environment)",
        )
    if raw_skip is not None:
        parsed = _parse_bool(raw_skip.strip())
        if parsed is None:
            problems.append(Problem(None, skip_field, f"{raw_skip!r} is not true or false"))
        skip = bool(parsed)
    tls = VaultTLS(
        skip_verify=skip,
        ca_cert=_env_or(params, "vaultCACertPath", "VAULT_CACERT"),
        ca_dir=_env_or(params, "vaultCADirectory", "VAULT_CAPATH"),
        server_name=_env_or(params, "vaultTLSServerName", "VAULT_TLS_SERVER_NAME"),
        client_cert=_env_or(params, "vaultTLSClientCertPath", "VAULT_CLIENT_CERT"),
        client_key=_env_or(params, "vaultTLSClientKeyPath", "VAULT_CLIENT_KEY"),
    )
    if bool(tls.client_cert) != bool(tls.client_key):
        problems.append(
            Problem(
                None,
                "vaultTLSClientKeyPath" if tls.client_cert else "vaultTLSClientCertPath",
                "vaultTLSClientCertPath and vaultTLSClientKeyPath must be set together",
            )
        )
    namespace = _env_or(params, "vaultNamespace", "VAULT_NAMESPACE")
    return VaultAuth(
        address=address.rstrip("/"),
        namespace=namespace.strip("/") if namespace else None,
        mount=mount,
        role=params.get("roleName") or None,
        audience=params.get("audience") or DEFAULT_AUDIENCE,
        tls=tls,
    )


def _object(
    item: Any, index: int, default_mode: int, problems: list[Problem]
) -> tuple[FileSpec, bool | None] | None:
    if not isinstance(item, dict):
        problems.append(
            Problem(
                None,
                f"objects[{index}]",
                "each object must be a mapping with objectName and secretPath",
            )
        )
        return None
    fields: dict[str, str | None] = {}
    bad = False
    for f in ("objectName", "secretPath", "secretKey", "method", "encoding"):
        raw = item.get(f)
        fields[f] = None if raw is None else _scalar(raw)
        if raw is not None and fields[f] is None:
            problems.append(Problem(_name(item, index), f, "must be a string"))
            bad = True
    name = fields["objectName"] or ""
    obj = _name(item, index)
    if not name:
        problems.append(Problem(obj, "objectName", "is required: it names the file"))
        bad = True
    else:
        problems_path = check_path(name, obj, "objectName")
        problems.extend(problems_path)
        bad |= bool(problems_path)
    path = None
    if not fields["secretPath"]:
        problems.append(Problem(obj, "secretPath", "is required, e.g. secret/data/app"))
    else:
        path = _clean_path(fields["secretPath"] or "")
        if path is None:
            problems.append(Problem(obj, "secretPath", "must not contain a '..' element"))
        elif not path or path.startswith("?"):
            problems.append(Problem(obj, "secretPath", "names no Vault path"))
            path = None
    method = (fields["method"] or "GET").upper()
    if method not in METHODS:
        problems.append(
            Problem(obj, "method", f"{fields['method']!r} is not one of " + ", ".join(METHODS))
        )
    encoding = (fields["encoding"] or "utf-8").lower()
    if encoding not in ENCODINGS:
        problems.append(
            Problem(
                obj, "encoding", f"{fields['encoding']!r} is not one of " + ", ".join(ENCODINGS)
            )
        )
    args = item.get("secretArgs")
    args_json: str | None = None
    if args is not None:
        if not isinstance(args, dict):
            problems.append(Problem(obj, "secretArgs", "must be a mapping of request fields"))
        else:
            try:
                args_json = json.dumps(args, sort_keys=True, separators=(",", ":"))
            except (TypeError, ValueError):
                problems.append(Problem(obj, "secretArgs", "holds a value JSON cannot carry"))
    mode = default_mode
    perm = item.get("filePermission")
    if perm not in (None, 0):  # upstream treats 0 as unset
        parsed = parse_mode_number(perm, obj, "filePermission", problems)
        bad |= parsed is None
        mode = parsed if parsed is not None else default_mode
    dyn = item.get("dynamic")
    if dyn is not None and not isinstance(dyn, bool):
        problems.append(Problem(obj, "dynamic", "must be true or false"))
        dyn = None
    if bad or path is None:
        return None
    source = VaultSource(path, method, args_json)
    return (
        FileSpec(
            path=name,
            mode=mode,
            source=source,
            object_name=name,
            select=VaultSelect(fields["secretKey"] or None, encoding),
            dynamic=is_dynamic(path, method) if dyn is None else dyn,
        ),
        dyn,
    )


def _name(item: dict[str, Any], index: int) -> str:
    name = _scalar(item.get("objectName"))
    return name if name else f"objects[{index}]"


def parse_objects(raw: str | None, default_mode: int, problems: list[Problem]) -> list[FileSpec]:
    if not raw or not raw.strip():
        problems.append(
            Problem(
                None,
                "objects",
                "is required: a YAML list of objects with objectName and secretPath",
            )
        )
        return []
    try:
        items = limits.load_yaml(raw, _Loader)  # a SafeLoader subclass
    except limits.LimitError as exc:
        problems.append(Problem(None, "objects", str(exc)))
        return []
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        problems.append(Problem(None, "objects", f"is not valid YAML{at}"))
        return []
    if items is None:
        items = []
    if not isinstance(items, list):
        problems.append(Problem(None, "objects", "must be a YAML list"))
        return []
    if not items:
        problems.append(Problem(None, "objects", "lists no objects: nothing would be mounted"))
    parsed = [_object(item, i, default_mode, problems) for i, item in enumerate(items)]
    specs = [p for p in parsed if p is not None]
    # One source, one behaviour: objects sharing a fetch are all dynamic if any of them says so
    # explicitly (``dynamic:``) or, without an explicit word, if the guess says so.
    explicit: dict[Any, bool] = {}
    for s, dyn in specs:
        if dyn is not None:
            explicit[s.source] = explicit.get(s.source, False) or dyn
    dynamic_sources = {s.source for s, _ in specs if explicit.get(s.source, s.dynamic)}
    return [
        FileSpec(s.path, s.mode, s.source, s.object_name, s.select, s.source in dynamic_sources)
        for s, _ in specs
    ]
