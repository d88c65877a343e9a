"""HTTP/3 load generator on aioquic: requests/s against a QUIC listener.

    .venv/bin/python benchmarks/h3load.py --port 8443 [--host 127.0.0.1] [--sni localhost]
        [--connections 4] [--streams 8] [--duration 10] [--path /]

Each connection keeps ``--streams`` requests in flight for ``--duration`` seconds; prints
requests/s, the status counts and p50/p99 latency. There is no packaged HTTP/3 load tool on
Debian 12, so the project ships this one; it runs on uvloop when available.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import time
from collections import Counter

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, H3Event, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import QuicEvent


class _Client(QuicConnectionProtocol):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.h3 = H3Connection(self._quic)
        self.waiters: dict[int, asyncio.Future[int]] = {}
        self.status: dict[int, int] = {}

    def quic_event_received(self, event: QuicEvent) -> None:
        for h3_event in self.h3.handle_event(event):
            self._on(h3_event)

    def _on(self, event: H3Event) -> None:
        if isinstance(event, HeadersReceived):
            for name, value in event.headers:
                if name == b":status":
                    self.status[event.stream_id] = int(value)
        if isinstance(event, HeadersReceived | DataReceived) and event.stream_ended:
            waiter = self.waiters.pop(event.stream_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(self.status.pop(event.stream_id, 0))

    async def get(self, authority: bytes, path: bytes) -> int:
        stream_id = self._quic.get_next_available_stream_id()
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.waiters[stream_id] = waiter
        self.h3.send_headers(
            stream_id,
            [
                (b":method", b"GET"),
                (b":scheme", b"https"),
                (b":authority", authority),
                (b":path", path),
            ],
            end_stream=True,
        )
        self.transmit()
        return await waiter


async def _run(args: argparse.Namespace) -> None:
    config = QuicConfiguration(
        is_client=True, alpn_protocols=H3_ALPN, verify_mode=ssl.CERT_NONE, server_name=args.sni
    )
    statuses: Counter[int] = Counter()
    latencies: list[float] = []
    deadline = time.perf_counter() + args.duration
    authority, path = args.sni.encode(), args.path.encode()

    async def stream_loop(client: _Client) -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            statuses[await client.get(authority, path)] += 1
            latencies.append(time.perf_counter() - started)

    async def connection() -> None:
        async with connect(
            args.host, args.port, configuration=config, create_protocol=_Client
        ) as client:
            assert isinstance(client, _Client)
            await asyncio.gather(*(stream_loop(client) for _ in range(args.streams)))

    started = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(args.connections)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    total = sum(statuses.values())
    p50 = latencies[len(latencies) // 2] * 1000 if latencies else 0
    p99 = latencies[int(len(latencies) * 0.99)] * 1000 if latencies else 0
    print(
        f"h3load: {total} requests in {elapsed:.2f} s = {total / elapsed:.0f} req/s; "
        f"status {dict(statuses)}; p50 {p50:.2f} ms, p99 {p99:.2f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--sni", default="localhost")
    parser.add_argument("--path", default="/")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--duration", type=float, default=10.0)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.run(_run(args))
    except ImportError:
        asyncio.run(_run(args))


if __name__ == "__main__":
    main()
