"""A small HTTP/1.1 echo server: a backend to try the proxy against and to test it with.

Every request is answered after its whole body has been read, hashed chunk by chunk and never
held whole, so the proxy's streaming can be checked by ``body_bytes`` / ``body_sha256``. The
answer is a JSON description of the request as received (method, target, headers in order,
client address), so tests see exactly what the proxy forwarded. Query parameters turn it into
the misbehaving backends the proxy must cope with:

- ``bytes=N``  answer N bytes of ``application/octet-stream`` instead (byte ``i`` is ``i % 256``),
  written 64 KiB at a time with backpressure, so memory stays flat even for gigabytes;
- ``delay=S``  wait S seconds (float, at most an hour) before answering;
- ``status=NNN``  answer with that status (200–599).

``/health`` answers ``ok`` (the parameters apply to it too, to make a backend look unhealthy or
slow to the health checker). A malformed request gets 400 and the connection is closed; a client
that misbehaves or vanishes only ever loses its own connection.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11

CHUNK = 64 * 1024
"""Read and write size: bounds the memory one connection holds."""
PATTERN = bytes(range(256)) * (CHUNK // 256)
"""One chunk of the ``bytes=N`` body; chunks start at multiples of 256, so byte i is i % 256."""
MAX_DELAY_S = 3600.0

_NO_BODY_STATUSES = frozenset({204, 304})


@dataclass(frozen=True)
class _Params:
    status: int
    delay_s: float
    size: int | None
    """Length of a pattern body to send instead of the JSON echo."""


def _parse_params(query: str) -> _Params:
    """The test parameters of a query string (the last one wins); ValueError says why not."""
    values = {name: found[-1] for name, found in parse_qs(query, keep_blank_values=True).items()}
    try:
        status = int(values.get("status", "200"))
        delay_s = float(values.get("delay", "0"))
        size = int(values["bytes"]) if "bytes" in values else None
    except ValueError as exc:
        raise ValueError(f"bad test parameter in {query!r}: {exc}") from exc
    if not 200 <= status <= 599:
        raise ValueError(f"status={status}: must be 200–599")
    if not (math.isfinite(delay_s) and 0 <= delay_s <= MAX_DELAY_S):
        raise ValueError(f"delay={delay_s}: must be 0–{MAX_DELAY_S:g} seconds")
    if size is not None and size < 0:
        raise ValueError(f"bytes={size}: must be >= 0")
    return _Params(status, delay_s, size)


def _pattern(size: int) -> Iterator[bytes]:
    for offset in range(0, size, CHUNK):
        yield PATTERN[: min(CHUNK, size - offset)]


def _address(sockaddr: Any) -> tuple[str, int]:
    """(host, port) of an IPv4/IPv6 socket address as asyncio reports it."""
    return str(sockaddr[0]), int(sockaddr[1])


class _DemoConnection:
    """One client connection: h11 state plus the stream pair it reads and writes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._conn = h11.Connection(h11.SERVER)
        self._server = f"demo-backend:{_address(writer.get_extra_info('sockname'))[1]}"
        host, port = _address(writer.get_extra_info("peername"))
        self._client = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def run(self) -> None:
        try:
            while await self._exchange():
                self._conn.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            with contextlib.suppress(ConnectionError, h11.LocalProtocolError):
                await self._refuse(exc.error_status_hint, f"bad request: {exc}")
        except (ConnectionError, h11.LocalProtocolError):
            pass  # the client went away or left h11 in a state we cannot answer from
        finally:
            self._writer.close()
            with contextlib.suppress(ConnectionError):
                await self._writer.wait_closed()

    async def _next_event(self) -> h11.Event | None:
        """The peer's next event; None if h11 paused (never expected: each cycle is reset)."""
        while True:
            event = self._conn.next_event()
            if isinstance(event, h11.Event):
                return event
            if event is h11.PAUSED:
                return None
            self._conn.receive_data(await self._reader.read(CHUNK))

    async def _send(self, event: h11.Event) -> None:
        data = self._conn.send(event)
        if data:
            self._writer.write(data)
            await self._writer.drain()

    async def _exchange(self) -> bool:
        """Serve one request; True when the connection can carry another."""
        request = await self._next_event()
        if not isinstance(request, h11.Request):
            return False  # closed cleanly between requests
        if request.method == b"CONNECT":
            # A 2xx would make h11 switch protocols; this server only speaks HTTP.
            await self._read_body()
            await self._respond(request, 405, b"text/plain", b"CONNECT not supported\n")
            return False
        if self._conn.they_are_waiting_for_100_continue:
            await self._send(h11.InformationalResponse(status_code=100, headers=[]))
        body_bytes, body_sha256 = await self._read_body()
        key = _websocket_key(request.headers)
        if key is not None:
            await self._websocket_echo(key)
            return False
        target = urlsplit(request.target.decode("latin-1"))
        try:
            params = _parse_params(target.query)
        except ValueError as exc:
            await self._respond(request, 400, b"text/plain", f"{exc}\n".encode())
            return self._reusable()
        if params.delay_s:
            await asyncio.sleep(params.delay_s)
        if params.size is not None:
            await self._stream(
                request,
                params.status,
                b"application/octet-stream",
                _pattern(params.size),
                params.size,
            )
        elif target.path == "/health":
            await self._respond(request, params.status, b"text/plain", b"ok")
        else:
            echo = {
                "method": request.method.decode("latin-1"),
                "path": target.path,
                "query": target.query,
                "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in request.headers],
                "body_bytes": body_bytes,
                "body_sha256": body_sha256,
                "server": self._server,
                "client": self._client,
            }
            body = json.dumps(echo).encode() + b"\n"
            await self._respond(request, params.status, b"application/json", body)
        return self._reusable()

    async def _websocket_echo(self, key: bytes) -> None:
        """Accept the upgrade, then echo every data frame (unmasked, as a server must)."""
        accept = base64.b64encode(hashlib.sha1(key + _WS_GUID).digest())
        await self._send(
            h11.InformationalResponse(
                status_code=101,
                headers=[
                    (b"upgrade", b"websocket"),
                    (b"connection", b"Upgrade"),
                    (b"sec-websocket-accept", accept),
                ],
            )
        )
        buffer = bytearray(self._conn.trailing_data[0])
        while True:
            frame = parse_ws_frame(buffer)
            if frame is None:
                data = await self._reader.read(CHUNK)
                if not data:
                    return
                buffer += data
                continue
            opcode, payload, used = frame
            del buffer[:used]
            if opcode == 0x8:  # close: answer it and stop
                self._writer.write(encode_ws_frame(0x8, payload[:2]))
                await self._writer.drain()
                return
            reply_opcode = 0xA if opcode == 0x9 else opcode  # ping -> pong
            self._writer.write(encode_ws_frame(reply_opcode, payload))
            await self._writer.drain()

    def _reusable(self) -> bool:
        return self._conn.our_state is h11.DONE and self._conn.their_state is h11.DONE

    async def _read_body(self) -> tuple[int, str]:
        digest = hashlib.sha256()
        size = 0
        while True:
            event = await self._next_event()
            if isinstance(event, h11.Data):
                digest.update(event.data)
                size += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return size, digest.hexdigest()
            else:  # h11 raises on a truncated body; anything else is a protocol breach
                raise h11.RemoteProtocolError(f"unexpected {event!r} in body", 400)

    async def _respond(
        self, request: h11.Request, status: int, content_type: bytes, body: bytes
    ) -> None:
        await self._stream(request, status, content_type, [body], len(body))

    async def _stream(
        self,
        request: h11.Request,
        status: int,
        content_type: bytes,
        chunks: Iterable[bytes],
        length: int,
    ) -> None:
        """Send a response of ``length`` bytes, one chunk at a time under backpressure.

        HEAD gets the Content-Length a GET would, without the body; 204 and 304 get neither.
        """
        headers = [(b"content-type", content_type)]
        if status not in _NO_BODY_STATUSES:
            headers.append((b"content-length", str(length).encode()))
        await self._send(h11.Response(status_code=status, headers=headers, reason=_reason(status)))
        if request.method != b"HEAD" and status not in _NO_BODY_STATUSES:
            for chunk in chunks:
                await self._send(h11.Data(data=chunk))
        await self._send(h11.EndOfMessage())

    async def _refuse(self, status: int, message: str) -> None:
        """Answer a request h11 could not parse, then let ``run`` close the connection."""
        if self._conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return  # a response is already under way: closing is all that is left
        body = message.encode("utf-8", "replace") + b"\n"
        headers = [
            (b"content-type", b"text/plain"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        await self._send(h11.Response(status_code=status, headers=headers, reason=_reason(status)))
        await self._send(h11.Data(data=body))
        await self._send(h11.EndOfMessage())


_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _websocket_key(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    values = {name: value for name, value in headers}
    if values.get(b"upgrade", b"").lower() != b"websocket":
        return None
    return values.get(b"sec-websocket-key")


def encode_ws_frame(opcode: int, payload: bytes, mask: bytes | None = None) -> bytes:
    """One final WebSocket frame; clients pass a 4-byte ``mask``, servers none."""
    head = bytearray([0x80 | opcode])
    bit = 0x80 if mask else 0
    size = len(payload)
    if size < 126:
        head.append(bit | size)
    elif size < 1 << 16:
        head += bytes([bit | 126]) + size.to_bytes(2, "big")
    else:
        head += bytes([bit | 127]) + size.to_bytes(8, "big")
    if mask:
        head += mask
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes(head) + payload


def parse_ws_frame(buffer: bytes | bytearray) -> tuple[int, bytes, int] | None:
    """``(opcode, unmasked payload, bytes used)``, or None until the frame is complete."""
    if len(buffer) < 2:
        return None
    opcode, masked, size = buffer[0] & 0x0F, buffer[1] & 0x80, buffer[1] & 0x7F
    offset = 2
    if size >= 126:
        width = 2 if size == 126 else 8
        if len(buffer) < offset + width:
            return None
        size = int.from_bytes(buffer[offset : offset + width], "big")
        offset += width
    mask = b""
    if masked:
        if len(buffer) < offset + 4:
            return None
        mask = bytes(buffer[offset : offset + 4])
        offset += 4
    if len(buffer) < offset + size:
        return None
    payload = bytes(buffer[offset : offset + size])
    if mask:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return opcode, payload, offset + size


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


async def serve_demo_backend(
    host: str, port: int, *, ready: Callable[[int], None] | None = None
) -> None:
    """Serve until cancelled; ``ready(bound_port)`` is called once the socket listens.

    With port 0 the system picks the port; when ``host`` resolves to several addresses each gets
    its own, and ``ready`` reports the first. Cancelling closes every open client connection.
    """
    connections: set[asyncio.Task[Any]] = set()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None, "start_server runs each callback in a task of its own"
        connections.add(task)
        try:
            await _DemoConnection(reader, writer).run()
        except asyncio.CancelledError:
            # Only shutdown cancels these tasks. Letting it propagate makes Python 3.11's streams
            # report "Exception in callback" for every open connection (fixed in 3.12).
            pass
        finally:
            connections.discard(task)

    server = await asyncio.start_server(on_connect, host, port)
    try:
        if ready is not None:
            ready(_address(server.sockets[0].getsockname())[1])
        await server.serve_forever()
    finally:
        server.close()
        for task in connections:
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)
        await server.wait_closed()


def run_demo_backend(host: str, port: int) -> None:
    """Blocking entry for ``alb-proxy demo-backend``: serve until Ctrl-C, on uvloop if installed.

    Prints one line with the bound address once listening, so ``--port 0`` is usable.
    """

    def announce(bound: int) -> None:
        print(f"demo backend listening on {host}:{bound}", flush=True)

    with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(loop_factory=_loop_factory()) as r:
        r.run(serve_demo_backend(host, port, ready=announce))


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop
