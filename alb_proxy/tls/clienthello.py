"""Parse a TLS ClientHello from the first bytes of a connection, before OpenSSL sees them.

Theory of operation
-------------------
The TLS server must choose the ``SSLContext`` (certificate, policy, verify mode) *before* it
creates the SSL object, so it buffers the connection's first bytes, asks this module for the
ClientHello's SNI and ALPN, picks a context, and then feeds the very same bytes to OpenSSL through
a ``MemoryBIO``. This module therefore only reads: it never consumes, rewrites or answers bytes,
and OpenSSL stays the judge of everything it does not need (versions, suites, signatures, ...).

The function is pure and stateless: the caller passes the whole buffer received so far on every
call, and gets one of exactly three outcomes, which the property tests hold it to:

* ``None``: the ClientHello is not complete yet; call again with more bytes;
* a ``ClientHello``: the complete handshake message was found;
* ``ClientHelloError``: the bytes are not a TLS ClientHello, or a malformed one.

The hard parts:

* A handshake message may span several records (type 22) and a record may arrive in pieces, so
  the record layer is unwrapped first, and the message is parsed only when all of its bytes are
  present. The message type and length are checked as soon as their 4 bytes arrive, so garbage
  and oversized messages are refused early rather than buffered.
* Being stateless means each call walks every record header again. A client sending 1-byte
  records could make that quadratic, so a ClientHello may span at most ``MAX_RECORDS`` records.
  With that and ``MAX_CLIENT_HELLO``, a buffer for which this returns ``None`` is never longer
  than ``MAX_BUFFERED``: the caller needs no other size limit.
* Every length field is checked against its container before it is used (``_Reader``, and by
  hand in the hot extension loop), so a malformed extension block is a ``ClientHelloError`` and
  never an ``IndexError`` or ``struct.error``; hypothesis feeds it garbage and mutated hellos.
* Bytes after the end of the ClientHello (a TLS 1.3 client's early data, or anything else) are
  not looked at: they are OpenSSL's business.

Only the structure of the extensions we read is checked strictly (server_name, ALPN,
supported_versions), plus the whole-message framing and duplicate extension types; unknown
extensions and GREASE values pass through untouched.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from alb_proxy.errors import AlbError

MAX_CLIENT_HELLO = 64 * 1024
"""Largest ClientHello handshake body accepted (real ones are ~300–2000 bytes; a post-quantum
key share adds ~1.2 KiB). Larger ones are refused rather than buffered."""

MAX_RECORDS = 64
"""Most TLS records a ClientHello may be split into (real clients use one; DPI-evasion tools a
few). Bounds the cost of re-walking the record headers on every call."""

MAX_RECORD_PAYLOAD = 2**14
"""RFC 8446 §5.1: a plaintext record carries at most 2^14 bytes."""

MAX_BUFFERED = 4 + MAX_CLIENT_HELLO + 5 * (MAX_RECORDS + 1)
"""Longest buffer for which ``parse_client_hello`` may still return ``None``."""

_HANDSHAKE = 22
_CLIENT_HELLO = 1
_EXT_SERVER_NAME = 0
_EXT_ALPN = 16
_EXT_SUPPORTED_VERSIONS = 43
_SNI_HOST_NAME = 0
_MAX_HOST_NAME = 255
_VISIBLE_ASCII = bytes(range(0x21, 0x7F))
_UPPER_ASCII = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")


class ClientHelloError(AlbError):
    """The first bytes of a connection are not a (well-formed) TLS ClientHello."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ClientHello:
    """What the TLS server needs from a ClientHello to choose a context, and to log."""

    server_name: str | None
    """First ``host_name`` of the server_name extension, exactly as sent (not lowercased, a
    trailing dot kept); ``None`` without SNI. Only visible ASCII, at most 255 bytes."""
    alpn_protocols: tuple[str, ...]
    """ALPN protocol names in the client's order, decoded as Latin-1 (lossless: names are opaque
    bytes, GREASE included); empty without the extension."""
    legacy_version: int
    """``ClientHello.legacy_version`` (0x0303 for TLS 1.2 and 1.3 clients, 0x0301 for TLS 1.0)."""
    supported_versions: tuple[int, ...]
    """The supported_versions extension as sent (GREASE included); empty when absent."""
    cipher_suites: tuple[int, ...]
    """Cipher suite code points in the client's order."""
    extension_types: tuple[int, ...]
    """Extension type code points in the order sent (for logging and fingerprinting)."""


