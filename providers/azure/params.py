"""Parameters of ``provider: azure``: clouds, the vault, the identity mode and the ``objects`` list.

Same schema as upstream (Azure/secrets-store-csi-driver-provider-azure): ``keyvaultName``,
``tenantID`` (or the deprecated ``tenantId``), ``cloudName`` (+ ``cloudEnvFileName`` for
``AzureStackCloud``), ``clientID``, the deprecated ``usePodIdentity`` / ``useVMManagedIdentity`` /
``useAzureTokenProxy`` switches (rejected here, see :func:`_identity_mode`) and ``objects``: a YAML
string ``array:`` whose elements are YAML strings, each one object. An element that is already a
mapping is accepted as well (upstream would refuse it; nothing is lost by being lenient).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from providers import limits
from providers.base import Problem, check_path, parse_mode_octal_text
from providers.limits import quote

# Where the Entra ID (AAD) token endpoint is and what Key Vault host names end with, per cloud.
# Names as go-autorest's EnvironmentFromName knows them (compared case-insensitively).
_PUBLIC = ("vault.azure.net", "https://login.microsoftonline.com/")
_USGOV = ("vault.usgovcloudapi.net", "https://login.microsoftonline.us/")
_CHINA = ("vault.azure.cn", "https://login.chinacloudapi.cn/")
_GERMAN = ("vault.microsoftazure.de", "https://login.microsoftonline.de/")
CLOUDS: dict[str, tuple[str, str]] = {
    "azurepubliccloud": _PUBLIC,
    "azurecloud": _PUBLIC,
    "azureusgovernmentcloud": _USGOV,
    "azureusgovernment": _USGOV,
    "azurechinacloud": _CHINA,
    "azuregermancloud": _GERMAN,
}
STACK_CLOUD = "azurestackcloud"
KNOWN_CLOUDS = (
    "AzurePublicCloud, AzureUSGovernmentCloud, AzureChinaCloud, AzureGermanCloud, AzureStackCloud"
)

OBJECT_TYPES = ("secret", "key", "cert")
FORMATS = ("pem", "pfx")
ENCODINGS = ("utf-8", "base64", "hex")
MAX_HISTORY = 500  # each history entry is a file; bounds the size of a plan

_VAULT_NAME = re.compile(r"^[-A-Za-z0-9]{3,24}$")
_OBJECT_NAME = re.compile(r"^[-A-Za-z0-9]{1,127}$")
_VERSION = re.compile(r"^[A-Za-z0-9]{0,64}$")
_TENANT = re.compile(r"^[A-Za-z0-9.-]{1,256}$")

_FIELDS = (
    "objectName",
    "objectType",
    "objectAlias",
    "objectVersion",
    "objectVersionHistory",
    "objectFormat",
    "objectEncoding",
    "filePermission",
)
_GO_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_GO_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


@dataclass(frozen=True)
class Cloud:
    """A cloud's Key Vault DNS suffix and Entra ID authority; ``custom`` for AzureStackCloud."""

    name: str
    vault_dns_suffix: str
    authority: str
    custom: bool = False


@dataclass(frozen=True)
class AzureObject:
    """One parsed element of ``objects``."""

    name: str
    type: str
    alias: str
    version: str  # "" = latest
    history: int  # <= 1: the one version; N > 1: N files <alias>/<index>
    format: str  # "pem" or "pfx"
    encoding: str  # "utf-8", "base64" or "hex"
    mode: int

    @property
    def file_name(self) -> str:
        return self.alias or self.name

    @property
    def uid(self) -> str:
        """Upstream's object id (``<type>/<name>``), shown in SecretProviderClassPodStatus."""
        return f"{self.type}/{self.name}"


