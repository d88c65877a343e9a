"""The aioquic private names ``listeners/quic_internals.py`` relies on, driven through real QUIC
connections in memory (client and server ``QuicConnection`` exchanging datagrams): if an aioquic
release moves one of them, these fail before any listener does."""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from typing import Any

from aioquic.buffer import encode_uint_var
from aioquic.h3.connection import H3_ALPN, FrameType, H3Connection, encode_frame
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import HandshakeCompleted, QuicEvent, StreamDataReceived
from certfactory import make_ca, make_server
from cryptography.hazmat.primitives.serialization import Encoding

from alb_proxy.certs.issue import Issued
from alb_proxy.listeners.quic_internals import install_sni_hook, send_goaway, stream_send_buffered

ROOT = make_ca("quic internals root")
DEFAULT = make_server(ROOT, ["default.example.test"])
EXACT = make_server(ROOT, ["exact.example.test"])
CLIENT_ADDR, SERVER_ADDR = ("127.0.0.1", 50000), ("127.0.0.1", 4433)


def choose(server_name: str | None, sigalgs: Sequence[int]) -> tuple[Any, Sequence[Any], Any]:
    chosen: Issued = EXACT if server_name == "exact.example.test" else DEFAULT
    return chosen.cert, [ROOT.cert], chosen.key


def pair(server_name: str | None) -> tuple[QuicConnection, QuicConnection]:
    client = QuicConnection(
        configuration=QuicConfiguration(
            is_client=True,
            alpn_protocols=H3_ALPN,
            server_name=server_name,
            verify_mode=ssl.CERT_NONE,
        )
    )
    config = QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN)
    config.certificate, config.private_key = DEFAULT.cert, DEFAULT.key
    server = QuicConnection(
        configuration=config,
        original_destination_connection_id=client.original_destination_connection_id,
    )
    install_sni_hook(server, choose)
    client.connect(SERVER_ADDR, now=0.0)
    return client, server


def exchange(client: QuicConnection, server: QuicConnection, now: float = 0.0) -> list[QuicEvent]:
    """Move datagrams both ways until both are quiet; the client's events."""
    events: list[QuicEvent] = []
    for conn in (client, server):
        timer = conn.get_timer()
        if timer is not None and timer <= now:
            conn.handle_timer(now=now)  # e.g. a delayed acknowledgement falls due
    while True:
        moved = False
        for data, _ in client.datagrams_to_send(now=now):
            server.receive_datagram(data, CLIENT_ADDR, now=now)
            moved = True
        for data, _ in server.datagrams_to_send(now=now):
            client.receive_datagram(data, SERVER_ADDR, now=now)
            moved = True
        while (ev := client.next_event()) is not None:
            events.append(ev)
        if not moved:
            return events


def settle(client: QuicConnection, server: QuicConnection, start: float, until: float) -> None:
    """Run both connections' timers (acknowledgement delays, ...) from ``start`` to ``until``."""
    now = start
    while now <= until:
        exchange(client, server, now)
        timers = [t for t in (client.get_timer(), server.get_timer()) if t is not None]
        if not timers:
            return
        now = max(now, min(timers))


def peer_der(client: QuicConnection) -> bytes:
    cert = client.tls._peer_certificate
    assert cert is not None
    return cert.public_bytes(Encoding.DER)


def test_sni_hook_serves_the_certificate_chosen_for_the_name() -> None:
    for name, expected in (("exact.example.test", EXACT), ("other.test", DEFAULT), (None, DEFAULT)):
        client, server = pair(name)
        events = exchange(client, server)
        assert any(isinstance(e, HandshakeCompleted) for e in events)
        assert peer_der(client) == expected.cert.public_bytes(Encoding.DER)


def test_send_buffered_counts_unacknowledged_bytes() -> None:
    client, server = pair("exact.example.test")
    exchange(client, server)
    stream_id = client.get_next_available_stream_id()
    client.send_stream_data(stream_id, b"x" * 5000)
    server_stream = 1  # the server's first bidirectional stream
    server.send_stream_data(server_stream, b"y" * 3000)
    assert stream_send_buffered(server, server_stream) == 3000
    assert stream_send_buffered(server, 99) == 0  # no such stream
    settle(client, server, 0.1, 1.0)  # delivered, and acknowledged once the ack delay is over
    assert stream_send_buffered(server, server_stream) == 0


def test_goaway_is_written_on_the_servers_control_stream() -> None:
    client, server = pair("exact.example.test")
    exchange(client, server)
    h3 = H3Connection(server)
    exchange(client, server)
    send_goaway(h3, 8)
    received = b"".join(
        e.data
        for e in exchange(client, server, now=0.1)
        if isinstance(e, StreamDataReceived) and e.stream_id == h3._local_control_stream_id
    )
    assert received.endswith(encode_frame(FrameType.GOAWAY, encode_uint_var(8)))
