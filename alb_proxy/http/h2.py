"""HTTP/2 front end (ALPN ``h2``): many streams on one TLS connection, each forwarded on its own.

The ``h2`` library is sans-I/O: bytes in, events out, frames to send. This module reads the
connection, starts one ``forward`` task per request stream, and answers through a per-stream
:class:`~alb_proxy.http.forward.Downstream`. Every change to the h2 state is followed at once by
flushing ``data_to_send``; no ``await`` sits between a state change and its flush.

Flow control both ways: request bodies are acknowledged (WINDOW_UPDATE) only when the backend
side has taken them, so a slow backend slows the client's upload; response bodies are sent
within the client's windows, a stream waiting for WINDOW_UPDATE while others go on, and each
write waits for the socket to drain. A stream reset by the client cancels its exchange only.

A request whose ``:authority`` the connection's certificate does not cover gets 421: a browser
may reuse a connection for another name, and this one cannot prove it is that server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from alb_proxy.http.fields import (
    Refusal,
    error_response,
    host_of,
    request_from_fields,
)
from alb_proxy.http.forward import ClientGone, ForwardRequest, RouteSettings, forward
from alb_proxy.http.h1 import ConnectionControl
from alb_proxy.observability.log import event

MAX_CONCURRENT_STREAMS = 128
_READ_SIZE = 256 * 1024
_WINDOW = 1024 * 1024
"""Receive window per stream and for the connection: enough for fast uploads, bounded memory."""

Header = tuple[bytes, bytes]


class H2Session:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        route: RouteSettings,
        control: ConnectionControl,
        client_cert_headers: Sequence[Header] = (),
        authority_ok: Callable[[str], bool] = lambda host: True,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.route = route
        self.control = control
        self.client_cert_headers = client_cert_headers
        self.authority_ok = authority_ok
        peer = writer.get_extra_info("peername")
        self.client_ip: str = peer[0] if peer else "-"
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=False, header_encoding=None, validate_inbound_headers=True
            )
        )
        self.streams: dict[int, _Stream] = {}
        self._window_open = asyncio.Event()
        self._closed = False

    async def run(self) -> None:
        self.control.on_drain = self._on_drain
        self.conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: self.route.max_header_bytes,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: _WINDOW,
            },
        )
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(_WINDOW - 65535)
        try:
            self.flush()
            while not self._closed:
                timeout = None if self.streams else self.route.idle_timeout
                if self.control.draining and not self.streams:
                    break
                try:
                    async with asyncio.timeout(timeout):
                        data = await self.reader.read(_READ_SIZE)
                except TimeoutError:
                    break
                if not data:
                    break
                try:
                    events = self.conn.receive_data(data)
                except h2.exceptions.ProtocolError as exc:
                    event(
                        logging.INFO,
                        "http/2 protocol error",
                        listener=self.route.listener,
                        client=self.client_ip,
                        error=str(exc),
                    )
                    self.flush()
                    break
                for ev in events:
                    self._handle(ev)
                self.flush()
            self._goaway()
        except (ConnectionError, ClientGone):
            pass
        finally:
            self._closed = True
            for stream in list(self.streams.values()):
                stream.cancel()
            if self.streams:
                await asyncio.wait([s.task for s in self.streams.values() if s.task], timeout=5)
            self.writer.close()

    def _goaway(self) -> None:
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.conn.close_connection(last_stream_id=self.conn.highest_inbound_stream_id)
            self.flush()

    def _handle(self, ev: h2.events.Event) -> None:
        if isinstance(ev, h2.events.RequestReceived):
            self.control.busy = True
            if self.control.draining:
                self.conn.reset_stream(ev.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
                return
            stream = _Stream(self, ev.stream_id)
            self.streams[ev.stream_id] = stream
            stream.start(ev.headers or [], ev.stream_ended is not None)
        elif isinstance(ev, h2.events.DataReceived):
            found = self.streams.get(ev.stream_id)
            if found is None:
                # Body for a stream we already answered: give the window back, drop the bytes.
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            else:
                found.feed(ev.data or b"", ev.flow_controlled_length)
        elif isinstance(ev, h2.events.TrailersReceived):
            found = self.streams.get(ev.stream_id)
            if found is not None:
                found.request_trailers = list(ev.headers or [])
        elif isinstance(ev, h2.events.StreamEnded):
            found = self.streams.get(ev.stream_id)
            if found is not None:
                found.feed_end()
        elif isinstance(ev, h2.events.StreamReset):
            found = self.streams.pop(ev.stream_id, None)
            if found is not None:
                found.cancel()
        elif isinstance(ev, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self._window_open.set()
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self._closed = True

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.writer.write(data)

    async def drain(self) -> None:
        try:
            await self.writer.drain()
        except ConnectionError as exc:
            raise ClientGone() from exc

    async def wait_window(self) -> None:
        """Until any WINDOW_UPDATE or SETTINGS arrives (or the connection ends)."""
        self._window_open.clear()
        try:
            async with asyncio.timeout(self.route.idle_timeout):
                await self._window_open.wait()
        except TimeoutError as exc:
            raise ClientGone() from exc
        if self._closed:
            raise ClientGone()

    def stream_done(self, stream_id: int) -> None:
        self.streams.pop(stream_id, None)
        if not self.streams:
            self.control.busy = False
            if self.control.draining:
                self._finish()

    def _on_drain(self) -> None:
        """New streams are refused from now on; GOAWAY once the last one in flight ends
        (h2 cannot send on any stream after its GOAWAY)."""
        if not self.streams:
            self._finish()

    def _finish(self) -> None:
        if not self._closed:
            self._goaway()
            self._closed = True
            self.writer.close()


class _Stream:
    """One request stream: the Downstream ``forward`` answers through."""

    def __init__(self, session: H2Session, stream_id: int) -> None:
        self.session = session
        self.conn = session.conn
        self.stream_id = stream_id
        self.route = session.route
        self.body: asyncio.Queue[tuple[bytes, int] | None] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None
        self._sent_head = False
        self._cancelled = False
        self.request_trailers: list[Header] = []

    def start(self, raw: Sequence[tuple[bytes, bytes]], ended: bool) -> None:
        if ended:
            self.body.put_nowait(None)
        self.task = asyncio.ensure_future(self._run(raw, ended))

    def feed(self, data: bytes, flow_controlled: int) -> None:
        self.body.put_nowait((data, flow_controlled))

    def feed_end(self) -> None:
        self.body.put_nowait(None)

    def cancel(self) -> None:
        self._cancelled = True
        if self.task is not None and not self.task.done():
            self.task.cancel()

    async def _run(self, raw: Sequence[tuple[bytes, bytes]], ended: bool) -> None:
        try:
            request = await self._request(raw, ended)
            if request is not None:
                await forward(request, self, self.route)
        except (ClientGone, h2.exceptions.StreamClosedError):
            pass
        except Exception as exc:  # one broken stream must never take the connection down
            event(
                logging.ERROR, "http/2 stream error", listener=self.route.listener, error=repr(exc)
            )
            self.abort()
        finally:
            self.session.stream_done(self.stream_id)

    async def _request(
        self, raw: Sequence[tuple[bytes, bytes]], ended: bool
    ) -> ForwardRequest | None:
        request = request_from_fields(
            raw,
            ended=ended,
            client_ip=self.session.client_ip,
            client_cert_headers=self.session.client_cert_headers,
            max_bytes=self.route.max_header_bytes,
        )
        if isinstance(request, Refusal):
            await self.send_error(request.status, request.detail)
            return None
        host = host_of(request.headers[0][1])
        if not self.session.authority_ok(host):
            await self.send_error(421, f"this connection's certificate does not cover {host}")
            return None
        return request

    # -- Downstream ---------------------------------------------------------------------------

    async def read_body(self) -> bytes | None:
        try:
            async with asyncio.timeout(self.route.idle_timeout):
                item = await self.body.get()
        except TimeoutError as exc:
            raise ClientGone() from exc
        if item is None:
            return None
        data, flow_controlled = item
        # The backend side took it: only now may the client send more (backpressure).
        if not self._cancelled:
            with contextlib.suppress(h2.exceptions.StreamClosedError):
                self.conn.acknowledge_received_data(flow_controlled, self.stream_id)
                self.session.flush()
        return data

    async def send_informational(self, status: int, headers: list[Header]) -> None:
        self._check()
        self.conn.send_headers(self.stream_id, [(b":status", str(status).encode()), *headers])
        self.session.flush()

    async def send_head(self, status: int, headers: list[Header], reason: bytes) -> None:
        self._check()
        self.conn.send_headers(self.stream_id, [(b":status", str(status).encode()), *headers])
        self._sent_head = True
        self.session.flush()

    async def send_data(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            self._check()
            window = min(
                self.conn.local_flow_control_window(self.stream_id),
                self.conn.max_outbound_frame_size,
            )
            if window <= 0:
                await self.session.wait_window()
                continue
            self.conn.send_data(self.stream_id, bytes(view[:window]))
            self.session.flush()
            view = view[window:]
            await self.session.drain()

    async def end(self, trailers: list[Header]) -> None:
        self._check()
        if trailers:
            self.conn.send_headers(self.stream_id, trailers, end_stream=True)
        else:
            self.conn.end_stream(self.stream_id)
        self.session.flush()

    async def send_error(self, status: int, detail: str) -> None:
        if self._cancelled or self._sent_head:
            return
        if status >= 500:
            event(
                logging.INFO,
                "request refused",
                listener=self.route.listener,
                client=self.session.client_ip,
                status=status,
                detail=detail,
            )
        headers, body = error_response(status)
        await self.send_head(status, headers, b"")
        await self.send_data(body)
        await self.end([])

    def abort(self) -> None:
        if not self._cancelled:
            self._cancelled = True
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.conn.reset_stream(self.stream_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
                self.session.flush()

    def _check(self) -> None:
        if self._cancelled:
            raise ClientGone()