def parse_client_hello(data: bytes) -> ClientHello | None:
    """Parse the ClientHello at the start of ``data`` (everything received so far).

    Returns ``None`` while more bytes are needed, the ``ClientHello`` once its handshake message
    is complete, and raises ``ClientHelloError`` for anything else.
    """
    message = _handshake_message(data)
    return None if message is None else _parse_body(message)


def _handshake_message(data: bytes) -> bytes | None:
    """Unwrap the records holding the first handshake message; its body, or None if incomplete."""
    if not data:
        return None
    if data[0] != _HANDSHAKE:
        raise ClientHelloError(_not_tls_reason(data))
    size = len(data)
    pos = 0
    fragments: list[bytes] = []
    have = 0
    need = -1  # 4 + body length, once the handshake header has arrived
    records = 0
    while True:
        if size - pos < 5:  # an incomplete record header: check what is there
            if size > pos and data[pos] != _HANDSHAKE:
                raise _interleaved(data[pos])
            if size - pos > 1 and data[pos + 1] != 3:
                raise ClientHelloError(_bad_record_version(data[pos + 1], pos))
            return None
        if data[pos] != _HANDSHAKE:
            raise _interleaved(data[pos])
        if data[pos + 1] != 3:
            raise ClientHelloError(_bad_record_version(data[pos + 1], pos))
        length = (data[pos + 3] << 8) | data[pos + 4]
        if length == 0:
            raise ClientHelloError("malformed ClientHello: empty handshake record")
        if length > MAX_RECORD_PAYLOAD:
            raise ClientHelloError(f"malformed ClientHello: record of {length} bytes (max 16384)")
        records += 1
        if records > MAX_RECORDS:
            raise ClientHelloError(f"ClientHello split into more than {MAX_RECORDS} records")
        start = pos + 5
        end = min(start + length, size)
        fragments.append(data[start:end])
        have += end - start
        if need < 0 and have >= 4:
            need = _check_header(fragments[0] if len(fragments) == 1 else b"".join(fragments))
        if need >= 0 and have >= need:
            message = fragments[0] if len(fragments) == 1 else b"".join(fragments)
            return message[4:need]
        if end < start + length:  # this record is still arriving
            return None
        pos = end


def _check_header(header: bytes) -> int:
    """Check the handshake type and length; return the whole message's size."""
    if header[0] != _CLIENT_HELLO:
        raise ClientHelloError(f"expected a ClientHello, got handshake message type {header[0]}")
    body_length = int.from_bytes(header[1:4], "big")
    if body_length > MAX_CLIENT_HELLO:
        raise ClientHelloError(
            f"ClientHello of {body_length} bytes exceeds the {MAX_CLIENT_HELLO}-byte limit"
        )
    return 4 + body_length


def _not_tls_reason(data: bytes) -> str:
    first = data[0]
    if first in _UPPER_ASCII:
        return "not a TLS handshake (plain HTTP sent to a TLS port?)"
    if first & 0x80 and len(data) >= 3 and data[2] == 1:  # 2-byte header, MSG-CLIENT-HELLO
        return "SSLv2-style ClientHello (SSLv2 compatible hellos are not supported)"
    return f"not a TLS handshake (first byte 0x{first:02x}, expected 0x16)"


def _interleaved(record_type: int) -> ClientHelloError:
    return ClientHelloError(f"malformed ClientHello: interrupted by a record of type {record_type}")


def _bad_record_version(major: int, pos: int) -> str:
    if pos == 0:
        return f"not a TLS handshake (record version major {major}, expected 3)"
    return f"malformed ClientHello: record version major {major}, expected 3"


class _Reader:
    """Bounds-checked big-endian reads; every overrun is a ClientHelloError naming the field."""

    __slots__ = ("_buf", "_end", "_pos")

    def __init__(self, buf: bytes) -> None:
        self._buf = buf
        self._pos = 0
        self._end = len(buf)

    def remaining(self) -> int:
        return self._end - self._pos

    def take(self, n: int, what: str) -> bytes:
        start = self._pos
        stop = start + n
        if stop > self._end:
            raise ClientHelloError(f"malformed ClientHello: truncated {what}")
        self._pos = stop
        return self._buf[start:stop]

    def u8(self, what: str) -> int:
        if self._pos >= self._end:
            raise ClientHelloError(f"malformed ClientHello: truncated {what}")
        self._pos += 1
        return self._buf[self._pos - 1]

    def u16(self, what: str) -> int:
        return int.from_bytes(self.take(2, what), "big")

    def vec8(self, what: str) -> bytes:
        return self.take(self.u8(what), what)

    def vec16(self, what: str) -> bytes:
        return self.take(self.u16(what), what)

    def expect_end(self, what: str) -> None:
        if self._pos != self._end:
            raise ClientHelloError(
                f"malformed ClientHello: {self.remaining()} extra bytes in {what}"
            )


