"""Request fields of HTTP/2 and HTTP/3 (pseudo-headers) turned into a forwardable request.

Pure, and shared by both adapters so they cannot drift: ``:authority`` becomes ``Host``, the
header section is bounded like an HTTP/1.1 head, and CONNECT (a tunnel, not a request) is
refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus

from alb_proxy.http.forward import ForwardRequest, Header

_PER_FIELD_OVERHEAD = 32
"""Counted per field as HTTP/2's SETTINGS_MAX_HEADER_LIST_SIZE counts it (RFC 9113 §6.5.2)."""


@dataclass(frozen=True)
class Refusal:
    status: int
    detail: str


def request_from_fields(
    fields: Sequence[tuple[bytes, bytes]],
    *,
    ended: bool,
    client_ip: str,
    client_cert_headers: Sequence[Header] = (),
    max_bytes: int = 64 * 1024,
) -> ForwardRequest | Refusal:
    pseudo: dict[bytes, bytes] = {}
    headers: list[Header] = []
    size = 0
    host = None
    for name, value in fields:
        size += len(name) + len(value) + _PER_FIELD_OVERHEAD
        if name.startswith(b":"):
            pseudo[name] = value
        elif name == b"host":
            host = value
        else:
            headers.append((name, value))
    if size > max_bytes:
        return Refusal(431, f"header section of {size} bytes")
    method, path = pseudo.get(b":method"), pseudo.get(b":path")
    authority = pseudo.get(b":authority") or host
    if not method or not path or not authority or method == b"CONNECT":
        return Refusal(400, "missing or unsupported pseudo-headers")
    headers.insert(0, (b"host", authority))
    declared = next((v.strip() for n, v in headers if n == b"content-length"), b"")
    return ForwardRequest(
        method=method,
        target=path,
        headers=headers,
        has_body=not ended and declared != b"0",
        client_ip=client_ip,
        client_cert_headers=client_cert_headers,
    )


def host_of(authority: bytes) -> str:
    """``host`` of ``host:port`` or ``[v6]:port``, lowercased."""
    text = authority.decode("latin-1")
    if text.startswith("["):
        return text[1 : text.find("]")].lower()
    return text.rsplit(":", 1)[0].lower() if ":" in text else text.lower()


def error_response(status: int) -> tuple[list[Header], bytes]:
    """Headers and body of the short text answer the proxy gives itself."""
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else ""
    body = f"{status} {phrase}\n".encode()
    return [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
    ], body
