"""Forwarding through the real daemon: headers, streaming, errors, smuggling, scheduling, drain."""

from __future__ import annotations

import json
import signal
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Pki
from harness import (
    Backend,
    Proxy,
    RecordingBackend,
    client_context,
    start_demo_backend,
    start_proxy,
)

MiB = 1024 * 1024


def group(gid: str, *ports: int, weights: list[int] | None = None) -> dict[str, Any]:
    weights = weights or [100] * len(ports)
    return {
        "id": gid,
        "servers": [
            {"host": "127.0.0.1", "port": p, "weight": w}
            for p, w in zip(ports, weights, strict=True)
        ],
    }


def listener(name: str, port: int, sg: str, tls: bool = False, **extra: Any) -> dict[str, Any]:
    item: dict[str, Any] = {
        "name": name,
        "protocol": "HTTPS" if tls else "HTTP",
        "port": port,
        "bind": "127.0.0.1",
        "default_action": {"forward": sg},
        **extra,
    }
    if tls:
        item["certificates"] = {"default": "c-default"}
    return item


@pytest.fixture(scope="module")
def recorder() -> Iterator[RecordingBackend]:
    backend = RecordingBackend()
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def garbage() -> Iterator[RecordingBackend]:
    backend = RecordingBackend(answer=b"this is not HTTP at all\r\n\r\n")
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def proxy(
    pki: Pki,
    demo_backend: Backend,
    recorder: RecordingBackend,
    garbage: RecordingBackend,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Proxy]:
    closed = socket.create_server(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]
    closed.close()  # nothing listens there: connection refused
    config = {
        "instance": {"name": "t"},
        "certificates": [pki.default.entry("c-default")],
        "server_groups": [
            group("sg-demo", demo_backend.port),
            group("sg-rec", recorder.port),
            group("sg-dead", dead_port),
            group("sg-garbage", garbage.port),
            group("sg-off", demo_backend.port, weights=[0]),
        ],
        "listeners": [
            listener("web", 8001, "sg-demo"),
            listener("tls", 8002, "sg-demo", tls=True, request_timeout_s=2),
            listener("rec", 8003, "sg-rec"),
            listener("dead", 8004, "sg-dead"),
            listener("garbage", 8005, "sg-garbage"),
            listener("off", 8006, "sg-off"),
        ],
    }
    p = start_proxy(tmp_path_factory.mktemp("http"), config)
    yield p
    assert p.stop() == 0


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "30", *args], capture_output=True, text=True, timeout=60
    )


