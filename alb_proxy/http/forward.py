"""One request forwarded to a server group, whatever protocol the client spoke.

The front-end adapters (HTTP/1.1 over llhttp, HTTP/3 over aioquic, HTTP/2 over h2) turn a client
request into a :class:`ForwardRequest` and offer a :class:`Downstream` to answer on; everything
about the backend lives here once: choosing a server, rewriting headers, the keep-alive pool,
a safe retry on a stale pooled connection, timeouts (504), unreachable or broken backends (502),
and streaming bodies both ways with backpressure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from alb_proxy.http.h1wire import Data, End, ResponseHead, Switched, WireError
from alb_proxy.http.headers import (
    request_headers_for_backend,
    response_headers_for_client,
    trailers_across,
)
from alb_proxy.observability.log import event
from alb_proxy.observability.metrics import Metrics
from alb_proxy.upstream.connection import BackendClosed, BackendConnection, BodyLengthMismatch
from alb_proxy.upstream.group import GroupRuntime
from alb_proxy.upstream.pool import ConnectionPool

Header = tuple[bytes, bytes]
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
MAX_CONNECT_ATTEMPTS = 3
"""Servers tried for one request when connecting fails (nothing sent yet, so always safe)."""
MAX_INFORMATIONAL = 16
"""1xx responses relayed per request; a backend sending more is broken (502)."""


@dataclass(frozen=True)
class RouteSettings:
    """What a listener's requests need: where they go and how long to wait."""

    listener: str
    scheme: str
    """``http`` or ``https``: the value of X-Forwarded-Proto."""
    port: int
    group: GroupRuntime
    pool: ConnectionPool
    metrics: Metrics
    idle_timeout: float
    request_timeout: float
    response_headers: tuple[Header, ...] = ()
    """Added to every response (e.g. Alt-Svc)."""
    max_header_bytes: int = 64 * 1024
    """Largest request head or header section accepted (431 above)."""


@dataclass(frozen=True)
class ForwardRequest:
    method: bytes
    target: bytes
    headers: Sequence[Header]
    """As the client sent them, lowercase names, with ``host`` (HTTP/2 and 3: from
    ``:authority``)."""
    has_body: bool
    client_ip: str
    client_cert_headers: Sequence[Header] = ()
    upgrade: bytes | None = None
    """The ``Upgrade`` value when the client asks to switch protocols (HTTP/1.1 only)."""


class ClientGone(Exception):
    """The client closed or broke its connection (or stream); nothing more can be sent."""


