"""What the backend learns about a verified client certificate: ``X-Forwarded-Clientcert-*``.

Pure: DER bytes in, header pairs out. DNs are RFC 4514 strings, and because an HTTP header
value may carry only visible ASCII safely, every byte of the UTF-8 form outside 0x21–0x7E, and
``%`` itself, is percent-encoded: ``CN=Zoë Doe,O=A\\, B`` becomes
``CN=Zo%C3%AB%20Doe,O=A\\,%20B``, which a backend decodes back exactly.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.utils import CryptographyDeprecationWarning

HEADER_PREFIX = "x-forwarded-clientcert-"
HEADER_NAMES = ("subjectdn", "issuerdn", "fingerprint", "serial", "clientverify")

_SAFE = frozenset(range(0x21, 0x7F)) - {ord("%")}


def percent_encode(text: str) -> bytes:
    """Visible ASCII except ``%`` kept; every other UTF-8 byte as ``%XX``."""
    return b"".join(
        bytes((b,)) if b in _SAFE else b"%%%02X" % b for b in text.encode("utf-8", "surrogatepass")
    )


_VALUES: dict[str, Callable[[x509.Certificate], bytes]] = {
    "subjectdn": lambda cert: percent_encode(cert.subject.rfc4514_string()),
    "issuerdn": lambda cert: percent_encode(cert.issuer.rfc4514_string()),
    "fingerprint": lambda cert: cert.fingerprint(hashes.SHA256()).hex().encode(),
    "serial": lambda cert: _whole_bytes_hex(cert.serial_number),
    "clientverify": lambda cert: b"SUCCESS",
}


def _whole_bytes_hex(number: int) -> bytes:
    """Lowercase hex in whole bytes (``0a1b``, not ``a1b``), as ``openssl x509 -serial`` shows
    it, so the value compares equal to what an operator copies from openssl."""
    text = format(number, "x")
    return (("0" + text) if len(text) % 2 else text).encode()


def client_cert_headers(der: bytes, enabled: Sequence[str]) -> list[tuple[bytes, bytes]]:
    """Headers for a client certificate that passed verification (hence ``SUCCESS``)."""
    return list(_headers(der, tuple(enabled)))


@functools.lru_cache(maxsize=1024)
def _headers(der: bytes, enabled: tuple[str, ...]) -> tuple[tuple[bytes, bytes], ...]:
    """Remembered per certificate: clients reconnect with the same few certificates, and
    parsing and formatting one on every connection cost mutual-TLS handshakes about a fifth
    of their rate per proxy CPU-second (``bench.py --only mtls``)."""
    # OpenSSL has already verified it; a quirk cryptography merely warns about (a serial
    # that is not positive) must not spill a warning per connection.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        cert = x509.load_der_x509_certificate(der)
    return tuple((f"{HEADER_PREFIX}{name}".encode(), _VALUES[name](cert)) for name in enabled)