def raw_exchange(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    return reply


def test_curl_through_https_reaches_backend_with_forwarded_headers(proxy: Proxy, pki: Pki) -> None:
    port = proxy.port("tls")
    done = curl(
        "--http1.1",  # Connection-named headers are an HTTP/1.1 matter
        "--cacert",
        str(pki.ca_file),
        "--resolve",
        f"default.example.test:{port}:127.0.0.1",
        "-H",
        "X-Forwarded-For: 203.0.113.9",
        "-H",
        "X-Forwarded-Proto: gopher",
        "-H",
        "X-Forwarded-Clientcert-Subjectdn: CN=forged",
        "-H",
        "Connection: keep-alive, X-Drop-Me",
        "-H",
        "X-Drop-Me: 1",
        "-H",
        "Keep-Alive: timeout=5",
        "-H",
        "X-Kept: yes",
        f"https://default.example.test:{port}/some/path?q=1",
    )
    assert done.returncode == 0, done.stderr
    echo = json.loads(done.stdout)
    headers = dict(echo["headers"])
    assert echo["path"] == "/some/path" and echo["query"] == "q=1"
    assert headers["host"] == f"default.example.test:{port}"
    assert headers["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    assert headers["x-forwarded-proto"] == "https"
    assert headers["x-forwarded-port"] == "8002"
    assert headers["x-forwarded-host"] == f"default.example.test:{port}"
    assert headers["x-kept"] == "yes"
    for dropped in ("x-drop-me", "keep-alive", "connection", "x-forwarded-clientcert-subjectdn"):
        assert dropped not in headers


def test_plain_http_listener_forwards_with_http_proto(proxy: Proxy) -> None:
    done = curl(f"http://127.0.0.1:{proxy.port('web')}/")
    headers = dict(json.loads(done.stdout)["headers"])
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-port"] == "8001"


def test_client_ip_is_the_real_peer_address(proxy: Proxy) -> None:
    done = curl("--interface", "127.0.0.2", f"http://127.0.0.1:{proxy.port('web')}/")
    assert dict(json.loads(done.stdout)["headers"])["x-forwarded-for"] == "127.0.0.2"


def test_keep_alive_on_both_sides(proxy: Proxy) -> None:
    url = f"http://127.0.0.1:{proxy.port('web')}/"
    done = curl(
        "-o",
        "/dev/null",
        "-o",
        "/dev/null",
        "-o",
        "/dev/null",
        url,
        url,
        url,
        "-w",
        "%{num_connects}\\n",
    )
    # curl opened one connection for three requests ...
    assert done.stdout.split() == ["1", "0", "0"]
    # ... and the backend saw them from one pooled connection.
    clients = {json.loads(curl(url).stdout)["client"] for _ in range(5)}
    assert len(clients) == 1


def test_backend_refusing_connections_gives_502(proxy: Proxy) -> None:
    done = curl("-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{proxy.port('dead')}/")
    assert done.stdout == "502"


def test_backend_answering_garbage_gives_502(proxy: Proxy) -> None:
    done = curl(
        "-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{proxy.port('garbage')}/"
    )
    assert done.stdout == "502"


def test_slow_backend_gives_504(proxy: Proxy, pki: Pki) -> None:
    port = proxy.port("tls")
    done = curl("-k", "-o", "/dev/null", "-w", "%{http_code}", f"https://127.0.0.1:{port}/?delay=5")
    assert done.stdout == "504"
    assert proxy.metric("alb_upstream_errors_total", server_group="sg-demo", kind="timeout") >= 1


def test_no_server_with_weight_gives_503(proxy: Proxy) -> None:
    done = curl("-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{proxy.port('off')}/")
    assert done.stdout == "503"


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
            b"400",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
            b"400",
        ),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (65 * 1024) + b"\r\n\r\n", b"431"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n", b"400"),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", b"501"),
        (b"CONNECT backend.internal:22 HTTP/1.1\r\nHost: backend.internal:22\r\n\r\n", b"405"),
        (b"GET /\r\n\r\n", b"400"),
        (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", b"505"),
    ],
    ids=[
        "cl-and-te",
        "conflicting-cl",
        "oversized-headers",
        "bad-header-name",
        "unknown-te",
        "connect",
        "http-0.9",
        "http-2.0-as-text",
    ],
)
def test_rejected_requests_never_reach_the_backend(
    proxy: Proxy, recorder: RecordingBackend, request_bytes: bytes, status: bytes
) -> None:
    before = len(recorder.received)
    reply = raw_exchange(proxy.port("rec"), request_bytes)
    assert reply.split(b" ", 2)[1] == status, reply[:200]
    assert len(recorder.received) == before
    # The listener still serves the next, well-formed request.
    assert raw_exchange(proxy.port("rec"), b"GET /fine HTTP/1.1\r\nHost: x\r\n\r\n").startswith(
        b"HTTP/1.1 200 "
    )
    assert b"/smuggled" not in recorder.received


def test_only_websocket_upgrades_are_tunnelled(proxy: Proxy, recorder: RecordingBackend) -> None:
    before = len(recorder.received)
    reply = raw_exchange(
        proxy.port("rec"),
        b"GET /h2c HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
    )
    assert reply.startswith(b"HTTP/1.1 200 "), reply
    seen = bytes(recorder.received[before:]).lower()
    assert b"get /h2c http/1.1" in seen
    assert b"upgrade" not in seen and b"http2-settings" not in seen


