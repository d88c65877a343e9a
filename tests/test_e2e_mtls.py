"""Mutual authentication against the real daemon, with real clients.

Each refusal is checked by the alert the client received and by the reason the daemon counted;
each acceptance by the response and the headers the backend saw.
"""

from __future__ import annotations

import functools
import json
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from certfactory import (
    DAY,
    NOW,
    SERVER_AUTH,
    make_ca,
    make_client,
    make_server,
    pem_of,
    serial_hex,
    write_pair,
    write_pem,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID
from harness import Backend, Proxy, client_context, start_proxy

from alb_proxy.certs.issue import Issued


@dataclass(frozen=True)
class ClientFiles:
    cert: Path
    key: Path
    issued: Issued


@dataclass(frozen=True)
class MtlsPki:
    server_ca: Path
    config_certs: list[dict[str, str]]
    clients: dict[str, ClientFiles]


@pytest.fixture(scope="module")
def mpki(tmp_path_factory: pytest.TempPathFactory) -> MtlsPki:
    out = tmp_path_factory.mktemp("mpki")
    server_root = make_ca("server root")
    ca_a, ca_b, ca_other = make_ca("client CA A"), make_ca("client CA B"), make_ca("unrelated CA")
    inter_a = make_ca("client intermediate A", issuer=ca_a)

    def server(name: str, names: list[str]) -> dict[str, str]:
        cert, key = write_pair(out, name, make_server(server_root, names))
        return {"id": name, "kind": "server", "cert": str(cert), "key": str(key)}

    write_pem(out / "ca-ab.pem", pem_of(ca_a, ca_b))
    write_pem(out / "ca-a.pem", pem_of(ca_a))
    write_pem(out / "ca-b.pem", pem_of(ca_b))
    certs = [
        server("s-default", ["default.example.test"]),
        server("s-exact", ["exact.example.test"]),
        server("s-wild", ["*.wild.example.test"]),
        {"id": "ca-ab", "kind": "ca", "cert": str(out / "ca-ab.pem")},
        {"id": "ca-a", "kind": "ca", "cert": str(out / "ca-a.pem")},
        {"id": "ca-b", "kind": "ca", "cert": str(out / "ca-b.pem")},
    ]
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "Zoë Doe"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, 'Acme, "Inc."'),
        ]
    )

    def client(name: str, issued: Issued, chain: tuple[Issued, ...] = ()) -> ClientFiles:
        cert, key = write_pair(out, name, issued, chain=chain)
        return ClientFiles(cert, key, issued)

    clients = {
        "good": client("good", make_client(ca_a, subject=subject)),
        "good-b": client("good-b", make_client(ca_b, "bob")),
        "via-intermediate": client("via-inter", make_client(inter_a, "carol"), (inter_a,)),
        "intermediate-not-sent": client("inter-missing", make_client(inter_a, "dave")),
        "other-ca": client("other", make_client(ca_other, "mallory")),
        "expired": client(
            "expired", make_client(ca_a, "old", not_before=NOW - 30 * DAY, not_after=NOW - DAY)
        ),
        "not-yet-valid": client(
            "future", make_client(ca_a, "new", not_before=NOW + DAY, not_after=NOW + 30 * DAY)
        ),
        "server-eku": client("server-eku", make_client(ca_a, "wrong-eku", eku=SERVER_AUTH)),
    }
    return MtlsPki(write_pem(out / "server-root.pem", pem_of(server_root)), certs, clients)


def mtls_listener(name: str, port: int, cas: list[str], **mtls: Any) -> dict[str, Any]:
    return {
        "name": name,
        "protocol": "HTTPS",
        "port": port,
        "bind": "127.0.0.1",
        "certificates": {"default": "s-default", "additional": ["s-exact", "s-wild"]},
        "mutual_authentication": {"enabled": True, "ca_certificates": cas, **mtls},
        "default_action": {"forward": "sg"},
    }


def base(mpki: MtlsPki, backend: Backend, listeners: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "instance": {"name": "t", "edition": "Standard"},
        "certificates": mpki.config_certs,
        "server_groups": [{"id": "sg", "servers": [{"host": "127.0.0.1", "port": backend.port}]}],
        "listeners": listeners,
    }


