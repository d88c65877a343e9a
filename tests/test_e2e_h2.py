"""HTTP/2 on HTTPS listeners with real clients: the ``h2`` library, curl --http2, h2load."""

from __future__ import annotations

import hashlib
import json
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import h2.errors
import pytest
from conftest import Pki
from h2client import H2Client
from harness import Backend, Proxy, RecordingBackend, start_proxy

from alb_proxy.http.h2 import MAX_CONCURRENT_STREAMS, RESET_BURST


@pytest.fixture(scope="module")
def proxy(
    pki: Pki, demo_backend: Backend, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Proxy]:
    config = {
        "instance": {"name": "h2"},
        "certificates": [pki.default.entry("c-default"), pki.exact.entry("c-exact")],
        "server_groups": [
            {"id": "sg", "servers": [{"host": "127.0.0.1", "port": demo_backend.port}]}
        ],
        "listeners": [
            {
                "name": "h",
                "protocol": "HTTPS",
                "port": 4443,
                "bind": "127.0.0.1",
                "certificates": {"default": "c-default", "additional": ["c-exact"]},
                "default_action": {"forward": "sg"},
            },
            {
                "name": "h1only",
                "protocol": "HTTPS",
                "port": 4444,
                "bind": "127.0.0.1",
                "http2": False,
                "certificates": {"default": "c-default"},
                "default_action": {"forward": "sg"},
            },
        ],
    }
    p = start_proxy(tmp_path_factory.mktemp("h2"), config)
    yield p
    assert p.stop() == 0
    assert "Traceback" not in p.log and "stream error" not in p.log


def test_hundred_concurrent_streams_each_get_their_own_answer(proxy: Proxy) -> None:
    client = H2Client(proxy.port("h"), "default.example.test")
    ids = [client.request(f"/s/{i}?delay=0.05", "default.example.test") for i in range(100)]
    client.wait()
    for i, stream_id in enumerate(ids):
        stream = client.streams[stream_id]
        assert stream.status == 200
        echo = json.loads(bytes(stream.body))
        assert echo["path"] == f"/s/{i}"
        assert dict(echo["headers"])["x-forwarded-proto"] == "https"
    client.close()


def test_a_reset_stream_does_not_disturb_its_siblings(proxy: Proxy) -> None:
    client = H2Client(proxy.port("h"), "default.example.test")
    big = client.request("/?bytes=50000000", "default.example.test")
    small = [client.request(f"/n/{i}?delay=0.1", "default.example.test") for i in range(5)]
    client.reset(big)
    client.wait(*small)
    assert [client.streams[s].status for s in small] == [200] * 5
    after = client.request("/after", "default.example.test")
    client.wait(after)
    assert client.streams[after].status == 200
    client.close()


def test_large_bodies_both_ways_respect_flow_control(proxy: Proxy) -> None:
    client = H2Client(proxy.port("h"), "default.example.test")
    body = bytes(range(256)) * 40000  # ~10 MB
    up = client.request("/upload", "default.example.test", "POST", body)
    down = client.request(f"/?bytes={20 * 1024 * 1024}", "default.example.test")
    client.wait(up, down)
    echo = json.loads(bytes(client.streams[up].body))
    assert (echo["body_bytes"], echo["body_sha256"]) == (
        len(body),
        hashlib.sha256(body).hexdigest(),
    )
    assert len(client.streams[down].body) == 20 * 1024 * 1024
    client.close()


def test_authority_not_covered_by_the_certificate_gets_421(proxy: Proxy) -> None:
    client = H2Client(proxy.port("h"), "exact.example.test")
    ok = client.request("/", "exact.example.test")
    other = client.request("/", "default.example.test")  # valid name, other certificate
    ip = client.request("/", "127.0.0.1:4443")
    client.wait()
    assert client.streams[ok].status == 200
    assert client.streams[other].status == 421
    assert client.streams[ip].status == 421
    client.close()
    # Without SNI (or for the name it asked for) the client's own choice is served.
    plain = H2Client(proxy.port("h"), None)
    by_ip = plain.request("/", "127.0.0.1:4443")
    plain.wait()
    assert plain.streams[by_ip].status == 200
    plain.close()


