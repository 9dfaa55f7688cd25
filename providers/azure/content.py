"""File content of Key Vault objects, following upstream's rules.

* ``key``: the public key as PEM (SubjectPublicKeyInfo, ``PUBLIC KEY``), RSA or EC P-256/384/521.
* ``cert``: the certificate (DER in Key Vault) as one ``CERTIFICATE`` PEM block.
* ``secret`` backing a certificate (it has a ``kid``): PEM content as stored; PKCS#12 content
  converted to the private key (PKCS#8 ``PRIVATE KEY``) followed by the certificates ordered leaf,
  intermediates, root (upstream's default ``--construct-pem-chain=true``; if the chain cannot be
  linked, the order of the PFX). ``objectFormat: pfx`` keeps the PFX (base64 text, as Key Vault
  stores it); ``objectEncoding`` then decodes the text (``base64`` gives the binary PFX).

Errors are ValueError with messages that never quote content.
"""

from __future__ import annotations

import base64
import binascii
import contextlib

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12

PEM_CONTENT_TYPE = "application/x-pem-file"
PFX_CONTENT_TYPE = "application/x-pkcs12"

_CURVES: dict[str, ec.EllipticCurve] = {
    "P-256": ec.SECP256R1(),
    "P-384": ec.SECP384R1(),
    "P-521": ec.SECP521R1(),
}


def public_key_pem(
    kty: str,
    *,
    n: bytes | None = None,
    e: bytes | None = None,
    crv: str | None = None,
    x: bytes | None = None,
    y: bytes | None = None,
) -> bytes:
    """The PEM public key of a JSON Web Key as Key Vault returns it."""
    if kty in ("RSA", "RSA-HSM"):
        if not n or not e:
            raise ValueError(f"the {kty} key has no modulus or exponent")
        numbers = rsa.RSAPublicNumbers(int.from_bytes(e, "big"), int.from_bytes(n, "big"))
        public: rsa.RSAPublicKey | ec.EllipticCurvePublicKey = numbers.public_key()
    elif kty in ("EC", "EC-HSM"):
        curve = _CURVES.get(crv or "")
        if curve is None:
            raise ValueError(f"curve {crv!r} is not supported (P-256, P-384, P-521 are)")
        if not x or not y:
            raise ValueError(f"the {kty} key has no x or y coordinate")
        ec_numbers = ec.EllipticCurvePublicNumbers(
            int.from_bytes(x, "big"), int.from_bytes(y, "big"), curve
        )
        public = ec_numbers.public_key()
    else:
        raise ValueError(f"key type {kty!r} is not supported (RSA and EC keys are)")
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def certificate_pem(der: bytes) -> bytes:
    """A DER certificate as PEM."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        raise ValueError("the certificate is not valid DER") from None
    return cert.public_bytes(serialization.Encoding.PEM)


def certificate_secret(value: str, content_type: str | None, fmt: str) -> str:
    """The text of a secret that backs a certificate, per ``objectFormat`` ``fmt``."""
    if content_type == PEM_CONTENT_TYPE:
        return value
    if content_type == PFX_CONTENT_TYPE:
        return value if fmt == "pfx" else pfx_to_pem(value)
    raise ValueError(f"the certificate's secret has an unknown content type {content_type!r}")


def pfx_to_pem(value: str) -> str:
    """A base64 PKCS#12 archive (no password, as Key Vault exports it) as key + chain PEM."""
    try:
        raw = base64.b64decode(_strip_newlines(value), validate=True)
    except binascii.Error:
        raise ValueError("the certificate's PFX is not valid base64") from None
    try:
        bundle = pkcs12.load_pkcs12(raw, None)
    except ValueError:
        raise ValueError(
            "the certificate's PFX cannot be read (corrupt, or has a password)"
        ) from None
    out = b""
    if bundle.key is not None:
        out += bundle.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    certs = [c.certificate for c in ([bundle.cert] if bundle.cert else [])]
    certs += [c.certificate for c in bundle.additional_certs]
    for cert in order_chain(certs):
        out += cert.public_bytes(serialization.Encoding.PEM)
    return out.decode("ascii")


def _key_ids(cert: x509.Certificate) -> tuple[bytes | None, bytes | None]:
    """(subject key id, authority key id) of a certificate, None when absent."""
    ski = aki = None
    with contextlib.suppress(x509.ExtensionNotFound):
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    with contextlib.suppress(x509.ExtensionNotFound):
        ext = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
        aki = ext.value.key_identifier
    return ski, aki


def order_chain(certs: list[x509.Certificate]) -> list[x509.Certificate]:
    """Leaf first, then each issuer up to the root, linking authority to subject key ids.

    If the certificates do not form one such chain, they are returned unchanged (upstream does the
    same, logging that the chain is incomplete).
    """
    if len(certs) < 2:
        return certs
    ids = [_key_ids(c) for c in certs]
    parent: dict[int, int] = {}
    for i, (_, aki) in enumerate(ids):
        for j, (ski, _) in enumerate(ids):
            if i != j and aki is not None and ski is not None and aki == ski:
                parent[i] = j
                break
    is_parent = set(parent.values())
    leaves = [i for i in range(len(certs)) if i not in is_parent]
    if not leaves:
        return certs
    chain: list[int] = []
    node: int | None = leaves[0]
    while node is not None and node not in chain:
        chain.append(node)
        node = parent.get(node)
    if len(chain) != len(certs):
        return certs
    return [certs[i] for i in chain]


def _strip_newlines(text: str) -> str:
    # Go's base64.StdEncoding ignores CR and LF, and nothing else.
    return text.replace("\r", "").replace("\n", "")


def decode(text: str, encoding: str) -> bytes:
    """Apply ``objectEncoding``: how the secret's text is turned into the file's bytes."""
    if encoding == "base64":
        try:
            return base64.b64decode(_strip_newlines(text), validate=True)
        except binascii.Error:
            raise ValueError("objectEncoding is base64 but the value is not valid base64") from None
    if encoding == "hex":
        try:
            return binascii.unhexlify(text)
        except (binascii.Error, ValueError):
            raise ValueError("objectEncoding is hex but the value is not valid hex") from None
    return text.encode("utf-8")
