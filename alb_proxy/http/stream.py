"""One connection's bytes as a coroutine sees them: ``read`` with a deadline, ``write``, ``drain``.

The HTTP/1.1 front end and the backend client each drive one connection from one task. asyncio's
``StreamReader``/``StreamWriter`` pair does that too, but costs a buffer copy, a lock-free
future dance and an ``asyncio.timeout`` context per read; at tens of thousands of requests a
second on one core that is a fifth of the budget. This protocol keeps the same guarantees with
less: received chunks are handed over as they came (joined only when several are waiting), a
read waits on one future with at most one timer, and backpressure is the transport's own
(``pause_reading`` above a high-water mark, ``pause_writing`` making ``drain`` wait).

A stream can be *parked* (an idle pooled backend connection): anything the peer sends or an
EOF while parked spoils it, without a task watching it.

It is a leaf module: nothing of the project is imported, so the backend client uses it too.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

HIGH_WATER = 256 * 1024
"""Unread bytes above which the transport stops reading from the socket."""


class Stream(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._chunks: list[bytes] = []  # a list: an empty deque costs half a KiB
        self._buffered = 0
        self._eof = False
        self._lost: Exception | None = None
        self._closed = False
        self._waiter: asyncio.Future[None] | None = None
        self._deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._drain_waiter: asyncio.Future[None] | None = None
        self._writing_paused = False
        self._reading_paused = False
        self.parked = False
        self.spoiled = False
        """Bytes or an EOF arrived while parked: the stream must not be reused."""

    # -- protocol side --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.parked:
            self.spoiled = True
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER and not self._reading_paused and self.transport:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        if self.parked:
            self.spoiled = True
        self._eof = True
        self._wake()
        return True  # half-closed: we may still answer

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._eof = self._closed = True
        self._lost = exc
        if self.parked:
            self.spoiled = True
        self._wake()
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)  # drain() sees the loss (no exception nobody may read)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _deadline_check(self) -> None:
        self._timer = None
        waiter, deadline = self._waiter, self._deadline
        if waiter is None or waiter.done() or deadline is None:
            return
        loop = asyncio.get_running_loop()
        if loop.time() >= deadline:
            waiter.set_exception(TimeoutError())
        else:
            self._timer = loop.call_at(deadline, self._deadline_check)
            self._timer_at = deadline

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # -- coroutine side -------------------------------------------------------------------------

    @property
    def at_eof(self) -> bool:
        """The peer sent EOF and every byte before it was read."""
        return self._eof and not self._chunks

    def unread(self) -> bool:
        """Bytes are waiting to be read."""
        return bool(self._chunks)

    async def read(self, timeout: float | None = None) -> bytes:
        """The bytes received so far (waiting for some if none); ``b""`` at EOF. Raises
        ``TimeoutError`` after ``timeout`` seconds without a byte, ``ConnectionError`` if
        the connection broke."""
        if not self._chunks and not self._eof:
            await self._wait(timeout)
        if self._chunks:
            chunks = self._chunks
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            chunks.clear()
            self._buffered = 0
            if self._reading_paused and self.transport is not None:
                self._reading_paused = False
                self.transport.resume_reading()
            return data
        if self._lost is not None:
            raise ConnectionResetError(str(self._lost) or "connection lost")
        return b""

    async def readable(self, timeout: float) -> bool:
        """Wait until bytes or an EOF are there to read (True), or ``timeout`` passes (False);
        nothing is consumed."""
        if self._chunks or self._eof:
            return True
        try:
            await self._wait(timeout)
        except TimeoutError:
            return False
        return True

    async def _wait(self, timeout: float | None) -> None:
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        if timeout is None:
            self._deadline = None
        else:
            # One timer serves many waits: it is re-armed only when it fires early (the common
            # case is data long before the deadline, and no timer churn per read).
            deadline = self._deadline = loop.time() + timeout
            if self._timer is None or self._timer_at > deadline:
                if self._timer is not None:
                    self._timer.cancel()
                self._timer = loop.call_at(deadline, self._deadline_check)
                self._timer_at = deadline
        try:
            await waiter
        finally:
            self._waiter = None

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self._closed:
            self.transport.write(data)

    async def drain(self) -> None:
        """Wait while the transport's write buffer is over its high-water mark."""
        if self._closed:
            raise ConnectionResetError("connection lost")
        if self._writing_paused:
            waiter = self._drain_waiter
            if waiter is None:
                waiter = self._drain_waiter = asyncio.get_running_loop().create_future()
            await asyncio.shield(waiter)
            if self._closed:
                raise ConnectionResetError("connection lost")

    @property
    def writing_paused(self) -> bool:
        """The transport's write buffer is over its high-water mark."""
        return self._writing_paused

    @property
    def closing(self) -> bool:
        return self._closed or self.transport is None or self.transport.is_closing()

    def can_write_eof(self) -> bool:
        return self.transport is not None and self.transport.can_write_eof()

    def write_eof(self) -> None:
        if self.transport is not None and not self.closing:
            self.transport.write_eof()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def extra(self, name: str, default: Any = None) -> Any:
        return self.transport.get_extra_info(name, default) if self.transport else default
