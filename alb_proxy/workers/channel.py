"""The channel between the control plane and a worker: JSON messages and descriptors.

One ``AF_UNIX`` stream socket per worker. A frame is a 4-byte big-endian body length, a 2-byte
count of descriptors that travel with it, then a UTF-8 JSON object. Descriptors go as
``SCM_RIGHTS`` on the first byte of their frame; the kernel delivers them with (never after)
that byte, so by the time a frame is whole its descriptors are queued and can be taken in order.

``FrameDecoder`` is the sans-I/O part (bytes in, frames out, ``ChannelError`` on garbage);
``Channel`` is the thin asyncio adapter: one reader callback, one write queue, no tasks.
"""

from __future__ import annotations

import array
import asyncio
import collections
import json
import socket
import struct
from collections.abc import Callable
from typing import Any

from alb_proxy.errors import AlbError

_HEADER = struct.Struct("!IH")
MAX_FRAME = 64 * 1024 * 1024
"""A config of thousands of listeners is a few MiB; anything larger is a bug or garbage."""
MAX_FDS = 250
"""Per frame; the kernel allows 253 descriptors in one ``SCM_RIGHTS`` message."""
_READ_SIZE = 256 * 1024

Message = dict[str, Any]


class ChannelError(AlbError):
    """The peer sent something that is not a frame of this protocol."""


def encode_frame(message: Message, fd_count: int = 0) -> bytes:
    if not 0 <= fd_count <= MAX_FDS:
        raise ValueError(f"at most {MAX_FDS} descriptors per frame, not {fd_count}")
    body = json.dumps(message, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise ValueError(f"frame of {len(body)} bytes is over {MAX_FRAME}")
    return _HEADER.pack(len(body), fd_count) + body


class FrameDecoder:
    """Bytes in, ``(message, descriptor count)`` out, in order."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[Message, int]]:
        self._buffer += data
        frames = []
        while len(self._buffer) >= _HEADER.size:
            length, fd_count = _HEADER.unpack_from(self._buffer)
            if length > MAX_FRAME or fd_count > MAX_FDS:
                raise ChannelError(f"frame header out of range ({length} bytes, {fd_count} fds)")
            end = _HEADER.size + length
            if len(self._buffer) < end:
                break
            body = bytes(self._buffer[_HEADER.size : end])
            del self._buffer[:end]
            try:
                message = json.loads(body)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ChannelError(f"frame is not JSON: {exc}") from exc
            if not isinstance(message, dict) or not isinstance(message.get("type"), str):
                raise ChannelError("frame is not a message object with a type")
            frames.append((message, fd_count))
        return frames


OnMessage = Callable[[Message, list[socket.socket]], None]


class Channel:
    """Messages and descriptors over a connected ``AF_UNIX`` stream socket.

    ``on_message`` is called on the loop for every frame, with the sockets that came with it
    (the receiver owns them); ``on_close`` once, when the peer goes away or sends garbage.
    """

    def __init__(
        self,
        sock: socket.socket,
        on_message: OnMessage,
        on_close: Callable[[Exception | None], None],
    ) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._on_message = on_message
        self._on_close = on_close
        self._decoder = FrameDecoder()
        self._fds: collections.deque[int] = collections.deque()
        self._out: collections.deque[tuple[memoryview, list[int]]] = collections.deque()
        self._loop = asyncio.get_running_loop()
        self._closed = False
        self._loop.add_reader(sock.fileno(), self._readable)

    @property
    def closed(self) -> bool:
        return self._closed

    def send(self, message: Message, socks: list[socket.socket] | tuple[()] = ()) -> None:
        """Queue one message; the sockets are duplicated by the kernel, the caller keeps its
        own. Sending on a closed channel does nothing (the peer is gone)."""
        if self._closed:
            return
        frame = encode_frame(message, len(socks))
        self._out.append((memoryview(frame), [s.fileno() for s in socks]))
        if len(self._out) == 1:
            self._flush()

    def close(self, exc: Exception | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._sock.fileno())
        self._loop.remove_writer(self._sock.fileno())
        self._sock.close()
        while self._fds:
            socket.close(self._fds.popleft())
        self._on_close(exc)

    def _flush(self) -> None:
        try:
            while self._out:
                data, fds = self._out[0]
                ancillary = (
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
                )
                sent = self._sock.sendmsg([data], ancillary)
                if sent < len(data):
                    self._out[0] = (data[sent:], [])  # descriptors went with the first byte
                    break
                self._out.popleft()
        except BlockingIOError:
            pass
        except OSError as exc:
            self.close(exc)
            return
        if self._out:
            self._loop.add_writer(self._sock.fileno(), self._writable)
        else:
            self._loop.remove_writer(self._sock.fileno())

    def _writable(self) -> None:
        self._flush()

    def _readable(self) -> None:
        try:
            data, fds, flags, _ = socket.recv_fds(self._sock, _READ_SIZE, MAX_FDS)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.close(exc)
            return
        self._fds.extend(fds)
        if flags & socket.MSG_CTRUNC:
            self.close(ChannelError("descriptors were truncated"))
            return
        if not data:
            self.close()
            return
        try:
            frames = self._decoder.feed(data)
        except ChannelError as exc:
            self.close(exc)
            return
        for message, fd_count in frames:
            if fd_count > len(self._fds):
                self.close(ChannelError("a frame announced descriptors that did not come"))
                return
            socks = [socket.socket(fileno=self._fds.popleft()) for _ in range(fd_count)]
            self._on_message(message, socks)
            if self._closed:
                return
