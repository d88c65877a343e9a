"""The control-plane/worker channel: the frame codec (pure, fuzzed) and the asyncio adapter over
a real socket pair, descriptors included."""

from __future__ import annotations

import asyncio
import os
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from alb_proxy.workers.channel import (
    MAX_FDS,
    Channel,
    ChannelError,
    FrameDecoder,
    Message,
    encode_frame,
)

messages = st.dictionaries(
    st.text(max_size=8), st.integers() | st.text(max_size=20), max_size=4
).map(lambda d: {**d, "type": "t"})


@given(st.lists(messages, min_size=1, max_size=5), st.integers(1, 64))
def test_frames_survive_any_split(batch: list[Message], step: int) -> None:
    wire = b"".join(encode_frame(m, i % 3) for i, m in enumerate(batch))
    decoder = FrameDecoder()
    out = []
    for start in range(0, len(wire), step):
        out += decoder.feed(wire[start : start + step])
    assert out == [(m, i % 3) for i, m in enumerate(batch)]


@given(st.binary(max_size=200))
def test_garbage_is_a_channel_error_or_needs_more_bytes(data: bytes) -> None:
    try:
        frames = FrameDecoder().feed(data)
    except ChannelError:
        return
    for message, fds in frames:
        assert isinstance(message, dict) and isinstance(message["type"], str)
        assert 0 <= fds <= MAX_FDS


@pytest.mark.parametrize(
    ("wire", "why"),
    [
        (struct.pack("!IH", 2**31, 0), "out of range"),
        (struct.pack("!IH", 2, 0) + b"[]", "with a type"),
        (struct.pack("!IH", 1, 0) + b"{", "not JSON"),
        (struct.pack("!IH", 2, 0) + b"\xff\xfe", "not JSON"),
        (struct.pack("!IH", 2, MAX_FDS + 1) + b"{}", "out of range"),
    ],
)
def test_bad_frames_are_refused(wire: bytes, why: str) -> None:
    with pytest.raises(ChannelError, match=why):
        FrameDecoder().feed(wire)


def test_encode_refuses_too_many_descriptors() -> None:
    with pytest.raises(ValueError, match="descriptors"):
        encode_frame({"type": "x"}, MAX_FDS + 1)


def test_messages_and_descriptors_cross_a_socket_pair() -> None:
    async def run() -> None:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        got: asyncio.Queue[tuple[Message, list[socket.socket]]] = asyncio.Queue()
        closed: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        sender = Channel(a, lambda m, s: None, lambda exc: None)
        receiver = Channel(b, lambda m, s: got.put_nowait((m, s)), closed.set_result)
        listening = socket.create_server(("127.0.0.1", 0))
        big = {"type": "big", "blob": "x" * 3_000_000}  # more than one socket buffer
        sender.send({"type": "sockets", "n": 1}, [listening])
        sender.send(big)
        message, socks = await got.get()
        assert message == {"type": "sockets", "n": 1} and len(socks) == 1
        # The descriptor is the same listening socket, owned by the receiver.
        assert socks[0].getsockname() == listening.getsockname()
        assert os.path.samestat(os.fstat(socks[0].fileno()), os.fstat(listening.fileno()))
        assert await got.get() == (big, [])
        socks[0].close()
        listening.close()
        sender.close()
        assert await closed is None and receiver.closed

    asyncio.run(run())


def test_garbage_from_the_peer_closes_the_channel_with_the_reason() -> None:
    async def run() -> None:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        closed: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        Channel(b, lambda m, s: None, closed.set_result)
        a.sendall(struct.pack("!IH", 4, 0) + b"nope")
        reason = await closed
        assert isinstance(reason, ChannelError) and "not JSON" in str(reason)
        a.close()

    asyncio.run(run())
