"""HTTP/2 on HTTPS listeners with real clients: the ``h2`` library, curl --http2, h2load."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Pki
from h2client import H2Client
from harness import Backend, Proxy, start_proxy


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
