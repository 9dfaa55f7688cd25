"""SecretProviderClass documents: read them as Kubernetes would, and plan their volumes."""

from __future__ import annotations

import dataclasses
import math
import re
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from providers import UnknownProvider, get_provider, limits
from providers.base import (
    DEFAULT_MODE,
    FileSpec,
    NodeAware,
    NodeInfo,
    ParameterError,
    Plan,
    Problem,
    check_path,
)

GROUP = "secrets-store.csi.x-k8s.io"
API_VERSIONS = (f"{GROUP}/v1", f"{GROUP}/v1alpha1")
KIND = "SecretProviderClass"

# The class's own TTL: seconds ("300", "2.5") or a Go duration ("90s", "5m", "1h30m"). Each node
# clamps it to its --min-ttl/--max-ttl.
TTL_ANNOTATION = "secretfs.io/ttl"
MAX_TTL_TEXT = 32  # characters: the parse is bounded whatever the annotation holds
_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")
_DURATION = re.compile(r"(?:(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:ns|us|µs|μs|ms|s|m|h))+")
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


# What `secretfs check`, csi's log and the pod's Event say about spec.secretObjects when the
# node's secret sync is off (csi --sync-secrets; chart syncSecret.enabled).
SECRET_OBJECTS = (
    "secretObjects is not synced (secret sync is off: it would store the value in etcd)"
)
# Bounds on spec.secretObjects (what one class may ask csi to write).
MAX_SECRET_OBJECTS = 64
MAX_SECRET_KEYS = 256  # data entries of one Secret
MAX_META_ENTRIES = 64  # labels, annotations
MAX_META_BYTES = 64 * 1024
# Kubernetes' own rules: a Secret's name is a DNS subdomain; a data key is [-._a-zA-Z0-9]+.
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_SECRET_KEY = re.compile(r"[-._a-zA-Z0-9]+")


class SpcError(ValueError):
    """The document is not a usable SecretProviderClass; the message says what to fix."""


@dataclass(frozen=True)
class SecretProviderClass:
    name: str
    namespace: str | None
    provider: str
    parameters: Mapping[str, str]
    ttl: float | None = None  # seconds, from the annotation secretfs.io/ttl
    # spec.secretObjects: Kubernetes Secrets to keep in sync with the volume's files. Only a node
    # that opts in (csi --sync-secrets) writes them (csi/sync.py); otherwise csi and `check` warn
    # (SECRET_OBJECTS). Entries that cannot be synced are in secret_object_problems.
    secret_objects: tuple[SecretObject, ...] = ()
    secret_object_problems: tuple[str, ...] = ()


@dataclass(frozen=True)
class SecretObject:
    """One entry of spec.secretObjects: a Secret and which mounted file fills each key."""

    secret_name: str
    type: str
    data: tuple[tuple[str, str], ...]  # (key, objectName: a file path in the volume)
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    annotations: Mapping[str, str] = dataclasses.field(default_factory=dict)


def _string_map(value: Any, where: str, problems: list[str]) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append(f"{where} must be a mapping")
        return {}
    if len(value) > MAX_META_ENTRIES:
        problems.append(f"{where} has {len(value)} entries; at most {MAX_META_ENTRIES}")
        return {}
    out = {str(k): v for k, v in value.items() if isinstance(v, str)}
    if len(out) != len(value):
        problems.append(f"{where}: every value must be a string; quote it in the YAML")
        return {}
    if sum(len(k) + len(v) for k, v in out.items()) > MAX_META_BYTES:
        problems.append(f"{where} is larger than {MAX_META_BYTES} bytes")
        return {}
    return out