@pytest.fixture(scope="module")
def proxy(
    mpki: MtlsPki, demo_backend: Backend, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Proxy]:
    config = base(
        mpki,
        demo_backend,
        [
            mtls_listener("bundle", 9001, ["ca-ab"]),
            mtls_listener("separate", 9002, ["ca-a", "ca-b"]),
            mtls_listener("quiet", 9003, ["ca-ab"], headers={"serial": False, "issuerdn": False}),
            {
                "name": "plain",
                "protocol": "HTTPS",
                "port": 9004,
                "bind": "127.0.0.1",
                "certificates": {"default": "s-default"},
                "default_action": {"forward": "sg"},
            },
        ],
    )
    p = start_proxy(tmp_path_factory.mktemp("mtls"), config)
    yield p
    assert p.stop() == 0


VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


@functools.lru_cache
def _client_ctx(version: str, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    """One context per client identity: Python resumes a session only with its own context."""
    ctx = client_context(minimum_version=VERSIONS[version], maximum_version=VERSIONS[version])
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


@dataclass
class Attempt:
    outcome: str
    """``ok``, or the reason of the alert the client read."""
    echo: dict[str, Any] | None = None
    session: ssl.SSLSession | None = None
    reused: bool = False


def attempt(
    port: int,
    client: ClientFiles | None,
    *,
    sni: str | None = "default.example.test",
    version: str = "1.3",
    session: ssl.SSLSession | None = None,
    extra_headers: str = "",
) -> Attempt:
    """Connect, send one request, read the answer (TLS 1.3 refusals arrive after the client's
    side of the handshake is done, so the request is what surfaces them)."""
    ctx = _client_ctx(version, client.cert if client else None, client.key if client else None)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname=sni, session=session) as tls:
                request = f"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n{extra_headers}\r\n"
                tls.sendall(request.encode())
                reply = b""
                while chunk := tls.recv(65536):
                    reply += chunk
                got_session, reused = tls.session, tls.session_reused
        except ssl.SSLError as exc:
            return Attempt(str(exc.reason))
    if not reply.startswith(b"HTTP/1.1 200 "):
        return Attempt(f"http {reply[:12]!r}")
    return Attempt("ok", json.loads(reply.split(b"\r\n\r\n", 1)[1]), got_session, reused)


@pytest.mark.parametrize("listener", ["bundle", "separate"])
@pytest.mark.parametrize("who", ["good", "good-b", "via-intermediate"])
@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_clients_of_an_associated_ca_are_accepted(
    proxy: Proxy, mpki: MtlsPki, listener: str, who: str, version: str
) -> None:
    result = attempt(proxy.port(listener), mpki.clients[who], version=version)
    assert result.outcome == "ok" and result.echo is not None
    assert dict(result.echo["headers"])["x-forwarded-clientcert-clientverify"] == "SUCCESS"


# (client, what a TLS 1.3 client reads, what a TLS 1.2 client reads, the daemon's reason)
REFUSALS = [
    (
        None,
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
        "SSLV3_ALERT_HANDSHAKE_FAILURE",
        "no_client_certificate",
    ),
    ("other-ca", "TLSV1_ALERT_UNKNOWN_CA", "TLSV1_ALERT_UNKNOWN_CA", "unknown_ca"),
    ("intermediate-not-sent", "TLSV1_ALERT_UNKNOWN_CA", "TLSV1_ALERT_UNKNOWN_CA", "unknown_ca"),
    ("expired", "SSLV3_ALERT_CERTIFICATE_EXPIRED", "SSLV3_ALERT_CERTIFICATE_EXPIRED", "expired"),
    (
        "not-yet-valid",
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "not_yet_valid",
    ),
    (
        "server-eku",
        "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
        "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
        "unsupported_purpose",
    ),
]


@pytest.mark.parametrize(
    ("who", "alert13", "alert12", "reason"), REFUSALS, ids=[str(r[0]) for r in REFUSALS]
)
@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_refused_clients_get_the_matching_alert_and_are_counted(
    proxy: Proxy,
    mpki: MtlsPki,
    who: str | None,
    alert13: str,
    alert12: str,
    reason: str,
    version: str,
) -> None:
    before = proxy.metric("alb_tls_handshake_failures_total", listener="bundle", reason=reason)
    client = mpki.clients[who] if who else None
    outcome = attempt(proxy.port("bundle"), client, version=version).outcome
    assert outcome == (alert13 if version == "1.3" else alert12)
    after = proxy.metric("alb_tls_handshake_failures_total", listener="bundle", reason=reason)
    assert after == before + 1
    assert f"reason={reason}" in proxy.log


