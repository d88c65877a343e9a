"""What one HTTP/2 connection may cost: the flood budgets (pure) and backpressure on a client
that does not read, with the session on a real socket in this process (plain TCP: the limits
sit above TLS, and here the socket buffers can be made small and the session observed)."""

from __future__ import annotations

import asyncio
import select
import socket
import threading

import h2.config
import h2.connection
from hyperframe.frame import DataFrame

from alb_proxy.http.forward import RouteSettings
from alb_proxy.http.h1 import ConnectionControl
from alb_proxy.http.h2 import MAX_BUFFERED, FloodBudget, H2Session
from alb_proxy.observability.metrics import Metrics
from alb_proxy.upstream.group import GroupRuntime
from alb_proxy.upstream.pool import ConnectionPool


def test_budget_allows_a_burst_then_the_sustained_rate() -> None:
    budget = FloodBudget(burst=3, per_second=2.0)
    assert [budget.spend(10.0) for _ in range(4)] == [True, True, True, False]
    assert budget.spend(10.4) is False  # 0.8 of a token back
    assert budget.spend(10.5) is True  # one whole token
    assert budget.spend(10.5) is False


def test_budget_refills_up_to_the_burst_only() -> None:
    budget = FloodBudget(burst=2, per_second=100.0)
    assert budget.spend(0.0) and budget.spend(0.0) and not budget.spend(0.0)
    assert [budget.spend(3600.0) for _ in range(3)] == [True, True, False]


class _PeakQueued:
    """Wraps a transport's ``write`` (every byte a session sends goes through it) and records
    the most bytes ever queued in the transport. A wrapper, not a subclass of H2Session: the
    session may be compiled (mypyc), and compiled classes take no interpreted subclasses."""

    def __init__(self, transport: asyncio.WriteTransport) -> None:
        self.peak = 0
        self._transport = transport
        self._write = transport.write
        transport.write = self.write  # type: ignore[method-assign]

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._write(data)
        self.peak = max(self.peak, self._transport.get_write_buffer_size())


def _route() -> RouteSettings:
    return RouteSettings(
        listener="t",
        scheme="https",
        port=443,
        group=GroupRuntime("sg", [], 1.0),
        pool=ConnectionPool(),
        metrics=Metrics(),
        idle_timeout=10.0,
        request_timeout=10.0,
    )


def _reset_flood(port: int, frames: int) -> tuple[bool, int]:
    """Open stream 1 and reset it, then send empty DATA frames on it without reading: h2
    answers each with RST_STREAM (CVE-2019-9514). Once the proxy stops taking them, read
    everything while sending the rest. Returns whether the sending stalled and how many bytes
    came back."""
    sock = socket.socket()
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        sock.setsockopt(socket.SOL_SOCKET, option, 4096)
    sock.connect(("127.0.0.1", port))
    conn = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding=None))
    conn.initiate_connection()
    head = [(b":method", b"POST"), (b":scheme", b"https"), (b":authority", b"a"), (b":path", b"/")]
    conn.send_headers(1, head)
    conn.reset_stream(1)
    sock.sendall(conn.data_to_send())
    flood = memoryview(DataFrame(1).serialize() * frames)
    stalled = False
    while flood and not stalled:
        # No event says "the peer stopped reading": no progress for this long is it.
        stalled = not select.select([], [sock], [], 1.5)[1]
        if not stalled:
            flood = flood[sock.send(flood, socket.MSG_DONTWAIT) :]
    received = 0

    def read_all() -> None:
        nonlocal received
        while chunk := sock.recv(1 << 20):
            received += len(chunk)

    reader = threading.Thread(target=read_all)
    reader.start()
    sock.sendall(flood)  # the proxy reads again once its answers drain
    sock.shutdown(socket.SHUT_WR)
    reader.join()
    sock.close()
    return stalled, received


def test_a_client_that_does_not_read_is_not_read_from() -> None:
    async def main() -> None:
        sessions: list[_PeakQueued] = []

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sessions.append(_PeakQueued(writer.transport))
            await H2Session(reader, writer, _route(), ConnectionControl()).run()

        # Small kernel buffers both ways (accepted sockets inherit them), so that what piles
        # up piles up in the session, and a session that stops reading stalls the sender.
        listening = socket.create_server(("127.0.0.1", 0))
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            listening.setsockopt(socket.SOL_SOCKET, option, 4096)
        server = await asyncio.start_server(serve, sock=listening)
        port = listening.getsockname()[1]
        # 160,000 frames of 9 bytes: 2 MB of RST_STREAM answers, twice the limit.
        stalled, received = await asyncio.to_thread(_reset_flood, port, 160_000)
        server.close()
        await server.wait_closed()
        (session,) = sessions
        assert session.peak <= MAX_BUFFERED + 64 * 1024, session.peak
        assert stalled
        assert received >= 13 * 160_000  # every frame answered, once the client read

    asyncio.run(main())
