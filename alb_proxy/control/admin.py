"""The admin HTTP server: h11 plumbing around :class:`AdminApi`.

One request at a time per connection, bodies up to 1 MiB, loopback by default.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from http import HTTPStatus

import h11

from alb_proxy.control.api import AdminApi, Request, Response
from alb_proxy.observability.log import event

MAX_BODY = 1024 * 1024
_MAX_HEAD = 16 * 1024


class _TooLarge(Exception):
    """A request body over MAX_BODY: answered 413, then the connection is closed."""


class AdminServer:
    def __init__(self, host: str, port: int, api: AdminApi) -> None:
        self.host = host
        self.port = port
        self.api = api
        self._server: asyncio.Server | None = None

    @property
    def bound_port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self, port_override: int | None = None) -> None:
        port = self.port if port_override is None else port_override
        self._server = await asyncio.start_server(self._serve, self.host, port)
        event(logging.INFO, "admin listening", address=f"{self.host}:{self.bound_port}")

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD)
        try:
            while True:
                request = await self._read_request(conn, reader)
                if request is None:
                    break
                try:
                    response = await self.api.handle(request)
                except Exception as exc:  # a handler bug is a 500, not a dead admin API
                    event(logging.ERROR, "admin API error", path=request.path, error=repr(exc))
                    response = Response(
                        500,
                        b'{"error": {"status": 500, "code": '
                        b'"internal_error", "message": "internal error"}}',
                    )
                self._send(conn, writer, response)
                await writer.drain()
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    break
                conn.start_next_cycle()
        except _TooLarge:
            body = b'{"error": {"status": 413, "code": "too_large", "message": "the body is ' + (
                b'over %d KiB"}}' % (MAX_BODY // 1024)
            )
            with contextlib.suppress(h11.ProtocolError, ConnectionError):
                self._send(conn, writer, Response(413, body, headers=(("connection", "close"),)))
                await writer.drain()
        except (h11.ProtocolError, ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()

    async def _read_request(
        self, conn: h11.Connection, reader: asyncio.StreamReader
    ) -> Request | None:
        head: h11.Request | None = None
        body = bytearray()
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                async with asyncio.timeout(30):
                    conn.receive_data(await reader.read(65536))
                continue
            if isinstance(ev, h11.Request):
                head = ev
                declared = dict(ev.headers).get(b"content-length")
                if declared is not None and int(declared) > MAX_BODY:
                    raise _TooLarge()  # answered before any of the body is read
            elif isinstance(ev, h11.Data):
                body += ev.data
                if len(body) > MAX_BODY:
                    raise _TooLarge()
            elif isinstance(ev, h11.EndOfMessage) and head is not None:
                headers = {
                    k.decode("latin-1").lower(): v.decode("latin-1") for k, v in head.headers
                }
                return Request(
                    head.method.decode("ascii"), head.target.decode("latin-1"), headers, bytes(body)
                )
            else:
                return None

    def _send(self, conn: h11.Connection, writer: asyncio.StreamWriter, response: Response) -> None:
        headers = [
            ("content-type", response.content_type),
            ("content-length", str(len(response.body))),
            *response.headers,
        ]
        for ev in (
            h11.Response(
                status_code=response.status,
                headers=headers,
                reason=HTTPStatus(response.status).phrase.encode(),
            ),
            h11.Data(data=response.body),
            h11.EndOfMessage(),
        ):
            data = conn.send(ev)
            if data:
                writer.write(data)
