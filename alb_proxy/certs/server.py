"""A server certificate with its key and chain, checked once at load so serving it cannot fail.

``load_server_certificate`` is pure on bytes (the caller reads files, see ``pem.read_pem_file``).
The leaf is the certificate that matches the private key, wherever it appears; the others form
the chain. Problems that would break handshakes are refused; problems a user may knowingly accept
(expiry, an unusual key size, a missing serverAuth usage) become ``warnings``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from ipaddress import IPv4Address, IPv6Address

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from alb_proxy.certs import describe as d
from alb_proxy.certs.chain import order_chain
from alb_proxy.certs.pem import (
    ServerKey,
    load_certificates,
    load_private_key,
    private_key_pem,
    to_pem,
)
from alb_proxy.certs.sni import CertInfo
from alb_proxy.errors import CertificateError

MIN_RSA_BITS = 2048
"""Below this OpenSSL's default security level (2) refuses the key; we warn, policies may allow."""


@dataclass(frozen=True)
class ServerCertificate:
    """What a listener serves for one certificate id. Descriptive facts derive from ``leaf``."""

    id: str
    leaf: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    """Intermediates (and possibly the root), leaf-issuer first: the order TLS sends them."""
    private_key: ServerKey = field(repr=False, compare=False)
    """Matches ``leaf``; kept out of repr so it never lands in a log or an error."""
    warnings: tuple[str, ...] = ()
    """Accepted but worth telling the user: expiry, reordered chain, unusual key, ..."""

    @property
    def chain_pem(self) -> bytes:
        """Leaf then chain, normalized PEM: the certificate file a TLS server loads."""
        return to_pem((self.leaf, *self.chain))

    def private_key_pem(self) -> bytes:
        """The key as unencrypted PKCS#8 PEM, for the TLS layer's key file. Handle with care."""
        return private_key_pem(self.private_key)

    @property
    def key_type(self) -> str:
        return self._key.type

    @property
    def key_bits(self) -> int:
        return self._key.bits

    @property
    def curve(self) -> str | None:
        return self._key.curve

    @property
    def _key(self) -> d.KeyFacts:
        return d.key_facts(self.leaf.public_key())

    @property
    def dns_names(self) -> tuple[str, ...]:
        return d.dns_names(self.leaf)

    @property
    def ip_addresses(self) -> tuple[IPv4Address | IPv6Address, ...]:
        return d.ip_addresses(self.leaf)

    @property
    def not_before(self) -> datetime:
        return self.leaf.not_valid_before_utc

    @property
    def not_after(self) -> datetime:
        return self.leaf.not_valid_after_utc

    @property
    def fingerprint_sha256(self) -> str:
        return d.fingerprint_sha256(self.leaf)

    @property
    def serial(self) -> str:
        return d.serial_hex(self.leaf)

    @property
    def subject(self) -> str:
        return self.leaf.subject.rfc4514_string()

    @property
    def issuer(self) -> str:
        return self.leaf.issuer.rfc4514_string()

    @property
    def info(self) -> CertInfo:
        """The facts SNI selection needs."""
        return CertInfo(self.id, self.key_type, self.dns_names, self.not_before, self.not_after)


def load_server_certificate(
    cert_id: str,
    cert_pem: bytes,
    key_pem: bytes,
    chain_pem: bytes | None = None,
    *,
    now: datetime,
) -> ServerCertificate:
    """Parse and check a certificate, its private key and optional chain; refuse what can't serve.

    ``cert_pem`` may already hold the chain after the leaf; ``chain_pem`` adds more.
    """
    d.require_aware(now)
    certs = load_certificates(f"{cert_id}: the certificate", cert_pem)
    if chain_pem is not None:
        certs += load_certificates(f"{cert_id}: the chain", chain_pem)
    key = load_private_key(f"{cert_id}: the private key", key_pem)

    spki = _spki(key)
    leaf = next((c for c in certs if _spki(c) == spki), None)
    if leaf is None:
        rest = [d.describe(c) for c in certs[1:]]
        others = f" (nor {'any of ' if len(rest) > 1 else ''}the chain's {', '.join(rest)})"
        others = others if rest else ""
        raise CertificateError(
            f"{cert_id}: the private key does not match the certificate "
            f"{d.describe(certs[0])}{others}"
        )
    warnings = []
    if leaf is not certs[0]:
        warnings.append("the certificate matching the private key was not first; it was moved")
    chain, chain_warnings = order_chain(cert_id, leaf, [c for c in certs if c is not leaf])
    warnings += chain_warnings
    warnings += _leaf_warnings(leaf)
    warnings += d.validity_warnings("the certificate", leaf, now)
    for cert in chain:
        warnings += d.validity_warnings(f"chain certificate {d.describe(cert)}", cert, now)
    return ServerCertificate(cert_id, leaf, chain, key, tuple(warnings))


def _leaf_warnings(leaf: x509.Certificate) -> list[str]:
    warnings = []
    facts = d.key_facts(leaf.public_key())
    if facts.type == "RSA" and facts.bits < MIN_RSA_BITS:
        warnings.append(
            f"the RSA key has {facts.bits} bits; OpenSSL's default security level needs "
            f"{MIN_RSA_BITS}, so only policies that lower it can serve this certificate"
        )
    try:
        usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = None
    if usages is not None and not {
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE,
    } & set(usages):
        warnings.append(
            "the certificate's extended key usage lacks serverAuth; TLS clients will refuse it"
        )
    names = d.dns_names(leaf)
    if names and d.subject_alt_names(leaf) is None:
        warnings.append(
            f"the certificate has no subjectAltName; SNI matches its subject CN '{names[0]}', "
            "which browsers ignore"
        )
    elif not names and not d.ip_addresses(leaf):
        warnings.append("the certificate names no host; it can serve only as a listener's default")
    return warnings


def _spki(obj: x509.Certificate | ServerKey) -> bytes:
    public = obj.public_key()
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