@pytest.mark.parametrize(
    "sni", ["default.example.test", "exact.example.test", "a.wild.example.test", None, "other.test"]
)
@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_every_sni_path_requires_the_client_certificate(
    proxy: Proxy, mpki: MtlsPki, sni: str | None, version: str
) -> None:
    port = proxy.port("bundle")
    assert attempt(port, mpki.clients["good"], sni=sni, version=version).outcome == "ok"
    assert attempt(port, None, sni=sni, version=version).outcome != "ok"
    assert attempt(port, mpki.clients["other-ca"], sni=sni, version=version).outcome != "ok"


def _dn_decode(value: str) -> str:
    from urllib.parse import unquote_to_bytes

    return unquote_to_bytes(value).decode("utf-8")


def test_backend_sees_exact_client_certificate_headers(proxy: Proxy, mpki: MtlsPki) -> None:
    good = mpki.clients["good"].issued.cert
    spoof = (
        "X-Forwarded-Clientcert-Subjectdn: CN=admin\r\n"
        "x-forwarded-clientcert-clientverify: SUCCESS\r\nX-FORWARDED-CLIENTCERT-SERIAL: 1\r\n"
    )
    echo = attempt(proxy.port("bundle"), mpki.clients["good"], extra_headers=spoof).echo
    assert echo is not None
    names = [name for name, _ in echo["headers"] if name.startswith("x-forwarded-clientcert")]
    assert sorted(names) == sorted(
        f"x-forwarded-clientcert-{n}"
        for n in ("subjectdn", "issuerdn", "fingerprint", "serial", "clientverify")
    )
    headers = dict(echo["headers"])
    subject = headers["x-forwarded-clientcert-subjectdn"]
    assert all(0x21 <= ord(c) <= 0x7E for c in subject)  # safe in a header value
    assert _dn_decode(subject) == good.subject.rfc4514_string()
    assert "Zoë Doe" in _dn_decode(subject) and 'Acme\\, \\"Inc.\\"' in _dn_decode(subject)
    assert _dn_decode(headers["x-forwarded-clientcert-issuerdn"]) == "CN=client CA A"
    assert headers["x-forwarded-clientcert-fingerprint"] == good.fingerprint(hashes.SHA256()).hex()
    assert headers["x-forwarded-clientcert-serial"] == serial_hex(good)
    assert headers["x-forwarded-clientcert-clientverify"] == "SUCCESS"


def test_headers_can_be_switched_off_per_listener(proxy: Proxy, mpki: MtlsPki) -> None:
    echo = attempt(
        proxy.port("quiet"),
        mpki.clients["good"],
        extra_headers="X-Forwarded-Clientcert-Serial: forged\r\n",
    ).echo
    assert echo is not None
    names = {name for name, _ in echo["headers"]}
    assert "x-forwarded-clientcert-serial" not in names
    assert "x-forwarded-clientcert-issuerdn" not in names
    assert "x-forwarded-clientcert-subjectdn" in names


def test_spoofed_headers_are_removed_without_mtls(proxy: Proxy) -> None:
    echo = attempt(
        proxy.port("plain"), None, extra_headers="X-Forwarded-Clientcert-Clientverify: SUCCESS\r\n"
    ).echo
    assert echo is not None
    assert not [n for n, _ in echo["headers"] if n.startswith("x-forwarded-clientcert")]


def test_curl_with_client_certificate(proxy: Proxy, mpki: MtlsPki) -> None:
    port = proxy.port("bundle")
    url = f"https://default.example.test:{port}/"
    common = [
        "curl",
        "-sS",
        "--cacert",
        str(mpki.server_ca),
        "--resolve",
        f"default.example.test:{port}:127.0.0.1",
    ]
    good = mpki.clients["good"]
    ok = subprocess.run(
        [*common, "--cert", str(good.cert), "--key", str(good.key), url],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ok.returncode == 0, ok.stderr
    assert (
        dict(json.loads(ok.stdout)["headers"])["x-forwarded-clientcert-clientverify"] == "SUCCESS"
    )
    refused = subprocess.run(
        [*common, "--http1.1", url], capture_output=True, text=True, timeout=30
    )
    assert refused.returncode != 0
    assert "alert" in refused.stderr and "certificate required" in refused.stderr
    over_h2 = subprocess.run([*common, "--http2", url], capture_output=True, text=True, timeout=30)
    assert over_h2.returncode != 0 and over_h2.stdout == ""


def test_openssl_s_client_sees_unknown_ca(proxy: Proxy, mpki: MtlsPki) -> None:
    other = mpki.clients["other-ca"]
    done = subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{proxy.port('bundle')}",
            "-tls1_2",
            "-cert",
            str(other.cert),
            "-key",
            str(other.key),
        ],
        input="",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "alert unknown ca" in done.stderr


