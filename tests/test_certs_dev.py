"""``certs dev`` output: the files the example config names, usable in real TLS handshakes."""

from __future__ import annotations

import os
import ssl
import stat
from pathlib import Path
from typing import TypeVar

import pytest
from certfactory import NOW, write_pem
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from alb_proxy.certs import load_ca_bundle, load_server_certificate, read_pem_file
from alb_proxy.certs.dev import LEAF_VALIDITY, write_dev_certificates

E = TypeVar("E", bound=x509.ExtensionType)
NAMES = ["ca", "site", "site-rsa", "api", "client-ca", "client"]


@pytest.fixture(scope="module")
def dev_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dev") / "certs"
    write_dev_certificates(out, now=NOW)
    return out


def cert_of(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def ext(cert: x509.Certificate, kind: type[E]) -> E:
    return cert.extensions.get_extension_for_class(kind).value


def handshake(server: ssl.SSLContext, client: ssl.SSLContext, server_name: str) -> bytes:
    """Drive a full handshake between two in-memory peers; return the certificate received."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client_obj = client.wrap_bio(c_in, c_out, server_hostname=server_name)
    server_obj = server.wrap_bio(s_in, s_out, server_side=True)
    done = [False, False]
    for _ in range(6):
        for i, (obj, out, peer_in) in enumerate(
            [(client_obj, c_out, s_in), (server_obj, s_out, c_in)]
        ):
            if not done[i]:
                try:
                    obj.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
            peer_in.write(out.read())
        if all(done):
            cert = client_obj.getpeercert(binary_form=True)
            assert cert is not None
            return cert
    raise AssertionError("handshake did not finish")


def server_context(dev_dir: Path, name: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(dev_dir / f"{name}.pem", dev_dir / f"{name}.key")
    return ctx


def client_context(dev_dir: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=dev_dir / "ca.pem")


def test_writes_the_files_the_example_config_names(tmp_path: Path) -> None:
    written = write_dev_certificates(tmp_path / "new", now=NOW)
    expected = [tmp_path / "new" / f"{n}.{ext}" for n in NAMES for ext in ("pem", "key")]
    assert written == expected
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == sorted(p.name for p in expected)


def test_keys_are_private_even_when_overwriting(tmp_path: Path) -> None:
    write_pem(tmp_path / "site.key", b"old", mode=0o644)
    first = write_dev_certificates(tmp_path, now=NOW)
    again = write_dev_certificates(tmp_path, now=NOW)
    assert first == again
    for path in again:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        assert mode == (0o600 if path.suffix == ".key" else 0o644 & ~_umask()), path
    assert (tmp_path / "site.key").read_bytes() != b"old"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


@pytest.mark.parametrize(
    ("name", "key_type", "dns_names"),
    [
        ("site", "EC", ("site.example.test", "*.site.example.test", "localhost")),
        ("site-rsa", "RSA", ("site.example.test", "*.site.example.test", "localhost")),
        ("api", "EC", ("api.example.test",)),
    ],
)
def test_server_certificates_load_cleanly_with_their_chain(
    dev_dir: Path, name: str, key_type: str, dns_names: tuple[str, ...]
) -> None:
    pem, key = read_pem_file(dev_dir / f"{name}.pem"), read_pem_file(dev_dir / f"{name}.key")
    cert = load_server_certificate(name, pem, key, now=NOW)
    assert (cert.key_type, cert.dns_names, cert.warnings) == (key_type, dns_names, ())
    assert cert.chain == (cert_of(dev_dir / "ca.pem"),)
    if name != "api":
        assert [str(ip) for ip in cert.ip_addresses] == ["127.0.0.1", "::1"]
    assert cert.not_after - cert.not_before <= LEAF_VALIDITY


def test_server_certificate_extensions(dev_dir: Path) -> None:
    ca, leaf = cert_of(dev_dir / "ca.pem"), cert_of(dev_dir / "site.pem")
    leaf.verify_directly_issued_by(ca)
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).critical
    assert not ext(leaf, x509.BasicConstraints).ca
    assert ext(ca, x509.BasicConstraints).ca
    assert ext(leaf, x509.KeyUsage).digital_signature
    assert not ext(leaf, x509.KeyUsage).key_cert_sign
    assert ext(ca, x509.KeyUsage).key_cert_sign
    assert ext(cert_of(dev_dir / "site-rsa.pem"), x509.KeyUsage).key_encipherment
    assert list(ext(leaf, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.SERVER_AUTH]
    aki = ext(leaf, x509.AuthorityKeyIdentifier).key_identifier
    assert aki == ext(ca, x509.SubjectKeyIdentifier).digest


def test_client_certificate_and_its_ca(dev_dir: Path) -> None:
    client = cert_of(dev_dir / "client.pem")
    assert client.subject.rfc4514_string() == "CN=demo-client"
    assert list(ext(client, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    bundle = load_ca_bundle("ca-clients", (dev_dir / "client-ca.pem").read_bytes(), now=NOW)
    assert bundle.warnings == ()
    client.verify_directly_issued_by(bundle.certificates[0])


@pytest.mark.parametrize(
    ("name", "server_name"),
    [
        ("site", "site.example.test"),
        ("site", "www.site.example.test"),
        ("site", "localhost"),
        ("site", "127.0.0.1"),
        ("site-rsa", "site.example.test"),
        ("api", "api.example.test"),
    ],
)
def test_real_handshake_verifies_against_the_dev_ca(
    dev_dir: Path, name: str, server_name: str
) -> None:
    received = handshake(server_context(dev_dir, name), client_context(dev_dir), server_name)
    assert received == cert_of(dev_dir / f"{name}.pem").public_bytes(Encoding.DER)


def test_handshake_fails_for_a_name_the_certificate_lacks(dev_dir: Path) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        handshake(server_context(dev_dir, "api"), client_context(dev_dir), "site.example.test")


def test_mutual_tls_with_the_dev_client_certificate(dev_dir: Path) -> None:
    server = server_context(dev_dir, "site")
    server.verify_mode = ssl.CERT_REQUIRED
    server.load_verify_locations(dev_dir / "client-ca.pem")
    client = client_context(dev_dir)
    client.load_cert_chain(dev_dir / "client.pem", dev_dir / "client.key")
    handshake(server, client, "site.example.test")

    stranger = client_context(dev_dir)
    stranger.load_cert_chain(dev_dir / "site.pem", dev_dir / "site.key")  # not from client-ca
    with pytest.raises(ssl.SSLError, match="certificate verify failed"):
        handshake(server, stranger, "site.example.test")
