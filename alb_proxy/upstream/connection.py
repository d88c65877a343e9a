"""One keep-alive HTTP/1.1 connection to a backend server: h11 client state plus a stream."""

from __future__ import annotations

import asyncio

import h11

_READ_SIZE = 256 * 1024


class BackendClosed(Exception):
    """The backend closed the connection before a complete response."""


class BackendConnection:
    """A connection to one backend; ``address`` keys it in the pool."""

    def __init__(
        self, address: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.address = address
        self.reader = reader
        self.writer = writer
        self.h11 = h11.Connection(h11.CLIENT)
        self.bytes_received = 0
        """Response bytes read in the current exchange; 0 means a retry is safe."""
        self._idle_watch: asyncio.Future[bytes] | None = None

    @classmethod
    async def open(cls, host: str, port: int, timeout: float) -> BackendConnection:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port, limit=_READ_SIZE)
        return cls(f"{host}:{port}", reader, writer)

    @property
    def stale(self) -> bool:
        """Unusable for a new request: closed, or it sent something while idle in the pool
        (EOF, or bytes no request asked for: reusing it would hand them to the next client)."""
        if self.writer.is_closing() or self.reader.at_eof():
            return True
        return self._idle_watch is not None and self._idle_watch.done()

    def park(self) -> None:
        """Entering the pool: watch for anything the backend sends while no request is out."""
        self._idle_watch = asyncio.ensure_future(self.reader.read(1))

    async def unpark(self) -> bool:
        """Leaving the pool for a request: stop the watch; False if the connection is spoiled."""
        watch, self._idle_watch = self._idle_watch, None
        if watch is not None:
            if not watch.done():
                watch.cancel()
                # Let the read unwind (StreamReader allows one reader at a time).
                await asyncio.wait({watch})
            if not watch.cancelled():
                return False  # EOF or unsolicited bytes arrived while idle
        return not (self.writer.is_closing() or self.reader.at_eof())

    def write(self, event: h11.Event) -> None:
        data = self.h11.send(event)
        if data:
            self.writer.write(data)

    async def send(self, event: h11.Event) -> None:
        self.write(event)
        await self.writer.drain()

    async def next_event(self, timeout: float | None) -> h11.Event:
        """The next response event; raises TimeoutError, BackendClosed or RemoteProtocolError."""
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                async with asyncio.timeout(timeout):
                    data = await self.reader.read(_READ_SIZE)
                if not data and self.bytes_received == 0:
                    # Closed before answering (typically an idle timeout racing our request).
                    raise BackendClosed(f"{self.address} closed the connection")
                self.bytes_received += len(data)
                self.h11.receive_data(data)
                continue
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                raise BackendClosed(f"{self.address} closed the connection")
            assert isinstance(event, h11.Event)
            return event

    def ready_for_reuse(self) -> bool:
        """After a complete exchange: reset for the next request if both sides allow it."""
        if self.h11.our_state is not h11.DONE or self.h11.their_state is not h11.DONE:
            return False
        if self.h11.trailing_data[0]:
            return False  # bytes beyond the response (e.g. a body on a HEAD answer)
        self.h11.start_next_cycle()
        self.bytes_received = 0
        return not self.stale

    def close(self) -> None:
        if self._idle_watch is not None:
            self._idle_watch.cancel()
            self._idle_watch = None
        if not self.writer.is_closing():
            self.writer.close()