def _parse_body(body: bytes) -> ClientHello:
    r = _Reader(body)
    legacy_version = r.u16("legacy_version")
    r.take(32, "random")
    if len(r.vec8("legacy_session_id")) > 32:
        raise ClientHelloError("malformed ClientHello: legacy_session_id longer than 32 bytes")
    suites = r.vec16("cipher_suites")
    if not suites or len(suites) % 2:
        raise ClientHelloError(f"malformed ClientHello: cipher_suites of {len(suites)} bytes")
    if not r.vec8("legacy_compression_methods"):
        raise ClientHelloError("malformed ClientHello: no compression methods")
    server_name: str | None = None
    alpn: tuple[str, ...] = ()
    versions: tuple[int, ...] = ()
    types: list[int] = []
    seen: set[int] = set()
    if r.remaining():  # TLS <= 1.2 clients may omit the extensions block altogether
        block = r.vec16("extensions")
        r.expect_end("ClientHello")
        pos, end = 0, len(block)
        while pos < end:  # the hot loop (~10-20 extensions): indexed by hand, not via _Reader
            if end - pos < 4:
                raise ClientHelloError("malformed ClientHello: truncated extension header")
            ext_type = (block[pos] << 8) | block[pos + 1]
            start = pos + 4
            pos = start + ((block[pos + 2] << 8) | block[pos + 3])
            if pos > end:
                raise ClientHelloError(f"malformed ClientHello: truncated extension {ext_type}")
            if ext_type in seen:
                raise ClientHelloError(f"malformed ClientHello: duplicate extension {ext_type}")
            seen.add(ext_type)
            types.append(ext_type)
            if ext_type == _EXT_SERVER_NAME:
                server_name = _server_name(block[start:pos])
            elif ext_type == _EXT_ALPN:
                alpn = _alpn(block[start:pos])
            elif ext_type == _EXT_SUPPORTED_VERSIONS:
                versions = _supported_versions(block[start:pos])
    return ClientHello(
        server_name=server_name,
        alpn_protocols=alpn,
        legacy_version=legacy_version,
        supported_versions=versions,
        cipher_suites=_u16_list(suites),
        extension_types=tuple(types),
    )


def _server_name(ext_data: bytes) -> str | None:
    """RFC 6066 §3: the first host_name entry; other name types are skipped."""
    r = _Reader(ext_data)
    names = r.vec16("server_name list")
    r.expect_end("server_name")
    if not names:
        raise ClientHelloError("malformed ClientHello: empty server_name list")
    entries = _Reader(names)
    found: bytes | None = None
    while entries.remaining():
        name_type = entries.u8("server_name entry")
        name = entries.vec16("server_name entry")
        if name_type == _SNI_HOST_NAME and found is None:
            found = name
    if found is None:
        return None
    if not found or len(found) > _MAX_HOST_NAME or found.translate(None, _VISIBLE_ASCII):
        raise ClientHelloError(f"invalid server name {found[:64]!r}")
    return found.decode("ascii")


def _alpn(ext_data: bytes) -> tuple[str, ...]:
    """RFC 7301 §3.1: a non-empty list of non-empty protocol names."""
    r = _Reader(ext_data)
    names = r.vec16("ALPN list")
    r.expect_end("ALPN")
    if not names:
        raise ClientHelloError("malformed ClientHello: empty ALPN list")
    entries = _Reader(names)
    protocols: list[str] = []
    while entries.remaining():
        name = entries.vec8("ALPN protocol name")
        if not name:
            raise ClientHelloError("malformed ClientHello: empty ALPN protocol name")
        protocols.append(name.decode("latin-1"))
    return tuple(protocols)


def _supported_versions(ext_data: bytes) -> tuple[int, ...]:
    """RFC 8446 §4.2.1, ClientHello form: a non-empty list of 16-bit versions."""
    r = _Reader(ext_data)
    versions = r.vec8("supported_versions")
    r.expect_end("supported_versions")
    if not versions or len(versions) % 2:
        raise ClientHelloError(
            f"malformed ClientHello: supported_versions of {len(versions)} bytes"
        )
    return _u16_list(versions)


def _u16_list(data: bytes) -> tuple[int, ...]:
    """Big-endian 16-bit values; the caller has checked the length is even."""
    return struct.unpack(f">{len(data) // 2}H", data)
