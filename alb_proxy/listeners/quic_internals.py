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

Verified against aioquic 1.2 – 1.7 (the range pinned in pyproject.toml); ``tests/test_quic.py``
fails loudly if a release moves these names.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

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
