"""Client-certificate headers: pure, so checked without sockets."""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

from certfactory import make_ca, make_client, serial_hex
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from alb_proxy.tls.clientcert import HEADER_NAMES, client_cert_headers, percent_encode


@given(st.text())
def test_percent_encoding_is_visible_ascii_and_round_trips(text: str) -> None:
    encoded = percent_encode(text)
    assert all(0x21 <= b <= 0x7E for b in encoded)
    assert unquote_to_bytes(encoded).decode("utf-8", "surrogatepass") == text


def test_percent_encoding_examples() -> None:
    assert percent_encode("CN=Zoë Doe") == b"CN=Zo%C3%AB%20Doe"
    assert percent_encode("100%") == b"100%25"
    assert percent_encode("O=A\\, B") == b"O=A\\,%20B"


def test_headers_for_a_certificate() -> None:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "a, b")])
    cert = make_client(make_ca("Issuer CA"), subject=subject).cert
    headers = dict(client_cert_headers(cert.public_bytes(Encoding.DER), HEADER_NAMES))
    assert headers == {
        b"x-forwarded-clientcert-subjectdn": b"CN=a\\,%20b",
        b"x-forwarded-clientcert-issuerdn": b"CN=Issuer%20CA",
        b"x-forwarded-clientcert-fingerprint": cert.fingerprint(hashes.SHA256()).hex().encode(),
        b"x-forwarded-clientcert-serial": serial_hex(cert).encode(),
        b"x-forwarded-clientcert-clientverify": b"SUCCESS",
    }
    only = client_cert_headers(cert.public_bytes(Encoding.DER), ("serial",))
    assert [name for name, _ in only] == [b"x-forwarded-clientcert-serial"]


def test_serial_is_hex_in_whole_bytes_like_openssl() -> None:
    from alb_proxy.tls.clientcert import _whole_bytes_hex

    assert _whole_bytes_hex(0x10B802) == b"10b802"
    assert _whole_bytes_hex(0xB802) == b"b802"
    assert _whole_bytes_hex(0xAB802) == b"0ab802"


def test_a_remembered_certificate_gives_its_own_headers_in_a_fresh_list() -> None:
    ca = make_ca("Issuer CA")
    a, b = (
        make_client(
            ca, subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        ).cert.public_bytes(Encoding.DER)
        for cn in ("a", "b")
    )
    first = client_cert_headers(a, HEADER_NAMES)
    first.clear()  # the caller's to keep: emptying it must not reach the next connection
    for der, cn in ((a, b"CN=a"), (b, b"CN=b"), (a, b"CN=a")):
        assert (
            dict(client_cert_headers(der, HEADER_NAMES))[b"x-forwarded-clientcert-subjectdn"] == cn
        )
