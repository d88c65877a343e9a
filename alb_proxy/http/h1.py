"""HTTP/1.1 front end: one client connection, its requests forwarded to a server group.

h11 keeps the protocol state of the client connection; this module reads its events, checks
what h11 accepts but a proxy must not, and offers the exchange to ``forward`` as a
:class:`~alb_proxy.http.forward.Downstream`. Every write is followed by a drain, so a slow
reader on either side slows the other instead of filling memory.

Refused here, before anything reaches a backend: a request with both Content-Length and
Transfer-Encoding (a smuggling vector when the backend frames it differently) and a request head
over 64 KiB (h11 bounds only a head still incomplete in its buffer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus

import h11

from alb_proxy.http.fields import error_response
from alb_proxy.http.forward import (
    BadRequestBody,
    ClientGone,
    ForwardRequest,
    RouteSettings,
    forward,
)
from alb_proxy.http.headers import response_headers_for_client
from alb_proxy.observability.log import event
from alb_proxy.upstream.connection import BackendConnection

_READ_SIZE = 256 * 1024
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})
_COALESCE_LIMIT = 64 * 1024


@dataclass
class ConnectionControl:
    """Shared between a session and its listener, which uses it to drain."""

    busy: bool = False
    draining: bool = False
    on_drain: Callable[[], None] | None = None
    """Set by sessions that close themselves on a drain (HTTP/2: GOAWAY once streams end)."""


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
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=route.max_header_bytes)
        peer = writer.get_extra_info("peername")
        self.client_ip: str = peer[0] if peer else "-"
        self.request_trailers: list[tuple[bytes, bytes]] = []
        self._out: list[bytes] = []
        self._out_size = 0
        self._flush_scheduled = False

    async def run(self) -> None:
        try:
            while await self._one_exchange():
                self.h11.start_next_cycle()
        except ClientGone:
            pass
        finally:
            self._flush_out()
            self.writer.close()

    async def _one_exchange(self) -> bool:
        """Serve one request; True when the connection can carry another."""
        self.control.busy = False
        self.request_trailers = []
        if self.control.draining:
            return False
        try:
            # One deadline for the whole head: a client trickling a byte at a time cannot
            # hold the connection past the idle timeout.
            async with asyncio.timeout(self.route.idle_timeout):
                request = await self._next_event(None)
        except TimeoutError:
            return False
        except h11.RemoteProtocolError as exc:
            await self._refuse(exc.error_status_hint, str(exc))
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

    async def _forward(self, request: h11.Request) -> bool:
        head_size = len(request.target) + sum(len(n) + len(v) + 4 for n, v in request.headers)
        if head_size > self.route.max_header_bytes:
            await self._refuse(431, f"request head of {head_size} bytes")
            return False
        if request.method == b"CONNECT":
            await self._refuse(405, "CONNECT is not proxied")  # a reverse proxy, not a tunnel
            return False
        framing = {name for name, _ in request.headers if name in _FRAMING}
        if len(framing) == 2:
            await self._refuse(400, "Content-Length and Transfer-Encoding both present")
            return False
        has_body = bool(framing) and not _zero_length(request.headers)
        if not has_body and not isinstance(self.h11.next_event(), h11.EndOfMessage):
            # h11 has the (empty) end of a body-less request ready without more bytes.
            await self._refuse(400, "unexpected request body framing")
            return False
        outcome = await forward(
            ForwardRequest(
                method=request.method,
                target=request.target,
                headers=request.headers,
                has_body=has_body,
                client_ip=self.client_ip,
                client_cert_headers=self.client_cert_headers,
                upgrade=_upgrade_requested(request.headers),
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
        return outcome.reusable

    async def _refuse(self, status: int, detail: str) -> None:
        self.route.metrics.requests_total.labels(self.route.listener, f"{status // 100}xx").inc()
        await self.send_error(status, detail)

    # -- reading the client -------------------------------------------------------------------

    async def _next_event(self, timeout: float | None) -> h11.Event:
        while True:
            ev = self.h11.next_event()
            if ev is h11.NEED_DATA:
                try:
                    async with asyncio.timeout(timeout):
                        data = await self.reader.read(_READ_SIZE)
                except ConnectionError as exc:
                    raise ClientGone() from exc
                if data:
                    self.control.busy = True  # a request has begun: a drain lets it finish
                elif self.control.draining or self.writer.is_closing():
                    raise ClientGone()  # closed by us (drain), not by the client
                self.h11.receive_data(data)
                continue
            if ev is h11.PAUSED:
                return h11.ConnectionClosed()
            assert isinstance(ev, h11.Event)
            return ev

    # -- Downstream: what forward() answers through ---------------------------------------

    async def read_body(self) -> bytes | None:
        try:
            ev = await self._next_event(self.route.idle_timeout)
        except TimeoutError as exc:
            raise ClientGone() from exc  # stalled mid-body: give up on this client
        except h11.RemoteProtocolError as exc:
            if self.reader.at_eof():
                raise ClientGone() from exc  # the client left mid-body: nobody to answer
            raise BadRequestBody(exc.error_status_hint, str(exc)) from exc
        if isinstance(ev, h11.Data):
            return bytes(ev.data)
        if isinstance(ev, h11.EndOfMessage):
            self.request_trailers = list(ev.headers)
            return None
        raise ClientGone()

    async def send_informational(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self._write(
            h11.InformationalResponse(
                status_code=status,
                headers=response_headers_for_client(headers),
                reason=_phrase(status).encode(),
            )
        )
        await self._drain()

    async def send_head(
        self, status: int, headers: list[tuple[bytes, bytes]], reason: bytes
    ) -> None:
        if self.control.draining:
            headers = [*headers, (b"connection", b"close")]
        self._write(h11.Response(status_code=status, headers=headers, reason=reason))

    async def send_data(self, data: bytes) -> None:
        self._write(h11.Data(data=data))
        if self._out_size >= _COALESCE_LIMIT:
            await self._drain()
        elif not self._flush_scheduled:
            # Small pieces written in this loop iteration (head, body, end) leave as one
            # write: one TLS record, one syscall. Streaming bodies still leave promptly.
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_out)

    async def end(self, trailers: list[tuple[bytes, bytes]]) -> None:
        try:
            self._write(h11.EndOfMessage(headers=trailers))
        except h11.LocalProtocolError:
            self._write(h11.EndOfMessage())  # not chunked (HTTP/1.0 client): no trailers
        await self._drain()

    async def send_error(self, status: int, detail: str) -> None:
        """Answer with a short text error and mark the connection for closing."""
        if self.writer.is_closing():
            raise ClientGone()
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            self.abort()
            raise ClientGone()
        phrase = _phrase(status)
        headers, body = error_response(status)
        headers.append((b"connection", b"close"))
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
            raise ClientGone() from exc
        await self._drain()

    def abort(self) -> None:
        self.writer.transport.abort()

    def _write(self, ev: h11.Event) -> None:
        data = self.h11.send(ev)
        if data:
            self._out.append(data)
            self._out_size += len(data)

    def _flush_out(self) -> None:
        self._flush_scheduled = False
        if self._out:
            out, self._out, self._out_size = self._out, [], 0
            if not self.writer.is_closing():
                self.writer.write(out[0] if len(out) == 1 else b"".join(out))

    async def _drain(self) -> None:
        self._flush_out()
        try:
            await self.writer.drain()
        except ConnectionError as exc:
            raise ClientGone() from exc

    # -- upgrades -------------------------------------------------------------------------------

    async def _tunnel(self, conn: BackendConnection, switch: h11.InformationalResponse) -> None:
        """The backend switched protocols (WebSocket): relay bytes both ways until either
        side closes or both are idle for the listener's idle timeout. Never pooled after."""
        route = self.route
        upgrade = dict(switch.headers).get(b"upgrade", b"websocket")
        headers = response_headers_for_client(switch.headers)
        headers += [(b"connection", b"upgrade"), (b"upgrade", upgrade)]
        if upgrade.strip().lower() != b"websocket":
            conn.close()  # only WebSocket was asked for
            await self.send_error(502, f"backend switched to {upgrade!r}, not websocket")
            return
        try:
            self._write(
                h11.InformationalResponse(status_code=101, headers=headers, reason=switch.reason)
            )
        except h11.LocalProtocolError:
            conn.close()  # the client never asked for this upgrade
            await self.send_error(502, "backend switched protocols unasked")
            return
        self._flush_out()
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
    """``websocket`` when the client asks to switch to it. Other upgrades (``h2c``, ...) are
    not tunnelled: their Upgrade header is dropped as hop-by-hop and the request forwarded
    as a plain one, so no backend can switch a client out of the proxy's view (h2c smuggling).
    """
    tokens = {t.strip().lower() for n, v in headers if n == b"connection" for t in v.split(b",")}
    if b"upgrade" not in tokens:
        return None
    offered = {t.strip().lower() for n, v in headers if n == b"upgrade" for t in v.split(b",")}
    return b"websocket" if b"websocket" in offered else None


def _zero_length(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    return any(name == b"content-length" and value.strip() == b"0" for name, value in headers)


def _phrase(status: int) -> str:
    return HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else ""
