"""Facts about one certificate for display, SNI and warnings: names, key, fingerprint, validity.

Everything takes the certificate (and ``now`` where time matters) and returns plain values, so the
loaders, the admin API and the SNI index all describe a certificate the same way.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from ipaddress import IPv4Address, IPv6Address
from typing import NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import NameOID

EXPIRY_WARNING = timedelta(days=30)
"""Certificates expiring sooner than this get a warning when loaded."""

_HOST_NAME = re.compile(r"(?:\*\.)?(?:[a-z0-9_-]+\.)*[a-z0-9_-]+\.?")


class KeyFacts(NamedTuple):
    type: str
    """``RSA``, ``EC``, ``Ed25519``, ``Ed448``: the unit of "one certificate per key type"."""
    bits: int
    curve: str | None
    """The named curve of an EC key (``secp256r1``), else None."""


def key_facts(key: CertificatePublicKeyTypes) -> KeyFacts:
    if isinstance(key, rsa.RSAPublicKey):
        return KeyFacts("RSA", key.key_size, None)
    if isinstance(key, ec.EllipticCurvePublicKey):
        return KeyFacts("EC", key.curve.key_size, key.curve.name)
    if isinstance(key, ed25519.Ed25519PublicKey):
        return KeyFacts("Ed25519", 256, None)
    if isinstance(key, ed448.Ed448PublicKey):
        return KeyFacts("Ed448", 456, None)
    if isinstance(key, dsa.DSAPublicKey):
        return KeyFacts("DSA", key.key_size, None)
    return KeyFacts(type(key).__name__.removesuffix("PublicKey"), 0, None)


def fingerprint_sha256(cert: x509.Certificate) -> str:
    """Lowercase hex SHA-256 of the DER certificate, as clients and headers show it."""
    return cert.fingerprint(hashes.SHA256()).hex()


def serial_hex(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def subject_alt_names(cert: x509.Certificate) -> x509.SubjectAlternativeName | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None


def common_name(cert: x509.Certificate) -> str | None:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = attrs[0].value if attrs else None
    return value if isinstance(value, str) else None


def dns_names(cert: x509.Certificate) -> tuple[str, ...]:
    """Lowercase DNS SANs; the subject CN only when there is no SAN extension at all (RFC 6125),
    and only when it looks like a host name (a CN like ``ACME Web Server`` names no host)."""
    san = subject_alt_names(cert)
    if san is not None:
        return tuple(dict.fromkeys(n.lower() for n in san.get_values_for_type(x509.DNSName)))
    cn = (common_name(cert) or "").lower()
    return (cn,) if _HOST_NAME.fullmatch(cn) else ()


def ip_addresses(cert: x509.Certificate) -> tuple[IPv4Address | IPv6Address, ...]:
    san = subject_alt_names(cert)
    if san is None:
        return ()
    return tuple(
        ip
        for ip in san.get_values_for_type(x509.IPAddress)
        if isinstance(ip, IPv4Address | IPv6Address)  # networks appear only in name constraints
    )


def describe(cert: x509.Certificate) -> str:
    """How messages name a certificate: its RFC 4514 subject, quoted."""
    return f"'{cert.subject.rfc4514_string()}'"


def validity_warnings(label: str, cert: x509.Certificate, now: datetime) -> list[str]:
    """Warn, never refuse: an expired certificate may still be wanted (a test, a grace period)."""
    require_aware(now)
    not_before, not_after = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < not_before:
        return [f"{label} is not valid until {_when(not_before)} (in {_days(not_before - now)})"]
    if now > not_after:
        return [f"{label} expired on {_when(not_after)} ({_days(now - not_after)} ago)"]
    if not_after - now < EXPIRY_WARNING:
        return [f"{label} expires in {_days(not_after - now)} (on {_when(not_after)})"]
    return []


def require_aware(now: datetime) -> None:
    """Certificate times are UTC-aware; a naive ``now`` would compare wrongly or raise later."""
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")


def _when(t: datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M UTC")


def _days(delta: timedelta) -> str:
    days = delta.days
    if days < 1:
        return "less than a day"
    return "1 day" if days == 1 else f"{days} days"
