"""Every use of aioquic's private names, in one place, for the two things it has no hook for.

1. **Certificate by SNI.** aioquic gives a server one certificate per ``QuicConfiguration`` and
   no SNI callback. The narrowest hook found: after ``QuicConnection._initialize`` creates the
   connection's ``tls.Context``, wrap that context's ``_server_handle_hello`` so it peeks at the
   ClientHello (``aioquic.tls.pull_client_hello``, public), sets the public ``certificate``,
   ``certificate_chain`` and ``certificate_private_key`` attributes for the requested name, and
   then runs aioquic's own handling unchanged. Reading the name from the Initial packet before
   creating the connection would need decrypting Initial packets and reassembling CRYPTO frames
   ourselves: far more code to get wrong.
2. **Send-side backpressure.** aioquic buffers everything sent on a stream until acknowledged and
   exposes no size; ``len(stream.sender._buffer)`` is that size.
3. **GOAWAY.** ``H3Connection`` can receive GOAWAY but not send it; a draining server writes the
   frame on the connection's own control stream (``_local_control_stream_id``).
5. **Upload backpressure.** aioquic grants a stream more credit (MAX_STREAM_DATA) as soon as
   data arrives, whatever the application did with it; a backend that does not read would let
   a client park any amount in the proxy. :func:`hold_stream_credit` wraps
   ``_write_stream_limits`` so credit grows with what the backend took, not with what arrived.
4. **One transmit per loop turn.** ``QuicConnectionProtocol.datagram_received`` builds and sends
   packets after every datagram; under load many datagrams arrive in one turn of the loop, and
   building packets is the costliest part of serving HTTP/3. :func:`receive` does what it does
   (``_quic.receive_datagram``, ``_process_events``) minus the transmit, which the protocol
   then schedules once per turn.

Verified against aioquic 1.7 (pyproject.toml pins ``>=1.7,<1.8``);
``tests/test_quic_internals.py`` drives each hook through real in-memory QUIC connections and
fails loudly if a release moves these names.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.buffer import encode_uint_var
from aioquic.h3.connection import FrameType, H3Connection, encode_frame
from aioquic.quic.connection import QuicConnection
from aioquic.tls import pull_client_hello

Chooser = Callable[[str | None, Sequence[int]], tuple[Any, Sequence[Any], Any]]
"""(server name, client's signature algorithms) -> (certificate, chain, private key)."""


def install_sni_hook(connection: QuicConnection, choose: Chooser) -> None:
    original_initialize = connection._initialize

    def initialize(peer_cid: bytes) -> None:
        original_initialize(peer_cid)
        context = connection.tls
        original_hello = context._server_handle_hello

        def handle_hello(input_buf: Any, initial_buf: Any, handshake_buf: Any) -> None:
            start = input_buf.tell()
            hello = pull_client_hello(input_buf)
            input_buf.seek(start)
            certificate, chain, key = choose(hello.server_name, hello.signature_algorithms or ())
            context.certificate = certificate
            context.certificate_chain = list(chain)
            context.certificate_private_key = key
            original_hello(input_buf, initial_buf, handshake_buf)

        context._server_handle_hello = handle_hello  # type: ignore[method-assign]

    connection._initialize = initialize  # type: ignore[method-assign]


def stream_send_buffered(connection: QuicConnection, stream_id: int) -> int:
    stream = connection._streams.get(stream_id)
    if stream is None:
        return 0
    return len(stream.sender._buffer)


def send_goaway(h3: H3Connection, stream_id: int) -> None:
    """Queue an HTTP/3 GOAWAY: request streams from ``stream_id`` on will not be processed."""
    control = h3._local_control_stream_id
    if control is not None:
        h3._quic.send_stream_data(
            control, encode_frame(FrameType.GOAWAY, encode_uint_var(stream_id))
        )


def receive(protocol: QuicConnectionProtocol, data: bytes, addr: Any) -> None:
    """Feed one datagram to the protocol's connection and handle its events, without sending."""
    protocol._quic.receive_datagram(data, addr, now=protocol._loop.time())
    protocol._process_events()


def hold_stream_credit(connection: QuicConnection, held: Callable[[int], int], limit: int) -> None:
    """Grant a stream credit by what its consumer took (received minus ``held(stream_id)``),
    and none while ``limit`` bytes or more are held."""
    original = connection._write_stream_limits

    def write_stream_limits(builder: Any, space: Any, stream: Any) -> None:
        waiting = held(stream.stream_id)
        if waiting >= limit:
            return  # the client waits until the backend takes some
        receiver = stream.receiver
        received = receiver.highest_offset
        receiver.highest_offset = received - waiting  # aioquic grows credit from this
        try:
            original(builder, space, stream)
        finally:
            receiver.highest_offset = received

    connection._write_stream_limits = write_stream_limits  # type: ignore[method-assign]