def test_spoofed_headers_and_trailers_never_reach_the_backend(
    proxy: Proxy, recorder: RecordingBackend
) -> None:
    before = len(recorder.received)
    reply = raw_exchange(
        proxy.port("rec"),
        b"POST /t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"X-Forwarded-Clientcert_Subjectdn: CN=admin-underscore\r\n\r\n"
        b"2\r\nok\r\n0\r\n"
        b"X-Forwarded-Clientcert-Subjectdn: CN=admin-trailer\r\nX-Forwarded-For: 6.6.6.6\r\n"
        b"Host: evil\r\nAuthorization: Bearer forged\r\nX-Checksum: abc\r\n\r\n",
    )
    assert reply.startswith(b"HTTP/1.1 200 "), reply
    seen = bytes(recorder.received[before:]).lower()
    assert b"\r\nx-checksum: abc\r\n" in seen  # a harmless trailer passes...
    for spoofed in (b"cn=admin", b"6.6.6.6", b"host: evil", b"bearer forged"):
        assert spoofed not in seen  # ...nothing that could pass for the proxy's word does


def test_wrr_honours_weights(tmp_path: Path) -> None:
    backends = [start_demo_backend() for _ in range(3)]
    try:
        config = {
            "instance": {"name": "t"},
            "server_groups": [group("sg", *(b.port for b in backends), weights=[3, 1, 0])],
            "listeners": [listener("web", 8001, "sg")],
        }
        p = start_proxy(tmp_path, config)
        url = f"http://127.0.0.1:{p.port('web')}/"
        seen = [json.loads(curl(url).stdout)["server"] for _ in range(40)]
        counts = {b.port: seen.count(f"demo-backend:{b.port}") for b in backends}
        assert counts == {backends[0].port: 30, backends[1].port: 10, backends[2].port: 0}
        assert p.stop() == 0
    finally:
        for b in backends:
            b.stop()


def _https(port: int) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=30)
    return client_context().wrap_socket(raw, server_hostname="default.example.test")


def _read_head(s: ssl.SSLSocket) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, data
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    return head, rest


