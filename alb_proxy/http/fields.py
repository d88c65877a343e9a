"""Request fields of HTTP/2 and HTTP/3 (pseudo-headers) turned into a forwardable request.

Pure, and shared by both adapters so they cannot drift: ``:authority`` becomes ``Host``, the
header section is bounded like an HTTP/1.1 head, and CONNECT (a tunnel, not a request) is
refused.

The request goes to the backend as HTTP/1.1 text, written as it is given, so every field must be
something an HTTP/1.1 request line or header may carry. HTTP/2 and HTTP/3 framing lets a client
send what HTTP/1.1 syntax cannot (a space in ``:path`` would make the backend read the rest as
the protocol version; a comma in a header name, a vertical tab in a value, a ``:path`` that is
not a path at all); the h2 library and aioquic check only part of it (RFC 9113 §8.2.1 rules out
NUL, CR and LF, nothing more). Whatever the HTTP/1.1 front end refuses as a bad request line or
header gets the same 400 here, before anything is sent upstream.

The rest of what makes an HTTP/2 request malformed (RFC 9113 §8.1.1: uppercase names,
connection-specific fields, pseudo-headers unknown, repeated or after regular fields) is checked
here too, rather than by the h2 library: h2 ends the whole connection over one malformed
request, which costs every other stream on it; the RFC asks for that request's stream alone.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus

from alb_proxy.http.forward import ForwardRequest, Header

_PER_FIELD_OVERHEAD = 32
"""Counted per field as HTTP/2's SETTINGS_MAX_HEADER_LIST_SIZE counts it (RFC 9113 §6.5.2)."""

# The HTTP/1.1 grammar (RFC 9110 §5.1, §5.5, RFC 9112 §3.2), with h11's reading of it.
_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_FIELD_VALUE = re.compile(rb"(?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?")
"""Visible bytes and obs-text, single spaces or tabs between them, none at either end."""
_ORIGIN_FORM = re.compile(rb"/[\x21-\x7e]*")
"""``:path`` of an http(s) request: absolute path and query, visible ASCII (RFC 9113 §8.3.1)."""
_AUTHORITY = re.compile(rb"[-A-Za-z0-9._~%!$&'()*+,;=:\[\]]+")
"""host[:port] in URI characters, no userinfo (RFC 3986 §3.2, RFC 9113 §8.3.1); it becomes the
``Host`` header."""
_CONTENT_LENGTH = re.compile(rb"[0-9]{1,20}")
_NAME = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-z]+")
"""A token in lowercase: HTTP/2 and HTTP/3 field names are lowercase (RFC 9113 §8.2.1)."""
_REQUEST_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path"})
_CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
"""Malformed in HTTP/2 and HTTP/3 (RFC 9113 §8.2.2); ``te`` is allowed as "trailers" only."""


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
    misplaced = False
    for name, value in fields:
        size += len(name) + len(value) + _PER_FIELD_OVERHEAD
        if name.startswith(b":"):
            # Known, once each, all before the first regular field (RFC 9113 §8.3).
            misplaced |= bool(headers) or host is not None
            misplaced |= name not in _REQUEST_PSEUDO or name in pseudo
            pseudo[name] = value
        elif name == b"host":
            misplaced |= host is not None
            host = value
        else:
            headers.append((name, value))
    if size > max_bytes:
        return Refusal(431, f"header section of {size} bytes")
    if misplaced:
        return Refusal(400, "unknown, repeated or misplaced pseudo-header (or a second host)")
    method, path = pseudo.get(b":method"), pseudo.get(b":path")
    authority = pseudo.get(b":authority")
    if not authority:
        authority = host
    if not method or not path or not authority or method == b"CONNECT":
        return Refusal(400, "missing or unsupported pseudo-headers")
    if not pseudo.get(b":scheme"):
        return Refusal(400, "missing :scheme")
    if host is not None and b":authority" in pseudo and host != pseudo[b":authority"]:
        return Refusal(400, "host differs from :authority")
    if problem := _invalid(method, path, authority, headers):
        return Refusal(400, problem)
    lengths = {p.strip() for n, v in headers if n == b"content-length" for p in v.split(b",")}
    if len(lengths) > 1 or not all(_CONTENT_LENGTH.fullmatch(length) for length in lengths):
        return Refusal(400, "invalid content-length")
    if ended and lengths and lengths != {b"0"}:
        # The stream ended with its headers: no body will come. Forwarded as it is, the length
        # would make the backend read the next request on its connection as this one's body.
        return Refusal(400, "content-length announces a body the request does not have")
    headers.insert(0, (b"host", authority))
    return ForwardRequest(
        method=method,
        target=path,
        headers=headers,
        has_body=not ended and lengths != {b"0"},
        client_ip=client_ip,
        client_cert_headers=client_cert_headers,
    )


def _invalid(method: bytes, path: bytes, authority: bytes, headers: Sequence[Header]) -> str:
    """Why these fields cannot make an HTTP/1.1 request (empty: they can)."""
    if not _TOKEN.fullmatch(method):
        return "invalid :method"
    if not (_ORIGIN_FORM.fullmatch(path) or (path == b"*" and method == b"OPTIONS")):
        return "invalid :path"
    if not _AUTHORITY.fullmatch(authority):
        return "invalid :authority"
    for name, value in headers:
        if not _NAME.fullmatch(name) or not _FIELD_VALUE.fullmatch(value):
            return "invalid header field"
        if name in _CONNECTION_SPECIFIC or (name == b"te" and value != b"trailers"):
            return f"connection-specific header field {name.decode()}"
    return ""


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
