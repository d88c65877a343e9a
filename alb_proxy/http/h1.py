"""HTTP/1.1 front end: one client connection, its requests forwarded to a server group.

``h1wire`` parses the client's bytes into events (llhttp: strict framing, limits, refusals with
their status); this module reads them from a :class:`~alb_proxy.http.stream.Stream`, offers each
exchange to ``forward`` as a :class:`~alb_proxy.http.forward.Downstream`, and frames the answer
for this client: the backend's ``Content-Length`` when it gave one, else chunked for HTTP/1.1,
else the end of the connection (HTTP/1.0). Nothing is written for HEAD, 1xx, 204 and 304 bodies.

Refused here, before anything reaches a backend: malformed framing and heads (400), a head over
the listener's limit (431), transfer codings other than chunked and unknown methods (501),
CONNECT (405). Small pieces of one answer written in the same loop iteration (head, body, end)
leave in one write: one TLS record, one syscall; a streaming body leaves as it comes, and a
writer waits (``drain``) while the client does not read, so a slow reader slows the backend
instead of filling memory.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Final

from alb_proxy.http import h1wire
from alb_proxy.http.fields import error_response
from alb_proxy.http.forward import (
    BadRequestBody,
    ClientGone,
    ForwardRequest,
    RouteSettings,
    forward,
    log_refusal,
)
from alb_proxy.http.h1wire import (
    BodyKind,
    Data,
    End,
    RequestHead,
    RequestReader,
    Switched,
    WireError,
)
from alb_proxy.http.headers import response_headers_for_client
from alb_proxy.http.stream import Stream
from alb_proxy.upstream.connection import BackendConnection

_COALESCE_LIMIT = 64 * 1024
IDLE_GRACE_S = 2.0
"""How long a connection waits between requests in its task before it idles without one."""
Header = tuple[bytes, bytes]


@dataclass
class ConnectionControl:
    """Shared between a session and its listener, which uses it to drain."""

    busy: bool = False
    draining: bool = False
    on_drain: Callable[[], None] | None = None
    """Set by sessions that close themselves on a drain (HTTP/2: GOAWAY once streams end)."""
    current_route: Callable[[], RouteSettings] | None = None
    """The listener's route now. Each request takes it as it begins: a server removed from
    the group gets no new request from a connection opened before the change (the TLS state,
    by contrast, is the connection's for its life)."""


class _Framing:
    NONE: Final = 0
    LENGTH: Final = 1
    CHUNKED: Final = 2
    UNTIL_CLOSE: Final = 3


class H1Session:
    def __init__(
        self,
        stream: Stream,
        route: RouteSettings,
        control: ConnectionControl,
        client_cert_headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        self.stream = stream
        self.route = route
        self.control = control
        self.client_cert_headers = client_cert_headers
        self._reader: RequestReader | None = None
        """Made when the first byte arrives: an idle connection costs memory by the thousand."""
        peer = stream.extra("peername")
        self.client_ip: str = peer[0] if peer else "-"
        self.request_trailers: list[Header] = []
        self._request: RequestHead | None = None
        self._request_done = False
        self._head_sent = False
        self._framing = _Framing.NONE
        self._keep_alive = False
        self._out: list[bytes] = []
        self._out_size = 0
        self._flush_scheduled = False

    async def serve(self) -> bool:
        """Serve the requests whose bytes have begun to arrive. True when the connection is
        idle and stays open (the caller runs this again when the client sends more, so an idle
        keep-alive connection holds no task); False when it is closed."""
        try:
            while await self._one_exchange():
                reader = self._reader
                if reader is not None and reader.pending:
                    continue  # a pipelined request is here already
                self._flush_out()
                self.control.busy = False  # between requests: a drain may close it at once
                # A busy client sends its next request within moments: wait a little for it
                # (starting a task per request costs more), then let the connection idle.
                grace = min(IDLE_GRACE_S, self.route.idle_timeout)
                if not await self.stream.readable(grace) and not self.control.draining:
                    return True
        except ClientGone:
            pass
        self._flush_out()
        self.stream.close()
        return False

    async def _one_exchange(self) -> bool:
        """Serve one request; True when the connection can carry another."""
        # A pipelined request may be under way already.
        self.control.busy = self._reader is not None and self._reader.pending
        self.request_trailers = []
        self._head_sent = False  # a refusal of this request is answered, not cut
        if self.control.draining:
            return False
        loop = asyncio.get_running_loop()
        # One deadline for the whole head: a client trickling a byte at a time cannot hold the
        # connection past the idle timeout.
        deadline = loop.time() + self.route.idle_timeout
        try:
            head = await self._next_event(deadline)
        except TimeoutError:
            return False
        except WireError as exc:
            await self._refuse(exc.status, exc.detail)
            return False
        if head is None:
            return False  # the client is done
        if not isinstance(head, RequestHead):
            return False
        self._request, self._request_done = head, False
        self._head_sent, self._keep_alive = False, False
        self.control.busy = True
        if head.body is BodyKind.NONE:
            await self._expect_end()
        keep_alive = await self._forward(head)
        return keep_alive and self._keep_alive and self._request_done and not self.control.draining

    async def _expect_end(self) -> None:
        """A body-less request: its end is parsed with its head."""
        ev = self.reader.next_event()
        if not isinstance(ev, End):  # pragma: no cover - llhttp always ends it at once
            raise ClientGone()
        self._request_done = True

    async def _forward(self, request: RequestHead) -> bool:
        if self.control.current_route is not None:
            self.route = self.control.current_route()
        outcome = await forward(
            ForwardRequest(
                method=request.method,
                target=request.target,
                headers=request.headers,
                has_body=request.body is not BodyKind.NONE,
                client_ip=self.client_ip,
                client_cert_headers=self.client_cert_headers,
                upgrade=b"websocket" if request.websocket else None,
            ),
            self,
            self.route,
        )
        if outcome.upgraded is not None:
            try:
                await self._tunnel(*outcome.upgraded)
            finally:
                if outcome.backend_index is not None:
                    self.route.group.finished(outcome.backend_index)
            return False
        if request.websocket:
            # The backend did not switch: what follows the head is HTTP/1.1 again.
            ev = self.reader.next_event()
            if isinstance(ev, Switched):
                try:
                    self.reader.resume()
                except WireError as exc:
                    await self._refuse(exc.status, exc.detail)
                    return False
        return outcome.reusable

    async def _refuse(self, status: int, detail: str) -> None:
        self.route.metrics.request_answered(self.route.listener, status)
        await self.send_error(status, detail)

    # -- reading the client -------------------------------------------------------------------

    @property
    def reader(self) -> RequestReader:
        """The request parser (there is one once a request has begun)."""
        assert self._reader is not None
        return self._reader

    async def _next_event(self, deadline: float | None) -> h1wire.Event | None:
        """The client's next event; None when it closed between requests. Raises WireError,
        TimeoutError, ClientGone."""
        while True:
            reader = self._reader
            if reader is not None:
                ev = reader.next_event()
                if ev is not None:
                    return ev
            timeout = None
            if deadline is not None:
                timeout = deadline - asyncio.get_running_loop().time()
                if timeout <= 0:
                    raise TimeoutError()
            try:
                data = await self.stream.read(timeout)
            except ConnectionError as exc:
                raise ClientGone() from exc
            if not data:
                if self._request is not None and not self._request_done:
                    raise ClientGone()  # left mid-request
                if self.control.busy:
                    raise ClientGone()  # left mid-head
                return None
            self.control.busy = True  # a request has begun: a drain lets it finish
            if reader is None:
                reader = self._reader = RequestReader(self.route.max_header_bytes)
            reader.feed(data)

    # -- Downstream: what forward() answers through ---------------------------------------

    async def read_body(self) -> bytes | None:
        loop = asyncio.get_running_loop()
        try:
            ev = await self._next_event(loop.time() + self.route.idle_timeout)
        except TimeoutError as stalled:
            raise ClientGone() from stalled  # stalled mid-body: give up on this client
        except WireError as bad:
            if self.stream.at_eof:
                raise ClientGone() from bad  # the client left mid-body: nobody to answer
            raise BadRequestBody(bad.status, bad.detail) from bad
        if isinstance(ev, Data):
            return ev.data
        if isinstance(ev, End):
            self.request_trailers = ev.trailers
            self._request_done = True
            return None
        raise ClientGone()

    async def send_informational(self, status: int, headers: list[Header]) -> None:
        request = self._request
        if request is None or not request.http11:
            return  # HTTP/1.0 clients know no 1xx
        self._write(
            h1wire.response_head(status, _phrase(status), response_headers_for_client(headers))
        )
        await self._drain()

    async def send_head(self, status: int, headers: list[Header], reason: bytes) -> None:
        request = self._request
        assert request is not None
        keep_alive = request.keep_alive and request.http11 and not self.control.draining
        if request.method == b"HEAD" or status < 200 or status in (204, 304):
            framing = _Framing.NONE
        elif any(name == b"content-length" for name, _ in headers):
            framing = _Framing.LENGTH
        elif request.http11:
            framing = _Framing.CHUNKED
            headers = [*headers, (b"transfer-encoding", b"chunked")]
        else:
            framing, keep_alive = _Framing.UNTIL_CLOSE, False
        if not keep_alive:
            headers = [*headers, (b"connection", b"close")]
        self._framing, self._keep_alive = framing, keep_alive
        self._head_sent = True
        self._write(h1wire.response_head(status, reason or _phrase(status), headers))

    async def send_data(self, data: bytes) -> None:
        framing = self._framing
        if framing == _Framing.NONE or not data:
            return
        if self.stream.closing:
            raise ClientGone()  # the client left mid-response: stop reading the backend
        self._write(h1wire.chunk(data) if framing == _Framing.CHUNKED else data)
        if self._out_size >= _COALESCE_LIMIT or self.stream.writing_paused:
            # Enough to send now, or the client is not keeping up: wait for it, however
            # small the backend's pieces, so a slow reader slows the backend.
            await self._drain()
        elif not self._flush_scheduled:
            # Small pieces written in this loop iteration (head, body, end) leave as one
            # write: one TLS record, one syscall. Streaming bodies still leave promptly.
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_out)

    async def end(self, trailers: list[Header]) -> None:
        if self._framing == _Framing.CHUNKED:
            self._write(h1wire.last_chunk(trailers))
        await self._drain()

    async def send_error(self, status: int, detail: str) -> None:
        """Answer with a short text error and mark the connection for closing."""
        if self.stream.closing:
            raise ClientGone()
        if self._head_sent:
            self.abort()
            raise ClientGone()
        headers, body = error_response(status)
        headers.append((b"connection", b"close"))
        log_refusal(self.route, self.client_ip, status, detail)
        self._keep_alive = False
        self._head_sent = True
        self._write(h1wire.response_head(status, _phrase(status), headers) + body)
        await self._drain()

    def abort(self) -> None:
        self.stream.abort()

    def _write(self, data: bytes) -> None:
        self._out.append(data)
        self._out_size += len(data)

    def _flush_out(self) -> None:
        self._flush_scheduled = False
        if self._out:
            out, self._out, self._out_size = self._out, [], 0
            self.stream.write(out[0] if len(out) == 1 else b"".join(out))

    async def _drain(self) -> None:
        self._flush_out()
        try:
            await self.stream.drain()
        except ConnectionError as exc:
            raise ClientGone() from exc

    # -- upgrades -------------------------------------------------------------------------------

    async def _tunnel(self, conn: BackendConnection, switch: h1wire.ResponseHead) -> None:
        """The backend switched protocols (WebSocket): relay bytes both ways until either
        side closes or both are idle for the listener's idle timeout. Never pooled after."""
        route = self.route
        upgrade = dict(switch.headers).get(b"upgrade", b"websocket")
        if self._request is None or not self._request.websocket:
            conn.close()
            await self.send_error(502, "backend switched protocols unasked")
            return
        if upgrade.strip().lower() != b"websocket":
            conn.close()  # only WebSocket was asked for
            await self.send_error(502, f"backend switched to {upgrade!r}, not websocket")
            return
        headers = response_headers_for_client(switch.headers)
        headers += [(b"connection", b"upgrade"), (b"upgrade", upgrade)]
        self._write(h1wire.response_head(101, switch.reason or b"Switching Protocols", headers))
        self._flush_out()
        backend_rest = conn.reader.next_event()
        if isinstance(backend_rest, Switched) and backend_rest.rest:
            self.stream.write(backend_rest.rest)
        client_rest = self.reader.next_event()
        while client_rest is not None and not isinstance(client_rest, Switched):
            client_rest = self.reader.next_event()
        if client_rest is not None and client_rest.rest:
            conn.stream.write(client_rest.rest)
        route.metrics.tunnels_active.labels(route.listener).inc()
        activity = [asyncio.get_running_loop().time()]
        try:
            await asyncio.gather(
                _pump(self.stream, conn.stream, route.idle_timeout, activity),
                _pump(conn.stream, self.stream, route.idle_timeout, activity),
            )
        except (ConnectionError, TimeoutError):
            pass
        finally:
            route.metrics.tunnels_active.labels(route.listener).dec()
            conn.close()


async def _pump(source: Stream, sink: Stream, idle: float, activity: list[float]) -> None:
    """Copy one direction of a tunnel; at EOF pass the half-close on, or close. The tunnel is
    idle only when neither direction moved for ``idle``: ``activity[0]`` is the last time
    either did."""
    loop = asyncio.get_running_loop()
    try:
        while True:
            try:
                data = await source.read(max(activity[0] + idle - loop.time(), 0.001))
            except TimeoutError:
                if loop.time() - activity[0] < idle:
                    continue  # the other direction is busy
                raise
            if not data:
                break
            activity[0] = loop.time()
            sink.write(data)
            await sink.drain()
    finally:
        if sink.can_write_eof() and not sink.closing:
            with contextlib.suppress(OSError):
                sink.write_eof()
        else:
            sink.close()


def _phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""
