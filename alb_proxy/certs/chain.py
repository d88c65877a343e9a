"""Put a server certificate's intermediates in the order TLS sends them, or refuse the chain.

Users paste chains in every order and with duplicates; what matters is that each certificate is
issued by the next. We walk up from the leaf, each step choosing the remaining certificate whose
subject is the current issuer *and* whose key verifies the current signature (a name match alone
is how a wrong intermediate with the right name slips through). Whatever is left over after the
walk does not belong to this chain, and is refused rather than silently served.

A self-signed root at the end is kept without a warning: clients ignore it, it costs a few hundred
bytes per full handshake, and "full chain" bundles (ours from ``certs dev`` too) include it.
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes

from alb_proxy.certs.describe import describe
from alb_proxy.errors import CertificateError


def order_chain(
    what: str, leaf: x509.Certificate, others: Sequence[x509.Certificate]
) -> tuple[tuple[x509.Certificate, ...], list[str]]:
    """``others`` ordered leaf-issuer first, without duplicates; and warnings for what changed."""
    warnings = []
    seen = {leaf.fingerprint(hashes.SHA256())}
    unique = []
    for cert in others:
        fp = cert.fingerprint(hashes.SHA256())
        if fp not in seen:
            seen.add(fp)
            unique.append(cert)
    if len(unique) < len(others):
        dropped = len(others) - len(unique)
        warnings.append(f"removed {dropped} duplicate certificate(s) from the chain")

    remaining = list(unique)
    chain: list[x509.Certificate] = []
    current = leaf
    while remaining and not is_self_signed(current):
        issuer = _find_issuer(what, current, remaining)
        if issuer is None:
            break
        chain.append(issuer)
        remaining.remove(issuer)
        current = issuer
    if remaining:
        stray = ", ".join(describe(c) for c in remaining)
        raise CertificateError(
            f"{what}: the chain does not link: {stray} issued no certificate in it "
            f"(from the leaf it reaches {describe(current)}, issued by "
            f"'{current.issuer.rfc4514_string()}')"
        )
    if chain != unique:
        warnings.append("the chain was out of order; it was reordered leaf-issuer first")
    return tuple(chain), warnings


def is_self_signed(cert: x509.Certificate) -> bool:
    return cert.subject == cert.issuer and _issued_by(cert, cert)


def _find_issuer(
    what: str, cert: x509.Certificate, candidates: Sequence[x509.Certificate]
) -> x509.Certificate | None:
    named = [c for c in candidates if c.subject == cert.issuer]
    for candidate in named:
        if _issued_by(cert, candidate):
            return candidate
    if named:
        raise CertificateError(
            f"{what}: the chain does not link: {describe(named[0])} has the name of the issuer "
            f"of {describe(cert)} but did not sign it (signature check failed)"
        )
    return None


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
