"""PEM bytes to ``cryptography`` objects, strictly, with errors that say which block is wrong.

We scan the PEM blocks ourselves instead of calling ``x509.load_pem_x509_certificates`` so that a
refusal can be specific: a private key pasted where a certificate belongs is refused (it would
otherwise be stored and shown as public material), an encrypted key is named as such, and a
broken block is named by its position. Text outside blocks (``Bag Attributes``, ``openssl x509
-text`` dumps) is ignored, as OpenSSL does.

Key bytes never reach an error message: key errors carry fixed texts and are raised ``from None``
so no underlying exception (which might quote its input) travels with them.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TypeAlias

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.utils import CryptographyDeprecationWarning

from alb_proxy.errors import CertificateError

ServerKey: TypeAlias = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)
"""Private key types OpenSSL can serve TLS with (DSA and key-agreement-only keys cannot)."""

MAX_PEM_FILE_BYTES = 1 << 20
"""A certificate chain is a few KiB; anything this large is the wrong file."""

_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", re.DOTALL)


@dataclass(frozen=True)
class PemBlock:
    label: str
    """What the BEGIN line names: ``CERTIFICATE``, ``PRIVATE KEY``, ``EC PARAMETERS``, ..."""
    text: bytes = field(repr=False)
    """The whole block, BEGIN to END line; may be a key, so never shown."""


def read_pem_file(path: str | os.PathLike[str]) -> bytes:
    """Read a PEM file for the pure loaders, turning I/O failures into a CertificateError."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PEM_FILE_BYTES + 1)
    except OSError as exc:
        raise CertificateError(f"cannot read {os.fspath(path)}: {exc.strerror or exc}") from exc
    if len(data) > MAX_PEM_FILE_BYTES:
        raise CertificateError(
            f"{os.fspath(path)} is larger than {MAX_PEM_FILE_BYTES // 1024} KiB; not a PEM file"
        )
    return data


def pem_blocks(what: str, data: bytes) -> list[PemBlock]:
    """Every complete PEM block in ``data``; a BEGIN line without its END line is an error."""
    blocks = [PemBlock(m[1].decode("ascii"), m[0]) for m in _BLOCK.finditer(data)]
    if data.count(b"-----BEGIN ") != len(blocks):
        raise CertificateError(f"{what}: a PEM block is truncated or its BEGIN/END lines differ")
    return blocks


def load_certificates(what: str, data: bytes) -> list[x509.Certificate]:
    """All certificates in ``data``, in order; anything else in a PEM block is refused."""
    blocks = pem_blocks(what, data)
    if not blocks:
        raise CertificateError(f"{what} is not a PEM certificate{_not_pem_hint(data)}")
    certs = []
    for n, block in enumerate(blocks, 1):
        if block.label.endswith("PRIVATE KEY"):
            raise CertificateError(
                f"{what} holds a private key (PEM block {n}) where a certificate is expected"
            )
        if block.label != "CERTIFICATE":
            raise CertificateError(f"{what}: PEM block {n} is {block.label}, not CERTIFICATE")
        try:
            # cryptography warns (and will later refuse) where RFC 5280 is broken, e.g. a
            # serial that is not positive; refuse those now instead of leaking a warning.
            with warnings.catch_warnings():
                warnings.simplefilter("error", CryptographyDeprecationWarning)
                cert = x509.load_pem_x509_certificate(block.text)
                # cryptography parses these lazily; touch them now so a malformed certificate
                # is refused here rather than raising later from a property.
                _ = (cert.extensions, cert.public_key(), cert.subject, cert.issuer)
                _ = (cert.subject.rfc4514_string(), cert.issuer.rfc4514_string())
        except (ValueError, UnsupportedAlgorithm, CryptographyDeprecationWarning) as exc:
            raise CertificateError(
                f"{what}: PEM block {n} is not a valid certificate ({exc})"
            ) from exc
        certs.append(cert)
    return certs


def load_private_key(what: str, data: bytes) -> ServerKey:
    """The one unencrypted private key in ``data`` (other blocks, e.g. EC PARAMETERS, ignored)."""
    blocks = pem_blocks(what, data)
    keys = [b for b in blocks if b.label.endswith("PRIVATE KEY")]
    if not keys:
        found = ", ".join(sorted({b.label for b in blocks})) or "no PEM block"
        raise CertificateError(f"{what} is not a PEM private key (found {found})")
    if len(keys) > 1:
        raise CertificateError(f"{what} holds {len(keys)} private keys; expected one")
    block = keys[0]
    if block.label == "ENCRYPTED PRIVATE KEY" or b"Proc-Type: 4,ENCRYPTED" in block.text:
        raise CertificateError(
            f"{what}: encrypted private keys are not supported; "
            "decrypt it first (openssl pkey -in KEY -out PLAIN_KEY)"
        )
    try:
        key = serialization.load_pem_private_key(block.text, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise CertificateError(f"{what}: the {block.label} block is not a valid key") from None
    if not isinstance(key, ServerKey):
        raise CertificateError(
            f"{what}: {type(key).__name__} keys cannot serve TLS; use RSA, ECDSA or Ed25519"
        )
    return key


def to_pem(certs: Iterable[x509.Certificate]) -> bytes:
    """Normalized PEM (64-column base64, LF line ends) of ``certs`` in the given order."""
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def private_key_pem(key: ServerKey) -> bytes:
    """Unencrypted PKCS#8 PEM, the one form every consumer (OpenSSL, aioquic) reads."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _not_pem_hint(data: bytes) -> str:
    if not data.strip():
        return " (it is empty)"
    if data[:1] == b"\x30":
        return " (it looks like DER; convert it with openssl x509 -inform der)"
    return " (no -----BEGIN CERTIFICATE----- block)"
