"""What headers a backend and a client see when the proxy forwards: pure functions on header lists.

Headers are ``list[tuple[bytes, bytes]]`` as the front ends give them (names lowercase, order
kept).
Names are still compared lowercased here, so a caller holding raw-cased names gets the same rules.

Hop-by-hop headers describe one connection, not the message, so they never cross the proxy
(RFC 9110 §7.6.1): the fixed set below plus every name a ``Connection`` header lists. Framing is
redone by the sending side (Content-Length or chunked, chosen per hop), which is why
``transfer-encoding`` goes and ``content-length`` stays.

A client may list any name in ``Connection`` to make a proxy drop it. Two names are exempt:
``host`` (the backend routes on it) and ``content-length`` (it frames the body). The headers the
proxy sets itself are added after the removal, so a client cannot suppress them that way
(the trick behind CVE-2022-31813 in Apache's mod_proxy).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

Header = tuple[bytes, bytes]

HOP_BY_HOP: frozenset[bytes] = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"transfer-encoding",
        b"upgrade",
    }
)
"""Connection-level headers removed in both directions (RFC 2616 §13.5.1, plus proxy-connection)."""

KEPT_DESPITE_CONNECTION: frozenset[bytes] = frozenset({b"host", b"content-length"})
"""End-to-end names a ``Connection`` header may not remove (see the module docstring)."""

CLIENT_CERT_PREFIX = b"x-forwarded-clientcert"
"""Only the proxy may set these (mutual TLS results): any copy from the client is removed."""

_SET_BY_PROXY = frozenset(
    {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-port", b"x-forwarded-host"}
)

NOT_IN_TRAILERS: frozenset[bytes] = frozenset(
    {
        # framing, routing and control (RFC 9110 §6.5.1): a recipient merging trailers into
        # the header section must never be steered by them
        b"content-length",
        b"host",
        b"trailer",
        b"expect",
        b"max-forwards",
        b"cache-control",
        b"range",
        b"if-match",
        b"if-none-match",
        b"if-modified-since",
        b"if-unmodified-since",
        b"if-range",
        b"authorization",
        b"cookie",
        b"set-cookie",
        b"www-authenticate",
        b"location",
        b"retry-after",
        b"vary",
        b"age",
        b"expires",
        b"date",
        b"content-encoding",
        b"content-type",
        b"content-range",
        b"forwarded",
        b"via",
    }
)
"""Fields a trailer section may not carry across the proxy, beside the hop-by-hop set and the
proxy's own ``X-Forwarded-*``."""


def connection_tokens(headers: Sequence[Header]) -> frozenset[bytes]:
    """Lowercased names listed by every ``Connection`` header, minus the exempt ones."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(token.strip().lower() for token in value.split(b","))
    tokens.discard(b"")
    return frozenset(tokens - KEPT_DESPITE_CONNECTION)


def without_hop_by_hop(headers: Sequence[Header]) -> list[Header]:
    """``headers`` minus the fixed hop-by-hop set and the names ``Connection`` lists; order kept."""
    kept = [(name, value) for name, value in headers if name.lower() not in HOP_BY_HOP]
    if len(kept) == len(headers):
        return kept  # no Connection header (it is hop-by-hop itself): nothing else to drop
    named = connection_tokens(headers)
    return [(name, value) for name, value in kept if name.lower() not in named] if named else kept


def response_headers_for_client(headers: Sequence[Header]) -> list[Header]:
    """A backend's response headers as the client gets them."""
    return without_hop_by_hop(headers)


_TRAILER_NAME = re.compile(rb"[-!#$%&'*+.^`|~0-9a-z]+")
_UNSAFE_IN_VALUE = re.compile(rb"[\x00\r\n]")


def trailers_across(trailers: Sequence[Header]) -> list[Header]:
    """A trailer section as it may cross the proxy, either way: what RFC 9110 §6.5.1 forbids in
    trailers, hop-by-hop fields, the proxy's own ``X-Forwarded-*`` (client-certificate results
    included) and names with an underscore are dropped, so nothing spoofed or steering can
    ride in after the body."""
    return [
        (name, value)
        for name, value in trailers
        if (key := name.lower()) not in HOP_BY_HOP
        and key not in NOT_IN_TRAILERS
        and not key.startswith(b"x-forwarded-")
        and b"_" not in key
        and _TRAILER_NAME.fullmatch(key)  # no pseudo-header, nothing HTTP/1.1 cannot carry
        and not _UNSAFE_IN_VALUE.search(value)
    ]


def is_client_cert_header(name: bytes) -> bool:
    """``X-Forwarded-Clientcert`` or ``X-Forwarded-Clientcert-*``, in any case."""
    key = name.lower()
    return key == CLIENT_CERT_PREFIX or key.startswith(CLIENT_CERT_PREFIX + b"-")


def request_headers_for_backend(
    headers: Sequence[Header],
    *,
    client_ip: str,
    proto: str,
    port: int,
    client_cert_headers: Sequence[Header] = (),
) -> list[Header]:
    """A client's request headers as the backend gets them.

    Everything end-to-end keeps its place (``Host`` included). The client's ``X-Forwarded-For``
    entries are merged into one header ending with ``client_ip``; ``X-Forwarded-Proto``,
    ``-Port`` and ``-Host`` (the ``Host`` value; omitted without ``Host``) replace whatever the
    client sent. They are appended after the kept headers, followed by ``client_cert_headers``
    (the proxy's own mutual-TLS results; any client copies are gone by then).
    """
    forwarded_for: list[bytes] = []
    host: bytes | None = None
    out: list[Header] = []
    for name, value in without_hop_by_hop(headers):
        key = name.lower()
        if b"_" in key:
            # Dropped like nginx does by default: CGI-style backends read ``X_Forwarded_For``
            # and ``X-Forwarded-For`` as one variable, so an underscore spelling could pass
            # for a header the proxy sets.
            continue
        if key == b"x-forwarded-for":
            forwarded_for.extend(p for part in value.split(b",") if (p := part.strip()))
            continue
        if key in _SET_BY_PROXY or is_client_cert_header(key):
            continue
        if key == b"host" and host is None:
            host = value
        out.append((name, value))
    forwarded_for.append(client_ip.encode("ascii"))
    out.append((b"x-forwarded-for", b", ".join(forwarded_for)))
    out.append((b"x-forwarded-proto", proto.encode("ascii")))
    out.append((b"x-forwarded-port", str(port).encode("ascii")))
    if host is not None:
        out.append((b"x-forwarded-host", host))
    out.extend(client_cert_headers)
    return out
