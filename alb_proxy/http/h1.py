"""HTTP/1.1 front end: one client connection, its requests forwarded to a server group.

h11 keeps the protocol state of both sides (client connection as SERVER, backend connection as
CLIENT); this module only moves events between them. Bodies are streamed chunk by chunk and every
write is followed by a drain, so a slow reader on either side slows the other instead of filling
memory.

What h11 accepts but a proxy must not: a request with both Content-Length and Transfer-Encoding
is a smuggling vector when the backend frames it differently, so it is refused here with 400.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus

import h11

from alb_proxy.http.headers import request_headers_for_backend, response_headers_for_client
from alb_proxy.observability.log import event
from alb_proxy.observability.metrics import Metrics
from alb_proxy.upstream.connection import BackendClosed, BackendConnection
from alb_proxy.upstream.group import GroupRuntime
from alb_proxy.upstream.pool import ConnectionPool

MAX_HEADER_BYTES = 64 * 1024
_READ_SIZE = 256 * 1024
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


@dataclass(frozen=True)
class RouteSettings:
    """What a listener's requests need: where they go and how long to wait."""

    listener: str
    scheme: str
    """``http`` or ``https``: the value of X-Forwarded-Proto."""
    port: int
    group: GroupRuntime
    pool: ConnectionPool
    metrics: Metrics
    idle_timeout: float
    request_timeout: float
    response_headers: tuple[tuple[bytes, bytes], ...] = ()
    """Added to every response (e.g. Alt-Svc)."""


@dataclass
class ConnectionControl:
    """Shared between a session and its listener, which uses it to drain."""

    busy: bool = False
    draining: bool = False


class _ClientGone(Exception):
    """The client closed or broke its connection; nothing more can be sent to it."""


