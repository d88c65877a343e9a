"""Issue X.509 certificates with the extensions TLS stacks check; for ``certs dev`` and tests.

One builder for both, so the development certificates and the test fixtures are made the same way
and a fix to one (an extension a client starts to insist on) reaches both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from ipaddress import IPv4Address, IPv6Address, ip_address

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID

from alb_proxy.certs.pem import ServerKey, private_key_pem, to_pem


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: ServerKey = field(repr=False)

    def cert_pem(self) -> bytes:
        return to_pem([self.cert])

    def key_pem(self) -> bytes:
        """Unencrypted PKCS#8 PEM."""
        return private_key_pem(self.key)


def new_key(key_type: str = "EC", *, rsa_bits: int = 2048) -> ServerKey:
    """A fresh key: ``EC`` (P-256), ``RSA`` (``rsa_bits``), ``Ed25519`` or ``Ed448``."""
    if key_type == "EC":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "RSA":
        return rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
    if key_type == "Ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if key_type == "Ed448":
        return ed448.Ed448PrivateKey.generate()
    raise ValueError(f"unknown key type {key_type!r}; use EC, RSA, Ed25519 or Ed448")


def issue(
    subject: str | x509.Name,
    *,
    issuer: Issued | None,
    not_before: datetime,
    not_after: datetime,
    key: ServerKey | None = None,
    ca: bool = False,
    path_length: int | None = None,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str | IPv4Address | IPv6Address] = (),
    extended_key_usage: Sequence[x509.ObjectIdentifier] = (),
) -> Issued:
    """Sign a certificate for ``subject`` (a CN, or a full name) with ``issuer``'s key.

    ``issuer=None`` makes it self-signed. ``key`` defaults to a new P-256 key. A subjectAltName
    extension is added only when names or addresses are given (so CN-only certificates can be
    made). Key usage follows the role: a CA signs certificates; a leaf signs handshakes, and an
    RSA leaf also decrypts (TLS 1.2 RSA key exchange).
    """
    key = key or new_key()
    name = (
        subject
        if isinstance(subject, x509.Name)
        else x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    )
    signer_key = issuer.key if issuer else key
    public = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.cert.subject if issuer else name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True
        )
        .add_extension(_key_usage(ca, rsa_leaf=isinstance(public, rsa.RSAPublicKey)), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(_authority_key_id(issuer, key), critical=False)
    )
    if extended_key_usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage(extended_key_usage), critical=False)
    if dns_names or ip_addresses:
        general: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
        general += [x509.IPAddress(ip_address(ip)) for ip in ip_addresses]
        # RFC 5280 §4.2.1.6: the extension is critical when the subject is empty.
        builder = builder.add_extension(x509.SubjectAlternativeName(general), critical=not name)
    pure_eddsa = isinstance(signer_key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey)
    return Issued(builder.sign(signer_key, None if pure_eddsa else hashes.SHA256()), key)


def _key_usage(ca: bool, *, rsa_leaf: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=rsa_leaf and not ca,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _authority_key_id(issuer: Issued | None, key: ServerKey) -> x509.AuthorityKeyIdentifier:
    """The issuer's own SKI when it has one, so the two always agree; ``key`` if self-signed."""
    if issuer is None:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key())
    try:
        ski = issuer.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
