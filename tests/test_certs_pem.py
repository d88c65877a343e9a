"""Loading server certificates and CA bundles from PEM bytes: what is accepted, fixed, refused."""

from __future__ import annotations

import ast
import base64
import contextlib
import re
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from certfactory import DAY, NOW, Issued, make_ca, make_client, make_server, pem_of, write_pem
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from alb_proxy.certs import (
    CertInfo,
    ServerCertificate,
    load_ca_bundle,
    load_server_certificate,
    read_pem_file,
)
from alb_proxy.certs.issue import issue, new_key
from alb_proxy.errors import CertificateError

ROOT = make_ca("Test Root CA")
INTER = make_ca("Test Intermediate CA", issuer=ROOT)
LEAF = make_server(INTER, ["WWW.Example.test", "*.example.test"], ip_addresses=["192.0.2.7"])


def load(cert_pem: bytes, key_pem: bytes, chain_pem: bytes | None = None) -> ServerCertificate:
    return load_server_certificate("cert-x", cert_pem, key_pem, chain_pem, now=NOW)


def key_body(issued: Issued) -> list[str]:
    """The base64 lines of a key: none of them may ever appear in an error."""
    return [line for line in issued.key_pem().decode().splitlines() if "-----" not in line]


def assert_no_key_in(exc: BaseException, issued: Issued) -> None:
    texts = [str(exc), repr(exc), repr(exc.__cause__), repr(exc.__context__)]
    for line in key_body(issued):
        assert not any(line in text for text in texts)


# --- accepted -------------------------------------------------------------------------------


def test_leaf_with_chain_is_described_from_the_leaf() -> None:
    cert = load(pem_of(LEAF, INTER), LEAF.key_pem())
    assert cert.id == "cert-x"
    assert cert.leaf == LEAF.cert
    assert cert.chain == (INTER.cert,)
    assert cert.chain_pem == pem_of(LEAF, INTER)
    assert (cert.key_type, cert.key_bits, cert.curve) == ("EC", 256, "secp256r1")
    assert cert.dns_names == ("www.example.test", "*.example.test")
    assert [str(ip) for ip in cert.ip_addresses] == ["192.0.2.7"]
    assert cert.not_before == LEAF.cert.not_valid_before_utc
    assert cert.not_after.tzinfo is not None
    assert cert.fingerprint_sha256 == LEAF.cert.fingerprint(hashes.SHA256()).hex()
    assert cert.serial == format(LEAF.cert.serial_number, "x")
    assert cert.subject == "CN=WWW.Example.test"
    assert cert.issuer == "CN=Test Intermediate CA"
    assert cert.warnings == ()
    assert cert.info == CertInfo(
        "cert-x", "EC", ("www.example.test", "*.example.test"), cert.not_before, cert.not_after
    )


def test_separate_chain_argument_and_rsa_key() -> None:
    leaf = make_server(INTER, ["rsa.example.test"], key_type="RSA")
    cert = load(leaf.cert_pem(), leaf.key_pem(), pem_of(INTER, ROOT))
    assert cert.chain == (INTER.cert, ROOT.cert)  # a self-signed root is kept, silently
    assert (cert.key_type, cert.key_bits, cert.curve) == ("RSA", 2048, None)
    assert cert.warnings == ()


def test_ed25519_and_self_signed_leaf() -> None:
    leaf = make_server(None, ["ed.example.test"], key_type="Ed25519")
    cert = load(leaf.cert_pem(), leaf.key_pem())
    assert (cert.key_type, cert.chain, cert.warnings) == ("Ed25519", (), ())


def test_private_key_round_trips_and_never_shows_in_repr() -> None:
    cert = load(pem_of(LEAF, INTER), LEAF.key_pem())
    assert cert.private_key_pem() == LEAF.key_pem()
    assert serialization.load_pem_private_key(cert.private_key_pem(), None)
    assert "private_key" not in repr(cert)


def test_text_outside_blocks_and_traditional_key_with_parameters_are_accepted() -> None:
    key = LEAF.key
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    traditional = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    params = b"-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\n"
    cert_pem = b"Bag Attributes\n    friendlyName: www\nsubject=CN=www\n" + pem_of(LEAF, INTER)
    assert load(cert_pem, params + traditional).leaf == LEAF.cert


# --- chains: fixed with a warning, or refused ----------------------------------------------


