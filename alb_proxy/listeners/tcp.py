"""HTTP and HTTPS listeners: accept TCP connections and run one HTTP session on each.

Every connection takes the listener's plan (certificate contexts, route) current when its
ClientHello arrives (plain HTTP: when it is accepted) and keeps it for its whole life, so a
runtime change affects new connections only. The plan is replaced by assigning
``listener.plan``; nothing in a plan is mutated.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from alb_proxy.http.forward import RouteSettings
from alb_proxy.http.h1 import IDLE_GRACE_S, ConnectionControl, H1Session
from alb_proxy.http.h2 import H2Session
from alb_proxy.http.stream import Stream
from alb_proxy.listeners.drain import finish_or_cut
from alb_proxy.listeners.sockets import BACKLOG, Address
from alb_proxy.observability.log import event
from alb_proxy.observability.metrics import Metrics
from alb_proxy.tls.clientcert import client_cert_headers
from alb_proxy.tls.clienthello import ClientHello
from alb_proxy.tls.connection import HandshakeFailure, TlsServerProtocol
from alb_proxy.tls.contexts import ListenerTls

_STREAM_LIMIT = 256 * 1024


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
        self._connections: dict[_Connection, ConnectionControl] = {}
        self._draining = False
        """Every connection this listener accepted that is still open."""
        self._route_now: Callable[[], RouteSettings] = lambda: self.plan.route
        """Each request's route (ConnectionControl.current_route); made once, not per accept."""

    @property
    def name(self) -> str:
        return self.plan.name

    async def start(self, sock: socket.socket) -> None:
        """Serve ``sock``, bound and listening (``listeners.sockets``); the server owns it."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._accept, sock=sock, backlog=BACKLOG)

    def _accept(self) -> asyncio.Protocol:
        accepted = self.plan
        control = ConnectionControl(draining=self._draining, current_route=self._route_now)
        self.metrics.connections_total.labels(accepted.name).inc()
        if accepted.tls is None:
            return _H1Protocol(accepted, control, self.metrics, self._connections)
        # A TLS connection keeps the plan current when its ClientHello arrives, not when it was
        # accepted: a client may connect, wait, and only then say hello, and a change made
        # meanwhile (mutual authentication turned on, a CA or policy replaced) must hold for
        # that handshake as for any other begun after it.
        chosen = accepted

        def select(hello: ClientHello | None) -> ssl.SSLContext:
            nonlocal chosen
            chosen = self.plan
            assert chosen.tls is not None  # a listener's protocol never changes
            return chosen.tls.select(hello)

        def app(alpn: str | None) -> asyncio.Protocol:
            # A handshake that completes after a drain began serves nothing more.
            control.draining = self._draining
            if alpn == "h2":
                return _H2Protocol(chosen, control, self.metrics, self._connections)
            return _H1Protocol(chosen, control, self.metrics, self._connections)

        return TlsServerProtocol(
            select_context=select,
            app_factory=app,
            on_failure=lambda failure: self._handshake_failed(chosen, failure),
            handshake_timeout=accepted.handshake_timeout,
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

    def stop_accepting(self) -> None:
        """Release the port at once; connections already accepted carry on."""
        if self._server is not None:
            self._server.close()

    async def drain(self, timeout: float) -> None:
        """Stop accepting, let requests in flight finish (bounded), then close what remains."""
        self.stop_accepting()
        self._draining = True
        for connection, control in list(self._connections.items()):
            control.draining = True
            if control.on_drain is not None:
                control.on_drain()
            elif not control.busy:
                connection.close()  # idle keep-alive connection: nothing to finish
        running: dict[asyncio.Future[None], _Connection] = {
            c.task: c for c in self._connections if c.task is not None
        }

        def cut(pending: set[asyncio.Future[None]]) -> None:
            for task in pending:
                running[task].abort()  # each session ends on its broken connection

        await finish_or_cut(running, timeout, self.name, cut)


class _Connection(Protocol):
    """What the listener needs of a connection to drain it."""

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The task serving it now (HTTP/1.1: only while a request is under way)."""

    def close(self) -> None: ...

    def abort(self) -> None: ...