def cloud_from_env_json(text: str, origin: str) -> Cloud:
    """A custom cloud from go-autorest's environment JSON; ValueError says what is wrong."""
    try:
        env = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{origin} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(env, dict):
        raise ValueError(f"{origin} must hold a JSON object")
    missing = [k for k in ("keyVaultDNSSuffix", "activeDirectoryEndpoint") if not env.get(k)]
    if missing:
        raise ValueError(f"{origin} lacks {', '.join(missing)}")
    suffix, authority = env["keyVaultDNSSuffix"], env["activeDirectoryEndpoint"]
    if not isinstance(suffix, str) or not isinstance(authority, str):
        raise ValueError(f"{origin}: keyVaultDNSSuffix and activeDirectoryEndpoint must be strings")
    if not authority.startswith("https://"):
        raise ValueError(f"{origin}: activeDirectoryEndpoint must be an https:// URL")
    name = env.get("name") if isinstance(env.get("name"), str) else "AzureStackCloud"
    return Cloud(str(name), suffix.strip().strip("."), authority.strip(), custom=True)


def parse_cloud(
    parameters: Mapping[str, str], settings: Mapping[str, str], problems: list[Problem]
) -> Cloud | None:
    """The cloud of ``cloudName`` (default: the operator's ``default_cloud`` setting)."""
    name = parameters.get("cloudName", "").strip() or settings.get("default_cloud", "")
    name = name or "AzurePublicCloud"
    key = name.lower()
    if key in CLOUDS:
        suffix, authority = CLOUDS[key]
        return Cloud(name, suffix, authority)
    if key != STACK_CLOUD:
        problems.append(
            Problem(None, "cloudName", f"unknown cloud {name!r}; use one of {KNOWN_CLOUDS}")
        )
        return None
    # Custom cloud: upstream reads go-autorest's environment file (cloudEnvFileName, or the
    # AZURE_ENVIRONMENT_FILEPATH variable); the operator may instead give the JSON inline.
    spc_path = parameters.get("cloudEnvFileName", "").strip()
    path = spc_path or settings.get("env_file", "")
    try:
        if spc_path and not _inside(spc_path, settings.get("env_dirs", "")):
            allowed = settings.get("env_dirs", "") or "none"
            raise ValueError(
                f"{spc_path!r} is outside the directories the operator allows for cloud "
                f"environment files ({allowed}; daemon setting SECRETFS_AZURE_CLOUD_ENV_DIRS)"
            )
        if path:
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read(1 << 20)
            except OSError as exc:
                raise ValueError(
                    f"cannot read cloud environment file {path!r}: {exc.strerror}"
                ) from None
            return cloud_from_env_json(text, f"cloud environment file {path!r}")
        if settings.get("env_json"):
            return cloud_from_env_json(settings["env_json"], "SECRETFS_AZURE_ENVIRONMENT_JSON")
    except ValueError as exc:
        problems.append(Problem(None, "cloudEnvFileName", str(exc)))
        return None
    problems.append(
        Problem(
            None,
            "cloudEnvFileName",
            "cloudName AzureStackCloud needs a cloud environment: set cloudEnvFileName to the path "
            "of a go-autorest environment JSON file (keyVaultDNSSuffix, activeDirectoryEndpoint)",
        )
    )
    return None


def _inside(path: str, dirs: str) -> bool:
    """``path`` (absolute, no '..' games) lies in one of the ``:``-separated ``dirs``."""
    if not os.path.isabs(path):
        return False
    norm = os.path.normpath(path)
    return any(
        os.path.commonpath([norm, os.path.normpath(d)]) == os.path.normpath(d)
        for d in dirs.split(":")
        if d
    )


def _go_bool(parameters: Mapping[str, str], key: str, problems: list[Problem]) -> bool:
    raw = parameters.get(key, "").strip()
    if raw == "" or raw in _GO_FALSE:
        return False
    if raw in _GO_TRUE:
        return True
    problems.append(Problem(None, key, f"{raw!r} is not a boolean (use true or false)"))
    return False


