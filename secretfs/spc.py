"""SecretProviderClass documents: read them as Kubernetes would, and plan their volumes."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from providers import UnknownProvider, get_provider, limits
from providers.base import (
    DEFAULT_MODE,
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


# What `secretfs check`, csi's log and the pod's Event say about spec.secretObjects.
SECRET_OBJECTS = (
    "secretObjects is not synced (secret sync is off: it would store the value in etcd)"
)


class SpcError(ValueError):
    """The document is not a usable SecretProviderClass; the message says what to fix."""


@dataclass(frozen=True)
class SecretProviderClass:
    name: str
    namespace: str | None
    provider: str
    parameters: Mapping[str, str]
    ttl: float | None = None  # seconds, from the annotation secretfs.io/ttl
    # spec.secretObjects is set: upstream would sync those objects into Kubernetes Secrets, which
    # is not offered (it would store the values in etcd); csi and `check` warn (SECRET_OBJECTS).
    secret_objects: bool = False


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
    return SecretProviderClass(
        name=str(name or ""),
        namespace=str(namespace) if namespace else None,
        provider=provider,
        parameters=parameters,
        ttl=ttl,
        secret_objects=bool(spec.get("secretObjects")),
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
    return result if spc.ttl is None else dataclasses.replace(result, ttl=spc.ttl)
