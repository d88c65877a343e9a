"""The QUIC listener's gate for new connections: at most MAX_CONNECTIONS_PER_SOURCE per source
address, none while draining, and datagrams of connections already held always pass."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from certfactory import make_server

from alb_proxy.listeners.quic import MAX_CONNECTIONS_PER_SOURCE, _GuardedServer

LEAF = make_server(None, ["quic.example.test"])


class _Transport:
    def sendto(self, data: bytes, addr: Any = None) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def initial(dcid: bytes) -> bytes:
    """A long-header Initial (QUIC v1) for ``dcid`` with an undecryptable payload."""
    return (
        b"\xc0\x00\x00\x00\x01\x08"
        + dcid
        + b"\x08"
        + os.urandom(8)
        + b"\x00\x44\xd0"
        + (os.urandom(1250))
    )


class _Recording(QuicConnectionProtocol):
    seen = 0

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        self.seen += 1
        super().datagram_received(data, addr)


def guarded() -> _GuardedServer:
    server: _GuardedServer

    def create(connection: QuicConnection, **kwargs: Any) -> QuicConnectionProtocol:
        protocol = _Recording(connection, **kwargs)
        server.created = protocol  # type: ignore[assignment]
        return protocol

    configuration = QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN)
    configuration.certificate, configuration.private_key = LEAF.cert, LEAF.key
    server = _GuardedServer(configuration=configuration, create_protocol=create)
    server.connection_made(_Transport())  # type: ignore[arg-type]
    return server


def test_new_connections_are_capped_per_source_and_refused_while_draining() -> None:
    async def run() -> None:
        server = guarded()
        first = os.urandom(8)
        server.datagram_received(initial(first), ("192.0.2.1", 1000))
        for port in range(MAX_CONNECTIONS_PER_SOURCE + 50):
            server.datagram_received(initial(os.urandom(8)), ("192.0.2.1", 2000 + port))
        assert len(server.live) == MAX_CONNECTIONS_PER_SOURCE
        # Another source is not held back by the first one's flood.
        server.datagram_received(initial(os.urandom(8)), ("192.0.2.2", 1000))
        assert len(server.live) == MAX_CONNECTIONS_PER_SOURCE + 1
        # A retransmitted Initial of a connection already held is not a new connection.
        held = server._protocols[first]
        assert isinstance(held, _Recording) and held.seen == 1
        server.datagram_received(initial(first), ("192.0.2.1", 1000))
        assert server._protocols[first] is held and held.seen == 2
        # A connection that ends makes room for its source again.
        server.forget(held)  # type: ignore[arg-type]
        server.datagram_received(initial(os.urandom(8)), ("192.0.2.1", 9999))
        assert len(server.live) == MAX_CONNECTIONS_PER_SOURCE + 1
        # Draining: nothing new from anyone.
        server.accepting = False
        server.datagram_received(initial(os.urandom(8)), ("192.0.2.3", 1000))
        assert len(server.live) == MAX_CONNECTIONS_PER_SOURCE + 1

    asyncio.run(run())
