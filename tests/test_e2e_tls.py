"""TLS termination against the real daemon: SNI selection, policies, alerts, failure counts.

Every check looks at what the client actually received: the leaf certificate's fingerprint,
the negotiated version, or the alert OpenSSL's client reports.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Pki
from harness import (
    Backend,
    Proxy,
    client_context,
    openssl_s_client,
    s_client_fingerprint,
    served_fingerprint,
    start_proxy,
)


def https_listener(name: str, port: int, policy: str, additional: list[str]) -> dict[str, Any]:
    return {
        "name": name,
        "protocol": "HTTPS",
        "port": port,
        "bind": "127.0.0.1",
        "certificates": {"default": "c-default", "additional": additional},
        "security_policy": policy,
        "default_action": {"forward": "sg"},
    }


@pytest.fixture(scope="module")
def proxy(
    pki: Pki, demo_backend: Backend, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Proxy]:
    tmp = tmp_path_factory.mktemp("tls")
    additional = ["c-exact", "c-wild", "c-dual-ec", "c-dual-rsa", "c-expired"]
    config = {
        "instance": {"name": "t", "edition": "Standard"},
        "certificates": [
            pki.default.entry("c-default"),
            pki.exact.entry("c-exact"),
            pki.wildcard.entry("c-wild"),
            pki.dual_ec.entry("c-dual-ec"),
            pki.dual_rsa.entry("c-dual-rsa"),
            pki.expired.entry("c-expired"),
        ],
        "server_groups": [
            {"id": "sg", "servers": [{"host": "127.0.0.1", "port": demo_backend.port}]}
        ],
        "listeners": [
            https_listener("h12", 4412, "tls_cipher_policy_1_2", additional),
            https_listener("h13", 4413, "tls_cipher_policy_1_2_strict_with_1_3", additional),
            https_listener("h11", 4411, "tls_cipher_policy_1_1", additional),
        ],
    }
    p = start_proxy(tmp, config)
    yield p
    assert p.stop() == 0


@pytest.mark.parametrize(
    ("server_name", "expected"),
    [
        ("exact.example.test", "exact"),
        ("EXACT.Example.TEST", "exact"),
        ("a.wild.example.test", "wildcard"),
        ("a.b.wild.example.test", "default"),
        ("wild.example.test", "default"),
        ("unknown.example.test", "default"),
        ("default.example.test", "default"),
        (None, "default"),
    ],
)
def test_sni_selects_certificate_python_client(
    proxy: Proxy, pki: Pki, server_name: str | None, expected: str
) -> None:
    want = getattr(pki, expected).fingerprint
    for listener in ("h12", "h13"):
        assert served_fingerprint(proxy.port(listener), server_name) == want


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["-servername", "exact.example.test."], "exact"),  # one trailing dot ignored
        (["-servername", "exact.example.test.."], "default"),
        (["-servername", "127.0.0.1"], "default"),  # an IP literal is not a host name
        (["-servername", "::1"], "default"),
        (["-noservername"], "default"),
        (["-servername", "A.WILD.example.test"], "wildcard"),
    ],
)
def test_sni_selects_certificate_openssl(
    proxy: Proxy, pki: Pki, args: list[str], expected: str
) -> None:
    assert s_client_fingerprint(proxy.port("h13"), *args) == getattr(pki, expected).fingerprint


def test_rsa_and_ecdsa_for_one_name_served_by_what_the_client_supports(
    proxy: Proxy, pki: Pki
) -> None:
    port = proxy.port("h12")
    ec = s_client_fingerprint(
        port,
        "-servername",
        "dual.example.test",
        "-tls1_2",
        "-cipher",
        "ECDHE-ECDSA-AES128-GCM-SHA256",
    )
    rsa = s_client_fingerprint(
        port,
        "-servername",
        "dual.example.test",
        "-tls1_2",
        "-cipher",
        "ECDHE-RSA-AES128-GCM-SHA256",
    )
    assert (ec, rsa) == (pki.dual_ec.fingerprint, pki.dual_rsa.fingerprint)


def test_expired_additional_certificate_is_still_chosen_by_its_name(proxy: Proxy, pki: Pki) -> None:
    # Only one certificate covers the name: SNI picks it; the warning was logged at start.
    assert served_fingerprint(proxy.port("h13"), "old.example.test") == pki.expired.fingerprint
    assert "certificate=c-expired" in proxy.log


def test_full_chain_is_sent(proxy: Proxy, pki: Pki) -> None:
    ctx = client_context(pki.ca_file)  # trusts only the root: fails unless the intermediate came
    ctx.check_hostname = True
    with (
        socket.create_connection(("127.0.0.1", proxy.port("h13"))) as raw,
        ctx.wrap_socket(raw, server_hostname="exact.example.test") as tls,
    ):
        assert tls.version() == "TLSv1.3"


@pytest.mark.parametrize("sni", [[], ["-servername", "exact.example.test"], ["-noservername"]])
def test_tls11_refused_with_protocol_version_alert(proxy: Proxy, sni: list[str]) -> None:
    before = proxy.metric(
        "alb_tls_handshake_failures_total", listener="h12", reason="protocol_version"
    )
    refused = openssl_s_client(proxy.port("h12"), "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0", *sni)
    assert "alert protocol version" in refused.stderr, refused.stderr
    assert refused.returncode != 0
    after = proxy.metric(
        "alb_tls_handshake_failures_total", listener="h12", reason="protocol_version"
    )
    assert after == before + 1
    # The same client gets in where the policy allows TLS 1.1, so the refusal above is the policy.
    allowed = openssl_s_client(proxy.port("h11"), "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0", *sni)
    assert "Protocol  : TLSv1.1" in allowed.stdout, allowed.stdout + allowed.stderr


def test_tls13_only_where_the_policy_has_it(proxy: Proxy) -> None:
    assert "New, TLSv1.3, Cipher is" in openssl_s_client(proxy.port("h13"), "-tls1_3").stdout
    refused = openssl_s_client(proxy.port("h12"), "-tls1_3", "-servername", "a.wild.example.test")
    assert "alert protocol version" in refused.stderr
    ctx = client_context()
    with (
        socket.create_connection(("127.0.0.1", proxy.port("h12"))) as raw,
        ctx.wrap_socket(raw, server_hostname="exact.example.test") as tls,
    ):
        assert tls.version() == "TLSv1.2"


def test_plain_http_to_tls_port_gets_an_answer(proxy: Proxy) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port("h13")), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = s.recv(4096)
    assert reply.startswith(b"HTTP/1.1 400 ")
    assert (
        proxy.metric("alb_tls_handshake_failures_total", listener="h13", reason="http_request") >= 1
    )


def test_garbage_records_get_an_alert_and_the_listener_keeps_serving(
    proxy: Proxy, pki: Pki
) -> None:
    garbage = [
        b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00",
        b"\x16\x03\x01\xff\xff" + b"\x00" * 100,
        b"\x00" * 64,
        b"\x15\x03\x03\x00\x02\x02\x28",
    ]
    for payload in garbage:
        with socket.create_connection(("127.0.0.1", proxy.port("h13")), timeout=10) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := s.recv(4096):
                reply += chunk
        assert not reply or reply[0] == 0x15  # nothing, or a TLS alert record
    assert served_fingerprint(proxy.port("h13"), "exact.example.test") == pki.exact.fingerprint


def test_handshake_failures_are_logged_with_reason(proxy: Proxy) -> None:
    openssl_s_client(
        proxy.port("h12"),
        "-tls1_1",
        "-cipher",
        "DEFAULT@SECLEVEL=0",
        "-servername",
        "log.example.test",
    )
    assert "tls handshake failed listener=h12" in proxy.log
    assert "sni=log.example.test reason=protocol_version" in proxy.log


def test_client_that_rejects_our_certificate_is_counted(proxy: Proxy, tmp_path: Path) -> None:
    ctx = ssl.create_default_context()  # trusts the system store, not our test root
    with (
        socket.create_connection(("127.0.0.1", proxy.port("h13"))) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        ctx.wrap_socket(raw, server_hostname="exact.example.test")
    assert (
        proxy.metric(
            "alb_tls_handshake_failures_total", listener="h13", reason="client_rejected_certificate"
        )
        >= 1
    )
