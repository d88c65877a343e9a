"""The admin HTTP endpoint: ``/healthz``, ``/readyz`` and ``/metrics`` (no token needed).

A deliberately small h11 server: one request at a time per connection, bodies ignored. It binds
loopback by default; anything beyond health and metrics will require the bearer token.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import h11

from alb_proxy.observability.log import event
from alb_proxy.observability.metrics import Metrics

_MAX_REQUEST_HEAD = 16 * 1024


class AdminServer:
    def __init__(self, host: str, port: int, metrics: Metrics, ready: Callable[[], bool]) -> None:
        self.host = host
        self.port = port
        self.metrics = metrics
        self.ready = ready
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
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_REQUEST_HEAD)
        try:
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    async with asyncio.timeout(30):
                        conn.receive_data(await reader.read(65536))
                    continue
                if isinstance(ev, h11.Request):
                    status, ctype, body = self._route(ev.method, ev.target)
                    writer.write(
                        conn.send(
                            h11.Response(
                                status_code=status,
                                headers=[
                                    (b"content-type", ctype),
                                    (b"content-length", str(len(body)).encode()),
                                ],
                            )
                        )
                        or b""
                    )
                    writer.write(conn.send(h11.Data(data=body)) or b"")
                    writer.write(conn.send(h11.EndOfMessage()) or b"")
                    await writer.drain()
                elif isinstance(ev, h11.EndOfMessage) and conn.our_state is h11.DONE:
                    if conn.their_state is not h11.DONE:
                        break
                    conn.start_next_cycle()
                elif isinstance(ev, h11.ConnectionClosed) or ev is h11.PAUSED:
                    break
        except (h11.ProtocolError, ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()

    def _route(self, method: bytes, target: bytes) -> tuple[int, bytes, bytes]:
        path = target.split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return 405, b"text/plain", b"method not allowed\n"
        if path == b"/healthz":
            return 200, b"text/plain", b"ok\n"
        if path == b"/readyz":
            return (
                (200, b"text/plain", b"ready\n")
                if self.ready()
                else (503, b"text/plain", b"not ready\n")
            )
        if path == b"/metrics":
            return 200, b"text/plain; version=0.0.4; charset=utf-8", self.metrics.render()
        return 404, b"text/plain", b"not found\n"
