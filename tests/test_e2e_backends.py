"""Misbehaving backends and clients: nothing one of them does may reach another client.

Regression tests for what a break-it session found: bytes past a response end on a pooled
connection, backends closing idle connections, ambiguous response framing, HTTP/1.0 clients,
a client trickling its request head, clients leaving mid-upload.
"""

from __future__ import annotations

import json
import select
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import Backend, Proxy, RecordingBackend, start_proxy


def _group(gid: str, port: int) -> dict[str, Any]:
    return {"id": gid, "servers": [{"host": "127.0.0.1", "port": port}]}


def _listener(name: str, port: int, sg: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "protocol": "HTTP",
        "port": port,
        "bind": "127.0.0.1",
        "default_action": {"forward": sg},
        **extra,
    }


@pytest.fixture(scope="module")
def backends() -> Iterator[dict[str, RecordingBackend]]:
    made = {
        # 2-byte body announced, 13 bytes sent: the rest must never reach the next client.
        "overflow": RecordingBackend(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokSTOLEN-BYTES"),
        # Closes every connection after answering, without saying so.
        "closer": RecordingBackend(close_after_answer=True),
        # A 204 announcing a length it does not have.
        "no-content": RecordingBackend(b"HTTP/1.1 204 No Content\r\nContent-Length: 8\r\n\r\n"),
        # Answers one request per connection, then closes on the next one unanswered.
        "one-shot": RecordingBackend(answers_per_connection=1),
        "ambiguous": RecordingBackend(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
        ),
    }
    yield made
    for backend in made.values():
        backend.close()


@pytest.fixture(scope="module")
def proxy(
    backends: dict[str, RecordingBackend],
    demo_backend: Backend,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Proxy]:
    config = {
        "instance": {"name": "b"},
        "server_groups": [_group(name, b.port) for name, b in backends.items()]
        + [_group("demo", demo_backend.port)],
        "listeners": [_listener(name, 9100 + i, name) for i, name in enumerate(backends)]
        + [
            _listener("demo", 9110, "demo"),
            _listener("slow", 9111, "demo", idle_timeout_s=1),
            _listener("small", 9112, "demo", max_header_bytes=2048),
        ],
    }
    p = start_proxy(tmp_path_factory.mktemp("backends"), config)
    yield p
    assert p.stop() == 0
    assert "Traceback" not in p.log and "connection error" not in p.log


def _get(port: int, *extra: str) -> tuple[str, str]:
    done = subprocess.run(
        ["curl", "-sS", "-w", "\n%{http_code}", *extra, f"http://127.0.0.1:{port}/"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    body, _, status = done.stdout.rpartition("\n")
    return status, body


def test_bytes_past_a_response_never_reach_the_next_client(proxy: Proxy) -> None:
    port = proxy.port("overflow")
    assert [_get(port) for _ in range(6)] == [("200", "ok")] * 6


def test_backend_closing_idle_connections_costs_no_request(
    proxy: Proxy, backends: dict[str, RecordingBackend]
) -> None:
    port = proxy.port("closer")
    before = backends["closer"].connections
    assert [_get(port)[0] for _ in range(10)] == ["200"] * 10
    assert backends["closer"].connections - before == 10  # a fresh connection each time


def test_ambiguous_response_framing_is_a_502(proxy: Proxy) -> None:
    assert _get(proxy.port("ambiguous"))[0] == "502"


def test_http_1_0_clients_are_served(proxy: Proxy) -> None:
    status, body = _get(proxy.port("demo"), "-0")
    assert status == "200" and '"method": "GET"' in body


def test_http_1_0_without_host_reaches_the_backend_with_its_address_as_host(
    proxy: Proxy, demo_backend: Backend
) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port("demo")), timeout=10) as s:
        s.sendall(b"GET /old HTTP/1.0\r\n\r\n")
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"connection: close" in head.lower()
    echo = json.loads(body)
    assert dict(echo["headers"])["host"] == f"127.0.0.1:{demo_backend.port}"
    assert echo["path"] == "/old"


def test_a_trickled_request_head_is_cut_at_the_idle_timeout(proxy: Proxy) -> None:
    payload = iter(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100)
    with socket.create_connection(("127.0.0.1", proxy.port("slow")), timeout=10) as s:
        started = time.monotonic()
        while time.monotonic() - started < 5:
            # The attacker's pace: one byte per 100 ms, until the proxy closes on it.
            readable, _, _ = select.select([s], [], [], 0.1)
            if readable:
                break
            s.sendall(bytes([next(payload)]))
        closed_after = time.monotonic() - started
        assert s.recv(100) in (b"", b"HTTP/1.1 408")  # closed, never answered as a request
    assert 0.9 < closed_after < 3


def test_client_leaving_mid_upload_is_not_counted_as_an_answer(proxy: Proxy) -> None:
    before = proxy.metric("alb_http_requests_total", listener="demo", code="4xx")
    with socket.create_connection(("127.0.0.1", proxy.port("demo")), timeout=10) as s:
        s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\npartial")
    assert _get(proxy.port("demo"))[0] == "200"
    assert proxy.metric("alb_http_requests_total", listener="demo", code="4xx") == before


def test_drain_with_a_half_sent_request_logs_no_error(
    tmp_path: Path, demo_backend: Backend
) -> None:
    config = {
        "instance": {"name": "d"},
        "server_groups": [_group("demo", demo_backend.port)],
        "listeners": [_listener("web", 9120, "demo", idle_timeout_s=2)],
    }
    p = start_proxy(tmp_path, config)
    with socket.create_connection(("127.0.0.1", p.port("web")), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n")
        while p.metric("alb_connections_active", listener="web") < 1:
            pass
        assert p.stop() == 0
    assert "connection error" not in p.log and "Traceback" not in p.log


def test_max_header_bytes_is_per_listener(proxy: Proxy) -> None:
    header = "X-Big: " + "a" * 3000
    assert _get(proxy.port("small"), "-H", header)[0] == "431"
    assert _get(proxy.port("demo"), "-H", header)[0] == "200"


def _requests_received(backend: RecordingBackend, method: bytes) -> int:
    return bytes(backend.received).count(method + b" /")


def test_a_reused_connection_closed_unanswered_retries_only_what_is_safe(
    proxy: Proxy, backends: dict[str, RecordingBackend]
) -> None:
    port, backend = proxy.port("one-shot"), backends["one-shot"]
    assert _get(port)[0] == "200"  # leaves a pooled connection the backend will not answer on
    # An idempotent request without a body is retried on a fresh connection.
    assert _get(port)[0] == "200"
    assert _requests_received(backend, b"GET") == 3
    # A POST is not: it may have had effects. The client gets a 502; the backend saw it once.
    status, _ = _get(port, "-X", "POST", "--data-binary", "payload")
    assert status == "502"
    assert _requests_received(backend, b"POST") == 1


def test_a_backend_that_never_accepts_hits_the_connect_timeout(tmp_path: Path) -> None:
    # A listening socket whose accept queue is full and never drained: the kernel drops the
    # proxy's SYNs, so its connect hangs as to an unreachable host.
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        fillers = []
        for _ in range(8):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(full.getsockname())
            fillers.append(filler)
        config = {
            "instance": {"name": "ct"},
            "server_groups": [{**_group("sg", full.getsockname()[1]), "connect_timeout_s": 1}],
            "listeners": [_listener("web", 9120, "sg")],
        }
        p = start_proxy(tmp_path, config)
        try:
            started = time.monotonic()
            assert _get(p.port("web"))[0] == "502"
            assert 0.9 <= time.monotonic() - started < 10
            assert "backend unreachable" in p.log
        finally:
            assert p.stop() == 0
            for filler in fillers:
                filler.close()


def test_a_204_reaches_the_client_without_a_length(proxy: Proxy) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port("no-content")), timeout=10) as s:
        s.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(65536)
    assert head.startswith(b"HTTP/1.1 204 ")
    assert b"content-length" not in head.lower()