def test_reordered_chain_is_fixed_with_a_warning() -> None:
    cert = load(pem_of(LEAF, ROOT, INTER), LEAF.key_pem())
    assert cert.chain == (INTER.cert, ROOT.cert)
    assert cert.chain_pem == pem_of(LEAF, INTER, ROOT)
    assert any("reordered" in w for w in cert.warnings)


def test_leaf_not_first_is_found_by_its_key() -> None:
    cert = load(pem_of(INTER, LEAF), LEAF.key_pem())
    assert cert.leaf == LEAF.cert
    assert cert.chain_pem == pem_of(LEAF, INTER)
    assert any("was not first" in w for w in cert.warnings)


def test_duplicates_are_removed() -> None:
    cert = load(pem_of(LEAF, INTER, LEAF), LEAF.key_pem(), pem_of(INTER))
    assert cert.chain == (INTER.cert,)
    assert any("removed 2 duplicate" in w for w in cert.warnings)


def test_unrelated_certificate_in_chain_is_refused() -> None:
    stranger = make_ca("Some Other CA")
    with pytest.raises(CertificateError, match=r"does not link.*CN=Some Other CA"):
        load(pem_of(LEAF, INTER, stranger), LEAF.key_pem())


def test_intermediate_with_right_name_but_wrong_key_is_refused() -> None:
    impostor = make_ca("Test Intermediate CA", issuer=ROOT)  # same name, another key
    with pytest.raises(CertificateError, match="did not sign it"):
        load(pem_of(LEAF, impostor), LEAF.key_pem())


def test_chain_missing_a_link_is_refused() -> None:
    with pytest.raises(CertificateError, match="does not link"):
        load(pem_of(LEAF, ROOT), LEAF.key_pem())  # the intermediate between them is missing


# --- refused input --------------------------------------------------------------------------


def test_mismatched_key_is_refused() -> None:
    other = make_server(INTER, ["other.example.test"])
    with pytest.raises(CertificateError, match="private key does not match the certificate") as e:
        load(pem_of(LEAF, INTER), other.key_pem())
    assert_no_key_in(e.value, other)


@pytest.mark.parametrize(
    ("data", "hint"),
    [
        (b"hello, world\n", "no -----BEGIN CERTIFICATE----- block"),
        (b"", "it is empty"),
        (LEAF.cert.public_bytes(serialization.Encoding.DER), "looks like DER"),
    ],
)
def test_not_pem_is_refused(data: bytes, hint: str) -> None:
    with pytest.raises(CertificateError, match="is not a PEM certificate") as e:
        load(data, LEAF.key_pem())
    assert hint in str(e.value)
    assert str(e.value).startswith("cert-x: ")


def test_key_given_as_certificate_is_refused_without_showing_it() -> None:
    with pytest.raises(CertificateError, match="holds a private key") as e:
        load(LEAF.key_pem(), LEAF.key_pem())
    assert_no_key_in(e.value, LEAF)
    with pytest.raises(CertificateError, match="holds a private key"):
        load(LEAF.cert_pem() + LEAF.key_pem(), LEAF.key_pem())


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "not a valid cert"),
        (b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n", "is X509 CRL, not CERT"),
        (LEAF.cert_pem()[:-30], "truncated"),
    ],
)
def test_broken_certificate_blocks_are_refused(data: bytes, match: str) -> None:
    with pytest.raises(CertificateError, match=match):
        load(data, LEAF.key_pem())


@pytest.mark.parametrize(
    ("key_pem", "match"),
    [
        (b"not a key", "is not a PEM private key \\(found no PEM block\\)"),
        (LEAF.cert_pem(), "is not a PEM private key \\(found CERTIFICATE\\)"),
        (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "not a valid key"),
        (LEAF.key_pem() + LEAF.key_pem(), "holds 2 private keys"),
    ],
)
def test_bad_keys_are_refused(key_pem: bytes, match: str) -> None:
    with pytest.raises(CertificateError, match=match) as e:
        load(pem_of(LEAF, INTER), key_pem)
    assert_no_key_in(e.value, LEAF)


@pytest.mark.parametrize("fmt", ["PKCS8", "TraditionalOpenSSL"])
def test_encrypted_keys_are_refused(fmt: str) -> None:
    encrypted = LEAF.key.private_bytes(
        serialization.Encoding.PEM,
        getattr(serialization.PrivateFormat, fmt),
        serialization.BestAvailableEncryption(b"secret"),
    )
    with pytest.raises(CertificateError, match="encrypted private keys are not supported") as e:
        load(pem_of(LEAF, INTER), encrypted)
    assert "secret" not in str(e.value)
    assert e.value.__cause__ is None