def identity_mode_problems(parameters: Mapping[str, str], problems: list[Problem]) -> None:
    """The deprecated identity modes are refused with what to use instead."""
    use_instead = (
        "use workload identity instead (set clientID to the managed identity's or app's client "
        "ID, federate it with the pod's service account, and add audience "
        "api://AzureADTokenExchange to tokenRequests of the CSIDriver), or a service principal "
        "via nodePublishSecretRef (keys clientid and clientsecret)"
    )
    if _go_bool(parameters, "usePodIdentity", problems):
        problems.append(
            Problem(
                None, "usePodIdentity", "AAD Pod Identity (NMI) is not supported; " + use_instead
            )
        )
    if _go_bool(parameters, "useVMManagedIdentity", problems):
        problems.append(
            Problem(
                None,
                "useVMManagedIdentity",
                "node (VM/VMSS) managed identity is not supported: every pod on the node could "
                "use it; " + use_instead,
            )
        )
    if _go_bool(parameters, "useAzureTokenProxy", problems):
        problems.append(
            Problem(
                None,
                "useAzureTokenProxy",
                "AKS identity binding (Azure token proxy) is not supported; " + use_instead,
            )
        )


def parse_vault_name(parameters: Mapping[str, str], problems: list[Problem]) -> str:
    name = parameters.get("keyvaultName", "").strip()
    if not name:
        problems.append(Problem(None, "keyvaultName", "required: the name of the Key Vault"))
    elif not _VAULT_NAME.match(name):
        problems.append(
            Problem(
                None, "keyvaultName", f"{name!r} must be 3-24 characters of a-z, A-Z, 0-9 and -"
            )
        )
    return name


def parse_tenant(parameters: Mapping[str, str], problems: list[Problem]) -> str:
    # tenantID wins; tenantId is upstream's deprecated spelling.
    tenant = parameters.get("tenantID", "").strip()
    fld = "tenantID"
    if not tenant:
        tenant = parameters.get("tenantId", "").strip()
        fld = "tenantId" if tenant else fld
    if not tenant:
        problems.append(Problem(None, "tenantID", "required: the Entra ID tenant ID of the vault"))
    elif not _TENANT.match(tenant):
        problems.append(
            Problem(None, fld, f"{tenant!r} is not a tenant ID (a GUID or a domain name)")
        )
    return tenant


def load_objects(raw: str, problems: list[Problem]) -> list[dict[str, Any]]:
    """The ``objects`` parameter as a list of mappings (one per element).

    Scalars stay text, as upstream's Go structs read them: ``objectVersion: 0123`` is "0123" and
    ``filePermission: 644`` is octal 644 (YAML 1.1 resolution would make them numbers).
    """
    if not raw.strip():
        problems.append(Problem(None, "objects", "required: an 'array:' of objects to mount"))
        return []
    try:
        doc = limits.load_yaml(raw, yaml.BaseLoader)
    except limits.LimitError as exc:
        problems.append(Problem(None, "objects", str(exc)))
        return []
    except yaml.YAMLError as exc:
        problems.append(Problem(None, "objects", f"is not valid YAML: {_yaml_where(exc)}"))
        return []
    array = doc.get("array") if isinstance(doc, dict) else None
    if not isinstance(array, list):
        problems.append(
            Problem(
                None, "objects", "must be YAML of the form 'array:' followed by a list of objects"
            )
        )
        return []
    if not array:
        problems.append(Problem(None, "objects", "the array lists no objects"))
    out: list[dict[str, Any]] = []
    for i, elem in enumerate(array):
        where = f"objects[{i}]"
        if isinstance(elem, str):
            try:
                elem = limits.load_yaml(elem, yaml.BaseLoader)
            except limits.LimitError as exc:
                problems.append(Problem(where, "objects", str(exc)))
                continue
            except yaml.YAMLError as exc:
                problems.append(Problem(where, "objects", f"is not valid YAML: {_yaml_where(exc)}"))
                continue
        if not isinstance(elem, dict):
            problems.append(
                Problem(where, "objects", "must be a mapping with objectName, objectType")
            )
            continue
        out.append({str(k): v for k, v in elem.items()})
    return out