def test_curl_http2_and_the_http1_only_listener(proxy: Proxy, pki: Pki) -> None:
    def version(port: int) -> str:
        done = subprocess.run(
            [
                "curl",
                "-sS",
                "--http2",
                "--cacert",
                str(pki.ca_file),
                "--resolve",
                f"default.example.test:{port}:127.0.0.1",
                "-o",
                "/dev/null",
                "-w",
                "%{http_version} %{http_code}",
                f"https://default.example.test:{port}/",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return done.stdout

    assert version(proxy.port("h")) == "2 200"
    assert version(proxy.port("h1only")) == "1.1 200"


def test_h2load(proxy: Proxy, tmp_path: Path) -> None:
    if shutil.which("h2load") is None:
        pytest.skip("nghttp2-client is not installed (.ci/run installs it)")
    done = subprocess.run(
        [
            "h2load",
            "-n",
            "2000",
            "-c",
            "4",
            "-m",
            "25",
            f"https://default.example.test:{proxy.port('h')}/",
            "--connect-to",
            f"127.0.0.1:{proxy.port('h')}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "2000 succeeded" in done.stdout, done.stdout + done.stderr
    assert "2000 2xx" in done.stdout


def test_drain_finishes_streams_in_flight_then_sends_goaway(
    pki: Pki, demo_backend: Backend, tmp_path: Path
) -> None:
    import signal

    config = {
        "instance": {"name": "h2"},
        "certificates": [pki.default.entry("c-default")],
        "server_groups": [
            {"id": "sg", "servers": [{"host": "127.0.0.1", "port": demo_backend.port}]}
        ],
        "listeners": [
            {
                "name": "h",
                "protocol": "HTTPS",
                "port": 4443,
                "bind": "127.0.0.1",
                "certificates": {"default": "c-default"},
                "default_action": {"forward": "sg"},
            }
        ],
    }
    p = start_proxy(tmp_path, config)
    client = H2Client(p.port("h"), "default.example.test")
    slow = client.request("/?delay=1", "default.example.test")
    while p.metric("alb_connections_active", listener="h") < 1:
        pass
    p.proc.send_signal(signal.SIGTERM)
    client.wait(slow)
    assert client.streams[slow].status == 200
    while not client.goaway and client._pump():
        pass
    assert client.goaway
    client.close()
    assert p.stop() == 0


def test_request_fields_http11_cannot_carry_get_400_not_a_reset(proxy: Proxy) -> None:
    logged = len(proxy.log)
    client = H2Client(proxy.port("h"), "default.example.test")
    space = client.request("/a b", "default.example.test")
    name = client.request("/", "default.example.test", headers=[(b"x(a)", b"1")])
    value = client.request("/", "default.example.test", headers=[(b"x-a", b"1\x0b2")])
    fine = client.request("/fine", "default.example.test")
    client.wait()
    streams = [client.streams[s] for s in (space, name, value, fine)]
    assert [(s.status, s.reset) for s in streams] == [(400, False)] * 3 + [(200, False)]
    assert bytes(streams[0].body) == b"400 Bad Request\n"
    client.close()
    assert " ERROR " not in proxy.log[logged:]


@pytest.mark.parametrize("frames", ["PING", "SETTINGS"])
def test_control_frame_flood_is_told_to_calm_down(proxy: Proxy, frames: str) -> None:
    """CVE-2019-9512: every PING or SETTINGS frame makes the server queue an ACK."""
    rss_before = proxy.rss_kib()
    attacker = H2Client(proxy.port("h"), "default.example.test")
    if frames == "PING":
        attacker.ping_flood(20_000)
    else:
        attacker.settings_flood(20_000)
    started = time.monotonic()
    client = H2Client(proxy.port("h"), "default.example.test")
    ok = client.request("/", "default.example.test")
    client.wait(ok)
    assert client.streams[ok].status == 200
    assert time.monotonic() - started < 2
    client.close()
    attacker.read_until_goaway()
    assert attacker.goaway_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    attacker.close()
    assert proxy.rss_kib() - rss_before < 16 * 1024
    assert "client over its limits" in proxy.log


def test_rapid_reset_is_told_to_calm_down_and_spares_other_connections(
    pki: Pki, tmp_path: Path
) -> None:
    """CVE-2023-44487: streams opened and at once reset, in bursts, from connection after
    connection for two seconds, while another connection keeps asking for a page."""
    backend = RecordingBackend()
    config = {
        "instance": {"name": "h2"},
        "certificates": [pki.default.entry("c-default")],
        "server_groups": [{"id": "sg", "servers": [{"host": "127.0.0.1", "port": backend.port}]}],
        "listeners": [
            {
                "name": "h",
                "protocol": "HTTPS",
                "port": 4443,
                "bind": "127.0.0.1",
                "idle_timeout_s": 5,
                "certificates": {"default": "c-default"},
                "default_action": {"forward": "sg"},
            }
        ],
    }
    p = start_proxy(tmp_path, config)
    port = p.port("h")
    answers: list[tuple[int, float]] = []
    attack_over = threading.Event()

    def probe() -> None:
        client = H2Client(port, "default.example.test")
        while not attack_over.is_set():
            started = time.monotonic()
            stream_id = client.request("/probe", "default.example.test")
            client.wait(stream_id)
            answers.append((client.streams[stream_id].status, time.monotonic() - started))
        client.close()

    prober = threading.Thread(target=probe)
    prober.start()
    connections = 0
    deadline = time.monotonic() + 2
    try:
        while time.monotonic() < deadline:
            attacker = H2Client(port, "default.example.test")
            connections += 1
            try:
                for _ in range(50):  # 5,000 streams, 25 times the budget
                    attacker.rapid_reset(100, "/rr", "default.example.test")
                    attacker.read_ready()
                    if attacker.goaway or attacker.closed:
                        break
            except (ConnectionError, ssl.SSLError):
                pass
            attacker.read_until_goaway()
            assert attacker.goaway_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
            attacker.close()
    finally:
        attack_over.set()
        prober.join()
        stopped = p.stop()
        backend.close()
    assert stopped == 0
    assert len(answers) >= 5 and {status for status, _ in answers} == {200}, answers[:10]
    slowest = max(latency for _, latency in answers)
    assert slowest < 2, f"{len(answers)} answers, the slowest in {slowest:.1f} s"
    assert backend.received.count(b"GET /rr ") <= connections * (
        RESET_BURST + MAX_CONCURRENT_STREAMS
    )
    assert "too many streams reset" in p.log


def test_an_oversized_header_section_gets_431_and_the_connection_lives_on(proxy: Proxy) -> None:
    client = H2Client(proxy.port("h"), "default.example.test")
    big = client.request("/big", "default.example.test", headers=[(b"x-big", b"a" * 70_000)])
    client.wait(big)
    assert client.streams[big].status == 431
    after = client.request("/after", "default.example.test")
    client.wait(after)
    assert client.streams[after].status == 200 and not client.goaway
    client.close()
    assert "request refused listener=h" in proxy.log and "status=431" in proxy.log


def test_a_length_without_a_body_is_refused_not_forwarded(proxy: Proxy) -> None:
    client = H2Client(proxy.port("h"), "default.example.test")
    lying = client.request(
        "/lying", "default.example.test", method="POST", headers=[(b"content-length", b"42")]
    )
    client.wait(lying)
    assert client.streams[lying].status == 400
    client.close()


def test_bodies_of_refused_and_reset_streams_give_the_window_back(proxy: Proxy) -> None:
    """The connection window is shared by every stream: bytes of uploads never read must be
    acknowledged all the same, or the connection ends up unable to upload at all."""
    client = H2Client(proxy.port("h"), "default.example.test")
    body = b"x" * 60_000
    for i in range(20):  # 1.2 MB refused, 1.2 MB reset: more than the 1 MiB window, twice
        refused = client.request(
            f"/refused/{i}", "default.example.test", "POST", body, [(b"x-bad", b"a\x0bb")]
        )
        client.wait(refused)
        assert client.streams[refused].status == 400
        dropped = client.request(f"/dropped/{i}", "default.example.test", "POST", body)
        client.reset(dropped)
    upload = client.request("/after", "default.example.test", "POST", b"y" * 300_000)
    client.wait(upload)
    assert client.streams[upload].status == 200
    assert json.loads(bytes(client.streams[upload].body))["body_bytes"] == 300_000
    client.close()


@pytest.mark.parametrize(
    "bad",
    [
        [(b"X-Upper", b"1")],
        [(b"connection", b"close")],
        [(b"te", b"gzip")],
        [(b":unknown", b"1")],
    ],
    ids=["uppercase-name", "connection-header", "te-gzip", "unknown-pseudo"],
)
def test_a_malformed_request_costs_its_own_stream_only(
    proxy: Proxy, bad: list[tuple[bytes, bytes]]
) -> None:
    client = H2Client(proxy.port("h"), "default.example.test")
    client.conn.config.normalize_outbound_headers = False  # send what a careless client would
    client.conn.config.validate_outbound_headers = False
    slow = client.request("/slow?delay=0.5", "default.example.test")
    malformed = client.request("/bad", "default.example.test", headers=bad)
    client.wait()
    assert client.streams[malformed].status == 400
    assert client.streams[slow].status == 200 and not client.goaway
    client.close()
