"""Server-side TLS over ``ssl.MemoryBIO``, as an asyncio protocol.

Theory of operation
-------------------
asyncio's and uvloop's built-in TLS transports fix one ``SSLContext`` per listening socket and
close a failed handshake without flushing the alert, so a client refused for its version or its
certificate sees a bare EOF and the failure cannot be counted. Swapping ``sslobj.context`` from an
SNI callback changes the certificate but not the verify mode, version limits or options, which
stay with the context the connection started with. So we drive OpenSSL ourselves:

1. Buffer the first bytes until a whole ClientHello is there (``clienthello.parse_client_hello``,
   a pure function) and read its SNI.
2. Ask the listener's selector for the context of that name. Every context is built at config
   load (one per listener and certificate group, each with the listener's policy, verify mode and
   CA store), so choosing one is a dictionary lookup and *every* setting comes from it.
3. ``ctx.wrap_bio()``, feed the buffered bytes, drive ``do_handshake()``; after every step write
   whatever OpenSSL queued in the outgoing BIO, alerts included, before closing on failure.
4. Once established, hand an ``asyncio.Transport`` look-alike to the application protocol
   (chosen by the negotiated ALPN protocol), so HTTP code is the same over TCP and TLS. Flow
   control is passed through in both directions: the app pausing reads pauses the socket, the
   socket's write buffer filling pauses the app's writes.

The connection keeps the context it started with for its whole life; a runtime change only
changes which contexts new connections are given.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from alb_proxy.tls.clienthello import ClientHello, ClientHelloError, parse_client_hello
from alb_proxy.tls.failures import classify_ssl_error

#: Plain HTTP sent to a TLS port gets this answer, like nginx, rather than a mute close.
_PLAIN_HTTP_ANSWER = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 46\r\n"
    b"Connection: close\r\n\r\nThe plain HTTP request was sent to a TLS port.\n"
)
_HTTP_METHOD_PREFIXES = (b"GET ", b"POST", b"HEAD", b"PUT ", b"DELE", b"OPTI", b"PATC", b"CONN")
_READ_SIZE = 256 * 1024
_LINGER_S = 2.0


@dataclass(frozen=True)
class HandshakeFailure:
    """Why a handshake did not complete, for the log line and the counter."""

    reason: str
    detail: str
    peer: str
    server_name: str | None


ContextSelector = Callable[[ClientHello | None], ssl.SSLContext]
"""Returns the context for a ClientHello (``None``: unparseable, use the default context)."""


class _State(enum.Enum):
    HELLO = "hello"
    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSED = "closed"


class TlsServerProtocol(asyncio.Protocol):
    """Terminates TLS for one accepted connection and runs an app protocol inside it."""

    def __init__(
        self,
        *,
        select_context: ContextSelector,
        app_factory: Callable[[str | None], asyncio.Protocol],
        on_failure: Callable[[HandshakeFailure], None],
        handshake_timeout: float = 10.0,
    ) -> None:
        self._select_context = select_context
        self._app_factory = app_factory
        self._on_failure = on_failure
        self._handshake_timeout = handshake_timeout
        self._state = _State.HELLO
        self._hello_buffer = bytearray()
        self._hello: ClientHello | None = None
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._sslobj: ssl.SSLObject | None = None
        self._transport: asyncio.Transport | None = None
        self._app: asyncio.Protocol | None = None
        self._app_transport = _TlsAppTransport(self)
        self._app_reading_paused = False
        self._app_closing = False
        self._timer: asyncio.TimerHandle | None = None
        self._peer = "-"

    # -- socket side --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio.Transport.
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if peer:
            self._peer = f"{peer[0]}:{peer[1]}"
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._handshake_timeout, self._handshake_timed_out)

    def data_received(self, data: bytes) -> None:
        if self._state is _State.OPEN:
            self._incoming.write(data)
            self._deliver_app_data()
        elif self._state is _State.HANDSHAKE:
            self._incoming.write(data)
            self._do_handshake()
        elif self._state is _State.HELLO:
            self._hello_buffer += data
            self._try_start_handshake()

    def eof_received(self) -> bool | None:
        if self._state is _State.CLOSED:
            return False  # the client closed after our alert: done lingering
        if self._state in (_State.HELLO, _State.HANDSHAKE):
            self._fail("client_closed", "connection closed during the handshake")
            return False
        if self._state is _State.OPEN:
            # TCP EOF: the BIO reports it after the records still buffered, and
            # _deliver_app_data then lets the app decide whether to close.
            self._incoming.write_eof()
            self._deliver_app_data()
            return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._state in (_State.HELLO, _State.HANDSHAKE):
            self._fail("client_closed", "connection lost during the handshake")
        self._state = _State.CLOSED
        self._cancel_timer()
        app, self._app = self._app, None
        if app is not None:
            app.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._app is not None:
            self._app.pause_writing()

    def resume_writing(self) -> None:
        if self._app is not None:
            self._app.resume_writing()

    # -- handshake ----------------------------------------------------------------------------

    def _try_start_handshake(self) -> None:
        try:
            hello = parse_client_hello(bytes(self._hello_buffer))
        except ClientHelloError as exc:
            if self._hello_buffer.startswith(_HTTP_METHOD_PREFIXES):
                assert self._transport is not None
                self._transport.write(_PLAIN_HTTP_ANSWER)
                self._fail("http_request", "plain HTTP request sent to a TLS port")
                return
            # Let OpenSSL judge the bytes with the default context: it answers with the alert
            # the client should see, and the failure is classified like any other.
            self._start_handshake(None, str(exc))
            return
        if hello is None:
            return
        self._hello = hello
        self._start_handshake(hello, None)

    def _start_handshake(self, hello: ClientHello | None, parse_error: str | None) -> None:
        try:
            context = self._select_context(hello)
        except Exception as exc:  # a selector bug must cost one connection, not the listener
            self._fail("internal_error", f"no context for this handshake: {exc!r}")
            return
        self._sslobj = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._incoming.write(bytes(self._hello_buffer))
        self._hello_buffer = bytearray()
        self._state = _State.HANDSHAKE
        self._do_handshake(parse_error)

    def _do_handshake(self, parse_error: str | None = None) -> None:
        assert self._sslobj is not None
        try:
            self._sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except ssl.SSLError as exc:
            self._flush()  # the alert OpenSSL queued goes out before we close
            reason, detail = classify_ssl_error(exc)
            if parse_error is not None:
                reason, detail = "bad_client_hello", parse_error  # our parser's words are clearer
            self._fail(reason, detail)
            return
        self._flush()
        self._cancel_timer()
        self._state = _State.OPEN
        self._app = self._app_factory(self._sslobj.selected_alpn_protocol())
        self._app.connection_made(self._app_transport)
        self._deliver_app_data()

    def _handshake_timed_out(self) -> None:
        self._timer = None
        if self._state in (_State.HELLO, _State.HANDSHAKE):
            self._fail("handshake_timeout", "no complete handshake in time")

    def _fail(self, reason: str, detail: str) -> None:
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        self._cancel_timer()
        server_name = self._hello.server_name if self._hello is not None else None
        self._on_failure(HandshakeFailure(reason, detail, self._peer, server_name))
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if reason in ("client_closed", "handshake_timeout") or not transport.can_write_eof():
            transport.close()
            return
        # Lingering close: closing a socket that still has unread client bytes (a TLS 1.3
        # client sends its request right after its Finished) makes the kernel send a reset,
        # which can overtake the alert. Send FIN after the alert, read and discard until the
        # client closes too, for at most _LINGER_S.
        transport.write_eof()
        asyncio.get_running_loop().call_later(_LINGER_S, transport.close)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- established connection ---------------------------------------------------------------

    def _deliver_app_data(self) -> None:
        """Decrypt what the incoming BIO holds and hand it to the app in one piece."""
        sslobj = self._sslobj
        if sslobj is None or self._app is None:
            return
        incoming = self._incoming
        chunks: list[bytes] = []
        eof = False
        while not self._app_reading_paused:
            try:
                chunk = sslobj.read(_READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                eof = True
                break
            except ssl.SSLError:
                # Truncation (EOF without close_notify) or a corrupt record: an end of stream.
                eof = True
                break
            if not chunk:
                eof = True
                break
            chunks.append(chunk)
            if not incoming.pending and not incoming.eof:
                # Every record taken: asking again would only raise SSLWantReadError, and an
                # exception per read is a tenth of a small request's cost.
                break
        if self._outgoing.pending:
            self._flush()  # key updates and other post-handshake messages
        if chunks and self._app is not None:
            self._app.data_received(b"".join(chunks) if len(chunks) > 1 else chunks[0])
        if eof and self._app is not None and self._state is _State.OPEN:
            keep_open = self._app.eof_received()
            if not keep_open:
                self._app_close()

    def _flush(self) -> None:
        if self._outgoing.pending and self._transport is not None:
            self._transport.write(self._outgoing.read())

    def _app_write(self, data: bytes | bytearray | memoryview) -> None:
        if self._state is not _State.OPEN or self._app_closing:
            return
        sslobj = self._sslobj
        assert sslobj is not None
        try:
            written = sslobj.write(data)  # all of it: partial writes are not enabled
            if written < len(data):  # pragma: no cover - kept should OpenSSL's mode change
                view = memoryview(data)[written:]
                while view:
                    view = view[sslobj.write(view) :]
        except ssl.SSLError:
            self._flush()
            self._app_abort()
            return
        self._flush()

    def _app_close(self) -> None:
        if self._app_closing or self._state is _State.CLOSED:
            return
        self._app_closing = True
        if self._sslobj is not None:
            with contextlib.suppress(ssl.SSLError):
                self._sslobj.unwrap()  # queue close_notify; the peer's answer is not awaited
            self._flush()
        if self._transport is not None:
            self._transport.close()

    def _app_abort(self) -> None:
        self._app_closing = True
        if self._transport is not None:
            self._transport.abort()

    def _app_pause_reading(self) -> None:
        self._app_reading_paused = True
        if self._transport is not None:
            self._transport.pause_reading()

    def _app_resume_reading(self) -> None:
        if not self._app_reading_paused:
            return
        self._app_reading_paused = False
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()
        # Records may be waiting in the BIO from before the pause.
        asyncio.get_running_loop().call_soon(self._deliver_app_data)

    def _extra_info(self, name: str, default: Any) -> Any:
        sslobj = self._sslobj
        if name == "ssl_object":
            return sslobj
        if name == "sslcontext":
            return sslobj.context if sslobj is not None else default
        if name == "tls_server_name":
            return self._hello.server_name if self._hello is not None else default
        if name == "cipher" and sslobj is not None:
            return sslobj.cipher()
        if name == "peercert" and sslobj is not None:
            return sslobj.getpeercert()
        if name == "alpn_protocol" and sslobj is not None:
            return sslobj.selected_alpn_protocol()
        if self._transport is None:
            return default
        return self._transport.get_extra_info(name, default)


class _TlsAppTransport(asyncio.Transport):
    """What the application protocol sees: a transport that encrypts on write."""

    def __init__(self, owner: TlsServerProtocol) -> None:
        super().__init__()
        self._owner = owner

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._owner._extra_info(name, default)

    def is_closing(self) -> bool:
        owner = self._owner
        return owner._app_closing or owner._state is _State.CLOSED

    def close(self) -> None:
        self._owner._app_close()

    def abort(self) -> None:
        self._owner._app_abort()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._owner._app_write(data)

    def writelines(self, list_of_data: Any) -> None:
        self._owner._app_write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return False

    def is_reading(self) -> bool:
        return not self._owner._app_reading_paused

    def pause_reading(self) -> None:
        self._owner._app_pause_reading()

    def resume_reading(self) -> None:
        self._owner._app_resume_reading()

    def get_write_buffer_size(self) -> int:
        transport = self._owner._transport
        return transport.get_write_buffer_size() if transport is not None else 0

    def get_write_buffer_limits(self) -> tuple[int, int]:
        transport = self._owner._transport
        return transport.get_write_buffer_limits() if transport is not None else (0, 0)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        transport = self._owner._transport
        if transport is not None:
            transport.set_write_buffer_limits(high, low)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.Protocol)
        self._owner._app = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        app = self._owner._app
        assert app is not None
        return app
