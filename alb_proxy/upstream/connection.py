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

    @classmethod
    async def open(cls, host: str, port: int, timeout: float) -> BackendConnection:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port, limit=_READ_SIZE)
        return cls(f"{host}:{port}", reader, writer)

    @property
    def stale(self) -> bool:
        """Closed by the backend while idle in the pool (seen without reading)."""
        return self.reader.at_eof() or self.writer.is_closing()

    def write(self, event: h11.Event) -> None:
        data = self.h11.send(event)
        if data:
            self.writer.write(data)

    async def send(self, event: h11.Event) -> None:
        self.write(event)
        await self.writer.drain()

    async def next_event(self, timeout: float) -> h11.Event:
        """The next response event; raises TimeoutError, BackendClosed or RemoteProtocolError."""
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                async with asyncio.timeout(timeout):
                    data = await self.reader.read(_READ_SIZE)
                self.bytes_received += len(data)
                self.h11.receive_data(data)
                continue
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                raise BackendClosed(f"{self.address} closed the connection")
            assert isinstance(event, h11.Event)
            return event

    def ready_for_reuse(self) -> bool:
        """After a complete exchange: reset for the next request if both sides allow it."""
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
            self.bytes_received = 0
            return not self.stale
        return False

    def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.close()
