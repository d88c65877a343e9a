"""HTTP/2 and HTTP/3 request fields -> forwardable requests (pure)."""

from __future__ import annotations

import h11
import pytest
from hypothesis import given
from hypothesis import strategies as st

from alb_proxy.http.fields import Refusal, error_response, host_of, request_from_fields
from alb_proxy.http.forward import ForwardRequest

BASE = [
    (b":method", b"GET"),
    (b":scheme", b"https"),
    (b":authority", b"a.example:8443"),
    (b":path", b"/p?q=1"),
]


def test_authority_becomes_host_first_and_pseudo_fields_go() -> None:
    request = request_from_fields([*BASE, (b"x-a", b"1")], ended=True, client_ip="10.0.0.1")
    assert isinstance(request, ForwardRequest)
    assert request.headers == [(b"host", b"a.example:8443"), (b"x-a", b"1")]
    assert (request.method, request.target, request.has_body) == (b"GET", b"/p?q=1", False)


def test_body_unless_ended_or_declared_empty() -> None:
    assert request_from_fields(BASE, ended=False, client_ip="-").has_body  # type: ignore[union-attr]
    empty = request_from_fields([*BASE, (b"content-length", b"0")], ended=False, client_ip="-")
    assert isinstance(empty, ForwardRequest) and not empty.has_body


def test_refusals() -> None:
    assert request_from_fields(BASE[1:], ended=True, client_ip="-") == Refusal(
        400, "missing or unsupported pseudo-headers"
    )
    connect = [(b":method", b"CONNECT"), (b":authority", b"x:443")]
    assert request_from_fields(connect, ended=True, client_ip="-").status == 400  # type: ignore[union-attr]
    big = [*BASE, *((b"x-%d" % i, b"v" * 1000) for i in range(70))]
    assert request_from_fields(big, ended=True, client_ip="-").status == 431  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        (b":path", b"/a b"),  # the tester's case: HTTP/1.1 would read "b" as the version
        (b":path", b"/a\tb"),
        (b":path", b"/caf\xc3\xa9"),
        (b":path", b"/\x7f"),
        (b":path", b"a/b"),  # not origin-form
        (b":path", b"http://a.example/"),
        (b":path", b"*"),  # only for OPTIONS
        (b":method", b"GET /x"),
        (b":method", b"G\x00T"),
        (b":authority", b"a.example b"),
        (b":authority", b"user@a.example"),
        (b":authority", b"a.example/x"),
    ],
)
def test_what_http11_cannot_carry_gets_400(name: bytes, value: bytes) -> None:
    fields = [(n, value if n == name else v) for n, v in BASE]
    refusal = request_from_fields(fields, ended=True, client_ip="-")
    assert isinstance(refusal, Refusal) and refusal.status == 400, refusal
    assert name.decode() in refusal.detail


@pytest.mark.parametrize(
    "header",
    [
        (b"x a", b"1"),
        (b"x,a", b"1"),
        (b"x(a)", b"1"),
        (b"", b"1"),
        (b"x-a", b" 1"),
        (b"x-a", b"1\t"),
        (b"x-a", b"1\x0b2"),
        (b"x-a", b"1\x0c"),
        (b"x-a", b"1\r\n2"),
        (b"x-a", b"1\x002"),
    ],
)
def test_header_fields_http11_cannot_carry_get_400(header: tuple[bytes, bytes]) -> None:
    assert request_from_fields([*BASE, header], ended=True, client_ip="-") == Refusal(
        400, "invalid header field"
    )


@pytest.mark.parametrize("value", [b"abc", b"-1", b"1, 2", b"1" * 21, b""])
def test_bad_content_length_gets_400(value: bytes) -> None:
    fields = [*BASE, (b"content-length", value)]
    assert request_from_fields(fields, ended=False, client_ip="-") == Refusal(
        400, "invalid content-length"
    )
    twice = [*BASE, (b"content-length", b"1"), (b"content-length", b"2")]
    assert request_from_fields(twice, ended=False, client_ip="-") == Refusal(
        400, "invalid content-length"
    )


def test_a_length_on_a_request_without_body_gets_400() -> None:
    """HEADERS with END_STREAM and content-length: 42 would leave the backend waiting for 42
    bytes, to be taken from the next request on its connection (smuggling)."""
    fields = [*BASE, (b"content-length", b"42")]
    refused = request_from_fields(fields, ended=True, client_ip="-")
    assert isinstance(refused, Refusal) and refused.status == 400
    zero = request_from_fields([*BASE, (b"content-length", b"0")], ended=True, client_ip="-")
    assert isinstance(zero, ForwardRequest) and not zero.has_body