def test_dsa_key_is_refused() -> None:
    from cryptography.hazmat.primitives.asymmetric import dsa

    key = dsa.generate_private_key(2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(CertificateError, match="DSAPrivateKey keys cannot serve TLS"):
        load(pem_of(LEAF, INTER), key)


def test_certificate_with_a_negative_serial_is_refused() -> None:
    # RFC 5280 requires a positive serial; cryptography only warns about it today and will
    # refuse it later, so it is refused now with a clear error rather than a warning.
    der = bytearray(LEAF.cert.public_bytes(serialization.Encoding.DER))
    at = der.index(b"\xa0\x03\x02\x01\x02\x02") + 7  # version [0], then the serial INTEGER
    der[at] = 0xFF  # same length, sign bit set
    body = base64.encodebytes(bytes(der)).replace(b"\n", b"")
    lines = b"\n".join(body[i : i + 64] for i in range(0, len(body), 64))
    cert_pem = b"-----BEGIN CERTIFICATE-----\n" + lines + b"\n-----END CERTIFICATE-----\n"
    with pytest.raises(CertificateError, match=r"PEM block 1 is not a valid certificate.*serial"):
        load(cert_pem, LEAF.key_pem())


def test_naive_now_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        load_server_certificate("c", LEAF.cert_pem(), LEAF.key_pem(), now=datetime(2030, 1, 1))


VALID_PEM = pem_of(LEAF, INTER) + LEAF.key_pem()


@st.composite
def damaged_pem(draw: st.DrawFn) -> bytes:
    """Valid PEM (certificates and a key) with a few bytes overwritten, cut or inserted."""
    data = bytearray(VALID_PEM)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["set", "cut", "insert"]))
        if action == "set":
            data[at] = draw(st.integers(0, 255))
        elif action == "cut":
            del data[at : at + draw(st.integers(1, 64))]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


@settings(max_examples=300)
@given(st.one_of(st.binary(max_size=512), damaged_pem()))
def test_loaders_refuse_any_bytes_only_with_certificate_error(data: bytes) -> None:
    for load_it in (
        lambda: load(data, LEAF.key_pem()),
        lambda: load(pem_of(LEAF, INTER), data),
        lambda: load(LEAF.cert_pem(), LEAF.key_pem(), data),
        lambda: load_ca_bundle("ca-x", data, now=NOW),
    ):
        with contextlib.suppress(CertificateError):
            load_it()


# --- warnings -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("not_before", "not_after", "expected"),
    [
        (NOW - 400 * DAY, NOW - 3 * DAY, "the certificate expired on .* \\(3 days ago\\)"),
        (NOW + 2 * DAY, NOW + 400 * DAY, "the certificate is not valid until .* \\(in 2 days\\)"),
        (NOW - DAY, NOW + 10 * DAY, "the certificate expires in 10 days \\(on "),
        (NOW - DAY, NOW + timedelta(hours=5), "expires in less than a day"),
    ],
)
def test_validity_problems_are_warnings(
    not_before: datetime, not_after: datetime, expected: str
) -> None:
    leaf = make_server(INTER, ["t.example.test"], not_before=not_before, not_after=not_after)
    (warning,) = load(pem_of(leaf, INTER), leaf.key_pem()).warnings
    assert re.search(expected, warning), warning


def test_expired_intermediate_is_a_warning() -> None:
    old = make_ca("Old Intermediate", issuer=ROOT, not_before=NOW - 90 * DAY, not_after=NOW - DAY)
    leaf = make_server(old, ["t.example.test"])
    (warning,) = load(pem_of(leaf, old), leaf.key_pem()).warnings
    assert warning.startswith("chain certificate 'CN=Old Intermediate' expired on")


def test_cn_is_the_name_only_without_a_san_extension() -> None:
    legacy = make_server(INTER, (), common_name="Legacy.Example.test")
    cert = load(legacy.cert_pem(), legacy.key_pem())
    assert cert.dns_names == ("legacy.example.test",)
    assert any("no subjectAltName" in w for w in cert.warnings)

    ip_only = make_server(INTER, (), ip_addresses=["192.0.2.1"], common_name="cn.example.test")
    assert load(ip_only.cert_pem(), ip_only.key_pem()).dns_names == ()

    no_host = make_server(INTER, (), common_name="ACME Web Server")
    cert = load(no_host.cert_pem(), no_host.key_pem())
    assert cert.dns_names == ()
    assert any("names no host" in w for w in cert.warnings)