@pytest.mark.slow
def test_one_gib_download_streams_with_flat_memory(proxy: Proxy) -> None:
    size = 1024 * MiB
    rss_before = proxy.rss_kib()
    peak = rss_before
    with _https(proxy.port("tls")) as s:
        s.sendall(f"GET /?bytes={size} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head, rest = _read_head(s)
        assert head.startswith(b"HTTP/1.1 200 ")
        assert f"content-length: {size}".encode() in head.lower()
        got, tail = len(rest), rest
        while got < size:
            chunk = s.recv(1 << 20)
            assert chunk
            got += len(chunk)
            tail = chunk
            if got % (64 * MiB) < len(chunk):
                peak = max(peak, proxy.rss_kib())
    assert got == size
    assert tail[-1] == (size - 1) % 256  # the demo backend's pattern: byte i is i % 256
    assert peak - rss_before < 16 * 1024, f"RSS grew {peak - rss_before} KiB during 1 GiB"


@pytest.mark.slow
def test_200_mib_chunked_upload_streams_with_flat_memory(proxy: Proxy) -> None:
    import hashlib

    size, block = 200 * MiB, b"\xa5" * MiB
    digest = hashlib.sha256()
    rss_before = proxy.rss_kib()
    peak = rss_before
    with _https(proxy.port("tls")) as s:
        s.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(size // len(block)):
            s.sendall(b"%x\r\n%s\r\n" % (len(block), block))
            digest.update(block)
            if i % 32 == 0:
                peak = max(peak, proxy.rss_kib())
        s.sendall(b"0\r\n\r\n")
        head, rest = _read_head(s)
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        while len(rest) < length:
            rest += s.recv(65536)
    echo = json.loads(rest)
    assert head.startswith(b"HTTP/1.1 200 ")
    assert (echo["body_bytes"], echo["body_sha256"]) == (size, digest.hexdigest())
    assert peak - rss_before < 16 * 1024, f"RSS grew {peak - rss_before} KiB during upload"


def _held_request(
    port: int, gate_backend: RecordingBackend
) -> tuple[threading.Thread, dict[str, bytes]]:
    """A request the backend holds unanswered: in flight once this returns."""
    result: dict[str, bytes] = {}

    def slow_request() -> None:
        result["reply"] = raw_exchange(port, b"GET /held HTTP/1.1\r\nHost: x\r\n\r\n")

    thread = threading.Thread(target=slow_request)
    thread.start()
    assert gate_backend.arrived.wait(30)
    return thread, result


def test_sigterm_lets_requests_in_flight_finish(tmp_path: Path) -> None:
    gate = threading.Event()
    backend = RecordingBackend(gate=gate)
    config = {
        "instance": {"name": "t"},
        "server_groups": [group("sg", backend.port)],
        "listeners": [listener("web", 8001, "sg")],
    }
    p = start_proxy(tmp_path, config)
    port = p.port("web")
    idle = socket.create_connection(("127.0.0.1", port))  # an idle keep-alive connection
    thread, result = _held_request(port, backend)
    p.proc.send_signal(signal.SIGTERM)
    assert idle.recv(1) == b""  # the idle connection is closed at once, not left hanging
    idle.close()
    gate.set()
    thread.join(timeout=30)
    assert p.proc.wait(timeout=30) == 0
    assert result["reply"].startswith(b"HTTP/1.1 200 ")
    assert b"connection: close" in result["reply"].lower()
    assert "draining" in p.log and "stopped" in p.log
    backend.close()


def test_a_deleted_listener_releases_its_port_and_finishes_requests_in_flight(
    tmp_path: Path,
) -> None:
    from test_e2e_runtime import api_of

    gate = threading.Event()
    backend = RecordingBackend(gate=gate)
    config = {
        "instance": {"name": "t"},
        "server_groups": [group("sg", backend.port)],
        "listeners": [listener("web", 8001, "sg"), listener("other", 8002, "sg")],
    }
    p = start_proxy(tmp_path, config)
    port = p.port("web")
    thread, result = _held_request(port, backend)
    api_of(p).ok("DELETE", "/v1/listeners/web")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)
    gate.set()
    thread.join(timeout=30)
    assert result["reply"].startswith(b"HTTP/1.1 200 ")
    assert raw_exchange(p.port("other"), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").startswith(
        b"HTTP/1.1 200 "
    )
    assert p.stop() == 0
    backend.close()


def test_websocket_is_tunnelled_on_http_and_https(proxy: Proxy) -> None:
    from harness import WebSocket

    with socket.create_connection(("127.0.0.1", proxy.port("web")), timeout=10) as raw:
        ws = WebSocket(raw)
        assert ws.head.startswith(b"HTTP/1.1 101 ")
        assert b"sec-websocket-accept" in ws.head.lower()
        assert ws.echo(b"hello") == b"hello"
        assert ws.echo(b"x" * 200_000) == b"x" * 200_000
        assert proxy.metric("alb_tunnels_active", listener="web") == 1
    with _https(proxy.port("tls")) as tls:
        ws = WebSocket(tls)
        assert ws.head.startswith(b"HTTP/1.1 101 ")
        assert ws.echo(b"over tls") == b"over tls"


def test_a_pipelined_request_before_a_bad_one_is_answered(
    proxy: Proxy, recorder: RecordingBackend
) -> None:
    reply = raw_exchange(
        proxy.port("rec"),
        b"GET /first-ok HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /bad-after-ok HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\r\n",
    )
    assert reply.startswith(b"HTTP/1.1 200 ")
    assert b"\r\n\r\nokHTTP/1.1 400 " in reply
    assert b"GET /first-ok " in recorder.received and b"/bad-after-ok" not in recorder.received