def parse_secret_objects(value: Any) -> tuple[tuple[SecretObject, ...], tuple[str, ...]]:
    """spec.secretObjects as entries that can be synced, and what is wrong with the others
    (each problem names the entry and the field). Bounded before any work per entry."""
    if value is None or value == []:
        return (), ()
    if not isinstance(value, list):
        return (), ("spec.secretObjects must be a list",)
    if len(value) > MAX_SECRET_OBJECTS:
        return (), (f"spec.secretObjects has {len(value)} entries; at most {MAX_SECRET_OBJECTS}",)
    objects: list[SecretObject] = []
    problems: list[str] = []
    names: set[str] = set()
    for i, item in enumerate(value):
        where = f"spec.secretObjects[{i}]"
        before = len(problems)
        if not isinstance(item, dict):
            problems.append(f"{where} must be a mapping")
            continue
        name = item.get("secretName")
        if not isinstance(name, str) or not name:
            problems.append(f"{where}.secretName is required")
        elif len(name) > 253 or not _DNS_SUBDOMAIN.fullmatch(name):
            problems.append(
                f"{where}.secretName {limits.quote(name)} is not a valid Secret name (lower-case "
                "letters, digits, '-' and '.', at most 253 characters)"
            )
        elif name in names:
            problems.append(f"{where}.secretName {name} is named twice")
        kind = item.get("type")
        if not isinstance(kind, str) or not kind or len(kind) > 253:
            problems.append(f"{where}.type is required (Opaque, kubernetes.io/tls, ...)")
        data = item.get("data")
        pairs: list[tuple[str, str]] = []
        if not isinstance(data, list) or not data:
            problems.append(f"{where}.data must list at least one {{objectName, key}}")
        elif len(data) > MAX_SECRET_KEYS:
            problems.append(f"{where}.data has {len(data)} entries; at most {MAX_SECRET_KEYS}")
        else:
            keys: set[str] = set()
            for j, entry in enumerate(data):
                at = f"{where}.data[{j}]"
                key = entry.get("key") if isinstance(entry, dict) else None
                obj = entry.get("objectName") if isinstance(entry, dict) else None
                if not isinstance(key, str) or len(key) > 253 or not _SECRET_KEY.fullmatch(key):
                    problems.append(
                        f"{at}.key {limits.quote(key)} is not a valid Secret key "
                        "([-._a-zA-Z0-9]+, at most 253 characters)"
                    )
                elif key in keys:
                    problems.append(f"{at}.key {key} is used twice")
                keys.add(str(key))
                if not isinstance(obj, str) or not obj:
                    problems.append(f"{at}.objectName is required (a file of the volume)")
                else:
                    problems += [f"{at}.objectName: {p.message}" for p in check_path(obj, None, "")]
                pairs.append((str(key), str(obj)))
        labels = _string_map(item.get("labels"), f"{where}.labels", problems)
        annotations = _string_map(item.get("annotations"), f"{where}.annotations", problems)
        if len(problems) == before:
            assert isinstance(name, str) and isinstance(kind, str)
            names.add(name)
            objects.append(SecretObject(name, kind, tuple(pairs), labels, annotations))
    return tuple(objects), tuple(problems)


def parse_ttl(value: object) -> float:
    """The seconds of a ``secretfs.io/ttl`` annotation; ValueError says what is wrong."""
    example = 'give seconds ("300") or a duration such as "90s", "5m" or "1h30m"'
    if not isinstance(value, str):
        raise ValueError(f"must be a string; quote the value in the YAML ({example})")
    text = value.strip()
    if not text or len(text) > MAX_TTL_TEXT:
        raise ValueError(f"{limits.quote(value)} is not a TTL: {example}")
    if _SECONDS.fullmatch(text):
        seconds = float(text)
    elif _DURATION.fullmatch(text):
        seconds = sum(float(n) * _UNIT[u] for n, u in _DURATION_PART.findall(text))
    else:
        raise ValueError(f"{limits.quote(value)} is not a TTL: {example}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{limits.quote(value)} is not a TTL: it must be more than 0 seconds")
    return seconds


def ttl_value(value: object) -> float | None:
    """A TTL as a control request carries it (seconds, None: none); ValueError if unusable."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"ttl {limits.quote(value)} is not a number of seconds")
    seconds = parse_ttl(value) if isinstance(value, str) else float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"ttl {limits.quote(value)} is not a number of seconds above 0")
    return seconds


def from_object(obj: Any, source: str = "document") -> SecretProviderClass:
    """Validate a decoded SecretProviderClass object (from a file or the Kubernetes API)."""
    if not isinstance(obj, dict):
        raise SpcError(f"{source}: expected a YAML mapping (a SecretProviderClass object)")
    problems: list[str] = []
    api_version = obj.get("apiVersion")
    if api_version not in API_VERSIONS:
        problems.append(f"apiVersion is {api_version!r}; expected {API_VERSIONS[0]}")
    if obj.get("kind") != KIND:
        problems.append(f"kind is {obj.get('kind')!r}; expected {KIND}")
    meta = obj.get("metadata") or {}
    name = meta.get("name") if isinstance(meta, dict) else None
    namespace = meta.get("namespace") if isinstance(meta, dict) else None
    annotations = meta.get("annotations") if isinstance(meta, dict) else None
    ttl = None
    if isinstance(annotations, dict) and TTL_ANNOTATION in annotations:
        try:
            ttl = parse_ttl(annotations[TTL_ANNOTATION])
        except ValueError as exc:
            problems.append(f"metadata.annotations[{TTL_ANNOTATION!r}]: {exc}")
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        problems.append("spec is missing or not a mapping")
        spec = {}
    provider = spec.get("provider")
    if not isinstance(provider, str) or not provider:
        problems.append("spec.provider is required (aws, azure, gcp or vault)")
    params = spec.get("parameters")
    parameters: dict[str, str] = {}
    if not isinstance(params, dict) or not params:
        problems.append("spec.parameters is required and must not be empty")
    else:
        for key, value in params.items():
            if not isinstance(value, str):
                # Kubernetes itself rejects non-string values here (map[string]string).
                problems.append(
                    f"spec.parameters.{key} must be a string; quote the value in the YAML"
                )
            else:
                parameters[str(key)] = value
    if problems:
        raise SpcError(f"{source}: " + "; ".join(problems))
    assert isinstance(provider, str)
    secret_objects, secret_problems = parse_secret_objects(spec.get("secretObjects"))
    return SecretProviderClass(
        name=str(name or ""),
        namespace=str(namespace) if namespace else None,
        provider=provider,
        parameters=parameters,
        ttl=ttl,
        secret_objects=secret_objects,
        secret_object_problems=secret_problems,
    )


def load(path: str | Path) -> SecretProviderClass:
    """Read the first SecretProviderClass in a YAML file (other documents are skipped)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpcError(f"{p}: cannot read: {exc.strerror}") from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise SpcError(f"{p}: not valid YAML: {exc}") from None
    for doc in docs:
        if isinstance(doc, dict) and doc.get("kind") == KIND:
            return from_object(doc, str(p))
    if len(docs) == 1:
        return from_object(docs[0], str(p))
    raise SpcError(f"{p}: no document of kind {KIND} found")