def _yaml_where(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or "syntax error"
    return f"{problem} (line {mark.line + 1})" if mark is not None else str(problem)


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value).strip()


def parse_object(
    raw: Mapping[str, Any], index: int, default_mode: int, problems: list[Problem]
) -> AzureObject | None:
    """One element of ``objects``; problems name it by alias or name (or its index)."""
    name = _text(raw.get("objectName"))
    alias = _text(raw.get("objectAlias"))
    obj = alias or name or f"objects[{index}]"
    before = len(problems)

    def bad(fld: str, msg: str) -> None:
        problems.append(Problem(obj, fld, msg))

    known = {f.lower(): f for f in _FIELDS}
    for key in raw:
        if key not in _FIELDS and key.lower() in known:
            bad(
                key,
                f"unknown field; did you mean {known[key.lower()]!r}? (names are case-sensitive)",
            )
    if not name:
        bad("objectName", "required: the name of the secret, key or certificate in the vault")
    elif not _OBJECT_NAME.match(name):
        bad("objectName", f"{name!r} is not a Key Vault object name (1-127 of a-z, A-Z, 0-9, -)")
    otype = _text(raw.get("objectType")).lower()
    if otype not in OBJECT_TYPES:
        shown = _text(raw.get("objectType")) or "(empty)"
        bad("objectType", f"{shown!r} is not valid; use secret, key or cert")
    version = _text(raw.get("objectVersion"))
    version = "" if version.lower() == "latest" else version
    if not _VERSION.match(version):
        bad("objectVersion", f"{version!r} is not a Key Vault version id (letters and digits)")
    history = _parse_history(raw.get("objectVersionHistory"), bad)
    fmt = _text(raw.get("objectFormat")).lower() or "pem"
    if fmt not in FORMATS:
        bad("objectFormat", f"{fmt!r} is not valid; use pem or pfx")
    elif fmt == "pfx" and otype in ("key", "cert"):
        bad("objectFormat", "pfx is only for objectType secret (the secret of a certificate)")
    encoding = _text(raw.get("objectEncoding")).lower()
    if encoding and encoding not in ENCODINGS:
        bad("objectEncoding", f"{encoding!r} is not valid; use utf-8, base64 or hex")
    elif encoding and otype in ("key", "cert"):
        bad("objectEncoding", "objectEncoding is only for objectType secret")
    mode = default_mode
    if _text(raw.get("filePermission")):
        parsed = parse_mode_octal_text(raw.get("filePermission"), obj, "filePermission", problems)
        mode = default_mode if parsed is None else parsed
    file_name = alias or name
    if file_name:
        fld = "objectAlias" if alias else "objectName"
        path_problems = check_path(file_name, obj, fld)
        if not path_problems and ".." in file_name:
            # Upstream refuses any '..' in a file name, even inside an element ("a..b").
            path_problems.append(
                Problem(obj, fld, f"file name {file_name!r} must not contain '..'")
            )
        problems.extend(path_problems)
    if len(problems) > before:
        return None
    return AzureObject(name, otype, alias, version, history, fmt, encoding or "utf-8", mode)


_HISTORY = re.compile(r"^-?[0-9]{1,9}$")


def _parse_history(value: object, bad: Callable[[str, str], None]) -> int:
    if value is None or value == "":
        return 0
    if isinstance(value, bool) or not (
        isinstance(value, int) or (isinstance(value, str) and _HISTORY.match(value.strip()))
    ):
        bad("objectVersionHistory", f"{quote(value)} is not a number of versions")
        return 0
    n = int(value)
    if n < 0:
        bad("objectVersionHistory", f"{n} is negative; use a number of versions (0 or 1: current)")
        return 0
    if n > MAX_HISTORY:
        bad("objectVersionHistory", f"{n} is more than the {MAX_HISTORY} versions supported")
        return 0
    return n
