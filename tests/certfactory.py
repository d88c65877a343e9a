"""Certificates for tests, made in memory with ``cryptography``; shared by every test module.

Build a hierarchy, then write what a test needs::

    root = make_ca()
    inter = make_ca("Test Intermediate CA", issuer=root)
    leaf = make_server(inter, ["www.example.test"], key_type="RSA")
    load_server_certificate("c", pem_of(leaf, inter), leaf.key_pem(), now=NOW)
    cert_file, key_file = write_pair(tmp_path, "www", leaf, chain=[inter])
    user = make_client(root, "alice")

Everything is valid from an hour before ``NOW`` for a year unless ``not_before``/``not_after``
say otherwise (pass times relative to ``NOW``: ``NOW - DAY`` makes an expired certificate). Keys
are fresh per certificate, so two certificates never share a key by accident; ECDSA P-256 is the
default because it is fast, ``key_type="RSA"`` gives RSA-2048. Server certificates carry the
serverAuth usage, client certificates clientAuth; pass ``eku=()`` for none.

The builder is ``alb_proxy.certs.issue.issue`` (the one ``alb-proxy certs dev`` uses); call it
directly for anything unusual (a subject with several attributes, a path length).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from alb_proxy.certs.issue import Issued, issue, new_key
from alb_proxy.certs.pem import to_pem

__all__ = [
    "CLIENT_AUTH",
    "DAY",
    "NOW",
    "SERVER_AUTH",
    "Issued",
    "make_ca",
    "make_client",
    "make_server",
    "pem_of",
    "write_pair",
    "write_pem",
]

NOW = datetime.now(UTC).replace(microsecond=0)
"""The tests' "now": pass it as ``now=`` so validity is judged against the same instant."""
DAY = timedelta(days=1)
START = NOW - timedelta(hours=1)
"""Default ``not_before``: a little before ``NOW``, as real issuers do for clock skew."""

SERVER_AUTH = (ExtendedKeyUsageOID.SERVER_AUTH,)
CLIENT_AUTH = (ExtendedKeyUsageOID.CLIENT_AUTH,)

Address = str | IPv4Address | IPv6Address


def make_ca(
    common_name: str = "Test Root CA",
    *,
    issuer: Issued | None = None,
    key_type: str = "EC",
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    path_length: int | None = None,
) -> Issued:
    """A self-signed root, or an intermediate CA when ``issuer`` is given."""
    return issue(
        common_name,
        issuer=issuer,
        key=new_key(key_type),
        not_before=not_before or START,
        not_after=not_after or NOW + 3650 * DAY,
        ca=True,
        path_length=path_length,
    )


def make_server(
    issuer: Issued | None,
    dns_names: Sequence[str] = ("localhost",),
    *,
    ip_addresses: Sequence[Address] = (),
    common_name: str | None = None,
    key_type: str = "EC",
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    eku: Sequence[x509.ObjectIdentifier] = SERVER_AUTH,
) -> Issued:
    """A server leaf. ``issuer=None`` makes it self-signed. With no names and no addresses the
    certificate has no subjectAltName at all (CN-only, as old certificates were); the CN is
    ``common_name`` or the first DNS name."""
    return issue(
        common_name or (dns_names[0] if dns_names else "test server"),
        issuer=issuer,
        key=new_key(key_type),
        not_before=not_before or START,
        not_after=not_after or NOW + 365 * DAY,
        dns_names=dns_names,
        ip_addresses=ip_addresses,
        extended_key_usage=eku,
    )


def make_client(
    issuer: Issued,
    common_name: str = "test-client",
    *,
    subject: x509.Name | None = None,
    key_type: str = "EC",
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    eku: Sequence[x509.ObjectIdentifier] = CLIENT_AUTH,
) -> Issued:
    """A client certificate for mutual TLS; ``subject`` overrides the CN-only subject (for
    header-encoding tests: several attributes, non-ASCII values)."""
    return issue(
        subject or common_name,
        issuer=issuer,
        key=new_key(key_type),
        not_before=not_before or START,
        not_after=not_after or NOW + 365 * DAY,
        extended_key_usage=eku,
    )


def pem_of(*certs: Issued | x509.Certificate) -> bytes:
    """PEM of the certificates in the given order (leaf first, then its chain)."""
    return to_pem(c.cert if isinstance(c, Issued) else c for c in certs)


def write_pem(path: Path, data: bytes, *, mode: int = 0o644) -> Path:
    """Write ``data`` to ``path`` created with ``mode`` (keys: 0o600, as the daemon expects)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def write_pair(
    directory: Path, name: str, leaf: Issued, *, chain: Sequence[Issued] = ()
) -> tuple[Path, Path]:
    """``NAME.pem`` (leaf then ``chain``) and ``NAME.key`` in ``directory``; returns both paths."""
    cert = write_pem(directory / f"{name}.pem", pem_of(leaf, *chain))
    key = write_pem(directory / f"{name}.key", leaf.key_pem(), mode=0o600)
    return cert, key


def serial_hex(cert: x509.Certificate) -> str:
    """The serial as ``openssl x509 -serial`` shows it: hex in whole bytes (lowercase)."""
    number = cert.serial_number
    return number.to_bytes((number.bit_length() + 7) // 8, "big").hex()