@pytest.mark.parametrize(
    "fields",
    [
        [*BASE, (b"X-Upper", b"1")],
        [*BASE, (b"connection", b"close")],
        [*BASE, (b"keep-alive", b"5")],
        [*BASE, (b"transfer-encoding", b"chunked")],
        [*BASE, (b"upgrade", b"h2c")],
        [*BASE, (b"te", b"gzip")],
        [*BASE, (b"x-a", b" padded")],
        [*BASE, (b"", b"empty name")],
        [*BASE, (b":method", b"POST")],  # repeated
        [*BASE, (b":status", b"200")],  # a response's
        [*BASE[:2], (b"x-a", b"1"), *BASE[2:]],  # pseudo after a regular field
        [*BASE[:1], *BASE[2:]],  # no :scheme
        [*BASE, (b"host", b"b.example")],  # host differs from :authority
        [*BASE[:2], BASE[3], (b"host", b"a"), (b"host", b"b")],
    ],
)
def test_malformed_http2_requests_get_400_on_their_stream_alone(
    fields: list[tuple[bytes, bytes]],
) -> None:
    refused = request_from_fields(fields, ended=True, client_ip="-")
    assert isinstance(refused, Refusal) and refused.status == 400, refused


def test_te_trailers_and_a_matching_host_pass() -> None:
    fields = [*BASE, (b"te", b"trailers"), (b"host", b"a.example:8443")]
    assert isinstance(request_from_fields(fields, ended=True, client_ip="-"), ForwardRequest)


def test_valid_unusual_requests_pass() -> None:
    options = [
        (b":method", b"OPTIONS"),
        (b":scheme", b"https"),
        (b":authority", b"[::1]:8443"),
        (b":path", b"*"),
    ]
    assert isinstance(request_from_fields(options, ended=True, client_ip="-"), ForwardRequest)
    fields = [
        (b":method", b"PURGE"),
        (b":scheme", b"https"),
        (b":authority", b"xn--caf-dma.example"),
        (b":path", b'/%20a?q={"j":[1,2]}|~^`'),
        (b"x-a", b"caf\xc3\xa9 au\tlait"),
        (b"x-empty", b""),
        (b"content-length", b"5, 5"),
    ]
    request = request_from_fields(fields, ended=False, client_ip="-")
    assert isinstance(request, ForwardRequest) and request.has_body
    zero = request_from_fields([*BASE, (b"content-length", b"0")], ended=False, client_ip="-")
    assert isinstance(zero, ForwardRequest) and not zero.has_body


def test_host_of() -> None:
    assert host_of(b"A.Example:8443") == "a.example"
    assert host_of(b"[::1]:443") == "::1"
    assert host_of(b"example") == "example"


def test_error_response_is_self_consistent() -> None:
    headers, body = error_response(421)
    assert body == b"421 Misdirected Request\n"
    assert (b"content-length", str(len(body)).encode()) in headers


@given(
    st.lists(st.tuples(st.binary(max_size=40), st.binary(max_size=40)), max_size=20), st.booleans()
)
def test_any_fields_give_a_request_or_a_refusal(
    fields: list[tuple[bytes, bytes]], ended: bool
) -> None:
    assert isinstance(
        request_from_fields(fields, ended=ended, client_ip="-"), ForwardRequest | Refusal
    )


_VALUES = st.binary(max_size=12) | st.sampled_from([b"/", b"/a b", b"*", b"GET", b"a.example"])


@given(
    st.lists(
        st.tuples(
            st.sampled_from([b":method", b":path", b":authority", b"host", b"x-a", b"x a"]),
            _VALUES,
        ),
        max_size=8,
    )
)
def test_a_request_is_always_one_http11_can_send(fields: list[tuple[bytes, bytes]]) -> None:
    """h11, a strict HTTP/1.1 serialiser, takes every request made: nothing in one can break
    the request line or header block the backend receives."""
    request = request_from_fields(fields, ended=True, client_ip="-")
    if isinstance(request, ForwardRequest):
        h11.Request(method=request.method, target=request.target, headers=request.headers)
