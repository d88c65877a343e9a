"""A small HTTP/3 client on aioquic for tests: one request per call, or several on one
connection; reports the certificate the server sent (by SHA-256 fingerprint)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, H3Event, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import QuicEvent
from cryptography.hazmat.primitives.serialization import Encoding


@dataclass
class H3Response:
    status: int = 0
    headers: dict[bytes, bytes] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    done: asyncio.Event = field(default_factory=asyncio.Event)


class H3Client(QuicConnectionProtocol):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.h3 = H3Connection(self._quic)
        self.responses: dict[int, H3Response] = {}

    def quic_event_received(self, event: QuicEvent) -> None:
        for h3_event in self.h3.handle_event(event):
            self._h3_event(h3_event)

    def _h3_event(self, event: H3Event) -> None:
        response = self.responses.get(getattr(event, "stream_id", -1))
        if response is None:
            return
        if isinstance(event, HeadersReceived):
            for name, value in event.headers:
                if name == b":status":
                    response.status = int(value)
                else:
                    response.headers[name] = value
        elif isinstance(event, DataReceived):
            response.body += event.data
        if getattr(event, "stream_ended", False):
            response.done.set()

    async def request(
        self,
        method: str,
        path: str,
        authority: str,
        headers: Sequence[tuple[bytes, bytes]] = (),
        body: bytes | None = None,
        chunks: Sequence[bytes] = (),
        trailers: Sequence[tuple[bytes, bytes]] = (),
    ) -> H3Response:
        stream_id = self._quic.get_next_available_stream_id()
        response = self.responses[stream_id] = H3Response()
        ends = body is None and not chunks
        self.h3.send_headers(
            stream_id,
            [
                (b":method", method.encode()),
                (b":scheme", b"https"),
                (b":authority", authority.encode()),
                (b":path", path.encode()),
                *headers,
            ],
            end_stream=ends,
        )
        self.transmit()
        for chunk in chunks:
            self.h3.send_data(stream_id, chunk, end_stream=False)
            self.transmit()
            await asyncio.sleep(0)
        if trailers:
            if body:
                self.h3.send_data(stream_id, body, end_stream=False)
            self.h3.send_headers(stream_id, list(trailers), end_stream=True)
            self.transmit()
        elif not ends:
            self.h3.send_data(stream_id, body or b"", end_stream=True)
            self.transmit()
        await asyncio.wait_for(response.done.wait(), 30)
        return response

    @property
    def peer_fingerprint(self) -> str:
        cert = self._quic.tls._peer_certificate  # test-only peek; aioquic has no public getter
        assert cert is not None
        return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


def client_configuration(
    server_name: str | None,
    alpn: Sequence[str] = H3_ALPN,
) -> QuicConfiguration:
    return QuicConfiguration(
        is_client=True,
        alpn_protocols=list(alpn),
        verify_mode=ssl.CERT_NONE,
        server_name=server_name,
    )


@contextlib.asynccontextmanager
async def h3_connect(port: int, server_name: str | None) -> AsyncIterator[H3Client]:
    """An HTTP/3 connection to the proxy on 127.0.0.1, offering ``server_name`` as SNI."""
    async with connect(
        "127.0.0.1",
        port,
        configuration=client_configuration(server_name),
        create_protocol=H3Client,
    ) as client:
        assert isinstance(client, H3Client)
        yield client


def h3_get(
    port: int, server_name: str | None, path: str = "/", headers: Sequence[tuple[bytes, bytes]] = ()
) -> tuple[H3Response, str]:
    async def run() -> tuple[H3Response, str]:
        async with h3_connect(port, server_name) as client:
            response = await client.request("GET", path, server_name or "localhost", headers)
            return response, client.peer_fingerprint

    return asyncio.run(run())
