"""Server groups through the real daemon: health checks, passive detection, schedulers."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from harness import Backend, Proxy, start_demo_backend, start_proxy


def _server_of(port: int, source: str = "127.0.0.1", path: str = "/") -> str:
    done = subprocess.run(
        [
            "curl",
            "-sS",
            "--interface",
            source,
            "-w",
            "\n%{http_code}",
            f"http://127.0.0.1:{port}{path}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    body, _, status = done.stdout.rpartition("\n")
    return json.loads(body)["server"] if status == "200" else status


def _wait_for(proxy: Proxy, address: str, healthy: float, deadline: float = 20.0) -> None:
    """Until the proxy reports ``address`` healthy (1) or not (0): an observable state change,
    polled through /metrics because nothing can be awaited across the process boundary."""
    end = time.monotonic() + deadline
    series = f'alb_upstream_server_healthy{{server="{address}"}} {healthy}'
    while series not in proxy.metrics():
        assert time.monotonic() < end, f"{address} never became {healthy}:\n{proxy.log}"
        time.sleep(0.05)


def _restart(port: int) -> Backend:
    proc = subprocess.Popen(
        [sys.executable, "-m", "alb_proxy", "demo-backend", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    proc.stdout.readline()
    return Backend(proc, port)


def _config(backends: list[Backend], **group: Any) -> dict[str, Any]:
    return {
        "instance": {"name": "g"},
        "server_groups": [
            {
                "id": "sg",
                **group,
                "servers": [{"host": "127.0.0.1", "port": b.port} for b in backends],
            }
        ],
        "listeners": [
            {
                "name": "web",
                "protocol": "HTTP",
                "port": 8001,
                "bind": "127.0.0.1",
                "default_action": {"forward": "sg"},
            }
        ],
    }


def test_active_health_check_moves_traffic_and_brings_it_back(tmp_path: Path) -> None:
    a, b = start_demo_backend(), start_demo_backend()
    check = {
        "enabled": True,
        "path": "/health",
        "interval_s": 0.2,
        "timeout_s": 1,
        "healthy_threshold": 2,
        "unhealthy_threshold": 2,
    }
    proxy = start_proxy(tmp_path, _config([a, b], health_check=check))
    port, b_address = proxy.port("web"), f"127.0.0.1:{b.port}"
    try:
        assert {_server_of(port) for _ in range(4)} == {
            f"demo-backend:{a.port}",
            f"demo-backend:{b.port}",
        }
        b.stop()
        _wait_for(proxy, b_address, 0)
        assert {_server_of(port) for _ in range(6)} == {f"demo-backend:{a.port}"}
        assert f"server unhealthy server={b_address}" in proxy.log
        b = _restart(b.port)
        _wait_for(proxy, b_address, 1)
        assert f"demo-backend:{b.port}" in {_server_of(port) for _ in range(6)}
    finally:
        assert proxy.stop() == 0
        a.stop()
        b.stop()


def test_passive_detection_retries_elsewhere_without_an_error(tmp_path: Path) -> None:
    a, b = start_demo_backend(), start_demo_backend()
    proxy = start_proxy(tmp_path, _config([a, b]))
    port = proxy.port("web")
    try:
        b.stop()
        # Every request succeeds: a refused connect is retried on the other server ...
        assert [_server_of(port) for _ in range(6)] == [f"demo-backend:{a.port}"] * 6
        # ... and the refusing server is taken out of rotation at once.
        assert proxy.metric("alb_upstream_server_healthy", server=f"127.0.0.1:{b.port}") == 0
    finally:
        assert proxy.stop() == 0
        a.stop()


def test_no_healthy_server_is_a_503(tmp_path: Path) -> None:
    a = start_demo_backend()
    check = {
        "enabled": True,
        "protocol": "tcp",
        "interval_s": 0.2,
        "timeout_s": 1,
        "healthy_threshold": 1,
        "unhealthy_threshold": 1,
    }
    proxy = start_proxy(tmp_path, _config([a], health_check=check))
    try:
        a.stop()
        _wait_for(proxy, f"127.0.0.1:{a.port}", 0)
        assert _server_of(proxy.port("web")) == "503"
    finally:
        assert proxy.stop() == 0


def test_source_ip_hash_sticks_a_client_to_one_server(tmp_path: Path) -> None:
    backends = [start_demo_backend() for _ in range(3)]
    proxy = start_proxy(tmp_path, _config(backends, scheduler="sch"))
    port = proxy.port("web")
    try:
        seen = {}
        for last in range(2, 12):
            source = f"127.0.0.{last}"
            servers = {_server_of(port, source) for _ in range(3)}
            assert len(servers) == 1, (source, servers)
            seen[source] = servers.pop()
        assert len(set(seen.values())) >= 2  # different clients spread over servers
    finally:
        assert proxy.stop() == 0
        for b in backends:
            b.stop()


@pytest.mark.parametrize("scheduler", ["wrr", "wlc"])
def test_weighted_schedulers_split_by_weight(tmp_path: Path, scheduler: str) -> None:
    backends = [start_demo_backend() for _ in range(2)]
    config = _config(backends, scheduler=scheduler)
    config["server_groups"][0]["servers"][0]["weight"] = 75
    config["server_groups"][0]["servers"][1]["weight"] = 25
    proxy = start_proxy(tmp_path, config)
    try:
        if scheduler == "wrr":
            seen = [_server_of(proxy.port("web")) for _ in range(40)]
        else:
            # Least connections only splits what is in flight at once: 40 slow requests.
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(40) as pool:
                seen = list(
                    pool.map(lambda _: _server_of(proxy.port("web"), path="/?delay=1"), range(40))
                )
        heavy = seen.count(f"demo-backend:{backends[0].port}")
        assert heavy == 30 if scheduler == "wrr" else 27 <= heavy <= 33
    finally:
        assert proxy.stop() == 0
        for b in backends:
            b.stop()


def test_expect_continue_head_and_trailers(demo_backend: Backend, tmp_path: Path) -> None:
    proxy = start_proxy(tmp_path, _config([demo_backend]))
    url = f"http://127.0.0.1:{proxy.port('web')}/"
    try:
        done = subprocess.run(
            ["curl", "-sS", "-v", "-H", "Expect: 100-continue", "--data-binary", "@-", url],
            input=b"x" * 200_000,
            capture_output=True,
            timeout=30,
        )
        assert b"< HTTP/1.1 100 Continue" in done.stderr
        assert json.loads(done.stdout)["body_bytes"] == 200_000
        head = subprocess.run(
            ["curl", "-sS", "-I", url], capture_output=True, text=True, timeout=30
        )
        assert head.stdout.startswith("HTTP/1.1 200") and "content-length" in head.stdout.lower()
    finally:
        assert proxy.stop() == 0


def test_response_trailers_reach_http1_and_http2_clients(tmp_path: Path, pki: Any) -> None:
    from h2client import H2Client
    from harness import RecordingBackend

    backend = RecordingBackend(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
        b"Trailer: x-checksum\r\n\r\n2\r\nok\r\n0\r\nx-checksum: abc\r\n\r\n"
    )
    config = _config([Backend(None, backend.port)])  # type: ignore[arg-type]
    config["certificates"] = [pki.default.entry("c")]
    config["listeners"].append(
        {
            "name": "tls",
            "protocol": "HTTPS",
            "port": 8002,
            "bind": "127.0.0.1",
            "certificates": {"default": "c"},
            "default_action": {"forward": "sg"},
        }
    )
    proxy = start_proxy(tmp_path, config)
    try:
        import socket

        import h11

        conn = h11.Connection(h11.CLIENT)
        with socket.create_connection(("127.0.0.1", proxy.port("web")), timeout=10) as s:
            s.sendall(
                conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
                + conn.send(h11.EndOfMessage())
            )
            events: list[Any] = []
            while not events or not isinstance(events[-1], h11.EndOfMessage):
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    conn.receive_data(s.recv(65536))
                else:
                    events.append(ev)
        assert events[-1].headers == [(b"x-checksum", b"abc")]
        assert (b"trailer", b"x-checksum") in events[0].headers
        client = H2Client(proxy.port("tls"), "default.example.test")
        stream = client.request("/", "default.example.test")
        client.wait(stream)
        assert bytes(client.streams[stream].body) == b"ok"
        assert client.streams[stream].trailers == {b"x-checksum": b"abc"}
        client.close()
    finally:
        assert proxy.stop() == 0
        backend.close()