class BadRequestBody(Exception):
    """The client's body broke its framing after the request went to the backend."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class Downstream(Protocol):
    """The client side of one exchange, as an adapter offers it."""

    request_trailers: list[Header]
    """Trailers that ended the request body (valid once ``read_body`` returned None)."""

    async def read_body(self) -> bytes | None:
        """Next chunk of the request body; None at its end. Raises ClientGone, BadRequestBody."""

    async def send_informational(self, status: int, headers: list[Header]) -> None: ...

    async def send_head(self, status: int, headers: list[Header], reason: bytes) -> None: ...

    async def send_data(self, data: bytes) -> None:
        """Send and wait until the client side can take more (backpressure)."""

    async def end(self, trailers: list[Header]) -> None:
        """End the response, with the backend's trailers where the client's protocol can
        carry them."""

    async def send_error(self, status: int, detail: str) -> None:
        """A short text answer; only valid before ``send_head``."""

    def abort(self) -> None:
        """Cut the exchange after the head went out: the only honest signal left."""


@dataclass
class Outcome:
    reusable: bool
    """The client connection can carry another request."""
    upgraded: tuple[BackendConnection, ResponseHead] | None = None
    """The backend accepted an upgrade: the adapter tunnels over this connection, and calls
    ``route.group.finished(backend_index)`` when the tunnel ends (it counts as in flight)."""
    backend_index: int | None = None


class _StaleConnection(Exception):
    """A reused backend connection died before answering: safe to retry once."""


async def forward(request: ForwardRequest, down: Downstream, route: RouteSettings) -> Outcome:
    group = route.group
    index = group.pick(request.client_ip)
    if index is None:
        await _refuse(down, route, 503, f"server group {group.id} has no available server")
        return Outcome(False)
    headers = request_headers_for_backend(
        request.headers,
        client_ip=request.client_ip,
        proto=route.scheme,
        port=route.port,
        client_cert_headers=request.client_cert_headers,
    )
    if request.has_body and not any(n == b"content-length" for n, _ in headers):
        # Framing is hop-by-hop: a body of unknown length goes to the backend chunked.
        headers.append((b"transfer-encoding", b"chunked"))
    if request.upgrade is not None:
        headers += [(b"connection", b"upgrade"), (b"upgrade", request.upgrade)]
    # HTTP/1.1 requires Host; an HTTP/1.0 client may have sent none. Like nginx's default,
    # the backend then gets its own address (filled in per attempt below).
    needs_host = not any(name == b"host" for name, _ in headers)
    retry_allowed = not request.has_body and request.method in _IDEMPOTENT
    refused: set[int] = set()
    fresh = False
    while True:
        backend = group.backends[index]
        try:
            conn, reused = await route.pool.acquire(
                backend.host, backend.port, group.connect_timeout, fresh=fresh
            )
        except (OSError, TimeoutError) as exc:
            # Nothing was sent: trying another server is safe for any method.
            detail = _describe(exc)
            group.connect_failed(index, detail)
            route.metrics.upstream_errors_total.labels(group.id, "connect").inc()
            event(
                logging.WARNING,
                "backend unreachable",
                group=group.id,
                server=backend.address,
                error=detail,
            )
            refused.add(index)
            next_index = group.pick(request.client_ip, exclude=refused)
            if next_index is None or len(refused) >= MAX_CONNECT_ATTEMPTS:
                await _refuse(down, route, 502, f"cannot connect to {backend.address}")
                return Outcome(False)
            index, fresh = next_index, False
            continue
        if not reused:
            group.connect_succeeded(index)
        group.started(index)
        upgraded = False
        try:
            outcome = await _exchange(
                conn,
                (
                    request.method,
                    request.target,
                    [(b"host", backend.address.encode()), *headers] if needs_host else headers,
                ),
                request.has_body,
                request.upgrade is not None,
                down,
                route,
            )
            if outcome.upgraded is not None:
                upgraded, outcome.backend_index = True, index  # the tunnel ends it
            return outcome
        except _StaleConnection:
            conn.close()
            if not (reused and retry_allowed and not fresh):
                route.metrics.upstream_errors_total.labels(group.id, "protocol").inc()
                await _refuse(down, route, 502, f"{backend.address} closed the connection")
                return Outcome(False)
        finally:
            if not upgraded:
                group.finished(index)
        fresh = True  # retry once, on a new connection


def log_refusal(route: RouteSettings, client_ip: str, status: int, detail: str) -> None:
    """Log a refusal an operator should see, whatever the protocol: the proxy's own failures
    (5xx) and requests it could not take (400, 431). Others (421, a client gone) are counted in
    metrics only."""
    if status >= 500 or status in (400, 431):
        event(
            logging.INFO,
            "request refused",
            listener=route.listener,
            client=client_ip,
            status=status,
            detail=detail,
        )


async def _refuse(down: Downstream, route: RouteSettings, status: int, detail: str) -> None:
    route.metrics.request_answered(route.listener, status)
    await down.send_error(status, detail)


async def _exchange(
    conn: BackendConnection,
    outgoing: tuple[bytes, bytes, list[Header]],
    has_body: bool,
    upgrade: bool,
    down: Downstream,
    route: RouteSettings,
) -> Outcome:
    started = time.monotonic()
    upload: asyncio.Task[None] | None = None
    try:
        conn.send_head(*outgoing)
        if has_body:
            upload = asyncio.create_task(_upload(conn, down, route.request_timeout))
        else:
            await conn.drain()
        response = await _response_head(conn, upload, down, route.request_timeout)
        if response.status == 101 and not upgrade:
            raise WireError(502, "switched protocols unasked")
    except BadRequestBody as bad:
        await _abandon(conn, upload)
        await _refuse(down, route, bad.status, bad.detail)
        return Outcome(False)
    except TimeoutError:
        await _abandon(conn, upload)
        route.metrics.upstream_errors_total.labels(route.group.id, "timeout").inc()
        await _refuse(down, route, 504, f"{conn.address} did not answer in time")
        return Outcome(False)
    except (BackendClosed, ConnectionError) as closed:
        await _abandon(conn, upload)
        if conn.bytes_received == 0:
            raise _StaleConnection() from closed
        route.metrics.upstream_errors_total.labels(route.group.id, "protocol").inc()
        await _refuse(down, route, 502, f"{conn.address}: {_describe(closed)}")
        return Outcome(False)
    except WireError as garbage:
        await _abandon(conn, upload)
        route.metrics.upstream_errors_total.labels(route.group.id, "protocol").inc()
        await _refuse(down, route, 502, f"{conn.address} answered garbage: {garbage}")
        return Outcome(False)
    except BaseException:
        await _abandon(conn, upload)
        raise
    route.metrics.upstream_responded(route.group.id, time.monotonic() - started)
    if response.status == 101:
        return Outcome(False, upgraded=(conn, response))
    # Ambiguous framing (Content-Length with Transfer-Encoding) never gets here: the response
    # reader refuses it (502), as relaying it could desynchronise the client.
    return await _relay_response(conn, response, upload, down, route)


async def _upload(conn: BackendConnection, down: Downstream, timeout: float) -> None:
    """Stream the request body to the backend, chunk by chunk; a backend that stops reading
    for ``timeout`` ends the exchange (504)."""
    try:
        while (chunk := await down.read_body()) is not None:
            if chunk:
                conn.send_data(chunk)
                async with asyncio.timeout(timeout):
                    await conn.drain()
        conn.send_end(trailers_across(down.request_trailers))
    except BodyLengthMismatch as exc:
        raise BadRequestBody(400, str(exc)) from exc
    async with asyncio.timeout(timeout):
        await conn.drain()


async def _response_head(
    conn: BackendConnection,
    upload: asyncio.Task[None] | None,
    down: Downstream,
    timeout: float,
) -> ResponseHead:
    """Wait for the backend's final response head, relaying 1xx responses on the way;
    a 101 (the backend accepted an upgrade) is returned as is."""
    informational = 0
    while True:
        if upload is not None and not upload.done():
            # No deadline while the client is still sending: the backend may well wait for the
            # whole body. Once it is in, the backend has ``timeout`` to answer.
            head = asyncio.ensure_future(conn.next_event(None))
            try:
                await asyncio.wait({head, upload}, return_when=asyncio.FIRST_COMPLETED)
                if upload.done() and upload.exception() is not None and not head.done():
                    upload.result()  # the client went away mid-upload: re-raise it
                ev = await asyncio.wait_for(head, timeout) if not head.done() else head.result()
            finally:
                # However this ends (an upload error, the stream reset by the client), the
                # read is not left running, nor its exception unread.
                if not head.done():
                    head.cancel()
                elif not head.cancelled():
                    head.exception()
        else:
            ev = await conn.next_event(timeout)
        if not isinstance(ev, ResponseHead):
            raise WireError(502, f"{type(ev).__name__} before a response head")
        if ev.status == 101 or ev.status >= 200:
            return ev
        informational += 1
        if informational > MAX_INFORMATIONAL:
            raise WireError(502, f"more than {MAX_INFORMATIONAL} 1xx responses")
        await down.send_informational(ev.status, list(ev.headers))


async def _relay_response(
    conn: BackendConnection,
    response: ResponseHead,
    upload: asyncio.Task[None] | None,
    down: Downstream,
    route: RouteSettings,
) -> Outcome:
    headers = response_headers_for_client(response.headers)
    if response.status == 204:
        # A 204 has no body, so no length (RFC 9110 §8.6); HTTP/2 clients reset a stream that
        # announces one.
        headers = [(n, v) for n, v in headers if n != b"content-length"]
    headers.extend(route.response_headers)
    route.metrics.request_answered(route.listener, response.status)
    try:
        await down.send_head(response.status, headers, response.reason)
        while True:
            ev = await conn.next_event(route.request_timeout)
            if isinstance(ev, Data):
                await down.send_data(ev.data)
            elif isinstance(ev, End):
                await down.end(trailers_across(ev.trailers))
                break
            elif isinstance(ev, Switched):
                raise WireError(502, "the backend switched protocols unasked")
            else:
                raise WireError(502, "a second response head")
    except (TimeoutError, BackendClosed, ConnectionError, WireError) as exc:
        route.metrics.upstream_errors_total.labels(route.group.id, "broken_response").inc()
        event(
            logging.WARNING,
            "backend response cut short",
            group=route.group.id,
            server=conn.address,
            error=_describe(exc),
        )
        await _abandon(conn, upload)
        down.abort()
        raise ClientGone() from exc
    except BaseException:
        await _abandon(conn, upload)
        raise
    if upload is not None and not upload.done():
        # Answered before the body was read (e.g. 413): neither side can be reused.
        await _abandon(conn, upload)
        return Outcome(False)
    failure = upload.exception() if upload is not None else None
    if failure is not None:
        event(
            logging.WARNING,
            "request body not forwarded",
            listener=route.listener,
            server=conn.address,
            error=_describe(failure),
        )
        conn.close()
        return Outcome(False)
    route.pool.release(conn)
    return Outcome(True)


async def _abandon(conn: BackendConnection, upload: asyncio.Task[None] | None) -> None:
    """Close the backend connection and end the upload, its outcome read whatever it was."""
    conn.close()
    if upload is None:
        return
    if not upload.done():
        upload.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await upload


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
