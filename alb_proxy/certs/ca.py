"""CA certificates that client certificates must chain to (mutual authentication trust anchors).

A bundle may hold several CAs. Each must really be a CA (basicConstraints CA:TRUE and, when key
usage is present, keyCertSign): OpenSSL would otherwise load it and then fail every client
verification, which users would see as an unexplained "unknown ca".
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from cryptography import x509

from alb_proxy.certs import describe as d
from alb_proxy.certs.pem import load_certificates, to_pem
from alb_proxy.errors import CertificateError


@dataclass(frozen=True)
class CaBundle:
    """One CA certificate entry of the store; descriptive facts derive from ``certificates``."""

    id: str
    certificates: tuple[x509.Certificate, ...]
    """At least one, each a CA, no duplicates, in the order given."""
    warnings: tuple[str, ...] = ()

    @property
    def pem(self) -> bytes:
        """Normalized PEM of all certificates: what the TLS layer loads as verify locations."""
        return to_pem(self.certificates)

    @property
    def fingerprints(self) -> tuple[str, ...]:
        return tuple(d.fingerprint_sha256(c) for c in self.certificates)

    @property
    def subjects(self) -> tuple[str, ...]:
        return tuple(c.subject.rfc4514_string() for c in self.certificates)

    @property
    def not_after(self) -> datetime:
        """The earliest expiry: when this bundle first needs attention."""
        return min(c.not_valid_after_utc for c in self.certificates)


def load_ca_bundle(cert_id: str, pem: bytes, *, now: datetime) -> CaBundle:
    """Parse a PEM of one or more CA certificates; refuse any that is not a CA."""
    d.require_aware(now)
    certs = load_certificates(f"{cert_id}: the CA certificate", pem)
    unique = list({d.fingerprint_sha256(c): c for c in certs}.values())
    warnings = []
    if len(unique) < len(certs):
        warnings.append(f"removed {len(certs) - len(unique)} duplicate certificate(s)")
    for cert in unique:
        _require_ca(cert_id, cert)
        warnings += d.validity_warnings(f"CA certificate {d.describe(cert)}", cert, now)
    return CaBundle(cert_id, tuple(unique), tuple(warnings))


def _require_ca(cert_id: str, cert: x509.Certificate) -> None:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise CertificateError(
            f"{cert_id}: {d.describe(cert)} is not a CA certificate (basicConstraints CA:TRUE "
            "is missing)"
        )
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    if not usage.key_cert_sign:
        raise CertificateError(
            f"{cert_id}: {d.describe(cert)} is not allowed to sign certificates (its key usage "
            "lacks keyCertSign)"
        )