def _tls_facts(
    plan: ListenerPlan, metrics: Metrics, sslobj: ssl.SSLObject | None
) -> list[tuple[bytes, bytes]]:
    """Count the handshake; the client-certificate headers, computed once per connection
    (the dict form of getpeercert() can be empty: read the DER)."""
    if sslobj is None:
        return []
    version = sslobj.version()
    metrics.handshakes_total.labels(plan.name, version if version else "-").inc()
    if plan.client_cert_headers:
        der = sslobj.getpeercert(binary_form=True)
        if der is not None:
            return client_cert_headers(der, plan.client_cert_headers)
    return []


class _H1Protocol(Stream):
    """An HTTP/1.1 connection: a task serves it while a request is under way, none while it
    idles between requests (thousands of idle keep-alive connections then cost no coroutine
    frames); its idle timeout is one timer."""

    def __init__(
        self,
        plan: ListenerPlan,
        control: ConnectionControl,
        metrics: Metrics,
        connections: dict[_Connection, ConnectionControl],
    ) -> None:
        super().__init__()
        self._plan, self._control, self._metrics = plan, control, metrics
        self._connections = connections
        self.task: asyncio.Task[None] | None = None
        self._session: H1Session | None = None
        self._cert_headers: list[tuple[bytes, bytes]] = []
        self._idle_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        plan = self._plan
        self._cert_headers = _tls_facts(plan, self._metrics, transport.get_extra_info("ssl_object"))
        self._metrics.connections_active.labels(plan.name).inc()
        self._connections[self] = self._control
        if self._control.draining:
            self.close()  # its listener is draining: nothing to serve
        else:
            self._idle()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.task is None:
            self._start()

    def eof_received(self) -> bool:
        super().eof_received()
        if self.task is None:
            self.close()  # between requests: the client is done
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        if self._connections.pop(self, None) is not None:
            self._metrics.connections_active.labels(self._plan.name).dec()

    def _start(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self._session is None:
            plan = self._plan
            self._session = H1Session(self, plan.route, self._control, self._cert_headers)
        self.task = asyncio.ensure_future(self._serve(self._session))

    async def _serve(self, session: H1Session) -> None:
        try:
            idle = await session.serve()
        except Exception as exc:  # one broken connection must never take the listener down
            event(logging.ERROR, "connection error", listener=self._plan.name, error=repr(exc))
            self.abort()
            idle = False
        finally:
            self.task = None
        if idle:
            if self.at_eof or self._control.draining:
                self.close()
            else:
                # The session waited IDLE_GRACE_S of the idle timeout already.
                timeout = self._plan.route.idle_timeout
                self._idle(timeout - min(IDLE_GRACE_S, timeout))

    def _idle(self, delay: float | None = None) -> None:
        """Close the connection unless the client sends something within ``delay`` (default:
        the idle timeout)."""
        loop = asyncio.get_running_loop()
        delay = self._plan.route.idle_timeout if delay is None else delay
        self._idle_timer = loop.call_later(delay, self._idle_expired)

    def _idle_expired(self) -> None:
        self._idle_timer = None
        if self.task is None:
            self.close()


class _H2Protocol(asyncio.StreamReaderProtocol):
    """Runs an :class:`H2Session` (ALPN ``h2``) on the TLS connection, in one task for its life
    (HTTP/2 multiplexes: there is no "between requests")."""

    def __init__(
        self,
        plan: ListenerPlan,
        control: ConnectionControl,
        metrics: Metrics,
        connections: dict[_Connection, ConnectionControl],
    ) -> None:
        self._plan, self._control, self._metrics = plan, control, metrics
        self._connections = connections
        self.task: asyncio.Task[None] | None = None
        self._writer: asyncio.StreamWriter | None = None
        super().__init__(asyncio.StreamReader(limit=_STREAM_LIMIT), self._serve)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.task = asyncio.current_task()
        self._writer = writer
        self._connections[self] = self._control
        active = self._metrics.connections_active.labels(self._plan.name)
        active.inc()
        try:
            await self._serve_h2(reader, writer)
        finally:
            self._connections.pop(self, None)
            active.dec()

    async def _serve_h2(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        plan = self._plan
        assert plan.tls is not None
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
        try:
            await session.run()
        except Exception as exc:  # one broken connection must never take the listener down
            event(logging.ERROR, "connection error", listener=plan.name, error=repr(exc))
            writer.transport.abort()
