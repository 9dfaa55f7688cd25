"""Vault and transport failures as :class:`FetchError`s that say what Vault answered.

Messages name the object, the method and path, and Vault's own error text (whitespace folded,
shortened, and scrubbed of every token this provider used); never a token or a value. Codes:

=====================  =========  ===================================================
code                   transient  cause
=====================  =========  ===================================================
PermissionDenied       no         403/401: policy, role, or service account not allowed
NotFound               no         404: no secret (or no handler) at that path
BadRequest             no         400 and other 4xx: Vault rejected the request
LeaseInvalid           no         400 on a lease renewal: expired, revoked or not renewable
VaultSealed            yes        503 "Vault is sealed"
VaultUnavailable       yes        other 503, 501 (not initialised)
Throttled              yes        429
ServerError            yes        500, 502, 412 and other 5xx
Unreachable            yes        connection refused, DNS, timeouts
TLSError               yes        handshake or certificate verification failed
TLSConfig              no         a TLS file named in the parameters cannot be loaded
BadResponse            no         the answer is not a Vault response
=====================  =========  ===================================================
"""

from __future__ import annotations

import re
import socket
import ssl
from collections.abc import Iterable

import requests

from providers.base import FetchError

_MAX_DETAIL = 300


def _fold(text: str, scrub: Iterable[str]) -> str:
    for s in scrub:
        if s:
            text = text.replace(s, "<redacted>")
    text = re.sub(r"\s+", " ", text).strip()
    # Vault wraps messages as "1 error occurred: * permission denied".
    text = re.sub(r"^\d+ errors? occurred: \* ", "", text)
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 3] + "..."


def vault_detail(resp: requests.Response, scrub: Iterable[str]) -> str:
    """Vault's ``errors`` from an error answer; nothing if the body is not Vault's JSON."""
    try:
        body = resp.json()
    except ValueError:
        return ""
    errors = body.get("errors") if isinstance(body, dict) else None
    if not isinstance(errors, list):
        return ""
    return _fold("; ".join(str(e) for e in errors), scrub)


def from_response(
    resp: requests.Response,
    obj: str,
    what: str,
    scrub: Iterable[str] = (),
    *,
    hint: str = "",
    lease: bool = False,
) -> FetchError:
    """A FetchError for Vault's error answer to ``what`` (e.g. ``GET secret/data/app``)."""
    detail = vault_detail(resp, scrub)
    said = f": {detail}" if detail else ""
    status = resp.status_code
    if status in (401, 403):
        msg = f"Vault denied {what} ({status} permission denied{said})"
        return FetchError(
            obj, msg + (f"; {hint}" if hint else ""), transient=False, code="PermissionDenied"
        )
    if status == 404:
        return FetchError(
            obj,
            f"Vault has nothing at {what} (404 not found{said})",
            transient=False,
            code="NotFound",
        )
    if status == 400:
        code = "LeaseInvalid" if lease else "BadRequest"
        return FetchError(obj, f"Vault rejected {what} (400{said})", transient=False, code=code)
    if status == 429:
        return FetchError(
            obj, f"Vault throttled {what} (429{said})", transient=True, code="Throttled"
        )
    if status == 503 and "sealed" in detail.lower():
        return FetchError(
            obj,
            f"Vault is sealed; {what} cannot be served until it is unsealed",
            transient=True,
            code="VaultSealed",
        )
    if status in (501, 503):
        return FetchError(
            obj,
            f"Vault is unavailable for {what} ({status}{said})",
            transient=True,
            code="VaultUnavailable",
        )
    if status >= 500 or status == 412:
        return FetchError(
            obj, f"Vault failed {what} ({status}{said})", transient=True, code="ServerError"
        )
    return FetchError(
        obj, f"Vault rejected {what} ({status}{said})", transient=False, code="BadRequest"
    )


def _causes(exc: BaseException) -> Iterable[BaseException]:
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo.extend(a for a in e.args if isinstance(a, BaseException))
        for nxt in (e.__cause__, e.__context__, getattr(e, "reason", None)):
            if isinstance(nxt, BaseException):
                todo.append(nxt)


def from_transport(exc: requests.RequestException, obj: str, what: str, address: str) -> FetchError:
    """A FetchError for a request that got no HTTP answer."""
    if isinstance(exc, requests.exceptions.SSLError):
        reason = "handshake failed"
        for e in _causes(exc):
            if isinstance(e, ssl.SSLCertVerificationError):
                reason = f"certificate verification failed: {e.verify_message}"
                break
            if isinstance(e, ssl.CertificateError | ssl.SSLError):
                reason = getattr(e, "reason", None) or type(e).__name__
        return FetchError(
            obj,
            f"TLS connection to Vault at {address} for {what} failed: {reason}",
            transient=True,
            code="TLSError",
        )
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        why = "connection timed out"
    elif isinstance(exc, requests.exceptions.Timeout):
        why = "no answer before the read timeout"
    else:
        why = "connection failed"
        for e in _causes(exc):
            if isinstance(e, ConnectionRefusedError):
                why = "connection refused"
                break
            if isinstance(e, socket.gaierror):
                why = "host name does not resolve"
                break
            if isinstance(e, ConnectionResetError):
                why = "connection reset"
                break
    return FetchError(
        obj,
        f"cannot reach Vault at {address} for {what}: {why}",
        transient=True,
        code="Unreachable",
    )


def tls_config(obj: str, setting: str, path: str, exc: Exception) -> FetchError:
    reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or type(exc).__name__
    return FetchError(
        obj, f"cannot load {setting} {path!r}: {reason}", transient=False, code="TLSConfig"
    )
