"""Parameters of ``provider: gcp`` and key extraction from fetched payloads.

The format is upstream's (secrets-store-csi-driver-provider-gcp ``config/config.go``): ``secrets``
is a YAML list of items with ``resourceName``, ``path`` (preferred) or ``fileName``, optional
``mode`` and at most one of ``extractJSONKey`` / ``extractYAMLKey``; ``auth`` is ``pod-adc`` (the
default) or ``provider-adc``. Unlike upstream, which finds a malformed resource name only when it
fetches, every problem is reported at parse time, all at once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from providers import limits
from providers.base import (
    FetchError,
    FileSpec,
    ParameterError,
    Plan,
    Problem,
    check_files,
    check_path,
    parse_mode_number,
)

AUTH_POD_ADC = "pod-adc"
AUTH_PROVIDER_ADC = "provider-adc"
AUTH_MODES = (AUTH_POD_ADC, AUTH_PROVIDER_ADC)

# Upstream's limit on a location id (util/constants.go); also keeps it usable in a host name.
LOCATION_MAX = 30
_GLOBAL = re.compile(r"^projects/([^/]+)/secrets/([^/]+)/versions/([^/]+)$")
_REGIONAL = re.compile(r"^projects/([^/]+)/locations/([^/]+)/secrets/([^/]+)/versions/([^/]+)$")
_PARAMETER = re.compile(r"^projects/[^/]+/locations/[^/]+/parameters/[^/]+/versions/[^/]+$")
_LOCATION = re.compile(r"^[a-z0-9][a-z0-9-]*$")

_ITEM_FIELDS = ("resourceName", "path", "fileName", "mode", "extractJSONKey", "extractYAMLKey")


@dataclass(frozen=True)
class Extract:
    """``FileSpec.select``: write only the string value of ``key`` from a JSON or YAML payload."""

    kind: str  # "JSON" or "YAML", as in the parameter names
    key: str


def location_of(resource_name: str) -> str | None:
    """The location of a regional secret version name, None for a global one."""
    m = _REGIONAL.match(resource_name)
    return m.group(2) if m else None


def _check_resource_name(name: str, obj: str, problems: list[Problem]) -> None:
    def bad(msg: str) -> None:
        problems.append(Problem(obj, "resourceName", msg))

    if _GLOBAL.match(name):
        return
    m = _REGIONAL.match(name)
    if m:
        loc = m.group(2)
        if len(loc) > LOCATION_MAX:
            bad(f"location {loc!r} is longer than {LOCATION_MAX} characters")
        elif not _LOCATION.match(loc):
            bad(f"location {loc!r} must be lower-case letters, digits and '-' (e.g. us-central1)")
        return
    if _PARAMETER.match(name):
        bad("Parameter Manager versions are not supported; use a Secret Manager secret version")
        return
    bad(
        f"{name!r} is not a secret version name: use "
        "projects/<project>/secrets/<secret>/versions/<version|latest> or "
        "projects/<project>/locations/<location>/secrets/<secret>/versions/<version|latest>"
    )


def _text(item: Mapping[Any, Any], fld: str, obj: str, problems: list[Problem]) -> str:
    value = item.get(fld)
    if value is None:
        return ""
    if not isinstance(value, str):
        problems.append(Problem(obj, fld, f"must be a string, not {type(value).__name__}"))
        return ""
    return value


def _parse_item(
    i: int, item: object, default_mode: int, problems: list[Problem]
) -> FileSpec | None:
    if not isinstance(item, Mapping):
        problems.append(
            Problem(f"secrets[{i}]", "secrets", "each item must be a mapping with resourceName")
        )
        return None
    raw_name = item.get("resourceName")
    obj = raw_name if isinstance(raw_name, str) and raw_name else f"secrets[{i}]"
    before = len(problems)
    for key in item:
        if key not in _ITEM_FIELDS:
            problems.append(
                Problem(obj, str(key), f"unknown field (known: {', '.join(_ITEM_FIELDS)})")
            )
    name = _text(item, "resourceName", obj, problems)
    if not name and "resourceName" not in item:
        problems.append(Problem(obj, "resourceName", "is required"))
    elif name:
        _check_resource_name(name, obj, problems)
    elif isinstance(raw_name, str):
        problems.append(Problem(obj, "resourceName", "is empty"))

    # Upstream writes to `path` when set, else to `fileName`.
    path = _text(item, "path", obj, problems)
    file_name = _text(item, "fileName", obj, problems)
    fld = "path" if path else "fileName"
    target = path or file_name
    if not target:
        problems.append(Problem(obj, "path", "is required (the file name; or set fileName)"))
    else:
        problems.extend(check_path(target, obj, fld))

    mode = default_mode
    if item.get("mode") is not None:
        parsed = parse_mode_number(item["mode"], obj, "mode", problems)
        mode = default_mode if parsed is None else parsed

    json_key = _text(item, "extractJSONKey", obj, problems)
    yaml_key = _text(item, "extractYAMLKey", obj, problems)
    select: Extract | None = None
    if json_key and yaml_key:
        problems.append(
            Problem(obj, "extractYAMLKey", "set only one of extractJSONKey and extractYAMLKey")
        )
    elif json_key:
        select = Extract("JSON", json_key)
    elif yaml_key:
        select = Extract("YAML", yaml_key)

    if len(problems) > before:
        return None
    return FileSpec(path=target, mode=mode, source=name, object_name=name, select=select)


def parse_parameters(parameters: Mapping[str, str], default_mode: int) -> Plan:
    """The plan of a ``provider: gcp`` volume; raises ParameterError listing every problem."""
    problems: list[Problem] = []
    auth = parameters.get("auth") or AUTH_POD_ADC
    if auth not in AUTH_MODES:
        problems.append(
            Problem(None, "auth", f"unknown auth {auth!r}; use one of {', '.join(AUTH_MODES)}")
        )

    files: list[FileSpec] = []
    raw = parameters.get("secrets")
    if raw is None or not raw.strip():
        problems.append(Problem(None, "secrets", "is required: a YAML list of resourceName items"))
    else:
        try:
            items = limits.load_yaml(raw)
        except limits.LimitError as exc:
            problems.append(Problem(None, "secrets", str(exc)))
            items = None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            problems.append(Problem(None, "secrets", f"is not valid YAML{where}"))
            items = None
        else:
            if not isinstance(items, list) or not items:
                problems.append(Problem(None, "secrets", "must be a non-empty YAML list"))
                items = None
        for i, item in enumerate(items or ()):
            spec = _parse_item(i, item, default_mode, problems)
            if spec is not None:
                files.append(spec)

    problems.extend(check_files(files))
    if problems:
        raise ParameterError(problems)
    return Plan(provider="gcp", files=tuple(files), auth=(auth,))


def extract(obj: str, select: Extract, payload: bytes) -> bytes:
    """The string value of ``select.key`` in ``payload``; errors never quote the payload."""

    def fail(msg: str) -> FetchError:
        return FetchError(obj, msg, transient=False, code="ExtractFailed")

    data: object
    try:
        data = (
            json.loads(payload)
            if select.kind == "JSON"
            else limits.load_yaml(payload.decode("utf-8"))
        )
    except limits.LimitError as exc:
        raise fail(f"extract{select.kind}Key {select.key!r}: the secret {exc}") from None
    except (ValueError, RecursionError, yaml.YAMLError):
        # The parser's message can quote the payload, so it is dropped.
        raise fail(
            f"extract{select.kind}Key {select.key!r}: the secret is not valid {select.kind}"
        ) from None
    if not isinstance(data, dict):
        raise fail(f"extract{select.kind}Key {select.key!r}: the secret is not a {select.kind} map")
    if select.key not in data:
        raise fail(f"extract{select.kind}Key: key {select.key!r} not found in the secret")
    value = data[select.key]
    if not isinstance(value, str):
        # Upstream writes only string values (util/key_extractor.go).
        raise fail(
            f"extract{select.kind}Key {select.key!r}: the value is a {type(value).__name__}, "
            "only string values can be extracted"
        )
    return value.encode()
