"""HTTP/2 and HTTP/3 request fields -> forwardable requests (pure)."""

from __future__ import annotations

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
