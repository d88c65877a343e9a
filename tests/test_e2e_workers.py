"""Worker processes against the real daemon (``workers: 2``).

Every change reaches every worker before the API answers; connections are spread over the
workers and each serves the new state; a killed worker is replaced and gets its sockets back;
metrics are summed across workers; changes under load drop nothing; SIGTERM drains them all;
a port somebody else holds is refused even though the workers share ports with SO_REUSEPORT.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from certfactory import make_ca, make_server, write_pair
from cryptography.hazmat.primitives.serialization import Encoding
from h3client import h3_get
from harness import (
    Backend,
    Proxy,
    client_context,
    openssl_s_client,
    run_cli,
    served_fingerprint,
    start_proxy,
    write_config,
)
from test_e2e_runtime import Api, KeepAlive, api_of, server_pem, upload


def _config(tmp_path: Path, backend_port: int, root: Any) -> dict[str, Any]:
    cert, key = write_pair(tmp_path, "initial", make_server(root, ["site.example.test"]))
    listener = {
        "bind": "127.0.0.1",
        "certificates": {"default": "initial"},
        "default_action": {"forward": "sg"},
    }
    return {
        "instance": {"name": "w"},
        "workers": 2,
        "certificates": [{"id": "initial", "kind": "server", "cert": str(cert), "key": str(key)}],
        "server_groups": [{"id": "sg", "servers": [{"host": "127.0.0.1", "port": backend_port}]}],
        "listeners": [
            {"name": "web", "protocol": "HTTPS", "port": 7443, "quic_upgrade": "q", **listener},
            {"name": "q", "protocol": "QUIC", "port": 7443, **listener},
            {
                "name": "h12",
                "protocol": "HTTPS",
                "port": 7444,
                "security_policy": "tls_cipher_policy_1_2",
                **listener,
            },
        ],
    }


@pytest.fixture()
def env(tmp_path: Path, demo_backend: Backend) -> Iterator[tuple[Proxy, Api, Any]]:
    root = make_ca("workers root")
    proxy = start_proxy(tmp_path, _config(tmp_path, demo_backend.port, root))
    try:
        yield proxy, api_of(proxy), root
    finally:
        proxy.stop()


def _workers(api: Api) -> list[dict[str, Any]]:
    workers: list[dict[str, Any]] = api.ok("GET", "/v1/workers")["workers"]
    return workers


def _get(port: int) -> int:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        client_context().wrap_socket(raw, server_hostname="site.example.test") as tls,
    ):
        tls.sendall(b"GET / HTTP/1.1\r\nHost: site.example.test\r\nConnection: close\r\n\r\n")
        return int(tls.recv(64).split(b" ")[1])


def test_workers_run_the_package_their_daemon_runs(tmp_path: Path, demo_backend: Backend) -> None:
    """Not an ``alb_proxy`` in the working directory: ``make run`` starts the daemon in the
    source tree, with the package installed (compiled) in the virtualenv."""
    decoy = tmp_path / "alb_proxy"
    decoy.mkdir()
    for name in ("__init__.py", "__main__.py"):
        (decoy / name).write_text("raise SystemExit('decoy alb_proxy imported')\n")
    proxy = start_proxy(tmp_path, _config(tmp_path, demo_backend.port, make_ca("decoy root")))
    try:
        assert len(proxy.workers) == 2
        assert {_get(proxy.port("web")) for _ in range(6)} == {200}
    finally:
        proxy.stop()
    assert "decoy" not in proxy.log


def test_two_workers_serve_every_listener_and_share_the_connections(
    env: tuple[Proxy, Api, Any],
) -> None:
    proxy, api, _ = env
    assert len(proxy.workers) == 2 and proxy.proc.pid not in proxy.workers
    workers = _workers(api)
    assert [w["slot"] for w in workers] == [0, 1]
    assert [w["pid"] for w in workers] == proxy.workers
    # QUIC is served by one worker: its datagrams must reach the process that holds its state.
    assert sorted(workers[0]["listeners"]) == ["h12", "q", "web"]
    assert sorted(workers[1]["listeners"]) == ["h12", "web"]
    for _ in range(40):
        assert _get(proxy.port("web")) == 200
    counts = [w["connections"] for w in _workers(api)]
    assert sum(counts) == 40 and min(counts) > 0, counts  # the kernel spread them
    assert proxy.metric("alb_connections_total", listener="web") == 40
    response, _ = h3_get(proxy.port("q"), "site.example.test")
    assert response.status == 200


def test_a_change_reaches_every_worker_before_the_api_answers(
    env: tuple[Proxy, Api, Any],
) -> None:
    proxy, api, root = env
    port = proxy.port("web")
    old = KeepAlive(port)
    assert old.get() == 200
    new = server_pem(root, ["site.example.test"])
    new_id = upload(api, "next", new)
    generation = api.ok("PUT", "/v1/listeners/web/default-certificate", {"certificate_id": new_id})[
        "generation"
    ]
    assert {w["generation"] for w in _workers(api)} == {generation}
    seen = {served_fingerprint(port, "site.example.test") for _ in range(30)}
    assert seen == {new.fingerprint}  # 30 new connections, over both workers
    response, received = h3_get(proxy.port("q"), "site.example.test")
    assert response.status == 200 and received != new.fingerprint  # QUIC keeps its own default
    assert old.get() == 200  # opened before the change, still served
    old.close()
    assert proxy.metric("alb_config_generation") == generation
    assert proxy.metric("alb_workers") == 2


def test_handshake_failures_are_counted_across_workers(env: tuple[Proxy, Api, Any]) -> None:
    proxy, _, _ = env
    for _ in range(12):
        refused = openssl_s_client(proxy.port("h12"), "-tls1_3")
        assert "alert protocol version" in refused.stderr + refused.stdout
    assert (
        proxy.metric("alb_tls_handshake_failures_total", listener="h12", reason="protocol_version")
        == 12
    )


def test_a_killed_worker_is_replaced_with_its_sockets(env: tuple[Proxy, Api, Any]) -> None:
    proxy, api, root = env
    port = proxy.port("web")
    for _ in range(10):
        assert _get(port) == 200
    before = proxy.metric("alb_connections_total", listener="web")
    survivors = [KeepAlive(port) for _ in range(16)]
    victim = proxy.workers[1]
    os.kill(victim, signal.SIGKILL)
    state = proxy.next_state()
    assert state["state"] == "worker_replaced" and state["worker_slot"] == 1
    assert state["worker_pid"] not in (victim, proxy.workers[0]) and len(proxy.workers) == 2
    # Connections of the other worker were never touched; those of the killed one are gone.
    alive = 0
    for conn in survivors:
        with contextlib.suppress(AssertionError, OSError):
            alive += conn.get() == 200
        conn.close()
    assert 0 < alive < 16
    # The replacement serves the current state on the same port, and takes new connections.
    assert {w["generation"] for w in _workers(api)} == {api.ok("GET", "/v1/config")["generation"]}
    new = server_pem(root, ["site.example.test"])
    api.ok(
        "PUT", "/v1/listeners/web/default-certificate", {"certificate_id": upload(api, "n", new)}
    )
    assert {served_fingerprint(port, "site.example.test") for _ in range(30)} == {new.fingerprint}
    assert min(w["connections"] for w in _workers(api)) > 0
    assert proxy.metric("alb_worker_restarts_total") == 1
    assert proxy.metric("alb_connections_total", listener="web") >= before + 30  # not reset


def test_changes_under_load_drop_nothing_on_any_worker(env: tuple[Proxy, Api, Any]) -> None:
    proxy, api, root = env
    port = proxy.port("web")
    pems = [server_pem(root, ["site.example.test"]) for _ in range(2)]
    ids = [upload(api, f"c{i}", pem) for i, pem in enumerate(pems)]
    stop = threading.Event()
    failures: list[str] = []
    done = {"new": 0, "keepalive": 0}

    def new_connections() -> None:
        while not stop.is_set():
            try:
                assert _get(port) == 200
                done["new"] += 1
            except (AssertionError, OSError, ssl.SSLError) as exc:
                failures.append(f"new connection: {exc!r}")

    def keep_alive() -> None:
        conn = KeepAlive(port)
        while not stop.is_set():
            try:
                assert conn.get() == 200
                done["keepalive"] += 1
            except (AssertionError, OSError) as exc:
                failures.append(f"keep-alive: {exc!r}")
                return
        conn.close()

    threads = [threading.Thread(target=new_connections) for _ in range(2)]
    threads += [threading.Thread(target=keep_alive) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        for i in range(60):
            api.ok("PUT", "/v1/listeners/web/default-certificate", {"certificate_id": ids[i % 2]})
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert failures == []
    assert done["new"] > 20 and done["keepalive"] > 20, done
    last = pems[59 % 2].fingerprint
    assert {served_fingerprint(port, "site.example.test") for _ in range(20)} == {last}
    generation = api.ok("GET", "/v1/config")["generation"]
    assert {w["generation"] for w in _workers(api)} == {generation}


def test_sigterm_drains_every_worker(env: tuple[Proxy, Api, Any]) -> None:
    proxy, _, _ = env
    results: list[bytes] = []
    started = threading.Event()

    def slow_request() -> None:
        with (
            socket.create_connection(("127.0.0.1", proxy.port("web")), timeout=30) as raw,
            client_context().wrap_socket(raw, server_hostname="site.example.test") as tls,
        ):
            tls.sendall(b"GET /?delay=3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            started.set()
            reply = b""
            while chunk := tls.recv(65536):
                reply += chunk
            results.append(reply)

    thread = threading.Thread(target=slow_request)
    thread.start()
    assert started.wait(10)
    assert proxy.metric("alb_connections_active", listener="web") == 1  # in flight
    workers = list(proxy.workers)
    proxy.proc.send_signal(signal.SIGTERM)
    # New connections are refused at once, while the request in flight goes on: nothing
    # queues on a port no process will accept from again.
    while True:
        try:
            socket.create_connection(("127.0.0.1", proxy.port("web")), timeout=5).close()
        except (ConnectionRefusedError, ConnectionResetError):
            break  # reset: it reached the accept queue just as the port closed
        assert not results, "still accepting when the drain was done"
    assert not results
    assert proxy.stop() == 0
    thread.join(30)
    assert results and results[0].startswith(b"HTTP/1.1 200 ")
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_port_held_by_another_process_is_refused(tmp_path: Path, demo_backend: Backend) -> None:
    # Even a socket that allows SO_REUSEPORT itself must not be joined silently.
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    taken = holder.getsockname()[1]
    config = _config(tmp_path, demo_backend.port, make_ca("taken root"))
    config["listeners"][2]["port"] = taken
    # Listeners bind before the admin API, so its (fixed) port is never reached here.
    config["state_dir"] = str(tmp_path / "state")
    path = write_config(tmp_path, config)
    try:
        done = run_cli("run", "--config", str(path), cwd=tmp_path)
    finally:
        holder.close()
    assert done.returncode == 1, done.stderr
    assert f"listeners[h12] 127.0.0.1:{taken}: Address already in use" in done.stderr
    assert "Traceback" not in done.stderr


def test_files_replaced_on_disk_reach_every_worker_only_when_applied(
    env: tuple[Proxy, Api, Any], tmp_path: Path
) -> None:
    proxy, api, root = env
    port = proxy.port("web")
    before = served_fingerprint(port, "site.example.test")
    # Rotate the certificate files in place, as certbot or an operator would.
    rotated = make_server(root, ["site.example.test"])
    write_pair(tmp_path, "initial", rotated)
    rotated_fp = hashlib.sha256(rotated.cert.public_bytes(Encoding.DER)).hexdigest()
    # A worker that dies now is replaced with the generation's own bytes, not the new files:
    # the workers never disagree about which certificate a generation serves.
    os.kill(proxy.workers[1], signal.SIGKILL)
    assert proxy.next_state()["state"] == "worker_replaced"
    assert {served_fingerprint(port, "site.example.test") for _ in range(30)} == {before}
    # SIGHUP with an unchanged file is a change all the same: the certificate bytes differ.
    generation = api.ok("GET", "/v1/config")["generation"]
    config = yaml.safe_load(proxy.config_path.read_text())
    assert proxy.reload(config)["state"] == "reloaded"
    assert api.ok("GET", "/v1/config")["generation"] == generation + 1
    assert {served_fingerprint(port, "site.example.test") for _ in range(30)} == {rotated_fp}
    # Nothing replaced since: the next SIGHUP changes nothing.
    assert proxy.reload(config)["state"] == "reloaded"
    assert api.ok("GET", "/v1/config")["generation"] == generation + 1
