"""Parsing of the AWS provider's ``parameters`` (the upstream AWS provider's format).

File naming follows upstream exactly: ``objectAlias`` if given, else ``objectName`` (a full ARN
stays a full ARN), then every '/' is replaced by ``pathTranslation`` (default '_'); with
``pathTranslation: "False"`` leading slashes are stripped and the remaining '/' make
subdirectories. jmesPath aliases go through the same translation.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import jmespath
import jmespath.exceptions
import yaml

from providers import limits
from providers.base import (
    FileSpec,
    NodeInfo,
    Problem,
    check_files,
    check_path,
    parse_mode_four_octal,
)

SECRETSMANAGER = "secretsmanager"
SSMPARAMETER = "ssmparameter"
OBJECT_TYPES = (SECRETSMANAGER, SSMPARAMETER)
# ARN service name -> objectType ("ssm" is accepted in an ARN, never as objectType; as upstream)
ARN_SERVICES = {"secretsmanager": SECRETSMANAGER, "ssm": SSMPARAMETER}

TOP_LEVEL = (
    "objects",
    "region",
    "failoverRegion",
    "pathTranslation",
    "usePodIdentity",
    "preferredAddressType",
)
# Keys the driver or kubelet put into the same map; they are not ours to judge.
IGNORED = ("secretProviderClass", "providerName")
IGNORED_PREFIX = "csi.storage.k8s.io/"

OBJECT_FIELDS = (
    "objectName",
    "objectType",
    "objectAlias",
    "objectVersion",
    "objectVersionLabel",
    "filePermission",
    "jmesPath",
    "failoverObject",
)
JMES_FIELDS = ("path", "objectAlias", "filePermission")
FAILOVER_FIELDS = ("objectName", "objectVersion", "objectVersionLabel")
ADDRESS_TYPES = ("auto", "ipv4", "ipv6")

# Where the region comes from when the parameter ``region`` is empty, as upstream's provider:
# AWS_REGION of the process that fetches (the chart's daemon.awsRegion), then the node's label.
REGION_LABEL = "topology.kubernetes.io/region"
REGION_ENV = ("AWS_REGION", "AWS_DEFAULT_REGION")

_REGION = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
_TRUE = ("1", "t", "T", "TRUE", "true", "True")  # Go strconv.ParseBool, as upstream
_FALSE = ("0", "f", "F", "FALSE", "false", "False")
_SSM_BOTH = "an SSM parameter takes objectVersion or objectVersionLabel, not both"


@dataclass(frozen=True)
class AwsAuth:
    """Plan.auth: everything that decides which credentials and endpoints a fetch uses."""

    region: str
    failover_region: str | None = None
    use_pod_identity: bool = False
    preferred_address_type: str = "auto"

    @property
    def regions(self) -> tuple[str, ...]:
        if self.failover_region:
            return (self.region, self.failover_region)
        return (self.region,)


class Target(NamedTuple):
    """What to read in one region: name (or ARN), version id/number, version label/stage."""

    name: str
    version: str | None
    label: str | None


class AwsSource(NamedTuple):
    """FileSpec.source: the object type, its primary-region target and, with a failover region,
    the target to read there (failoverObject, or the primary's name and versions)."""

    kind: str
    primary: Target
    failover: Target | None

    @property
    def name(self) -> str:
        return self.primary.name


def translate_name(name: str, translate: str) -> str:
    if translate:
        return name.replace("/", translate)
    return name.lstrip("/")


def _parse_arn(name: str) -> tuple[str, str] | None:
    """(service, region) of an ARN ``arn:partition:service:region:account:resource``."""
    parts = name.split(":", 5)
    if len(parts) != 6 or not parts[1] or not parts[2] or not parts[5]:
        return None
    return parts[2], parts[3]


class _Parser:
    def __init__(
        self, parameters: Mapping[str, str], default_mode: int, node: NodeInfo | None = None
    ) -> None:
        self.params = parameters
        self.default_mode = default_mode
        self.node = node
        self.problems: list[Problem] = []
        self.notes: list[str] = []
        self.translate = "_"
        self.region = ""
        self.failover_region: str | None = None

    def bad(self, obj: str | None, fld: str, msg: str) -> None:
        self.problems.append(Problem(obj, fld, msg))

    # --- top level -------------------------------------------------------------------------------

    def top_level(self) -> AwsAuth:
        p = self.params
        for key in p:
            if key in TOP_LEVEL or key in IGNORED or key.startswith(IGNORED_PREFIX):
                continue
            self.bad(
                None, key, f"unknown parameter; the aws provider accepts {', '.join(TOP_LEVEL)}"
            )

        region = (p.get("region") or "").strip() or self.default_region()
        if region and not _REGION.match(region):
            self.bad(None, "region", f"{region!r} is not an AWS region name such as 'us-east-1'")
        self.region = region

        failover = (p.get("failoverRegion") or "").strip() or None
        if failover is not None:
            if not _REGION.match(failover):
                self.bad(None, "failoverRegion", f"{failover!r} is not an AWS region name")
            elif failover == region:
                self.bad(None, "failoverRegion", "must differ from the primary region")
        self.failover_region = failover

        trans = p.get("pathTranslation", "")
        if trans == "":
            self.translate = "_"
        elif trans.lower() == "false":
            self.translate = ""
        elif len(trans) != 1:
            self.bad(None, "pathTranslation", "must be 'False' or a single character such as '_'")
        elif trans in ("\0", "."):
            self.bad(None, "pathTranslation", f"{trans!r} cannot replace '/' in file names")
        else:
            self.translate = trans

        use_pi = False
        raw = p.get("usePodIdentity", "")
        if raw in _TRUE:
            use_pi = True
        elif raw not in _FALSE and raw != "":
            self.bad(None, "usePodIdentity", f'{raw!r} is not a boolean; use "true" or "false"')

        addr = (p.get("preferredAddressType") or "auto").lower()
        if addr not in ADDRESS_TYPES:
            self.bad(None, "preferredAddressType", "must be one of ipv4, ipv6, auto")
            addr = "auto"
        return AwsAuth(region, failover, use_pi, addr)

    def default_region(self) -> str:
        """The region when the parameter is empty: AWS_REGION, else the node's label ("" and a
        problem, or offline a note, if neither is known)."""
        node = self.node
        if node is not None and node.offline:
            # secretfs check: this machine's environment says nothing about a node's.
            self.notes.append(
                "parameter 'region' is not set: on a node the region comes from AWS_REGION of "
                "the secretfs daemon (chart value daemon.awsRegion) if set, else from the "
                f"node's label {REGION_LABEL} (as upstream); with `secretfs mount` from "
                "AWS_REGION"
            )
            return ""
        env = next((os.environ[k] for k in REGION_ENV if os.environ.get(k)), "")
        if env or node is None:
            if not env:
                self.bad(
                    None,
                    "region",
                    "no region given; set parameter 'region' (or AWS_REGION in the environment)",
                )
            return env.strip()
        if node.region:
            return node.region
        where = f"node {node.name}" if node.name else "the node"
        why = f" ({node.problem})" if node.problem else ""
        self.bad(
            None,
            "region",
            f"no region: set parameter 'region' in the SecretProviderClass (or the volume's "
            f"attributes), label {where} with {REGION_LABEL}{why}, or set the secretfs "
            "chart's daemon.awsRegion (AWS_REGION of the secretfs daemon)",
        )
        return ""

    # --- objects ---------------------------------------------------------------------------------

    def objects(self) -> list[FileSpec]:
        raw = self.params.get("objects")
        if raw is None or not raw.strip():
            self.bad(None, "objects", "required: a YAML list of objects to mount")
            return []
        try:
            items = limits.load_yaml(raw)
        except limits.LimitError as exc:
            self.bad(None, "objects", str(exc))
            return []
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            self.bad(None, "objects", f"is not valid YAML{where}")
            return []
        if not isinstance(items, list) or not items:
            self.bad(None, "objects", "must be a non-empty YAML list of objects")
            return []
        files: list[FileSpec] = []
        for i, item in enumerate(items):
            files.extend(self.one_object(i, item))
        return files

    def _str(self, d: Mapping[str, Any], key: str, obj: str, *, num_ok: bool = False) -> str | None:
        v = d.get(key)
        if v is None or v == "":
            return None
        if num_ok and isinstance(v, int) and not isinstance(v, bool):
            return str(v)
        if not isinstance(v, str):
            self.bad(obj, key, f"must be a string, not {type(v).__name__}")
            return None
        return v

    def _unknown(
        self, d: Mapping[Any, Any], allowed: tuple[str, ...], obj: str, where: str
    ) -> None:
        for k in d:
            if k not in allowed:
                self.bad(obj, f"{where}{k}", f"unknown field; allowed: {', '.join(allowed)}")

    def _check_name(
        self, name: str, kind: str | None, region: str | None, obj: str, fld: str
    ) -> str | None:
        """Validate an objectName against objectType and region; returns the resolved type."""
        if not name.startswith("arn:"):
            if kind is None:
                self.bad(
                    obj,
                    "objectType",
                    "required unless objectName is a full ARN; use 'secretsmanager' or "
                    "'ssmparameter'",
                )
            return kind
        parsed = _parse_arn(name)
        if parsed is None:
            self.bad(obj, fld, "is not a valid ARN")
            return kind
        service, arn_region = parsed
        arn_kind = ARN_SERVICES.get(service)
        if arn_kind is None:
            self.bad(obj, fld, f"ARN service {service!r} is neither secretsmanager nor ssm")
            return kind
        if kind is not None and kind != arn_kind:
            self.bad(obj, "objectType", f"{kind!r} does not match the ARN's service {service!r}")
        if region and arn_region != region:
            self.bad(obj, fld, f"ARN region {arn_region!r} must match region {region!r}")
        return arn_kind

    def one_object(self, i: int, item: object) -> list[FileSpec]:
        if not isinstance(item, dict):
            self.bad(f"objects[{i}]", "objects", "each entry must be a mapping with objectName")
            return []
        name = item.get("objectName")
        obj = name if isinstance(name, str) and name else f"objects[{i}]"
        self._unknown(item, OBJECT_FIELDS, obj, "")
        if not isinstance(name, str) or not name:
            what = "required" if name in (None, "") else "must be a string (quote it)"
            self.bad(obj, "objectName", f"{what}: the secret's name or full ARN")
            name = None

        kind = self._str(item, "objectType", obj)
        kind_given = kind is not None
        if kind is not None and kind not in OBJECT_TYPES:
            self.bad(obj, "objectType", f"{kind!r} is not one of {', '.join(OBJECT_TYPES)}")
            kind = None
        alias = self._str(item, "objectAlias", obj)
        version = self._str(item, "objectVersion", obj, num_ok=True)
        label = self._str(item, "objectVersionLabel", obj)
        mode = self.default_mode
        if item.get("filePermission") not in (None, ""):  # upstream: empty means the default
            perm = parse_mode_four_octal(
                item["filePermission"], obj, "filePermission", self.problems
            )
            mode = perm if perm is not None else mode

        if name is not None and (kind is not None or not kind_given or name.startswith("arn:")):
            # (An objectType that was given but is wrong has been reported: not "required" too.)
            kind = self._check_name(name, kind, self.region, obj, "objectName")
        if kind == SSMPARAMETER and version and label:
            self.bad(obj, "objectVersionLabel", _SSM_BOTH)

        failover = self.failover_object(item, obj, name, kind, alias, version, label)
        if name is None or kind is None:
            return []

        source = AwsSource(kind, Target(name, version, label), failover)
        path = translate_name(alias or name, self.translate)
        fld = "objectAlias" if alias else "objectName"
        self.problems.extend(check_path(path, obj, fld))
        files = [FileSpec(path, mode, source, name)]
        files.extend(self.jmes_entries(item, obj, source, mode))
        return files

    def failover_object(
        self,
        item: Mapping[str, Any],
        obj: str,
        name: str | None,
        kind: str | None,
        alias: str | None,
        version: str | None,
        label: str | None,
    ) -> Target | None:
        fo = item.get("failoverObject")
        if fo is None:
            if self.failover_region and name is not None:
                return Target(name, version, label)  # upstream reads the same object there
            return None
        if not isinstance(fo, dict):
            self.bad(obj, "failoverObject", "must be a mapping with objectName")
            return None
        self._unknown(fo, FAILOVER_FIELDS, obj, "failoverObject.")
        fo_name = self._str(fo, "objectName", obj)
        fo_version = self._str(fo, "objectVersion", obj, num_ok=True)
        fo_label = self._str(fo, "objectVersionLabel", obj)
        if fo_name is None:
            self.bad(
                obj, "failoverObject.objectName", "required: the failover secret's name or ARN"
            )
        if not alias:
            self.bad(obj, "objectAlias", "required for an object with a failoverObject")
        if not self.failover_region:
            self.bad(obj, "failoverObject", "needs the top-level parameter failoverRegion")
        if fo_version != version:
            self.bad(obj, "failoverObject.objectVersion", "must equal the object's objectVersion")
        if kind == SSMPARAMETER and fo_version and fo_label:
            self.bad(obj, "failoverObject.objectVersionLabel", _SSM_BOTH)
        if fo_name is not None:
            fo_kind = self._check_name(
                fo_name, kind, self.failover_region, obj, "failoverObject.objectName"
            )
            if kind is not None and fo_kind != kind:
                self.bad(obj, "failoverObject.objectName", "must be of the same type as objectName")
        if fo_name is None or not self.failover_region:
            return None
        # As upstream: unset failover version fields fall back to the primary's.
        return Target(fo_name, fo_version or version, fo_label or label)

    def jmes_entries(
        self, item: Mapping[str, Any], obj: str, source: AwsSource, mode: int
    ) -> list[FileSpec]:
        entries = item.get("jmesPath")
        if entries is None:
            return []
        if not isinstance(entries, list):
            self.bad(obj, "jmesPath", "must be a list of {path, objectAlias}")
            return []
        files: list[FileSpec] = []
        for j, e in enumerate(entries):
            where = f"jmesPath[{j}]"
            if not isinstance(e, dict):
                self.bad(obj, where, "must be a mapping with path and objectAlias")
                continue
            self._unknown(e, JMES_FIELDS, obj, f"{where}.")
            path = self._str(e, "path", obj)
            alias = self._str(e, "objectAlias", obj)
            if path is None:
                self.bad(obj, f"{where}.path", "required: a JMESPath expression such as 'username'")
            else:
                try:
                    jmespath.compile(path)
                except jmespath.exceptions.JMESPathError:
                    self.bad(
                        obj,
                        f"{where}.path",
                        f"{path!r} is not a valid JMESPath expression (quote keys with "
                        "hyphens: '\"my-key\"')",
                    )
                    path = None
            if alias is None:
                self.bad(obj, f"{where}.objectAlias", "required: the file name for this value")
            emode = mode
            if e.get("filePermission") not in (None, ""):
                perm = parse_mode_four_octal(
                    e["filePermission"], obj, f"{where}.filePermission", self.problems
                )
                emode = perm if perm is not None else mode
            if path is None or alias is None:
                continue
            fpath = translate_name(alias, self.translate)
            self.problems.extend(check_path(fpath, obj, f"{where}.objectAlias"))
            files.append(FileSpec(fpath, emode, source, source.name, select=("jmespath", path)))
        return files


def parse_parameters(
    parameters: Mapping[str, str], default_mode: int, node: NodeInfo | None = None
) -> tuple[AwsAuth, list[FileSpec], list[Problem], list[str]]:
    """Auth, files, every problem found (the caller raises ParameterError if any) and notes.

    The region is the parameter ``region`` (the SecretProviderClass's, or the volume's attribute
    that replaces it), else AWS_REGION (or AWS_DEFAULT_REGION) of this process, else, on a node,
    the node's ``topology.kubernetes.io/region`` label: upstream's order. ``node`` None is
    standalone mode (no node: the environment or nothing)."""
    parser = _Parser(parameters, default_mode, node)
    auth = parser.top_level()
    files = parser.objects()
    parser.problems.extend(check_files(files))
    return auth, files, parser.problems, parser.notes