def test_a_refused_request_on_a_keep_alive_connection_gets_its_answer(proxy: Proxy) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port("demo")), timeout=10) as s:
        s.sendall(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n")
        first = b""
        while b'"body_bytes"' not in first:
            first += s.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 ")
        s.sendall(b"CONNECT backend:22 HTTP/1.1\r\nHost: backend:22\r\n\r\n")
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 405 "), reply


def test_a_websocket_busy_one_way_outlives_the_idle_timeout(tmp_path: Path) -> None:
    """A tunnel is idle only when neither direction moves: a backend pushing to a client that
    never writes (a live feed) keeps it open past ``idle_timeout_s``; once both are quiet for
    that long it closes."""
    pushes, interval = 8, 0.3  # 2.4 s of pushes against a 1 s idle timeout
    server = socket.create_server(("127.0.0.1", 0))

    def push() -> None:
        conn, _ = server.accept()
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(4096)
            conn.sendall(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: x\r\n\r\n"
            )
            for i in range(pushes):
                conn.sendall(b"push-%d;" % i)
                time.sleep(interval)
            conn.recv(1)  # then quiet, until the proxy closes the tunnel

    thread = threading.Thread(target=push, daemon=True)
    thread.start()
    config = {
        "instance": {"name": "ws"},
        "server_groups": [_group("feed", server.getsockname()[1])],
        "listeners": [_listener("web", 9130, "feed", idle_timeout_s=1)],
    }
    p = start_proxy(tmp_path, config)
    try:
        with socket.create_connection(("127.0.0.1", p.port("web")), timeout=10) as s:
            s.sendall(
                b"GET /feed HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
            )
            received = b""
            while chunk := s.recv(4096):
                received += chunk
                if received.endswith(b"push-%d;" % (pushes - 1)):
                    last_push = time.monotonic()
            closed_after = time.monotonic() - last_push
        assert received.startswith(b"HTTP/1.1 101 ")
        assert received.split(b"\r\n\r\n", 1)[1] == b"".join(b"push-%d;" % i for i in range(pushes))
        assert 0.9 < closed_after < 3
    finally:
        assert p.stop() == 0
        server.close()
        thread.join(timeout=10)