OPENSSL_ALERTS = {
    "good": None,
    "via-intermediate": None,  # sends the intermediate that issued it
    "other-ca": "alert unknown ca",
    "intermediate-not-sent": "alert unknown ca",
    "expired": "alert certificate expired",
    "not-yet-valid": "alert bad certificate",
    "server-eku": "alert unsupported certificate",
}


@pytest.mark.parametrize(("who", "alert"), OPENSSL_ALERTS.items(), ids=OPENSSL_ALERTS.keys())
@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
def test_openssl_s_client_reads_the_alert_of_each_case(
    proxy: Proxy, mpki: MtlsPki, who: str, alert: str | None, version: str
) -> None:
    client = mpki.clients[who]
    done = subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{proxy.port('bundle')}",
            version,
            "-cert",
            str(client.cert),
            "-key",
            str(client.key),
            # s_client sends only the leaf of -cert; the intermediate goes by -cert_chain
            *(["-cert_chain", str(client.cert)] if who == "via-intermediate" else []),
            "-ign_eof",
        ],
        input="GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
        capture_output=True,
        text=True,
        timeout=30,
    )
    if alert is None:
        assert "HTTP/1.1 200 " in done.stdout, done.stderr
        assert "x-forwarded-clientcert-clientverify" in done.stdout.lower()
    else:
        assert alert in done.stderr, done.stderr
        assert "HTTP/1.1" not in done.stdout


@pytest.mark.parametrize(
    ("who", "alert"),
    [("expired", "certificate expired"), ("intermediate-not-sent", "unknown ca")],
)
def test_curl_reports_the_alert(proxy: Proxy, mpki: MtlsPki, who: str, alert: str) -> None:
    port, client = proxy.port("bundle"), mpki.clients[who]
    done = subprocess.run(
        [
            "curl",
            "-sS",
            "--http1.1",
            "--cacert",
            str(mpki.server_ca),
            "--resolve",
            f"default.example.test:{port}:127.0.0.1",
            "--cert",
            str(client.cert),
            "--key",
            str(client.key),
            f"https://default.example.test:{port}/",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode != 0 and done.stdout == ""
    assert alert in done.stderr, done.stderr


def test_renegotiation_is_refused(proxy: Proxy, mpki: MtlsPki) -> None:
    good = mpki.clients["good"]
    client = subprocess.Popen(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{proxy.port('bundle')}",
            "-tls1_2",
            "-cert",
            str(good.cert),
            "-key",
            str(good.key),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Keep stdin open: s_client asks for renegotiation on "R" and exits on the server's refusal.
    assert client.stdin is not None
    client.stdin.write("R\n")
    client.stdin.flush()
    client.wait(timeout=30)
    assert client.stdout is not None and client.stderr is not None
    out, err = client.stdout.read(), client.stderr.read()
    for stream in (client.stdin, client.stdout, client.stderr):
        stream.close()
    assert "RENEGOTIATING" in out + err  # the client did ask ...
    assert "no renegotiation" in err  # ... and the server refused with the alert


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_session_from_before_mtls_cannot_skip_the_certificate(
    mpki: MtlsPki, demo_backend: Backend, tmp_path: Path, version: str
) -> None:
    listener = mtls_listener("r", 9010, ["ca-a"])
    listener["mutual_authentication"]["enabled"] = False
    config = base(mpki, demo_backend, [listener])
    p = start_proxy(tmp_path, config)
    try:
        first = attempt(p.port("r"), None, version=version)
        assert first.outcome == "ok" and first.session is not None
        # Resumption works while nothing changed, so the check below is meaningful.
        again = attempt(p.port("r"), None, version=version, session=first.session)
        assert again.outcome == "ok" and again.reused
        listener["mutual_authentication"]["enabled"] = True
        assert p.reload(config)["state"] == "reloaded"
        after = attempt(p.port("r"), None, version=version, session=again.session or first.session)
        assert after.outcome in (
            "TLSV13_ALERT_CERTIFICATE_REQUIRED",
            "SSLV3_ALERT_HANDSHAKE_FAILURE",
        )
        assert attempt(p.port("r"), mpki.clients["good"], version=version).outcome == "ok"
    finally:
        assert p.stop() == 0
