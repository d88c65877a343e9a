"""HTTP/3 front end: one QUIC connection, each request stream forwarded like HTTP/1.1.

aioquic's ``H3Connection`` is sans-I/O: QUIC events in, HTTP/3 events out. This protocol feeds it,
turns each request stream into a :class:`~alb_proxy.http.forward.ForwardRequest`
(``:authority`` becomes ``Host``) and answers through a per-stream
:class:`~alb_proxy.http.forward.Downstream`, so backend handling is the same code as on HTTPS.

Backpressure towards the client: aioquic buffers whatever is sent on a stream until it is
acknowledged, so a stream waits while more than ``_SEND_HIGH_WATER`` bytes are unacknowledged and
is woken as acknowledgements arrive (after each datagram). A stream reset by the client cancels
its exchange and nothing else.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, ErrorCode, H3Connection
from aioquic.h3.events import DataReceived, H3Event, HeadersReceived
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated, ProtocolNegotiated, QuicEvent, StreamReset

from alb_proxy.http.fields import (
    Refusal,
    error_response,
    host_of,
    request_from_fields,
)
from alb_proxy.http.forward import (
    ClientGone,
    ForwardRequest,
    RouteSettings,
    forward,
    log_refusal,
)
from alb_proxy.observability.log import event

_SEND_HIGH_WATER = 1024 * 1024
RECEIVE_HIGH_WATER = 1024 * 1024
"""Request body bytes held for a backend beyond which the client gets no more credit."""

SendBuffered = Callable[[QuicConnection, int], int]
"""How many bytes of a stream aioquic still holds unacknowledged (see quic_internals)."""
SendGoaway = Callable[[H3Connection, int], None]
"""Queue an HTTP/3 GOAWAY naming the first stream id left unprocessed (see quic_internals)."""
Receive = Callable[[QuicConnectionProtocol, bytes, Any], None]
"""Feed a datagram and handle its events without transmitting (see quic_internals)."""


class H3Protocol(QuicConnectionProtocol):
    def __init__(
        self,
        quic: QuicConnection,
        *,
        route: RouteSettings,
        send_buffered: SendBuffered,
        send_goaway: SendGoaway,
        receive: Receive,
        current_route: Callable[[], RouteSettings] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(quic, **kwargs)
        self._receive = receive
        self.route = route
        self.current_route = current_route
        """The listener's route now, taken by each request as it begins (see h1's
        ConnectionControl.current_route)."""
        self._send_buffered = send_buffered
        self._send_goaway = send_goaway
        self.authority_ok: Callable[[str], bool] = lambda host: True
        """Set once the ClientHello is read: may a request for this host use the connection
        (421 if not, as on HTTP/2)?"""
        self.on_closed: Callable[[], None] = lambda: None
        """Called once when the connection ends (the listener's per-source accounting)."""
        self._h3: H3Connection | None = None
        self._streams: dict[int, _Stream] = {}
        self.client_ip = "-"
        self._draining = False
        self._next_stream_id = 0
        """Lowest client-initiated request stream id not seen yet (what a GOAWAY names)."""
        self._idle: asyncio.Event | None = None
        """Set once a draining connection has no request in flight."""
        self._transmit_scheduled = False
        self._ping_timer: asyncio.TimerHandle | None = None
        self._pings = 0

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        if self.client_ip == "-":
            self.client_ip = str(addr[0])
        self._receive(self, data if isinstance(data, bytes) else data.encode(), addr)
        self.transmit_soon()  # ACKs and answers of every datagram in this turn, together
        for stream in self._streams.values():
            stream.maybe_writable()

    def quic_event_received(self, quic_event: QuicEvent) -> None:
        if isinstance(quic_event, ProtocolNegotiated) and quic_event.alpn_protocol in H3_ALPN:
            self._h3 = H3Connection(self._quic)
        elif isinstance(quic_event, StreamReset):
            stream = self._streams.pop(quic_event.stream_id, None)
            if stream is not None:
                stream.cancel()
        elif isinstance(quic_event, ConnectionTerminated):
            if self._ping_timer is not None:
                self._ping_timer.cancel()
                self._ping_timer = None
            for stream in self._streams.values():
                stream.cancel()
            self._streams.clear()
            if self._idle is not None:
                self._idle.set()
            self.on_closed()
        if self._h3 is not None:
            for h3_event in self._h3.handle_event(quic_event):
                self._h3_event(h3_event)

    def _h3_event(self, h3_event: H3Event) -> None:
        if isinstance(h3_event, HeadersReceived) and h3_event.stream_id in self._streams:
            # A second header section on a request stream: its trailers.
            stream = self._streams[h3_event.stream_id]
            stream.request_trailers = list(h3_event.headers)
            if h3_event.stream_ended:
                stream.feed(b"", True)
        elif isinstance(h3_event, HeadersReceived):
            assert self._h3 is not None
            if h3_event.stream_id < self._next_stream_id:
                return  # trailers of a request answered already: nothing starts here
            if self._draining and h3_event.stream_id >= self._next_stream_id:
                # Past our GOAWAY: rejected unprocessed, so the client may retry it elsewhere.
                self._quic.reset_stream(h3_event.stream_id, ErrorCode.H3_REQUEST_REJECTED)
                self.transmit()
                return
            self._next_stream_id = max(self._next_stream_id, h3_event.stream_id + 4)
            if self.current_route is not None:
                self.route = self.current_route()  # the group as it is now
            stream = _Stream(self, self._h3, h3_event.stream_id)
            self._streams[h3_event.stream_id] = stream
            stream.start(h3_event.headers, h3_event.stream_ended)
            self._keep_alive()
        elif isinstance(h3_event, DataReceived):
            found = self._streams.get(h3_event.stream_id)
            if found is not None:
                found.feed(h3_event.data, h3_event.stream_ended)

    def held(self, stream_id: int) -> int:
        """Request body bytes of a stream received but not yet taken by its backend."""
        stream = self._streams.get(stream_id)
        return stream.queued if stream is not None else 0

    def _keep_alive(self) -> None:
        """While requests are in flight, PING the client every half idle timeout: QUIC's idle
        timeout counts silence on the connection, and a backend taking its time (up to the
        request timeout) must not make the connection time out under its request."""
        if self._ping_timer is None and self._streams:
            loop = asyncio.get_running_loop()
            self._ping_timer = loop.call_later(self.route.idle_timeout / 2, self._ping)

    def _ping(self) -> None:
        self._ping_timer = None
        if self._streams:
            self._pings += 1
            self._quic.send_ping(self._pings)
            self.transmit()
            self._keep_alive()

    def stream_done(self, stream_id: int) -> None:
        self._streams.pop(stream_id, None)
        if self._idle is not None and not self._streams:
            self._idle.set()

    async def drain(self) -> None:
        """Tell the client (GOAWAY) that no new request will be served here, refuse any that
        still arrive, and return once the requests in flight have finished."""
        self._draining = True
        self._idle = asyncio.Event()
        if self._h3 is not None:
            self._send_goaway(self._h3, self._next_stream_id)
            self.transmit()
        if not self._streams:
            self._idle.set()
        await self._idle.wait()

    def send_buffered(self, stream_id: int) -> int:
        return self._send_buffered(self._quic, stream_id)

    def transmit_soon(self) -> None:
        """What every stream queued in this turn of the loop leaves in one ``transmit``:
        building and encrypting packets is the costliest part of serving HTTP/3, and a
        response sent piecemeal (head, body, end) would fill three packets instead of one."""
        if not self._transmit_scheduled:
            self._transmit_scheduled = True
            asyncio.get_running_loop().call_soon(self._transmit_now)

    def _transmit_now(self) -> None:
        self._transmit_scheduled = False
        self.transmit()

    def reset_stream(self, stream_id: int) -> None:
        self._quic.reset_stream(stream_id, ErrorCode.H3_INTERNAL_ERROR)
        self.transmit()


class _Stream:
    """One request stream: the Downstream ``forward`` answers through."""

    def __init__(self, protocol: H3Protocol, h3: H3Connection, stream_id: int) -> None:
        self.protocol = protocol
        self.h3 = h3
        self.stream_id = stream_id
        self.route = protocol.route
        self._body: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._queued = 0
        self._writable = asyncio.Event()
        self._writable.set()
        self._task: asyncio.Task[None] | None = None
        self._sent_head = False
        self._cancelled = False
        self.request_trailers: list[tuple[bytes, bytes]] = []

    def start(self, headers: Sequence[tuple[bytes, bytes]], ended: bool) -> None:
        if ended:
            self._body.put_nowait(None)
        self._task = asyncio.ensure_future(self._run(headers, ended))

    def feed(self, data: bytes, ended: bool) -> None:
        if data:
            self._queued += len(data)
            self._body.put_nowait(data)
        if ended:
            self._body.put_nowait(None)

    def cancel(self) -> None:
        self._cancelled = True
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def maybe_writable(self) -> None:
        if not self._writable.is_set() and self._buffered() < _SEND_HIGH_WATER:
            self._writable.set()

    async def _run(self, raw: Sequence[tuple[bytes, bytes]], ended: bool) -> None:
        try:
            request = self._request(raw, ended)
            if request is None:
                return
            await forward(request, self, self.route)
        except ClientGone:
            pass
        except Exception as exc:  # one broken stream must never take the connection down
            event(
                logging.ERROR, "http/3 stream error", listener=self.route.listener, error=repr(exc)
            )
            self.abort()
        finally:
            self.protocol.stream_done(self.stream_id)

    def _request(self, raw: Sequence[tuple[bytes, bytes]], ended: bool) -> ForwardRequest | None:
        request = request_from_fields(
            raw,
            ended=ended,
            client_ip=self.protocol.client_ip,
            max_bytes=self.route.max_header_bytes,
        )
        if isinstance(request, Refusal):
            self._answer_sync(request.status, request.detail)
            return None
        host = host_of(request.headers[0][1])
        if not self.protocol.authority_ok(host):
            self._answer_sync(421, f"this connection's certificate does not cover {host}")
            return None
        return request

    # -- Downstream ---------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        return self._queued

    async def read_body(self) -> bytes | None:
        try:
            async with asyncio.timeout(self.route.idle_timeout):
                chunk = await self._body.get()
        except TimeoutError as exc:
            raise ClientGone() from exc
        if chunk is not None:
            before = self._queued
            self._queued -= len(chunk)
            if before >= RECEIVE_HIGH_WATER > self._queued:
                self.protocol.transmit_soon()  # the credit held back can go out now
        return chunk

    async def send_informational(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        pass  # 1xx are hop-by-hop; HTTP/3 clients do not wait for 100-continue here

    async def send_head(
        self, status: int, headers: list[tuple[bytes, bytes]], reason: bytes
    ) -> None:
        self._check()
        self.h3.send_headers(self.stream_id, [(b":status", b"%d" % status), *headers])
        self._sent_head = True
        self.protocol.transmit_soon()

    async def send_data(self, data: bytes) -> None:
        self._check()
        self.h3.send_data(self.stream_id, data, end_stream=False)
        self.protocol.transmit_soon()
        if self._buffered() >= _SEND_HIGH_WATER:
            self._writable.clear()
            try:
                async with asyncio.timeout(self.route.idle_timeout):
                    await self._writable.wait()
            except TimeoutError as exc:
                self.abort()
                raise ClientGone() from exc

    async def end(self, trailers: list[tuple[bytes, bytes]]) -> None:
        self._check()
        if trailers:
            self.h3.send_headers(self.stream_id, trailers, end_stream=True)
        else:
            self.h3.send_data(self.stream_id, b"", end_stream=True)
        self.protocol.transmit_soon()

    async def send_error(self, status: int, detail: str) -> None:
        self._answer_sync(status, detail)

    def abort(self) -> None:
        if not self._cancelled:
            self._cancelled = True
            self.protocol.reset_stream(self.stream_id)

    def _answer_sync(self, status: int, detail: str) -> None:
        if self._cancelled or self._sent_head:
            return
        log_refusal(self.route, self.protocol.client_ip, status, detail)
        headers, body = error_response(status)
        self.h3.send_headers(self.stream_id, [(b":status", b"%d" % status), *headers])
        self.h3.send_data(self.stream_id, body, end_stream=True)
        self._sent_head = True
        self.protocol.transmit_soon()

    def _buffered(self) -> int:
        return self.protocol.send_buffered(self.stream_id)

    def _check(self) -> None:
        if self._cancelled:
            raise ClientGone()
