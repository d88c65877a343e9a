"""QUIC listeners: HTTP/3 over UDP with aioquic, certificates chosen per connection by SNI.

Like the TCP listener, each new connection takes the listener's plan current when its first
packet arrives (certificates, route) and keeps it; a runtime change reaches new connections
only. One SNI index serves HTTPS and QUIC alike (built by the control plane); this module only
turns its answer into aioquic's certificate objects.
"""

from __future__ import annotations

import asyncio
import functools
import socket
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from aioquic.asyncio.server import QuicServer
from aioquic.buffer import Buffer  # type: ignore[attr-defined]
from aioquic.h3.connection import H3_ALPN
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicPacketType, pull_quic_header
from aioquic.tls import CipherSuite

from alb_proxy.http.forward import RouteSettings
from alb_proxy.http.h3 import RECEIVE_HIGH_WATER, H3Protocol
from alb_proxy.listeners.drain import finish_or_cut
from alb_proxy.listeners.quic_internals import (
    hold_stream_credit,
    install_sni_hook,
    receive,
    send_goaway,
    stream_send_buffered,
)
from alb_proxy.listeners.sockets import Address
from alb_proxy.observability.metrics import Metrics
from alb_proxy.tls.contexts import authority_ok

MAX_CONNECTIONS_PER_SOURCE = 256
"""New QUIC connections from one address beyond this are dropped (Initial flood guard)."""

QUIC_CIPHER_SUITES = (
    CipherSuite.AES_128_GCM_SHA256,
    CipherSuite.AES_256_GCM_SHA384,
    CipherSuite.CHACHA20_POLY1305_SHA256,
)
"""The TLS 1.3 suites of our policies that aioquic implements (not the CCM ones)."""

_ECDSA_SIGALGS = frozenset({0x0403, 0x0503, 0x0603})


@dataclass(frozen=True)
class QuicCertificate:
    certificate: Any
    """``cryptography`` x509.Certificate (the leaf)."""
    chain: tuple[Any, ...]
    private_key: Any
    key_type: str


@dataclass(frozen=True)
class QuicCertificates:
    """Per handshake: the SNI group for the name, then the certificate the client can verify."""

    select_ids: Callable[[str | None], tuple[str, ...]]
    by_id: Mapping[str, QuicCertificate]
    covers: Callable[[tuple[str, ...], str], bool] = lambda group, host: True
    """Whether the certificates of an SNI group cover a host name (see ListenerTls.covers)."""

    def authority_ok(self, server_name: str | None, host: str) -> bool:
        return authority_ok(self.select_ids, self.covers, server_name, host)

    def choose(self, server_name: str | None, sigalgs: Sequence[int]) -> tuple[Any, Any, Any]:
        group = [self.by_id[cert_id] for cert_id in self.select_ids(server_name)]
        wants_ec = any(alg in _ECDSA_SIGALGS for alg in sigalgs)
        chosen = next((c for c in group if (c.key_type == "EC") == wants_ec), group[0])
        return chosen.certificate, chosen.chain, chosen.private_key


@dataclass(frozen=True)
class QuicPlan:
    name: str
    bind: str
    port: int
    route: RouteSettings
    certificates: QuicCertificates
    protocol: str = "QUIC"

    @property
    def address(self) -> Address:
        return Address("udp", self.bind, self.port)


