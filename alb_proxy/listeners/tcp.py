"""HTTP and HTTPS listeners: accept TCP connections and run one HTTP session on each.

Every accepted connection takes the listener's plan current at accept time (certificate
contexts, route) and keeps it for its whole life, so a runtime change affects new connections
only. The plan is replaced by assigning ``listener.plan``; nothing in a plan is mutated.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from alb_proxy.http.forward import RouteSettings
from alb_proxy.http.h1 import ConnectionControl, H1Session
from alb_proxy.http.h2 import H2Session
from alb_proxy.http.stream import Stream
from alb_proxy.listeners.sockets import BACKLOG, Address
from alb_proxy.observability.log import event
from alb_proxy.observability.metrics import Metrics
from alb_proxy.tls.clientcert import client_cert_headers
from alb_proxy.tls.connection import HandshakeFailure, TlsServerProtocol
from alb_proxy.tls.contexts import ListenerTls

_STREAM_LIMIT = 256 * 1024
_Session = tuple[ConnectionControl, "_Closable"]


@dataclass(frozen=True)
class ListenerPlan:
    """Everything one listener serves with, built by the control plane as part of a snapshot."""

    name: str
    protocol: str
    bind: str
    port: int
    route: RouteSettings
    tls: ListenerTls | None = None
    handshake_timeout: float = 10.0
    client_cert_headers: tuple[str, ...] = ()
    """With mutual authentication: the ``X-Forwarded-Clientcert-*`` headers to send."""
    quic_upgrade: str | None = None
    """QUIC listener advertised with Alt-Svc (its bound port is filled in once it listens)."""

    @property
    def address(self) -> Address:
        return Address("tcp", self.bind, self.port)


class TcpListener:
    def __init__(self, plan: ListenerPlan, metrics: Metrics) -> None:
        self.plan = plan
        self.metrics = metrics
        self._server: asyncio.Server | None = None
        self._sessions: dict[asyncio.Task[None], _Session] = {}

    @property
    def name(self) -> str:
        return self.plan.name

    async def start(self, sock: socket.socket) -> None:
        """Serve ``sock``, bound and listening (``listeners.sockets``); the server owns it."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._accept, sock=sock, backlog=BACKLOG)

    def _accept(self) -> asyncio.Protocol:
        plan = self.plan  # the snapshot this connection keeps for its life
        control = ConnectionControl()
        self.metrics.connections_total.labels(plan.name).inc()

        def register(task: asyncio.Task[None], closable: _Closable) -> None:
            self._sessions[task] = (control, closable)
            task.add_done_callback(self._forget)

        def app(alpn: str | None) -> asyncio.Protocol:
            if alpn == "h2":
                return _H2Protocol(plan, control, self.metrics, register)
            return _H1Protocol(plan, control, self.metrics, register)

        if plan.tls is None:
            return app(None)
        tls = plan.tls
        return TlsServerProtocol(
            select_context=tls.select,
            app_factory=app,
            on_failure=lambda failure: self._handshake_failed(plan, failure),
            handshake_timeout=plan.handshake_timeout,
        )

    def _handshake_failed(self, plan: ListenerPlan, failure: HandshakeFailure) -> None:
        self.metrics.handshake_failures_total.labels(plan.name, failure.reason).inc()
        event(
            logging.INFO,
            "tls handshake failed",
            listener=plan.name,
            client=failure.peer,
            sni=failure.server_name,
            reason=failure.reason,
            detail=failure.detail,
        )

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._sessions.pop(task, None)

    def stop_accepting(self) -> None:
        """Release the port at once; connections already accepted carry on."""
        if self._server is not None:
            self._server.close()

    async def drain(self, timeout: float) -> None:
        """Stop accepting, let requests in flight finish (bounded), then close what remains."""
        self.stop_accepting()
        for control, writer in self._sessions.values():
            control.draining = True
            if control.on_drain is not None:
                control.on_drain()
            elif not control.busy:
                writer.close()  # idle keep-alive connection: nothing to finish
        tasks = list(self._sessions)
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        if pending:
            # Out of time: cut what remains; each session ends on its broken connection.
            event(
                logging.WARNING,
                "drain timeout: connections cut",
                listener=self.name,
                connections=len(pending),
            )
            for task in pending:
                session = self._sessions.get(task)
                if session is not None:
                    session[1].transport.abort()
            await asyncio.wait(pending, timeout=5.0)


class _Closable(Protocol):
    def close(self) -> None: ...

    @property
    def transport(self) -> Any: ...


Register = Callable[[asyncio.Task[None], _Closable], None]


def _tls_facts(
    plan: ListenerPlan, metrics: Metrics, sslobj: ssl.SSLObject | None
) -> list[tuple[bytes, bytes]]:
    """Count the handshake; the client-certificate headers, computed once per connection
    (the dict form of getpeercert() can be empty: read the DER)."""
    if sslobj is None:
        return []
    metrics.handshakes_total.labels(plan.name, sslobj.version() or "-").inc()
    if plan.client_cert_headers:
        der = sslobj.getpeercert(binary_form=True)
        if der is not None:
            return client_cert_headers(der, plan.client_cert_headers)
    return []


async def _run(
    plan: ListenerPlan, metrics: Metrics, session: H1Session | H2Session, abort: Callable[[], None]
) -> None:
    active = metrics.connections_active.labels(plan.name)
    active.inc()
    try:
        await session.run()
    except Exception as exc:  # one broken connection must never take the listener down
        event(logging.ERROR, "connection error", listener=plan.name, error=repr(exc))
        abort()
    finally:
        active.dec()


class _H1Protocol(Stream):
    """Runs an :class:`H1Session` on the (TLS) connection once it is established."""

    def __init__(
        self, plan: ListenerPlan, control: ConnectionControl, metrics: Metrics, register: Register
    ) -> None:
        super().__init__()
        self._plan, self._control, self._metrics, self._register = plan, control, metrics, register

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        plan = self._plan
        cert_headers = _tls_facts(plan, self._metrics, transport.get_extra_info("ssl_object"))
        session = H1Session(self, plan.route, self._control, cert_headers)
        task = asyncio.ensure_future(_run(plan, self._metrics, session, self.abort))
        self._register(task, self)


class _H2Protocol(asyncio.StreamReaderProtocol):
    """Runs an :class:`H2Session` (ALPN ``h2``) on the TLS connection."""

    def __init__(
        self, plan: ListenerPlan, control: ConnectionControl, metrics: Metrics, register: Register
    ) -> None:
        self._plan, self._control, self._metrics, self._register = plan, control, metrics, register
        super().__init__(asyncio.StreamReader(limit=_STREAM_LIMIT), self._serve)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        plan = self._plan
        task = asyncio.current_task()
        assert task is not None and plan.tls is not None
        self._register(task, writer)
        cert_headers = _tls_facts(plan, self._metrics, writer.get_extra_info("ssl_object"))
        session = H2Session(
            reader,
            writer,
            plan.route,
            self._control,
            cert_headers,
            authority_ok=functools.partial(
                plan.tls.authority_ok, writer.get_extra_info("tls_server_name")
            ),
        )
        await _run(plan, self._metrics, session, writer.transport.abort)