def node_value(value: object) -> NodeInfo | None:
    """The ``node`` of a control request (what csi read of its Node; absent: None)."""
    if not isinstance(value, dict):
        return None
    return NodeInfo(
        name=str(value.get("name") or "")[:253],
        region=str(value.get("region") or "").strip()[:64],
        problem=str(value.get("problem") or "")[:400],
    )


def plan(
    spc: SecretProviderClass,
    overrides: Mapping[str, str] | None = None,
    default_mode: int = DEFAULT_MODE,
    node: NodeInfo | None = None,
) -> Plan:
    """The provider's plan for a volume of ``spc``.

    ``overrides`` are volume attributes; as upstream does, they replace SPC parameters with the
    same key. ``node``: what csi knows of the node (the daemon), or ``base.OFFLINE`` (``secretfs
    check``); only providers that take node defaults see it (base.NodeAware: the AWS region).
    Raises ParameterError (problems naming object and field).
    """
    params = dict(spc.parameters)
    if overrides:
        params.update(overrides)
    # Bounded before any provider parses anything (providers/limits.py).
    too_big = limits.check_parameters(params)
    if too_big:
        raise ParameterError([Problem(None, fld, msg) for fld, msg in too_big])
    try:
        provider = get_provider(spc.provider)
    except UnknownProvider as exc:
        raise ParameterError([Problem(None, "spec.provider", str(exc))]) from None
    if node is not None and hasattr(provider, "parse_on_node"):
        aware: NodeAware = provider  # type: ignore[assignment]
        result = aware.parse_on_node(params, default_mode, node)
    else:
        result = provider.parse(params, default_mode)
    # Whatever a provider derived (history indexes, extracted keys), every path must be sane.
    bad = [p for f in result.files for p in check_path(f.path, f.object_name, "path")]
    if bad:
        raise ParameterError(bad)
    if len(result.files) > limits.MAX_FILES:
        raise ParameterError(
            [
                Problem(
                    None,
                    "objects",
                    f"produce {len(result.files)} files; at most {limits.MAX_FILES} per volume",
                )
            ]
        )
    if spc.ttl is not None:
        result = dataclasses.replace(result, ttl=spc.ttl)
    return shared(result)


# Volumes of one class parse to equal plans and file specs: one object of each while any volume
# holds it, instead of a copy per volume (measured: ~4 KiB a volume of specs, their strings and
# source tuples). Weak: what no volume holds any more goes.
_SPECS: weakref.WeakValueDictionary[FileSpec, FileSpec] = weakref.WeakValueDictionary()
_PLANS: weakref.WeakValueDictionary[Plan, Plan] = weakref.WeakValueDictionary()
_SHARED_LOCK = threading.Lock()  # plans are made in worker threads


def shared(plan: Plan) -> Plan:
    """``plan``, or an equal plan (and file specs) already in use."""
    with _SHARED_LOCK:
        files = tuple(_SPECS.setdefault(f, f) for f in plan.files)
        if any(a is not b for a, b in zip(files, plan.files, strict=True)):
            plan = dataclasses.replace(plan, files=files)
        known = _PLANS.setdefault(plan, plan)
        return known if known.notes == plan.notes else plan  # notes are not part of equality
