"""Vault responses as upstream's vault-csi-provider sees and writes them.

Upstream decodes a response into Go's ``api.Secret`` (numbers kept as written, ``UseNumber``) and,
when an object has no ``secretKey``, writes ``json.Marshal(secret)``: struct fields in declaration
order, map keys sorted, compact, ``<``, ``>``, ``&``, U+2028 and U+2029 escaped. This module
reproduces that encoding so a whole-response file reads the same as upstream's, and implements
upstream's key extraction (KV v2's ``data.data`` descended automatically) and value decodings.

Nothing here logs or puts a value into an exception message.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ENCODINGS = ("utf-8", "base64", "hex")


@dataclass(frozen=True)
class Num:
    """A JSON number kept exactly as written (Go's ``json.Number``)."""

    text: str

    def as_int(self) -> int | None:
        try:
            return int(self.text)
        except ValueError:
            return None


class Struct(tuple[tuple[str, Any], ...]):
    """A Go struct for marshalling: fields in declaration order, never sorted."""


class BadResponse(ValueError):
    """The body is not a Vault response; the message never contains the body."""


def _no_constant(name: str) -> Any:
    raise BadResponse(f"JSON constant {name} is not valid JSON")


def loads(body: bytes) -> Any:
    """Parse JSON keeping numbers as :class:`Num` (like Go's ``UseNumber``)."""
    try:
        return json.loads(body, parse_int=Num, parse_float=Num, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise BadResponse("the response is not valid JSON") from None


_HTML = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026"})
_HTML.update({0x2028: "\\u2028", 0x2029: "\\u2029"})


def _clean(s: str) -> str:
    if any("\ud800" <= c <= "\udfff" for c in s):
        # Go's decoder turns a lone surrogate escape into U+FFFD.
        return s.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return s


def _string(s: str) -> str:
    s = _clean(s)
    # Python and Go escape the same control characters the same way (\b \f \n \r \t, else \u00xx
    # in lower-case hex); Go additionally escapes HTML-sensitive characters.
    return json.dumps(s, ensure_ascii=False).translate(_HTML)


def marshal(value: Any) -> str:
    """``json.Marshal`` of a decoded value, byte for byte."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, Num):
        return value.text
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, Struct):
        return "{" + ",".join(_string(k) + ":" + marshal(v) for k, v in value) + "}"
    if isinstance(value, Mapping):
        items = sorted(value.items())
        return "{" + ",".join(_string(k) + ":" + marshal(v) for k, v in items) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(marshal(v) for v in value) + "]"
    raise TypeError(f"cannot marshal a {type(value).__name__}")


# --- api.Secret -----------------------------------------------------------------------------------


def _str(obj: Mapping[str, Any], key: str) -> str:
    v = obj.get(key)
    if v is None:
        return ""
    if not isinstance(v, str):
        raise BadResponse(f"field {key!r} of the response is not a string")
    return v


def _int(obj: Mapping[str, Any], key: str) -> int:
    v = obj.get(key)
    if v is None:
        return 0
    n = v.as_int() if isinstance(v, Num) else None
    if n is None:
        raise BadResponse(f"field {key!r} of the response is not an integer")
    return n


def _bool(obj: Mapping[str, Any], key: str) -> bool:
    v = obj.get(key)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise BadResponse(f"field {key!r} of the response is not a boolean")
    return v


def _typed(obj: Mapping[str, Any], key: str, kind: type) -> Any:
    v = obj.get(key)
    if v is not None and not isinstance(v, kind):
        raise BadResponse(f"field {key!r} of the response has the wrong type")
    return v


def _auth(raw: Any) -> Struct | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise BadResponse("field 'auth' of the response is not an object")
    return Struct(
        (
            ("client_token", _str(raw, "client_token")),
            ("accessor", _str(raw, "accessor")),
            ("policies", _typed(raw, "policies", list)),
            ("token_policies", _typed(raw, "token_policies", list)),
            ("identity_policies", _typed(raw, "identity_policies", list)),
            ("metadata", _typed(raw, "metadata", dict)),
            ("orphan", _bool(raw, "orphan")),
            ("entity_id", _str(raw, "entity_id")),
            ("lease_duration", _int(raw, "lease_duration")),
            ("renewable", _bool(raw, "renewable")),
            # Approximation: upstream re-marshals this through typed structs with omitempty.
            ("mfa_requirement", _typed(raw, "mfa_requirement", dict)),
        )
    )


def _wrap_info(raw: Any) -> Struct | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise BadResponse("field 'wrap_info' of the response is not an object")
    return Struct(
        (
            ("token", _str(raw, "token")),
            ("accessor", _str(raw, "accessor")),
            ("ttl", _int(raw, "ttl")),
            ("creation_time", raw.get("creation_time")),
            ("creation_path", _str(raw, "creation_path")),
            ("wrapped_accessor", _str(raw, "wrapped_accessor")),
        )
    )


@dataclass(frozen=True)
class Secret:
    """The fields of Go's ``api.Secret`` that this provider reads, plus its marshalled form."""

    lease_id: str
    lease_duration: int
    renewable: bool
    data: dict[str, Any] | None
    warnings: tuple[str, ...]
    struct: Struct

    def to_json(self) -> bytes:
        return marshal(self.struct).encode()


def parse_secret(body: bytes, *, request_id: str | None = None) -> Secret | None:
    """Decode a response body like ``api.ParseSecret``; None for an empty body.

    ``request_id`` replaces the response's own when given: Vault sends a new one with every answer,
    and keeping it would make identical secrets differ byte for byte on each refresh.
    """
    if not body.strip():
        return None
    raw = loads(body)
    if not isinstance(raw, dict):
        raise BadResponse("the response is not a JSON object")
    data = _typed(raw, "data", dict)
    warnings = _typed(raw, "warnings", list)
    if warnings is not None and not all(isinstance(w, str) for w in warnings):
        raise BadResponse("field 'warnings' of the response is not a list of strings")
    auth = _auth(raw.get("auth"))
    wrap = _wrap_info(raw.get("wrap_info"))
    fields: list[tuple[str, Any]] = [
        ("request_id", _str(raw, "request_id") if request_id is None else request_id),
        ("lease_id", _str(raw, "lease_id")),
        ("lease_duration", _int(raw, "lease_duration")),
        ("renewable", _bool(raw, "renewable")),
        ("data", data),
        ("warnings", warnings),
    ]
    zero = not (
        _str(raw, "request_id")
        or fields[1][1]
        or fields[2][1]
        or fields[3][1]
        or data is not None
        or warnings is not None
        or auth is not None
        or wrap is not None
        or _str(raw, "mount_type")
    )
    if zero:
        # Like api.ParseSecret: a body without any Secret field is raw data (or only errors).
        if set(raw) <= {"errors"}:
            return None
        data = raw
        fields[4] = ("data", data)
    if auth is not None:
        fields.append(("auth", auth))
    if wrap is not None:
        fields.append(("wrap_info", wrap))
    if _str(raw, "mount_type"):
        fields.append(("mount_type", _str(raw, "mount_type")))
    return Secret(
        lease_id=fields[1][1],
        lease_duration=fields[2][1],
        renewable=fields[3][1],
        data=data,
        warnings=tuple(warnings or ()),
        struct=Struct(fields),
    )


def kv2_version(data: Mapping[str, Any] | None) -> int | None:
    """The KV v2 version of a read's ``data`` (``data.data`` + ``data.metadata.version``)."""
    if not data or not isinstance(data.get("data"), dict):
        return None
    meta = data.get("metadata")
    if not isinstance(meta, dict):
        return None
    v = meta.get("version")
    return v.as_int() if isinstance(v, Num) else None


# --- rendering ------------------------------------------------------------------------------------


def key_from_data(root: Mapping[str, Any], key: str) -> bytes:
    """Upstream's ``keyFromData``: descend into ``data`` when it is an object, then take ``key``.

    Strings are written plainly; any other value as its JSON. KeyError if the key is absent.
    """
    inner = root.get("data")
    data = inner if isinstance(inner, dict) else root
    if key not in data:
        raise KeyError(key)
    value = data[key]
    if isinstance(value, str):
        return _clean(value).encode()
    return marshal(value).encode()


def decode_value(raw: bytes, encoding: str) -> bytes:
    """Apply an object's ``encoding``; ValueError (without the value) if it does not decode."""
    if encoding == "utf-8":
        return raw
    try:
        if encoding == "base64":
            # Go's StdEncoding skips CR and LF and otherwise insists on padded standard base64.
            return base64.b64decode(raw.replace(b"\r", b"").replace(b"\n", b""), validate=True)
        if encoding == "hex":
            return binascii.unhexlify(raw)
    except (binascii.Error, ValueError):
        raise ValueError(f"the value is not valid {encoding}") from None
    raise ValueError(f"unknown encoding {encoding!r}")
