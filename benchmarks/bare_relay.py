"""The ceiling of a Python TLS relay on this machine: what ``bench.py --only ceiling`` measures.

    python -P benchmarks/bare_relay.py --tls memorybio|uvloop --port 18443 --backend 18080 \\
        --cert site.pem --key site.key

A relay that does only what no HTTP proxy can skip: terminate TLS, parse each request and
response head with llhttp (httptools), and relay them over one backend connection per client.
No routing, no header rewriting beyond X-Forwarded-For, no limits, no metrics, no error paths.
``--tls memorybio`` runs it over alb-proxy's own TLS layer (``tls.connection``, the one every
HTTPS listener uses); ``--tls uvloop`` over uvloop's built-in TLS transport, which alb-proxy
cannot use (it fixes one context per listening socket and drops alerts, see the design notes).
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
from collections.abc import Callable
from typing import cast

import httptools
import uvloop

from alb_proxy.tls.connection import TlsServerProtocol


class _Backend(asyncio.Protocol):
    def __init__(self, front: _Front) -> None:
        self.front = front
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.head: list[bytes] = []
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.front.backend_ready()

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head.append(b"%s: %s\r\n" % (name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        head, body = b"".join(self.head), b"".join(self.body)
        self.front.reply(b"HTTP/1.1 %d OK\r\n%s\r\n%s" % (status, head, body))
        self.head, self.body = [], []


class _Front(asyncio.Protocol):
    def __init__(self, backend_port: int) -> None:
        self.backend_port = backend_port
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.backend: _Backend | None = None
        self.waiting: list[bytes] = []
        self.url = b""
        self.head: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        loop = asyncio.get_running_loop()
        backend = self.backend = _Backend(self)
        self.connecting = loop.create_task(
            loop.create_connection(lambda: backend, "127.0.0.1", self.backend_port)
        )

    def backend_ready(self) -> None:
        assert self.backend is not None and self.backend.transport is not None
        for request in self.waiting:
            self.backend.transport.write(request)
        self.waiting = []

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head.append(b"%s: %s\r\n" % (name, value))

    def on_message_complete(self) -> None:
        method = self.parser.get_method()
        request = b"%s %s HTTP/1.1\r\n%sx-forwarded-for: 127.0.0.1\r\n\r\n" % (
            method,
            self.url,
            b"".join(self.head),
        )
        self.head = []
        if self.backend is not None and self.backend.transport is not None:
            self.backend.transport.write(request)
        else:
            self.waiting.append(request)

    def reply(self, response: bytes) -> None:
        if self.transport is not None:
            self.transport.write(response)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.backend is not None and self.backend.transport is not None:
            self.backend.transport.close()


async def tls_server(
    kind: str, context: ssl.SSLContext, app: Callable[[], asyncio.Protocol], port: int
) -> asyncio.Server:
    """A server on 127.0.0.1:``port`` handing plaintext to ``app()``, its TLS done by
    alb-proxy's layer (``memorybio``) or else by uvloop's built-in transport."""
    loop = asyncio.get_running_loop()
    if kind != "memorybio":
        return await loop.create_server(app, "127.0.0.1", port, ssl=context)
    return await loop.create_server(
        lambda: TlsServerProtocol(
            select_context=lambda hello: context,
            app_factory=lambda alpn: app(),
            on_failure=lambda failure: None,
        ),
        "127.0.0.1",
        port,
    )


async def serve(tls: str, port: int, backend_port: int, cert: str, key: str) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["http/1.1"])
    server = await tls_server(tls, context, lambda: _Front(backend_port), port)
    await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tls", choices=("memorybio", "uvloop"), required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backend", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    args = parser.parse_args()
    uvloop.run(serve(args.tls, args.port, args.backend, args.cert, args.key))


if __name__ == "__main__":
    main()