def test_client_only_usage_and_small_rsa_key_are_warnings() -> None:
    client = make_server(INTER, ["c.example.test"], eku=[x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH])
    assert any("lacks serverAuth" in w for w in load(client.cert_pem(), client.key_pem()).warnings)

    small = issue(
        "small.example.test",
        issuer=INTER,
        key=rsa.generate_private_key(65537, 1024),
        not_before=NOW - DAY,
        not_after=NOW + 90 * DAY,
        dns_names=["small.example.test"],
    )
    (warning,) = load(small.cert_pem(), small.key_pem()).warnings
    assert "1024 bits" in warning


# --- CA bundles -----------------------------------------------------------------------------


def test_ca_bundle_with_several_cas_and_a_duplicate() -> None:
    other = make_ca("Other Root CA", key_type="RSA")
    bundle = load_ca_bundle("ca-x", pem_of(ROOT, INTER, other, ROOT), now=NOW)
    assert bundle.certificates == (ROOT.cert, INTER.cert, other.cert)
    assert bundle.pem == pem_of(ROOT, INTER, other)
    assert bundle.subjects == ("CN=Test Root CA", "CN=Test Intermediate CA", "CN=Other Root CA")
    assert bundle.fingerprints[0] == ROOT.cert.fingerprint(hashes.SHA256()).hex()
    assert bundle.not_after == min(c.not_valid_after_utc for c in bundle.certificates)
    assert bundle.warnings == ("removed 1 duplicate certificate(s)",)


def test_ca_bundle_refuses_a_leaf_naming_it() -> None:
    client = make_client(ROOT, "alice")
    with pytest.raises(CertificateError, match="ca-x: 'CN=alice' is not a CA certificate"):
        load_ca_bundle("ca-x", pem_of(ROOT, client), now=NOW)


def test_ca_bundle_refuses_a_ca_that_may_not_sign_certificates() -> None:
    key = new_key()
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "No Sign CA")])
    usage = x509.KeyUsage(True, False, False, False, False, False, False, False, False)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + DAY * 30)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(CertificateError, match="'CN=No Sign CA' is not allowed to sign"):
        load_ca_bundle("ca-x", pem_of(cert), now=NOW)


def test_ca_bundle_warns_when_expired_and_refuses_keys_and_junk() -> None:
    old = make_ca("Old CA", not_before=NOW - 90 * DAY, not_after=NOW - DAY)
    (warning,) = load_ca_bundle("ca-x", pem_of(old), now=NOW).warnings
    assert warning.startswith("CA certificate 'CN=Old CA' expired on")
    with pytest.raises(CertificateError, match="holds a private key"):
        load_ca_bundle("ca-x", ROOT.key_pem(), now=NOW)
    with pytest.raises(CertificateError, match="ca-x: the CA certificate is not a PEM cert"):
        load_ca_bundle("ca-x", b"junk", now=NOW)


# --- files and purity -----------------------------------------------------------------------


def test_read_pem_file(tmp_path: Path) -> None:
    path = write_pem(tmp_path / "a.pem", ROOT.cert_pem())
    assert read_pem_file(path) == ROOT.cert_pem()
    with pytest.raises(
        CertificateError, match=re.escape(f"cannot read {tmp_path / 'missing.pem'}: No such")
    ):
        read_pem_file(tmp_path / "missing.pem")
    big = write_pem(tmp_path / "big.pem", b"x" * (1024 * 1024 + 1))
    with pytest.raises(CertificateError, match=r"big\.pem is larger than 1024 KiB"):
        read_pem_file(big)


CERTS_DIR = Path(__file__).parent.parent / "alb_proxy" / "certs"
FORBIDDEN = {"asyncio", "socket", "ssl"}


def top_level_imports(source: str) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return {name.split(".")[0] for name in names}


def test_certs_modules_import_no_io_frameworks() -> None:
    """Directly, by reading each module; and transitively for asyncio and ssl, in a fresh
    interpreter (socket is left out there: cryptography imports email.utils, which imports it)."""
    modules = sorted(CERTS_DIR.glob("*.py"))
    assert len(modules) >= 5
    for path in modules:
        assert not top_level_imports(path.read_text()) & FORBIDDEN, path.name
    names = ", ".join(f"alb_proxy.certs.{p.stem}" for p in modules if p.stem != "__init__")
    code = f"import sys, {names}; print(sorted({{'asyncio', 'ssl'}} & set(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=CERTS_DIR.parent.parent,
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == "[]"
