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

Limits on what one connection may cost
--------------------------------------
HTTP/2 lets a client make the server work and write without asking for anything it reads: h2
answers every PING and SETTINGS frame by itself (CVE-2019-9512), and a stream opened and reset
at once costs a task and possibly a backend request while the client pays 30 bytes
(CVE-2023-44487, "rapid reset"). So:

* Backpressure on the client's frames: while more than :data:`MAX_BUFFERED` bytes wait in the
  socket's write buffer, nothing more is read from the client (each frame read may queue an
  answer); a client that takes nothing for ``idle_timeout`` is cut off. This bounds the memory of
  every kind of flood, the ones below included.
* Budgets (token buckets, :class:`FloodBudget`) for PING and SETTINGS frames and for streams the
  client resets; over either, GOAWAY(ENHANCE_YOUR_CALM) and the connection is closed, as nginx
  and HAProxy do. Rates, not "frames while not reading": the kernel's socket buffers (3-4 MB
  measured on loopback) hide a client that does not read for the first ~200,000 PINGs.
* The client's bytes go to h2 :data:`_FEED_SIZE` at a time, with a turn of the event loop in
  between, so one connection's burst cannot hold the loop for other connections. Streams are
  started after their slice is handled, so one opened and reset in the same burst never gets a
  task nor reaches a backend; and tasks still winding down after a reset count against
  :data:`MAX_CONCURRENT_STREAMS`, which h2 alone counts only for streams still open.