class QuicListener:
    def __init__(self, plan: QuicPlan, metrics: Metrics) -> None:
        self._plan = plan
        self.metrics = metrics
        self._transport: asyncio.DatagramTransport | None = None
        self._server: _GuardedServer | None = None
        self._route_now: Callable[[], RouteSettings] = lambda: self._plan.route
        """Each request's route (H3Protocol.current_route); made once, not per connection."""

    @property
    def plan(self) -> QuicPlan:
        return self._plan

    @plan.setter
    def plan(self, plan: QuicPlan) -> None:
        """New connections take ``plan``. aioquic gives every connection the server's one
        configuration (its idle timeout included), so a changed timeout takes a new one that
        only connections created from now on share."""
        self._plan = plan
        server = self._server
        if server is not None and server.configuration.idle_timeout != plan.route.idle_timeout:
            server.configuration = replace(
                server.configuration, idle_timeout=plan.route.idle_timeout
            )

    @property
    def name(self) -> str:
        return self.plan.name

    async def start(self, sock: socket.socket) -> None:
        """Serve ``sock``, a bound UDP socket (``listeners.sockets``); the endpoint owns it."""
        loop = asyncio.get_running_loop()
        default = self.plan.certificates.choose(None, (0x0403,))
        configuration = QuicConfiguration(
            is_client=False,
            alpn_protocols=H3_ALPN,
            idle_timeout=self.plan.route.idle_timeout,
            cipher_suites=list(QUIC_CIPHER_SUITES),
            max_datagram_frame_size=None,
        )
        # aioquic wants one certificate up front; the SNI hook replaces it per connection.
        configuration.certificate, chain, configuration.private_key = default
        configuration.certificate_chain = list(chain)
        transport, protocol = await loop.create_datagram_endpoint(
            lambda: _GuardedServer(configuration=configuration, create_protocol=self._connect),
            sock=sock,
        )
        self._transport = transport
        assert isinstance(protocol, _GuardedServer)
        self._server = protocol

    def _connect(self, connection: QuicConnection, **kwargs: Any) -> H3Protocol:
        plan = self.plan  # the snapshot this connection keeps for its life
        protocol_of: list[H3Protocol] = []

        def choose(server_name: str | None, sigalgs: Sequence[int]) -> tuple[Any, Any, Any]:
            if protocol_of:  # the connection's requests are checked against the name it asked
                protocol_of[0].authority_ok = functools.partial(
                    plan.certificates.authority_ok, server_name
                )
            return plan.certificates.choose(server_name, sigalgs)

        install_sni_hook(connection, choose)
        hold_stream_credit(
            connection,
            lambda stream_id: protocol_of[0].held(stream_id) if protocol_of else 0,
            RECEIVE_HIGH_WATER,
        )
        self.metrics.connections_total.labels(plan.name).inc()
        server = self._server
        assert server is not None
        protocol = H3Protocol(
            connection,
            route=plan.route,
            current_route=self._route_now,
            send_buffered=stream_send_buffered,
            send_goaway=send_goaway,
            receive=receive,
            **kwargs,
        )
        protocol_of.append(protocol)
        protocol.on_closed = lambda: server.forget(protocol)
        server.created = protocol
        return protocol

    def stop_accepting(self) -> None:
        """Take no new connection. Unlike a TCP listening socket, the UDP socket carries the
        established connections too, so it stays open until :meth:`drain` is done with them."""
        if self._server is not None:
            self._server.accepting = False

    async def drain(self, timeout: float) -> None:
        """GOAWAY to every connection, let requests in flight finish (up to ``timeout``),
        close each connection with NO_ERROR, then release the socket."""
        self.stop_accepting()
        server = self._server
        live = list(server.live) if server is not None else []
        if live:
            drains = [asyncio.ensure_future(protocol.drain()) for protocol in live]

            def cut(pending: set[asyncio.Future[None]]) -> None:
                for task in pending:
                    task.cancel()  # the connections close just below

            await finish_or_cut(drains, timeout, self.name, cut)
            for protocol in live:
                protocol.close()  # CONNECTION_CLOSE leaves at once (transmit is synchronous)
        if self._transport is not None:
            self._transport.close()


class _GuardedServer(QuicServer):
    """aioquic's server, plus a cap on concurrent connections per source address."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._per_source: Counter[str] = Counter()
        self._sources: dict[H3Protocol, str] = {}
        self.accepting = True
        """False while draining: Initial packets that would open a connection are dropped."""
        self.created: H3Protocol | None = None
        """Set by the protocol factory while ``datagram_received`` runs."""

    @property
    def configuration(self) -> QuicConfiguration:
        """What aioquic's server creates each new connection with (its ``_configuration``)."""
        configuration: QuicConfiguration = self._configuration
        return configuration

    @configuration.setter
    def configuration(self, configuration: QuicConfiguration) -> None:
        self._configuration = configuration

    @property
    def live(self) -> tuple[H3Protocol, ...]:
        """Connections not yet terminated."""
        return tuple(self._sources)

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        source = str(addr[0])
        if (
            not self.accepting or self._per_source[source] >= MAX_CONNECTIONS_PER_SOURCE
        ) and self._opens_connection(data):
            return
        self.created = None
        super().datagram_received(data, addr)
        if self.created is not None:
            self._sources[self.created] = source
            self._per_source[source] += 1
            self.created = None

    def forget(self, protocol: H3Protocol) -> None:
        source = self._sources.pop(protocol, None)
        if source is not None:
            self._per_source[source] -= 1
            if self._per_source[source] <= 0:
                del self._per_source[source]

    def _opens_connection(self, data: bytes | str) -> bool:
        """An Initial packet for no connection we hold (retransmitted Initials of a
        handshake in progress belong to their connection and pass)."""
        try:
            raw = data if isinstance(data, bytes) else data.encode()
            header = pull_quic_header(Buffer(data=raw), host_cid_length=8)
        except ValueError:
            return False
        return (
            header.packet_type == QuicPacketType.INITIAL
            and header.destination_cid not in self._protocols
        )
