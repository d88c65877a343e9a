"""Runtime changes through the admin API against the real daemon.

After each change a new handshake sees the new state (by fingerprint or alert) while connections
opened before it carry on; refused changes leave the old state serving; changes survive a
restart; a burst of changes under load drops nothing.
"""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from certfactory import DAY, NOW, make_ca, make_client, make_server, pem_of, write_pair, write_pem
from cryptography.hazmat.primitives.serialization import Encoding
from harness import (
    Backend,
    Proxy,
    RecordingBackend,
    client_context,
    fingerprint,
    served_fingerprint,
    start_proxy,
)


@dataclass
class Api:
    port: int
    token: str

    def call(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, Any]]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            data=data,
            method=method,
            headers={
                "Authorization": f"Bearer {self.token}",
                "Content-Type": "application/json",
                **(headers or {}),
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, json.loads(exc.read())

    def ok(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        status, payload = self.call(method, path, body)
        assert status in (200, 201), payload
        return payload


def api_of(proxy: Proxy) -> Api:
    token = (proxy.config_path.parent / "state" / "admin.token").read_text().strip()
    return Api(proxy.admin_port, token)


@dataclass(frozen=True)
class Pem:
    cert: str
    key: str
    fingerprint: str


def server_pem(issuer: Any, names: list[str], **kwargs: Any) -> Pem:
    leaf = make_server(issuer, names, **kwargs)
    return Pem(
        pem_of(leaf).decode(),
        leaf.key_pem().decode(),
        fingerprint(leaf.cert.public_bytes(Encoding.DER)),
    )


@pytest.fixture()
def env(tmp_path: Path, demo_backend: Backend) -> Iterator[tuple[Proxy, Api, Any]]:
    root = make_ca("runtime root")
    cert, key = write_pair(tmp_path, "initial", make_server(root, ["site.example.test"]))
    config = {
        "instance": {"name": "rt", "edition": "Standard"},
        "certificates": [{"id": "initial", "kind": "server", "cert": str(cert), "key": str(key)}],
        "server_groups": [
            {"id": "sg", "servers": [{"host": "127.0.0.1", "port": demo_backend.port}]}
        ],
        "listeners": [
            {
                "name": "web",
                "protocol": "HTTPS",
                "port": 7443,
                "bind": "127.0.0.1",
                "certificates": {"default": "initial"},
                "default_action": {"forward": "sg"},
            }
        ],
    }
    proxy = start_proxy(tmp_path, config)
    try:
        yield proxy, api_of(proxy), root
    finally:
        proxy.stop()


def upload(api: Api, name: str, pem: Pem) -> str:
    payload = api.ok(
        "POST", "/v1/certificates", {"name": name, "cert_pem": pem.cert, "key_pem": pem.key}
    )
    return str(payload["id"])


class KeepAlive:
    """A TLS connection opened before a change, used again after it."""

    def __init__(self, port: int, client: tuple[Path, Path] | None = None) -> None:
        ctx = client_context()
        if client:
            ctx.load_cert_chain(*client)
        raw = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock = ctx.wrap_socket(raw, server_hostname="site.example.test")
        self.fingerprint = fingerprint(self.sock.getpeercert(binary_form=True) or b"")

    def get(self) -> int:
        self.sock.sendall(b"GET /ka HTTP/1.1\r\nHost: site.example.test\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(65536)
            assert chunk, "connection dropped"
            head += chunk
        top, rest = head.split(b"\r\n\r\n", 1)
        length = int(top.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        while len(rest) < length:
            rest += self.sock.recv(65536)
        return int(top.split(b" ")[1])

    def close(self) -> None:
        self.sock.close()


class SlowUpload(threading.Thread):
    """A chunked upload that keeps sending while changes happen; checks the backend's hash."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.go_on = threading.Event()
        self.started_sending = threading.Event()
        self.result: dict[str, Any] = {}
        self.digest = hashlib.sha256()
        self.sent = 0

    def run(self) -> None:
        with (
            socket.create_connection(("127.0.0.1", self.port), timeout=60) as raw,
            client_context().wrap_socket(raw, server_hostname="site.example.test") as s,
        ):
            s.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
            block = b"z" * 65536
            s.sendall(b"%x\r\n%s\r\n" % (len(block), block))
            self.digest.update(block)
            self.sent += len(block)
            self.started_sending.set()
            self.go_on.wait(60)
            for _ in range(16):
                s.sendall(b"%x\r\n%s\r\n" % (len(block), block))
                self.digest.update(block)
                self.sent += len(block)
            s.sendall(b"0\r\n\r\n")
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
                if reply.count(b"}") and reply.rstrip().endswith(b"}"):
                    break
            self.result = json.loads(reply.split(b"\r\n\r\n", 1)[1])


class SlowDownload:
    """A large download whose reader holds back (the proxy must wait, not buffer or drop it)
    while changes happen, then reads the rest and checks every byte."""

    SIZE = 32 << 20

    def __init__(self, port: int) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.sock = client_context().wrap_socket(raw, server_hostname="site.example.test")
        self.sock.sendall(b"GET /?bytes=%d HTTP/1.1\r\nHost: x\r\n\r\n" % self.SIZE)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(65536)
            assert chunk, "connection dropped"
            head += chunk
        top, self.body = head.split(b"\r\n\r\n", 1)
        assert top.startswith(b"HTTP/1.1 200")
        while len(self.body) < 1 << 20:  # the first MiB now, the rest after the changes
            self.body += self.sock.recv(65536)

    def finish(self) -> None:
        body = bytearray(self.body)
        while len(body) < self.SIZE:
            chunk = self.sock.recv(1 << 20)
            assert chunk, f"download cut at {len(body)} of {self.SIZE} bytes"
            body += chunk
        self.sock.close()
        assert len(body) == self.SIZE
        assert body == bytes(range(256)) * (self.SIZE // 256)


def test_each_change_applies_to_new_handshakes_and_spares_open_connections(
    env: tuple[Proxy, Api, Any], tmp_path: Path
) -> None:
    from harness import WebSocket

    proxy, api, root = env
    port = proxy.port("web")
    old = KeepAlive(port)
    upload_thread = SlowUpload(port)
    upload_thread.start()
    assert upload_thread.started_sending.wait(30)
    assert old.get() == 200
    download = SlowDownload(port)
    ws_raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    ws_tls = client_context().wrap_socket(ws_raw, server_hostname="site.example.test")
    ws = WebSocket(ws_tls)
    assert ws.echo(b"before") == b"before"

    # replace the default certificate
    new = server_pem(root, ["site.example.test"])
    new_id = upload(api, "site 2027", new)
    api.ok("PUT", "/v1/listeners/web/default-certificate", {"certificate_id": new_id})
    assert served_fingerprint(port, "site.example.test") == new.fingerprint
    assert old.get() == 200 and old.fingerprint != new.fingerprint

    # add, then delete, an additional certificate
    extra = server_pem(root, ["api.example.test"])
    extra_id = upload(api, "api", extra)
    api.ok("POST", "/v1/listeners/web/additional-certificates", {"certificate_id": extra_id})
    assert served_fingerprint(port, "api.example.test") == extra.fingerprint
    api.ok("DELETE", f"/v1/listeners/web/additional-certificates/{extra_id}")
    assert served_fingerprint(port, "api.example.test") == new.fingerprint
    assert old.get() == 200

    # enable mutual authentication
    ca_a, ca_b = make_ca("clients A"), make_ca("clients B")
    ca_a_id = api.ok(
        "POST", "/v1/ca-certificates", {"name": "A", "cert_pem": pem_of(ca_a).decode()}
    )["id"]
    ca_b_id = api.ok(
        "POST", "/v1/ca-certificates", {"name": "B", "cert_pem": pem_of(ca_b).decode()}
    )["id"]
    client_a = write_pair(tmp_path, "client-a", make_client(ca_a, "alice"))
    client_b = write_pair(tmp_path, "client-b", make_client(ca_b, "bob"))
    api.ok(
        "PUT",
        "/v1/listeners/web/mutual-authentication",
        {"enabled": True, "ca_certificates": [ca_a_id]},
    )
    assert _request(port) == "TLSV13_ALERT_CERTIFICATE_REQUIRED"
    assert _request(port, client_a) == "200"
    assert old.get() == 200  # opened before mTLS: keeps the state it started with

    # replace the CA certificate
    api.ok("PUT", "/v1/listeners/web/ca-certificates", {"ca_certificates": [ca_b_id]})
    assert _request(port, client_a) == "TLSV1_ALERT_UNKNOWN_CA"
    assert _request(port, client_b) == "200"

    # change the security policy: TLS 1.3 allowed before, refused after
    api.ok("PUT", "/v1/listeners/web/mutual-authentication", {"enabled": False})
    assert _tls13(port) == "TLSv1.3"
    api.ok("PUT", "/v1/listeners/web/security-policy", {"security_policy": "tls_cipher_policy_1_2"})
    assert _tls13(port) == "alert protocol version"

    # the connections from before every change are still fine
    assert old.get() == 200
    assert ws.echo(b"after every change") == b"after every change"
    ws_tls.close()
    download.finish()
    upload_thread.go_on.set()
    upload_thread.join(60)
    assert upload_thread.result["body_bytes"] == upload_thread.sent
    assert upload_thread.result["body_sha256"] == upload_thread.digest.hexdigest()
    old.close()


def _request(port: int, client: tuple[Path, Path] | None = None) -> str:
    ctx = client_context(minimum_version=ssl.TLSVersion.TLSv1_3)
    if client:
        ctx.load_cert_chain(*client)
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="site.example.test") as s,
        ):
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return s.recv(100).split(b" ")[1].decode()
    except ssl.SSLError as exc:
        return str(exc.reason)


def _tls13(port: int) -> str:
    done = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3"],
        input="",
        capture_output=True,
        text=True,
        timeout=30,
    )
    if "alert protocol version" in done.stderr:
        return "alert protocol version"
    return "TLSv1.3" if "New, TLSv1.3," in done.stdout else done.stdout + done.stderr


def test_refused_changes_leave_the_old_state_serving(env: tuple[Proxy, Api, Any]) -> None:
    proxy, api, root = env
    port = proxy.port("web")
    before = served_fingerprint(port, "site.example.test")
    generation = api.ok("GET", "/v1/config")["generation"]
    other = server_pem(root, ["x.example.test"])
    mismatched = server_pem(root, ["y.example.test"])
    status, body = api.call(
        "POST",
        "/v1/certificates",
        {"name": "bad", "cert_pem": other.cert, "key_pem": mismatched.key},
    )
    assert status == 422 and "does not match" in body["error"]["message"]
    assert mismatched.key.splitlines()[1] not in json.dumps(body)
    # the operator reading the log sees the refusal too, and no key material
    assert "admin request refused method=POST path=/v1/certificates status=422" in proxy.log
    assert mismatched.key.splitlines()[1] not in proxy.log
    status, body = api.call(
        "POST", "/v1/ca-certificates", {"name": "not a ca", "cert_pem": other.cert}
    )
    assert status == 422 and "not a CA" in body["error"]["message"]
    status, body = api.call("DELETE", "/v1/certificates/initial")
    assert status == 409 and "in use by listener(s) web" in body["error"]["message"]
    status, body = api.call(
        "PUT", "/v1/listeners/web/default-certificate", {"certificate_id": "nope"}
    )
    assert "path=/v1/listeners/web/default-certificate status=422" in proxy.log
    assert status == 422 and body["error"]["problems"] == [
        "listeners[web].certificates.default: unknown certificate 'nope'"
    ]
    status, body = api.call("PUT", "/v1/listeners/web/security-policy", {"security_policy": "weak"})
    assert status == 422
    status, _ = api.call(
        "PUT", "/v1/listeners/nope/security-policy", {"security_policy": "tls_cipher_policy_1_2"}
    )
    assert status == 404
    assert api.ok("GET", "/v1/config")["generation"] == generation
    assert served_fingerprint(port, "site.example.test") == before


def test_mutual_authentication_refused_on_basic_instances(
    tmp_path: Path, demo_backend: Backend
) -> None:
    root = make_ca()
    cert, key = write_pair(tmp_path, "s", make_server(root, ["s.example.test"]))
    ca = write_pem(tmp_path / "ca.pem", pem_of(make_ca("clients")))
    config = {
        "instance": {"name": "basic", "edition": "Basic"},
        "certificates": [
            {"id": "s", "kind": "server", "cert": str(cert), "key": str(key)},
            {"id": "ca", "kind": "ca", "cert": str(ca)},
        ],
        "server_groups": [
            {"id": "sg", "servers": [{"host": "127.0.0.1", "port": demo_backend.port}]}
        ],
        "listeners": [
            {
                "name": "web",
                "protocol": "HTTPS",
                "port": 7443,
                "bind": "127.0.0.1",
                "certificates": {"default": "s"},
                "default_action": {"forward": "sg"},
            }
        ],
    }
    proxy = start_proxy(tmp_path, config)
    try:
        api = api_of(proxy)
        status, body = api.call(
            "PUT",
            "/v1/listeners/web/mutual-authentication",
            {"enabled": True, "ca_certificates": ["ca"]},
        )
        assert status == 422
        assert body["error"]["problems"] == [
            "listeners[web].mutual_authentication: "
            "mutual authentication is not available on Basic instances"
        ]
        assert _request(proxy.port("web")) == "200"
    finally:
        assert proxy.stop() == 0


def test_changes_survive_a_restart(env: tuple[Proxy, Api, Any], tmp_path: Path) -> None:
    proxy, api, root = env
    new = server_pem(root, ["site.example.test"])
    new_id = upload(api, "site", new)
    api.ok("PUT", "/v1/listeners/web/default-certificate", {"certificate_id": new_id})
    generation = api.ok("GET", "/v1/config")["generation"]
    key_file = tmp_path / "state" / "keys" / f"{new_id}.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert proxy.stop() == 0
    again = start_proxy(tmp_path, json.loads(json.dumps(_config_of(proxy))))
    try:
        assert served_fingerprint(again.port("web"), "site.example.test") == new.fingerprint
        assert api_of(again).ok("GET", "/v1/config")["generation"] == generation
        assert "running state from the store" in again.log
    finally:
        assert again.stop() == 0


def test_oversized_and_absurdly_nested_bodies_are_client_errors(
    env: tuple[Proxy, Api, Any],
) -> None:
    _, api, _ = env
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as s:
        s.sendall(
            b"PUT /v1/config HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2097152\r\n"
            b"Authorization: Bearer " + api.token.encode() + b"\r\n\r\n"
        )
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413 Request Entity Too Large\r\n"), reply[:100]
    deep = "[" * 100_000 + "]" * 100_000
    request = urllib.request.Request(
        f"http://127.0.0.1:{api.port}/v1/certificates",
        data=deep.encode(),
        method="POST",
        headers={"Authorization": f"Bearer {api.token}", "Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    with refused.value as answer:
        assert answer.code == 400
        assert "nested too deeply" in json.loads(answer.read())["error"]["message"]


def test_a_config_put_goes_through_the_strict_loader(env: tuple[Proxy, Api, Any]) -> None:
    proxy, api, _ = env
    generation = api.ok("GET", "/v1/config")["generation"]
    body = proxy.config_path.read_text() + "listeners: []\n"  # a duplicate key
    request = urllib.request.Request(
        f"http://127.0.0.1:{api.port}/v1/config",
        data=body.encode(),
        method="PUT",
        headers={"Authorization": f"Bearer {api.token}", "Content-Type": "application/yaml"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    with refused.value as answer:
        assert answer.code == 422
        error = json.loads(answer.read())["error"]
    assert any("duplicate key 'listeners'" in p for p in error["problems"]), error
    assert api.ok("GET", "/v1/config")["generation"] == generation
    assert [x["name"] for x in api.ok("GET", "/v1/listeners")["listeners"]] == ["web"]


def test_concurrent_changes_are_serialised_and_none_is_lost(env: tuple[Proxy, Api, Any]) -> None:
    proxy, api, root = env
    pems = [server_pem(root, [f"n{i}.example.test"]) for i in range(6)]
    ids = [upload(api, f"n{i}", pem) for i, pem in enumerate(pems)]
    generation = api.ok("GET", "/v1/config")["generation"]
    answers: list[int] = []
    barrier = threading.Barrier(len(ids))

    def add(cert_id: str) -> None:
        barrier.wait()
        status, _ = api.call(
            "POST", "/v1/listeners/web/additional-certificates", {"certificate_id": cert_id}
        )
        answers.append(status)

    threads = [threading.Thread(target=add, args=(cert_id,)) for cert_id in ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(answers) == [200] * len(ids)
    listener = api.ok("GET", "/v1/listeners/web")
    assert sorted(listener["certificates"]["additional"]) == sorted(ids)
    assert api.ok("GET", "/v1/config")["generation"] == generation + len(ids)
    for i, pem in enumerate(pems):
        assert served_fingerprint(proxy.port("web"), f"n{i}.example.test") == pem.fingerprint


def test_sighup_with_a_broken_file_keeps_the_running_state(env: tuple[Proxy, Api, Any]) -> None:
    proxy, api, _ = env
    port = proxy.port("web")
    before = served_fingerprint(port, "site.example.test")
    generation = api.ok("GET", "/v1/config")["generation"]
    config = _config_of(proxy)
    config["listeners"].append(
        {
            "name": "plain",
            "protocol": "HTTP",
            "port": 7080,
            "certificates": {"default": "initial"},
            "default_action": {"forward": "sg"},
        }
    )
    config["certificates"][0]["key"] = str(proxy.config_path.parent / "missing.key")
    state = proxy.reload(config)
    assert state["state"] == "reload_refused"
    assert "listeners[plain].certificates: HTTP listeners take no certificates" in state["problems"]
    assert any(p.startswith("certificates[initial]: cannot read") for p in state["problems"]), state
    assert "reload refused" in proxy.log
    assert served_fingerprint(port, "site.example.test") == before
    assert api.ok("GET", "/v1/config")["generation"] == generation
    assert proxy.metric("alb_config_reloads_total", result="refused") == 1


def test_a_second_daemon_on_the_same_state_dir_is_refused_and_touches_nothing(
    env: tuple[Proxy, Api, Any], tmp_path: Path
) -> None:
    proxy, api, _ = env
    generation = api.ok("GET", "/v1/config")["generation"]
    # An edited config file would make a start import it; the second daemon must not get there.
    edited = proxy.config_path.read_text() + "# edited\n"
    proxy.config_path.write_text(edited)
    second = subprocess.run(
        [sys.executable, "-m", "alb_proxy", "run", "--config", str(proxy.config_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert second.returncode == 1, second.stderr
    assert f"in use by another alb-proxy (pid {proxy.proc.pid})" in second.stderr
    assert "Traceback" not in second.stderr
    assert api.ok("GET", "/v1/config")["generation"] == generation
    # The running daemon still takes changes: nobody else numbered a generation.
    api.ok("PUT", "/v1/listeners/web/security-policy", {"security_policy": "tls_cipher_policy_1_2"})
    assert api.ok("GET", "/v1/config")["generation"] == generation + 1


def test_runtime_changes_outlive_an_edited_file_until_it_is_applied(
    env: tuple[Proxy, Api, Any], tmp_path: Path
) -> None:
    proxy, api, root = env
    initial = served_fingerprint(proxy.port("web"), "site.example.test")
    new = server_pem(root, ["site.example.test"])
    api.ok(
        "PUT",
        "/v1/listeners/web/default-certificate",
        {"certificate_id": upload(api, "site", new)},
    )
    assert proxy.stop() == 0
    edited = _config_of(proxy)
    edited["listeners"][0]["security_policy"] = "tls_cipher_policy_1_2"
    again = start_proxy(tmp_path, edited)  # rewrites the file: it changed since its import
    try:
        assert "changes were made at runtime since: serving the store's state" in again.log
        assert served_fingerprint(again.port("web"), "site.example.test") == new.fingerprint
        assert again.reload(edited)["state"] == "reloaded"  # SIGHUP: now the file rules
        assert served_fingerprint(again.port("web"), "site.example.test") == initial
        assert _tls13(again.port("web")) == "alert protocol version"
    finally:
        assert again.stop() == 0


def _config_of(proxy: Proxy) -> dict[str, Any]:
    import yaml

    loaded: dict[str, Any] = yaml.safe_load(proxy.config_path.read_text())
    return loaded


def test_stale_if_match_is_refused(env: tuple[Proxy, Api, Any]) -> None:
    _, api, _ = env
    generation = api.ok("GET", "/v1/config")["generation"]
    api.ok("PUT", "/v1/listeners/web/security-policy", {"security_policy": "tls_cipher_policy_1_2"})
    status, body = api.call(
        "PUT",
        "/v1/listeners/web/security-policy",
        {"security_policy": "tls_cipher_policy_1_0"},
        headers={"If-Match": f'"{generation}"'},
    )
    assert status == 412 and body["error"]["code"] == "precondition_failed"


def test_api_needs_the_token_and_refuses_browsers(env: tuple[Proxy, Api, Any]) -> None:
    _, api, _ = env
    assert Api(api.port, "wrong").call("GET", "/v1/listeners")[0] == 401
    assert api.call("GET", "/v1/listeners", headers={"Origin": "http://evil.test"})[0] == 403
    with urllib.request.urlopen(f"http://127.0.0.1:{api.port}/openapi.json") as resp:
        doc = json.loads(resp.read())
    assert "/v1/listeners/{name}/default-certificate" in doc["paths"]
    listed = api.ok("GET", "/v1/certificates")["certificates"]
    assert [c["id"] for c in listed] == ["initial"]
    assert "PRIVATE" not in json.dumps(listed)


def test_listener_create_stop_start_delete_binds_and_releases_its_port(
    env: tuple[Proxy, Api, Any],
) -> None:
    proxy, api, _ = env
    created = api.ok(
        "POST",
        "/v1/listeners",
        {
            "name": "plain",
            "protocol": "HTTP",
            "port": 7080,
            "bind": "127.0.0.1",
            "default_action": {"forward": "sg"},
        },
    )
    port = created["listener"]["bound_port"]
    assert _http_status(port) == 200
    api.ok("POST", "/v1/listeners/plain/stop")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)
    port = api.ok("POST", "/v1/listeners/plain/start")["listener"]["bound_port"]
    assert _http_status(port) == 200
    api.ok("DELETE", "/v1/listeners/plain")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)
    assert served_fingerprint(proxy.port("web"), None)  # the other listener is untouched


def _http_status(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as resp:
        return int(resp.status)


def test_server_add_remove_weight(env: tuple[Proxy, Api, Any], demo_backend: Backend) -> None:
    _, api, _ = env
    address = f"127.0.0.1:{demo_backend.port}"
    api.ok("POST", "/v1/server-groups/sg/servers", {"host": "127.0.0.1", "port": 9, "weight": 0})
    groups = api.ok("GET", "/v1/server-groups")["server_groups"]
    assert groups[0]["servers"][1] == {"host": "127.0.0.1", "port": 9, "weight": 0}
    api.ok("PATCH", f"/v1/server-groups/sg/servers/{address}", {"weight": 50})
    api.ok("DELETE", "/v1/server-groups/sg/servers/127.0.0.1:9")
    groups = api.ok("GET", "/v1/server-groups")["server_groups"]
    assert groups[0]["servers"] == [{"host": "127.0.0.1", "port": demo_backend.port, "weight": 50}]


def test_expiry_is_reported_per_listener(env: tuple[Proxy, Api, Any]) -> None:
    proxy, api, root = env
    soon = server_pem(root, ["site.example.test"], not_after=NOW + 10 * DAY)
    soon_id = upload(api, "soon", soon)
    changed = api.ok("PUT", "/v1/listeners/web/default-certificate", {"certificate_id": soon_id})
    assert changed["warnings"] == [f"web serves {soon_id}, which expires in 9 days"]
    gone = server_pem(root, ["site.example.test"], not_before=NOW - 9 * DAY, not_after=NOW - DAY)
    gone_id = upload(api, "gone", gone)
    changed = api.ok("PUT", "/v1/listeners/web/default-certificate", {"certificate_id": gone_id})
    assert changed["warnings"] == [f"web serves {gone_id}, which has expired"]
    api.ok("PUT", "/v1/listeners/web/default-certificate", {"certificate_id": soon_id})
    view = api.ok("GET", "/v1/listeners/web")
    assert view["certificate_expiry"][0]["id"] == soon_id
    assert view["certificate_expiry"][0]["days_left"] in (9, 10)
    assert f"certificate expires soon certificate={soon_id} listeners=web days_left=" in proxy.log


def test_burst_of_changes_under_load_drops_nothing(env: tuple[Proxy, Api, Any]) -> None:
    proxy, api, root = env
    port = proxy.port("web")
    pems = [server_pem(root, ["site.example.test"]) for _ in range(2)]
    ids = [upload(api, f"c{i}", pem) for i, pem in enumerate(pems)]
    stop = threading.Event()
    failures: list[str] = []
    counts = {"handshakes": 0, "keepalive": 0}

    def new_connections() -> None:
        while not stop.is_set():
            try:
                assert _request(port) == "200"
                counts["handshakes"] += 1
            except Exception as exc:
                failures.append(f"new connection: {exc!r}")

    def keep_alive() -> None:
        conn = KeepAlive(port)
        while not stop.is_set():
            try:
                assert conn.get() == 200
                counts["keepalive"] += 1
            except Exception as exc:
                failures.append(f"keep-alive: {exc!r}")
                return
        conn.close()

    workers = [threading.Thread(target=new_connections) for _ in range(2)]
    workers.append(threading.Thread(target=keep_alive))
    for w in workers:
        w.start()
    latencies = []
    try:
        for i in range(200):
            started = time.perf_counter()
            api.ok("PUT", "/v1/listeners/web/default-certificate", {"certificate_id": ids[i % 2]})
            latencies.append(time.perf_counter() - started)
    finally:
        stop.set()
        for w in workers:
            w.join(30)
    assert failures == []
    assert counts["handshakes"] > 50 and counts["keepalive"] > 50
    assert served_fingerprint(port, "site.example.test") == pems[199 % 2].fingerprint
    assert proxy.metric("alb_tls_handshake_failures_total", listener="web", reason="other") == 0
    latencies.sort()
    print(
        f"\nswap latency over 200 changes: p50 {latencies[100] * 1000:.1f} ms, "
        f"max {latencies[-1] * 1000:.1f} ms; {counts}"
    )


def test_websocket_survives_a_certificate_replacement(env: tuple[Proxy, Api, Any]) -> None:
    from harness import WebSocket

    proxy, api, root = env
    port = proxy.port("web")
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        client_context().wrap_socket(raw, server_hostname="site.example.test") as tls,
    ):
        ws = WebSocket(tls)
        assert ws.echo(b"before") == b"before"
        new = server_pem(root, ["site.example.test"])
        api.ok(
            "PUT",
            "/v1/listeners/web/default-certificate",
            {"certificate_id": upload(api, "new", new)},
        )
        assert served_fingerprint(port, "site.example.test") == new.fingerprint
        api.ok(
            "PUT", "/v1/listeners/web/security-policy", {"security_policy": "tls_cipher_policy_1_2"}
        )
        assert ws.echo(b"after") == b"after"


def test_listener_that_cannot_bind_is_refused_and_changes_nothing(
    env: tuple[Proxy, Api, Any],
) -> None:
    _, api, _ = env
    generation = api.ok("GET", "/v1/config")["generation"]
    # 192.0.2.1 (TEST-NET-1) is not an address of this host: the bind fails.
    status, body = api.call(
        "POST",
        "/v1/listeners",
        {
            "name": "nowhere",
            "protocol": "HTTP",
            "port": 7081,
            "bind": "192.0.2.1",
            "default_action": {"forward": "sg"},
        },
    )
    assert status == 409, body
    assert "listeners[nowhere] 192.0.2.1:" in body["error"]["message"]
    assert api.ok("GET", "/v1/config")["generation"] == generation
    assert [x["name"] for x in api.ok("GET", "/v1/listeners")["listeners"]] == ["web"]


def test_unknown_fields_and_overlong_names_are_refused_and_change_nothing(
    env: tuple[Proxy, Api, Any],
) -> None:
    _, api, root = env
    generation = api.ok("GET", "/v1/config")["generation"]
    pem = server_pem(root, ["strict.example.test"])
    body = {"name": "strict", "cert_pem": pem.cert, "key_pem": pem.key}
    status, payload = api.call("POST", "/v1/certificates", {**body, "chian_pem": pem.cert})
    assert status == 400
    assert payload["error"]["problems"] == ["unknown field 'chian_pem'"]
    status, payload = api.call("POST", "/v1/certificates", {**body, "name": "n" * 129})
    assert status == 422 and "1 to 128 printable" in payload["error"]["message"]
    status, payload = api.call("POST", "/v1/certificates", {**body, "name": "line\nbreak"})
    assert status == 422
    status, payload = api.call(
        "PUT", "/v1/listeners/web/mutual-authentication", {"enabled": False, "cas": ["x"]}
    )
    assert status == 400 and payload["error"]["problems"] == ["unknown field 'cas'"]
    assert api.ok("GET", "/v1/config")["generation"] == generation


def test_a_connection_opened_before_a_change_says_hello_under_the_new_state(
    env: tuple[Proxy, Api, Any],
) -> None:
    """The TLS state is taken when the ClientHello arrives: a client that connects, waits,
    and only then starts its handshake cannot slip in under the state of its connect."""
    proxy, api, root = env
    port = proxy.port("web")
    early = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
    new = server_pem(root, ["site.example.test"])
    api.ok(
        "PUT", "/v1/listeners/web/default-certificate", {"certificate_id": upload(api, "n", new)}
    )
    ca = make_ca("late clients")
    ca_id = api.ok("POST", "/v1/ca-certificates", {"name": "late", "cert_pem": pem_of(ca).decode()})
    with client_context().wrap_socket(early[0], server_hostname="site.example.test") as tls:
        assert fingerprint(tls.getpeercert(binary_form=True) or b"") == new.fingerprint
    api.ok(
        "PUT",
        "/v1/listeners/web/mutual-authentication",
        {"enabled": True, "ca_certificates": [ca_id["id"]]},
    )
    ctx = client_context(minimum_version=ssl.TLSVersion.TLSv1_3)
    tls = ctx.wrap_socket(early[1], server_hostname="site.example.test")
    with tls, pytest.raises(ssl.SSLError, match="CERTIFICATE_REQUIRED"):
        tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        tls.recv(100)


def test_uploads_racing_an_apply_are_kept(env: tuple[Proxy, Api, Any]) -> None:
    """An apply lists the store's uploads under the change lock: one that landed while the
    apply waited for it stays in the running state."""
    proxy, api, root = env
    file_text = proxy.config_path.read_text()
    pems = [server_pem(root, [f"race{i}.example.test"]) for i in range(6)]
    uploaded: list[str] = []

    def upload_one(i: int) -> None:
        uploaded.append(upload(api, f"race{i}", pems[i]))

    def apply() -> None:
        request = urllib.request.Request(
            f"http://127.0.0.1:{api.port}/v1/config",
            data=file_text.encode(),
            method="PUT",
            headers={"Authorization": f"Bearer {api.token}"},
        )
        with urllib.request.urlopen(request, timeout=30) as answer:
            assert answer.status == 200

    threads = []
    for i in range(len(pems)):
        threads += [threading.Thread(target=upload_one, args=(i,)), threading.Thread(target=apply)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    listed = {c["id"] for c in api.ok("GET", "/v1/certificates")["certificates"]}
    assert len(uploaded) == len(pems) and set(uploaded) <= listed


def test_a_removed_server_gets_no_request_from_an_old_keep_alive_connection(
    env: tuple[Proxy, Api, Any], demo_backend: Backend
) -> None:
    """The TLS state is a connection's for its life; the server group is taken by each
    request as it begins, as a load balancer deregisters a target."""
    proxy, api, _ = env
    replacement = RecordingBackend()
    old = KeepAlive(proxy.port("web"))
    try:
        assert old.get() == 200  # through the demo backend
        api.ok(
            "POST", "/v1/server-groups/sg/servers", {"host": "127.0.0.1", "port": replacement.port}
        )
        api.ok("DELETE", f"/v1/server-groups/sg/servers/127.0.0.1:{demo_backend.port}")
        assert old.get() == 200
        assert b"GET /ka " in replacement.received
    finally:
        old.close()
        replacement.close()


def test_a_renamed_listener_keeps_its_port(env: tuple[Proxy, Api, Any]) -> None:
    """The socket passes to the listener's new name (a second bind of the address would
    fail); the old name drains as a deleted listener does."""
    proxy, api, _ = env
    port = proxy.port("web")
    before = served_fingerprint(port, "site.example.test")
    config = api.ok("GET", "/v1/config")["config"]
    config["listeners"][0]["name"] = "edge"
    status, payload = api.call("PUT", "/v1/config", config)
    assert status == 200, payload
    assert api.ok("GET", "/v1/listeners/edge")["bound_port"] == port
    assert served_fingerprint(port, "site.example.test") == before
    assert [x["name"] for x in api.ok("GET", "/v1/listeners")["listeners"]] == ["edge"]