class H1Session:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        route: RouteSettings,
        control: ConnectionControl,
        client_cert_headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.route = route
        self.control = control
        self.client_cert_headers = client_cert_headers
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        peer = writer.get_extra_info("peername")
        self.client_ip: str = peer[0] if peer else "-"

    async def run(self) -> None:
        try:
            while await self._one_exchange():
                self.h11.start_next_cycle()
        except _ClientGone:
            pass
        finally:
            self.writer.close()

    async def _one_exchange(self) -> bool:
        """Serve one request; True when the connection can carry another."""
        self.control.busy = False
        if self.control.draining:
            return False
        try:
            request = await self._next_client_event(self.route.idle_timeout)
        except TimeoutError:
            return False
        except h11.RemoteProtocolError as exc:
            await self._send_error(exc.error_status_hint, str(exc))
            return False
        if not isinstance(request, h11.Request):
            return False  # ConnectionClosed: the client is done
        self.control.busy = True
        keep_alive = await self._forward(request)
        return (
            keep_alive
            and self.h11.our_state is h11.DONE
            and self.h11.their_state is h11.DONE
            and not self.control.draining
        )

    # -- client side --------------------------------------------------------------------------

    async def _next_client_event(self, timeout: float) -> h11.Event:
        while True:
            ev = self.h11.next_event()
            if ev is h11.NEED_DATA:
                try:
                    async with asyncio.timeout(timeout):
                        data = await self.reader.read(_READ_SIZE)
                except ConnectionError as exc:
                    raise _ClientGone() from exc
                self.h11.receive_data(data)
                continue
            if ev is h11.PAUSED:
                return h11.ConnectionClosed()
            assert isinstance(ev, h11.Event)
            return ev

    def _write(self, ev: h11.Event) -> None:
        data = self.h11.send(ev)
        if data:
            self.writer.write(data)

    async def _drain(self) -> None:
        try:
            await self.writer.drain()
        except ConnectionError as exc:
            raise _ClientGone() from exc

    async def _send_error(self, status: int, detail: str) -> None:
        """Answer with a short text error and mark the connection for closing."""
        self.route.metrics.requests_total.labels(self.route.listener, f"{status // 100}xx").inc()
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            self.writer.transport.abort()
            raise _ClientGone()
        phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else ""
        body = f"{status} {phrase}\n".encode()
        headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        if status >= 500 or status in (400, 431):
            event(
                logging.INFO,
                "request refused",
                listener=self.route.listener,
                client=self.client_ip,
                status=status,
                detail=detail,
            )
        try:
            self._write(h11.Response(status_code=status, headers=headers, reason=phrase.encode()))
            self._write(h11.Data(data=body))
            self._write(h11.EndOfMessage())
        except h11.LocalProtocolError as exc:
            raise _ClientGone() from exc
        await self._drain()

    # -- forwarding ---------------------------------------------------------------------------

    async def _forward(self, request: h11.Request) -> bool:
        route = self.route
        # h11 bounds only a head still incomplete in its buffer; one that arrived whole in a
        # single read is measured here, so the limit holds whatever the packet boundaries.
        head_size = len(request.target) + sum(len(n) + len(v) + 4 for n, v in request.headers)
        if head_size > MAX_HEADER_BYTES:
            await self._send_error(431, f"request head of {head_size} bytes")
            return False
        framing = {name for name, _ in request.headers if name in _FRAMING}
        if len(framing) == 2:
            await self._send_error(400, "Content-Length and Transfer-Encoding both present")
            return False
        backend = route.group.pick(self.client_ip)
        if backend is None:
            await self._send_error(503, f"server group {route.group.id} has no available server")
            return False
        headers = request_headers_for_backend(
            request.headers,
            client_ip=self.client_ip,
            proto=route.scheme,
            port=route.port,
            client_cert_headers=self.client_cert_headers,
        )
        upgrade = _upgrade_requested(request.headers)
        if upgrade is not None:
            # Connection and Upgrade are hop-by-hop; an upgrade is asked for again, hop by hop.
            headers += [(b"connection", b"upgrade"), (b"upgrade", upgrade)]
        has_body = bool(framing) and not _zero_length(request.headers)
        if b"transfer-encoding" in framing:
            # Transfer-Encoding is hop-by-hop and was dropped; re-frame the body for the backend
            # (h11 only frames a request body the headers announce).
            headers.append((b"transfer-encoding", b"chunked"))
        outgoing = h11.Request(
            method=request.method,
            target=request.target,
            headers=headers,
            http_version=request.http_version,
        )
        if not has_body and not isinstance(self.h11.next_event(), h11.EndOfMessage):
            # h11 has the (empty) end of a body-less request ready without more bytes.
            await self._send_error(400, "unexpected request body framing")
            return False
        retry_allowed = not has_body and request.method in _IDEMPOTENT
        fresh = False
        while True:
            try:
                conn, reused = await route.pool.acquire(
                    backend.host, backend.port, route.group.connect_timeout, fresh=fresh
                )
            except (OSError, TimeoutError) as exc:
                route.metrics.upstream_errors_total.labels(route.group.id, "connect").inc()
                event(
                    logging.WARNING,
                    "backend unreachable",
                    group=route.group.id,
                    server=backend.address,
                    error=_describe(exc),
                )
                await self._send_error(502, f"cannot connect to {backend.address}")
                return False
            try:
                return await self._exchange(conn, outgoing, has_body)
            except _StaleConnection:
                conn.close()
                if reused and retry_allowed and not fresh:
                    fresh = True
                    continue
                route.metrics.upstream_errors_total.labels(route.group.id, "protocol").inc()
                await self._send_error(502, f"{backend.address} closed the connection")
                return False

    async def _exchange(
        self, conn: BackendConnection, outgoing: h11.Request, has_body: bool
    ) -> bool:
        route = self.route
        started = time.monotonic()
        upload: asyncio.Task[None] | None = None
        try:
            conn.write(outgoing)
            if has_body:
                upload = asyncio.create_task(self._upload(conn))
            else:
                conn.write(h11.EndOfMessage())
                await conn.writer.drain()
            response = await self._response_head(conn, upload)
        except _BadRequestBody as exc:
            await self._abandon(conn, upload)
            await self._send_error(exc.status, exc.detail)
            return False
        except TimeoutError:
            await self._abandon(conn, upload)
            route.metrics.upstream_errors_total.labels(route.group.id, "timeout").inc()
            await self._send_error(504, f"{conn.address} did not answer in time")
            return False
        except (BackendClosed, ConnectionError) as exc:
            await self._abandon(conn, upload)
            if conn.bytes_received == 0:
                raise _StaleConnection() from exc
            route.metrics.upstream_errors_total.labels(route.group.id, "protocol").inc()
            await self._send_error(502, f"{conn.address}: {_describe(exc)}")
            return False
        except h11.ProtocolError as exc:
            await self._abandon(conn, upload)
            route.metrics.upstream_errors_total.labels(route.group.id, "protocol").inc()
            await self._send_error(502, f"{conn.address} answered garbage: {exc}")
            return False
        except BaseException:
            await self._abandon(conn, upload)
            raise
        route.metrics.upstream_latency.labels(route.group.id).observe(time.monotonic() - started)
        if isinstance(response, h11.InformationalResponse):
            return await self._tunnel(conn, response)
        return await self._relay_response(conn, response, upload)

    async def _upload(self, conn: BackendConnection) -> None:
        """Stream the request body to the backend, chunk by chunk."""
        while True:
            try:
                ev = await self._next_client_event(self.route.idle_timeout)
            except TimeoutError as exc:
                raise _ClientGone() from exc  # stalled mid-body: give up on this client
            except h11.RemoteProtocolError as exc:
                raise _BadRequestBody(exc.error_status_hint, str(exc)) from exc
            if isinstance(ev, h11.Data):
                conn.write(h11.Data(data=ev.data))
                await conn.writer.drain()
            elif isinstance(ev, h11.EndOfMessage):
                conn.write(h11.EndOfMessage(headers=ev.headers))
                await conn.writer.drain()
                return
            else:
                raise _ClientGone()

    async def _response_head(
        self, conn: BackendConnection, upload: asyncio.Task[None] | None
    ) -> h11.Response | h11.InformationalResponse:
        """Wait for the backend's final response head, relaying 1xx responses on the way;
        a 101 (the backend accepted an upgrade) is returned as is."""
        timeout = self.route.request_timeout
        while True:
            if upload is not None and not upload.done():
                head = asyncio.ensure_future(conn.next_event(timeout))
                await asyncio.wait({head, upload}, return_when=asyncio.FIRST_COMPLETED)
                if upload.done() and upload.exception() is not None and not head.done():
                    head.cancel()
                    upload.result()  # the client went away mid-upload: re-raise it
                ev = await head
            else:
                ev = await conn.next_event(timeout)
            if isinstance(ev, h11.InformationalResponse):
                if ev.status_code == 101:
                    return ev
                self._write(ev)
                await self._drain()
                continue
            assert isinstance(ev, h11.Response)
            return ev

    async def _relay_response(
        self, conn: BackendConnection, response: h11.Response, upload: asyncio.Task[None] | None
    ) -> bool:
        route = self.route
        headers = response_headers_for_client(response.headers)
        headers.extend(route.response_headers)
        if self.control.draining:
            headers.append((b"connection", b"close"))
        status_class = f"{response.status_code // 100}xx"
        route.metrics.requests_total.labels(route.listener, status_class).inc()
        try:
            self._write(
                h11.Response(
                    status_code=response.status_code,
                    headers=headers,
                    reason=response.reason,
                )
            )
            while True:
                ev = await conn.next_event(route.request_timeout)
                if isinstance(ev, h11.Data):
                    self._write(ev)
                    await self._drain()
                elif isinstance(ev, h11.EndOfMessage):
                    self._write(h11.EndOfMessage())
                    await self._drain()
                    break
        except (TimeoutError, BackendClosed, ConnectionError, h11.ProtocolError) as exc:
            # The head is out: the only honest signal left is to cut the client connection.
            route.metrics.upstream_errors_total.labels(route.group.id, "broken_response").inc()
            event(
                logging.WARNING,
                "backend response cut short",
                group=route.group.id,
                server=conn.address,
                error=_describe(exc),
            )
            await self._abandon(conn, upload)
            self.writer.transport.abort()
            raise _ClientGone() from exc
        except BaseException:
            await self._abandon(conn, upload)
            raise
        if upload is not None and not upload.done():
            # Answered before the body was read (e.g. 413): neither side can be reused.
            await self._abandon(conn, upload)
            return False
        if upload is not None and upload.exception() is not None:
            event(
                logging.WARNING,
                "request body not forwarded",
                listener=route.listener,
                server=conn.address,
                error=_describe(upload.exception() or Exception()),
            )
            conn.close()
            return False
        route.pool.release(conn)
        return True

    async def _tunnel(self, conn: BackendConnection, switch: h11.InformationalResponse) -> bool:
        """The backend switched protocols (WebSocket): relay bytes both ways until either
        side closes or both are idle for the listener's idle timeout. Never pooled after."""
        route = self.route
        upgrade = dict(switch.headers).get(b"upgrade", b"websocket")
        headers = response_headers_for_client(switch.headers)
        headers += [(b"connection", b"upgrade"), (b"upgrade", upgrade)]
        try:
            self._write(
                h11.InformationalResponse(status_code=101, headers=headers, reason=switch.reason)
            )
        except h11.LocalProtocolError:
            conn.close()  # the client never asked for this upgrade
            await self._send_error(502, "backend switched protocols unasked")
            return False
        self.writer.write(conn.h11.trailing_data[0])
        conn.writer.write(self.h11.trailing_data[0])
        route.metrics.tunnels_active.labels(route.listener).inc()
        try:
            await asyncio.gather(
                _pump(self.reader, conn.writer, route.idle_timeout),
                _pump(conn.reader, self.writer, route.idle_timeout),
            )
        except (ConnectionError, TimeoutError):
            pass
        finally:
            route.metrics.tunnels_active.labels(route.listener).dec()
            conn.close()
        return False

    async def _abandon(self, conn: BackendConnection, upload: asyncio.Task[None] | None) -> None:
        conn.close()
        if upload is not None and not upload.done():
            upload.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await upload


class _BadRequestBody(Exception):
    """The client's body framing broke after the request head went to the backend."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class _StaleConnection(Exception):
    """A reused backend connection died before answering: safe to retry once."""


_FRAMING = frozenset({b"content-length", b"transfer-encoding"})


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, idle: float) -> None:
    """Copy one direction of a tunnel; at EOF pass the half-close on, or close."""
    try:
        while True:
            async with asyncio.timeout(idle):
                data = await reader.read(_READ_SIZE)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    finally:
        if writer.can_write_eof() and not writer.is_closing():
            with contextlib.suppress(OSError):
                writer.write_eof()
        else:
            writer.close()


def _upgrade_requested(headers: Sequence[tuple[bytes, bytes]]) -> bytes | None:
    """The Upgrade header's value when the client asks to switch protocols."""
    tokens = {t.strip().lower() for n, v in headers if n == b"connection" for t in v.split(b",")}
    if b"upgrade" not in tokens:
        return None
    return next((v for n, v in headers if n == b"upgrade"), None)


def _zero_length(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    return any(name == b"content-length" and value.strip() == b"0" for name, value in headers)


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