"""

from __future__ import annotations

import asyncio
import collections
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
from alb_proxy.http.forward import (
    ClientGone,
    ForwardRequest,
    RouteSettings,
    forward,
    log_refusal,
)
from alb_proxy.http.h1 import ConnectionControl
from alb_proxy.observability.log import event

MAX_CONCURRENT_STREAMS = 128
"""Advertised, and enforced on running streams, reset ones included."""
MAX_BUFFERED = 1024 * 1024
"""Unsent bytes for one client beyond which no more of its frames are read. What piles up past
it is what h2 answers by itself (ACKs, RST_STREAM for frames on reset streams). Responses reach
it only briefly (each stream waits for the socket after every frame it writes; 128 streams
writing 16 KiB each at once could), and pausing reads then until the client catches up is
harmless."""
CONTROL_FRAME_BURST = 1000
CONTROL_FRAMES_PER_S = 100.0
"""PING and SETTINGS frames: a client keeping a connection alive sends one every few seconds."""
RESET_BURST = 200
RESETS_PER_S = 20.0
"""Streams the client resets (RST_STREAM): a browser leaving a page may cancel every stream it
has open at once (up to 128), but not hundreds a second for long."""
_READ_SIZE = 256 * 1024
_COALESCE_LIMIT = 64 * 1024
"""Body bytes queued in h2 before a stream writes them out at once and waits for the socket."""
_FEED_SIZE = 4 * 1024
"""Bytes handed to h2 at once: its costliest frames (HEADERS of streams reset at once, ~26 bytes
and ~36 µs each) keep it busy ~6 ms."""
_TURN_S = 0.002
"""Time one connection may spend feeding h2 before it lets the event loop turn."""
_WINDOW = 1024 * 1024
"""Receive window per stream and for the connection: enough for fast uploads, bounded memory."""
_DECODE_LIMIT = 1024 * 1024
"""Largest header list decoded at all (HPACK can inflate a few bytes into kilobytes). A list
over the listener's ``max_header_bytes`` but under this is decoded and answered 431, as on
HTTP/1.1; past it the client is abusing the connection and h2 ends it (ENHANCE_YOUR_CALM)."""
_LINGER_S = 2.0
_LINGER_BYTES = 1024 * 1024
"""After our GOAWAY, how long and how much of what the client still sends is read (and dropped)
while it closes: a client flooding on is not worth more."""

Header = tuple[bytes, bytes]


class FloodBudget:
    """A token bucket: ``burst`` events at once, ``per_second`` sustained. Time is passed in."""

    def __init__(self, burst: int, per_second: float) -> None:
        self.burst = burst
        self.per_second = per_second
        self._tokens = float(burst)
        self._at: float | None = None

    def spend(self, now: float) -> bool:
        """Take one token; False once the bucket is empty (the peer is over its budget)."""
        if self._at is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.per_second)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


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
                client_side=False,
                header_encoding=None,
                # fields.py checks requests (400 on that stream alone; h2 would end the whole
                # connection) and headers.trailers_across what trailers may carry on.
                validate_inbound_headers=False,
                # What we send was parsed already (llhttp: lowercase names, valid values) and
                # stripped of connection-specific fields (headers.HOP_BY_HOP): h2's second
                # check of every response header costs a tenth of a request.
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        self.streams: dict[int, _Stream] = {}
        """Streams the client may still send on: started, or waiting in ``_pending``."""
        self._pending: dict[int, _Stream] = {}
        """Received in the slice being handled; started once it is done, unless reset."""
        self._tasks: set[asyncio.Task[None]] = set()
        """Every stream task not yet finished, those of reset streams included."""
        self._control_frames = FloodBudget(CONTROL_FRAME_BURST, CONTROL_FRAMES_PER_S)
        self._resets = FloodBudget(RESET_BURST, RESETS_PER_S)
        self._window_open = asyncio.Event()
        self._closed = False
        self._goaway_sent = False
        self._send_timeout = route.idle_timeout
        """How long queued bytes may take to leave once the connection is closing."""
        self._flush_scheduled = False
        self._unflushed = 0
        """Body bytes handed to h2 since the last write to the socket."""

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
        self._raise_decode_limit()
        try:
            self.flush()
            while not self._closed:
                if self.control.draining and not self.streams:
                    break
                try:
                    async with asyncio.timeout(self.route.idle_timeout):
                        data = await self.reader.read(_READ_SIZE)
                except TimeoutError:
                    if self.streams:
                        continue  # quiet while its requests are answered: not idle
                    break
                if not data or not await self._feed(data):
                    break
            self._goaway()
        except (ConnectionError, ClientGone):
            pass
        finally:
            self._closed = True
            for stream in list(self.streams.values()):
                stream.cancel()
            if self._tasks:
                await asyncio.wait(self._tasks, timeout=5)
            await self._close()

    async def _feed(self, data: bytes) -> bool:
        """Hand the client's bytes to h2 a slice at a time, letting the event loop turn every
        _TURN_S; False when the connection is to end."""
        loop = asyncio.get_running_loop()
        turn = loop.time()
        for start in range(0, len(data), _FEED_SIZE):
            if loop.time() - turn > _TURN_S:
                await asyncio.sleep(0)
                turn = loop.time()
            if self._closed or not await self._writable():
                return False
            try:
                events = self.conn.receive_data(data[start : start + _FEED_SIZE])
            except h2.exceptions.ProtocolError as exc:
                event(
                    logging.INFO,
                    "http/2 protocol error",
                    listener=self.route.listener,
                    client=self.client_ip,
                    error=str(exc),
                )
                self.flush()
                return False
            now = loop.time()
            for ev in events:
                self._handle(ev, now)
                if self._closed:
                    break
            self._start_pending()
            self.flush()
        return not self._closed

    async def _writable(self) -> bool:
        """Backpressure: past MAX_BUFFERED unsent bytes, wait for the client to take some (the
        transport resumes writing below its low-water mark); False if it takes none for
        ``idle_timeout``."""
        if self.writer.transport.get_write_buffer_size() <= MAX_BUFFERED:
            return True
        try:
            async with asyncio.timeout(self.route.idle_timeout):
                await self.drain()
        except TimeoutError:
            event(
                logging.INFO,
                "http/2 client not reading",
                listener=self.route.listener,
                client=self.client_ip,
                buffered=self.writer.transport.get_write_buffer_size(),
            )
            self._send_timeout = 0.0
            return False
        return True

    async def _close(self) -> None:
        """Close; the queued bytes (the GOAWAY last) get ``_send_timeout`` to leave, then a
        client that takes none is cut off instead of keeping its buffer.

        After our GOAWAY, what the client still sends is read and dropped until it closes too,
        within _LINGER_S and _LINGER_BYTES: a socket closed with unread bytes makes the kernel
        send a reset, which can destroy the GOAWAY before the client reads it."""
        if self._goaway_sent and self._send_timeout:
            dropped = 0
            with contextlib.suppress(TimeoutError, OSError):
                async with asyncio.timeout(_LINGER_S):
                    while dropped < _LINGER_BYTES and (data := await self.reader.read(_READ_SIZE)):
                        dropped += len(data)
        self.writer.close()
        if self.writer.transport.get_write_buffer_size():
            try:
                async with asyncio.timeout(self._send_timeout):
                    await self.writer.wait_closed()
            except TimeoutError:
                self.writer.transport.abort()
            except OSError:
                pass

    def _goaway(self, error_code: h2.errors.ErrorCodes = h2.errors.ErrorCodes.NO_ERROR) -> None:
        if self._goaway_sent:
            return
        self._goaway_sent = True
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.conn.close_connection(
                error_code=error_code, last_stream_id=self.conn.highest_inbound_stream_id
            )
            self.flush()

    def _calm(self, reason: str) -> None:
        """GOAWAY(ENHANCE_YOUR_CALM), then close: the client is over one of its budgets."""
        event(
            logging.WARNING,
            "http/2 client over its limits",
            listener=self.route.listener,
            client=self.client_ip,
            reason=reason,
        )
        self._goaway(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
        self._closed = True

    def _handle(self, ev: h2.events.Event, now: float) -> None:
        if isinstance(ev, h2.events.RequestReceived):
            self.control.busy = True
            running = len(self._tasks) + len(self._pending)
            if self.control.draining or running >= MAX_CONCURRENT_STREAMS:
                self.conn.reset_stream(ev.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
                return
            if self.control.current_route is not None:
                self.route = self.control.current_route()  # the group as it is now
            stream = _Stream(
                self, ev.stream_id, ev.headers if ev.headers else [], ev.stream_ended is not None
            )
            self.streams[ev.stream_id] = stream
            self._pending[ev.stream_id] = stream
        elif isinstance(ev, h2.events.DataReceived):
            found = self.streams.get(ev.stream_id)
            if found is None:
                # Body for a stream we already answered: give the window back, drop the bytes.
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            else:
                found.feed(ev.data if ev.data else b"", ev.flow_controlled_length)
        elif isinstance(ev, h2.events.TrailersReceived):
            found = self.streams.get(ev.stream_id)
            if found is not None:
                found.request_trailers = list(ev.headers) if ev.headers else []
        elif isinstance(ev, h2.events.StreamEnded):
            found = self.streams.get(ev.stream_id)
            if found is not None:
                found.feed_end()
        elif isinstance(ev, h2.events.StreamReset):
            found = self.streams.pop(ev.stream_id, None)
            if found is not None:
                self._pending.pop(ev.stream_id, None)
                found.cancel()
                found.release()
            if ev.remote_reset and not self._resets.spend(now):
                self._calm("too many streams reset")
        elif isinstance(ev, h2.events.PingReceived):
            if not self._control_frames.spend(now):
                self._calm("too many PING and SETTINGS frames")
        elif isinstance(ev, h2.events.RemoteSettingsChanged):
            self._window_open.set()
            if not self._control_frames.spend(now):
                self._calm("too many PING and SETTINGS frames")
        elif isinstance(ev, h2.events.WindowUpdated):
            self._window_open.set()
        elif isinstance(ev, h2.events.SettingsAcknowledged):
            self._raise_decode_limit()  # h2 has just lowered it to what we advertised
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self._closed = True

    def _raise_decode_limit(self) -> None:
        """h2 decodes no header list over the MAX_HEADER_LIST_SIZE we advertise, and ends the
        whole connection over one that is; decoding up to _DECODE_LIMIT lets fields.py answer
        that request alone with 431."""
        self.conn.decoder.max_header_list_size = max(_DECODE_LIMIT, self.route.max_header_bytes)

    def _start_pending(self) -> None:
        pending, self._pending = self._pending, {}
        if not self._closed:
            for stream in pending.values():
                task = stream.start()
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        self._check_idle()

    def flush(self) -> None:
        self._flush_scheduled = False
        self._unflushed = 0
        data = self.conn.data_to_send()
        if data:
            self.writer.write(data)

    def flush_soon(self, body_bytes: int = 0) -> bool:
        """Frames from every stream in this turn of the loop leave in one write (one TLS
        record, one syscall) rather than one per frame. True when enough body is waiting that
        the caller should flush now and wait for the socket (backpressure)."""
        self._unflushed += body_bytes
        if self._unflushed >= _COALESCE_LIMIT:
            return True
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_if_open)
        return False

    def _flush_if_open(self) -> None:
        if self._flush_scheduled and not self.writer.is_closing():
            self.flush()

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
        self._check_idle()

    def _check_idle(self) -> None:
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

    def __init__(
        self, session: H2Session, stream_id: int, raw: Sequence[Header], ended: bool
    ) -> None:
        self.session = session
        self.conn = session.conn
        self.stream_id = stream_id
        self.route = session.route
        self.raw = raw
        self.ended = ended
        self._body: collections.deque[tuple[bytes, int] | None] = collections.deque()
        if ended:
            self._body.append(None)
        self._body_waiter: asyncio.Future[None] | None = None
        self.task: asyncio.Task[None] | None = None
        self._sent_head = False
        self._cancelled = False
        self.request_trailers: list[Header] = []

    def start(self) -> asyncio.Task[None]:
        self.task = asyncio.ensure_future(self._run(self.raw, self.ended))
        return self.task

    def feed(self, data: bytes, flow_controlled: int) -> None:
        if not data:
            # Empty DATA frames cost the client nothing; queued, a stream of them would grow
            # without bound while the backend is slow. Padding alone is given back at once.
            if flow_controlled:
                self.conn.acknowledge_received_data(flow_controlled, self.stream_id)
                self.session.flush_soon()
            return
        self._body.append((data, flow_controlled))
        self._wake()

    def release(self) -> None:
        """Give back the connection window of body bytes never read (the request was refused,
        reset, or answered without reading it): else every such upload shrinks the window all
        streams share, until none can send."""
        unread = sum(item[1] for item in self._body if item is not None)
        self._body.clear()
        if unread:
            self.conn.acknowledge_received_data(unread, self.stream_id)
            self.session.flush_soon()

    def feed_end(self) -> None:
        self._body.append(None)
        self._wake()

    def _wake(self) -> None:
        waiter, self._body_waiter = self._body_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

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
            self.release()
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
        if not self._body:
            waiter = self._body_waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(self.route.idle_timeout):
                    await waiter
            except TimeoutError as exc:
                raise ClientGone() from exc
        if not self._body:
            raise ClientGone()  # released: the stream was reset
        item = self._body.popleft()
        if item is None:
            return None
        data, flow_controlled = item
        # The backend side took it: only now may the client send more (backpressure).
        if not self._cancelled:
            with contextlib.suppress(h2.exceptions.StreamClosedError):
                self.conn.acknowledge_received_data(flow_controlled, self.stream_id)
                self.session.flush_soon()
        return data

    async def send_informational(self, status: int, headers: list[Header]) -> None:
        self._check()
        self.conn.send_headers(self.stream_id, [(b":status", str(status).encode()), *headers])
        self.session.flush_soon()

    async def send_head(self, status: int, headers: list[Header], reason: bytes) -> None:
        self._check()
        self.conn.send_headers(self.stream_id, [(b":status", b"%d" % status), *headers])
        self._sent_head = True
        self.session.flush_soon()

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
            view = view[window:]
            if self.session.flush_soon(window):
                self.session.flush()
                await self.session.drain()

    async def end(self, trailers: list[Header]) -> None:
        self._check()
        if trailers:
            self.conn.send_headers(self.stream_id, trailers, end_stream=True)
        else:
            self.conn.end_stream(self.stream_id)
        self.session.flush_soon()

    async def send_error(self, status: int, detail: str) -> None:
        if self._cancelled or self._sent_head:
            return
        log_refusal(self.route, self.session.client_ip, status, detail)
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
