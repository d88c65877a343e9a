"""Header rewriting for forwarding: X-Forwarded-*, client-cert headers, hop-by-hop removal."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from alb_proxy.http.headers import (
    HOP_BY_HOP,
    Header,
    request_headers_for_backend,
    response_headers_for_client,
    trailers_across,
)

ROOT = Path(__file__).resolve().parents[1]
IO_MODULES = {"asyncio", "socket", "ssl", "selectors"}


def forward(
    headers: list[Header],
    *,
    client_ip: str = "203.0.113.7",
    proto: str = "https",
    port: int = 8443,
    client_cert_headers: list[Header] | None = None,
) -> list[Header]:
    return request_headers_for_backend(
        headers,
        client_ip=client_ip,
        proto=proto,
        port=port,
        client_cert_headers=client_cert_headers or (),
    )


def values(headers: list[Header], name: bytes) -> list[bytes]:
    return [v for n, v in headers if n.lower() == name]


def test_plain_request_gets_forwarded_headers_after_its_own() -> None:
    out = forward([(b"host", b"example.com"), (b"accept", b"*/*"), (b"content-length", b"3")])
    assert out == [
        (b"host", b"example.com"),
        (b"accept", b"*/*"),
        (b"content-length", b"3"),
        (b"x-forwarded-for", b"203.0.113.7"),
        (b"x-forwarded-proto", b"https"),
        (b"x-forwarded-port", b"8443"),
        (b"x-forwarded-host", b"example.com"),
    ]


def test_xff_appends_to_existing_value() -> None:
    out = forward([(b"host", b"h"), (b"x-forwarded-for", b"198.51.100.1")])
    assert values(out, b"x-forwarded-for") == [b"198.51.100.1, 203.0.113.7"]


def test_multiple_xff_headers_are_combined_into_one() -> None:
    out = forward(
        [
            (b"x-forwarded-for", b"10.0.0.1,10.0.0.2"),
            (b"host", b"h"),
            (b"X-Forwarded-For", b" 10.0.0.3 , "),
        ],
        client_ip="2001:db8::1",
    )
    assert values(out, b"x-forwarded-for") == [b"10.0.0.1, 10.0.0.2, 10.0.0.3, 2001:db8::1"]


def test_spoofed_forwarded_headers_are_replaced() -> None:
    out = forward(
        [
            (b"host", b"real.example"),
            (b"x-forwarded-proto", b"http"),
            (b"x-forwarded-port", b"1"),
            (b"x-forwarded-host", b"evil.example"),
        ],
        proto="http",
        port=8080,
    )
    assert values(out, b"x-forwarded-proto") == [b"http"]
    assert values(out, b"x-forwarded-port") == [b"8080"]
    assert values(out, b"x-forwarded-host") == [b"real.example"]


def test_no_host_means_no_forwarded_host() -> None:
    out = forward([(b"x-forwarded-host", b"evil.example")])
    assert values(out, b"x-forwarded-host") == []


def test_client_cert_headers_from_client_are_removed_in_any_case() -> None:
    own = [(b"x-forwarded-clientcert-clientverify", b"SUCCESS")]
    out = forward(
        [
            (b"host", b"h"),
            (b"x-forwarded-clientcert-subjectdn", b"CN=admin"),
            (b"X-Forwarded-ClientCert-Fingerprint", b"00"),
            (b"X-FORWARDED-CLIENTCERT", b"x"),
            (b"x-forwarded-clientcertificate", b"not ours, kept"),
        ],
        client_cert_headers=own,
    )
    assert [n for n, _ in out if n.lower().startswith(b"x-forwarded-clientcert")] == [
        b"x-forwarded-clientcertificate",
        b"x-forwarded-clientcert-clientverify",
    ]
    assert out[-1] == own[0]


def test_underscore_spellings_never_reach_the_backend() -> None:
    out = forward(
        [
            (b"host", b"x"),
            (b"X-Forwarded-Clientcert_Subjectdn", b"CN=admin"),
            (b"X_Forwarded_For", b"6.6.6.6"),
            (b"x_custom", b"1"),
            (b"x-custom", b"2"),
        ]
    )
    assert not [name for name, _ in out if b"_" in name]
    assert values(out, b"x-custom") == [b"2"]
    assert values(out, b"x-forwarded-for") == [b"203.0.113.7"]


def test_trailers_carry_no_spoofed_steering_or_framing_field() -> None:
    sent = [
        (b"X-Forwarded-Clientcert-Subjectdn", b"CN=admin"),
        (b"X-Forwarded-For", b"6.6.6.6"),
        (b"Host", b"evil"),
        (b"Content-Length", b"50"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Authorization", b"Bearer x"),
        (b"x_checksum", b"1"),
        (b"X-Checksum", b"abc"),
        (b"server-timing", b"db;dur=53"),
    ]
    assert trailers_across(sent) == [(b"X-Checksum", b"abc"), (b"server-timing", b"db;dur=53")]


def test_hop_by_hop_and_connection_named_headers_are_removed() -> None:
    headers = [(name, b"x") for name in sorted(HOP_BY_HOP)] + [
        (b"host", b"h"),
        (b"connection", b"keep-alive, X-Secret ,x-other"),
        (b"Connection", b"close"),
        (b"x-secret", b"1"),
        (b"x-other", b"2"),
        (b"close", b"3"),
        (b"x-kept", b"4"),
    ]
    out = forward(headers)
    assert [n for n, _ in out][:2] == [b"host", b"x-kept"]
    assert not {n for n, _ in out} & (HOP_BY_HOP | {b"x-secret", b"x-other", b"close"})


def test_connection_cannot_remove_host_content_length_or_forwarded_headers() -> None:
    out = forward(
        [
            (b"host", b"h"),
            (b"content-length", b"5"),
            (b"connection", b"host, content-length, x-forwarded-for, x-forwarded-proto"),
            (b"x-forwarded-for", b"10.0.0.1"),
        ]
    )
    assert values(out, b"host") == [b"h"]
    assert values(out, b"content-length") == [b"5"]
    assert values(out, b"x-forwarded-for") == [b"203.0.113.7"]  # the client's hop is dropped
    assert values(out, b"x-forwarded-proto") == [b"https"]


def test_response_headers_lose_hop_by_hop_and_keep_content_length() -> None:
    out = response_headers_for_client(
        [
            (b"content-type", b"text/plain"),
            (b"transfer-encoding", b"chunked"),
            (b"connection", b"keep-alive, x-backend-hop"),
            (b"keep-alive", b"timeout=5"),
            (b"x-backend-hop", b"1"),
            (b"content-length", b"12"),
            (b"set-cookie", b"a=1"),
            (b"set-cookie", b"b=2"),
        ]
    )
    assert out == [
        (b"content-type", b"text/plain"),
        (b"content-length", b"12"),
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
    ]


_names = st.sampled_from(
    [
        *HOP_BY_HOP,
        b"host",
        b"content-length",
        b"x-forwarded-for",
        b"x-forwarded-host",
        b"x-forwarded-clientcert-serial",
        b"x-a",
        b"x-b",
        b"accept",
    ]
) | st.from_regex(rb"\A[a-z][a-z0-9-]{0,10}\Z")
_values = st.binary(max_size=20).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


def _cased(name: bytes, upper: bool) -> bytes:
    return name.upper() if upper else name


@given(
    st.lists(st.tuples(_names, _values, st.booleans()), max_size=15),
    st.lists(st.lists(_names, max_size=3), max_size=2),
)
def test_output_never_holds_hop_by_hop_or_connection_named(
    raw: list[tuple[bytes, bytes, bool]], connection_lists: list[list[bytes]]
) -> None:
    headers = [(_cased(n, upper), v) for n, v, upper in raw]
    headers += [(b"connection", b", ".join(names)) for names in connection_lists]
    named = {n for names in connection_lists for n in names} - {b"host", b"content-length"}
    out = forward(headers)
    out_names = [n.lower() for n, _ in out]
    proxied = {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-port", b"x-forwarded-host"}
    assert not set(out_names) & (HOP_BY_HOP | (named - proxied))
    assert [out_names.count(name) for name in sorted(proxied - {b"x-forwarded-host"})] == [1, 1, 1]
    assert values(out, b"x-forwarded-for")[0].endswith(b"203.0.113.7")
    assert not any(n.startswith(b"x-forwarded-clientcert") for n in out_names)
    expected_rest = [
        (n, v)
        for n, v in headers
        if (k := n.lower()) not in HOP_BY_HOP | named | proxied
        and not k.startswith(b"x-forwarded-clientcert")
    ]
    assert [(n, v) for n, v in out if n.lower() not in proxied] == expected_rest
    assert not set(n.lower() for n, _ in response_headers_for_client(headers)) & (
        HOP_BY_HOP | named
    )


def test_module_is_pure() -> None:
    code = f"import sys, alb_proxy.http.headers; print(sorted({IO_MODULES!r} & set(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"


def test_trailers_lose_pseudo_headers_and_what_http11_cannot_carry() -> None:
    trailers = [(b":path", b"/x"), (b"x-ok", b"1"), (b"x-bad", b"a\r\nb"), (b"x,y", b"1")]
    assert trailers_across(trailers) == [(b"x-ok", b"1")]
