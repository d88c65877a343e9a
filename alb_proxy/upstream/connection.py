"""One keep-alive HTTP/1.1 connection to a backend server: a response reader plus a stream.

Requests go out as bytes (``http.h1wire``): a head, then the body as it comes (chunked when its
length is unknown), then its end. Responses come back as events. Between exchanges the
connection waits in the pool *parked*: a byte or an EOF from the backend then spoils it (bytes
no request asked for must never reach the next client), without a task watching it.
"""

from __future__ import annotations

import asyncio

from alb_proxy.http import h1wire
from alb_proxy.http.h1wire import End, Event, Header, ResponseReader, WireError
from alb_proxy.http.stream import Stream


class BackendClosed(Exception):
    """The backend closed the connection before a complete response."""


class BodyLengthMismatch(Exception):
    """The request body is longer or shorter than its ``Content-Length``: sent on, the
    difference would frame the backend's next request (smuggling), so it never is."""


class BackendConnection:
    """A connection to one backend; ``address`` keys it in the pool."""

    def __init__(self, address: str, stream: Stream) -> None:
        self.address = address
        self.stream = stream
        self.reader = ResponseReader()
        self.bytes_received = 0
        """Response bytes read in the current exchange; 0 means a retry is safe."""
        self._chunked = False
        self._remaining: int | None = None
        """Request body bytes its Content-Length still announces."""
        self._exchanges = 0
        self._complete = False
        self._keep_alive = True

    @classmethod
    async def open(cls, host: str, port: int, timeout: float) -> BackendConnection:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            _, stream = await loop.create_connection(Stream, host, port)
        return cls(f"{host}:{port}", stream)

    @property
    def stale(self) -> bool:
        """Unusable for a new request: closed, or it sent something while idle in the pool."""
        stream = self.stream
        return stream.spoiled or stream.closing or stream.at_eof or stream.unread()

    def park(self) -> None:
        """Entering the pool: from now on anything the backend sends spoils the connection."""
        self.stream.parked = True

    def unpark(self) -> bool:
        """Leaving the pool for a request: False if the connection is spoiled."""
        self.stream.parked = False
        return not self.stale

    # -- the request ----------------------------------------------------------------------------

    def send_head(self, method: bytes, target: bytes, headers: list[Header]) -> None:
        """Write a request head; a body follows chunked unless ``headers`` give its length."""
        self._exchanges += 1
        self._complete = False
        self.reader.expect(method)
        self._chunked = False
        self._remaining = None
        for name, value in headers:
            if name == b"transfer-encoding":
                self._chunked = True
            elif name == b"content-length":
                self._remaining = int(value)  # validated by every front end's parser
        self.stream.write(h1wire.request_head(method, target, headers))

    def send_data(self, data: bytes) -> None:
        if not data:
            return
        if self._chunked:
            self.stream.write(h1wire.chunk(data))
            return
        if self._remaining is None or len(data) > self._remaining:
            raise BodyLengthMismatch("more body than its Content-Length")
        self._remaining -= len(data)
        self.stream.write(data)

    def send_end(self, trailers: list[Header]) -> None:
        """End the request body (trailers go only where the body is chunked)."""
        if self._chunked:
            self.stream.write(h1wire.last_chunk(trailers))
        elif self._remaining:
            raise BodyLengthMismatch(f"body {self._remaining} bytes short of its Content-Length")

    async def drain(self) -> None:
        await self.stream.drain()

    # -- the response ---------------------------------------------------------------------------

    async def next_event(self, timeout: float | None) -> Event:
        """The next response event; raises TimeoutError, BackendClosed or WireError."""
        reader = self.reader
        while True:
            event = reader.next_event()
            if event is not None:
                if isinstance(event, End):
                    self._complete = True
                elif isinstance(event, h1wire.ResponseHead) and event.status >= 200:
                    self._keep_alive = event.keep_alive
                return event
            data = await self.stream.read(timeout)
            if not data:
                if reader.eof():
                    continue  # that ended a response framed by the connection's end
                if self.bytes_received == 0:
                    # Closed before answering (typically an idle timeout racing our request).
                    raise BackendClosed(f"{self.address} closed the connection")
                raise BackendClosed(f"{self.address} closed the connection mid-response")
            self.bytes_received += len(data)
            reader.feed(data)

    def ready_for_reuse(self) -> bool:
        """After a complete exchange: reset for the next request if both sides allow it."""
        if not self._complete or not self._keep_alive or self.reader.spoiled:
            return False
        self.bytes_received = 0
        return not self.stale

    def close(self) -> None:
        self.stream.close()


__all__ = ["BackendClosed", "BackendConnection", "BodyLengthMismatch", "WireError"]
