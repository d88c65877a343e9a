"""Run the real daemon and real backends as subprocesses, on ports the OS picks.

Readiness is an event, not a sleep: the daemon writes one JSON line with its bound ports to the
descriptor given by ``--ready-fd`` once every listener is serving; the demo backend prints its
port on stdout. Logs go to files under the test's ``tmp_path`` and are shown when a start fails.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import select
import signal
import socket
import ssl
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

START_TIMEOUT = 30.0


_pending: dict[int, bytes] = {}
"""Bytes read past the last line handed out, by descriptor (lines may arrive together)."""


def _read_line(fd: int, timeout: float, what: str, log: Path | None) -> str:
    data = _pending.pop(fd, b"")
    while b"\n" not in data:
        ready, _, _ = select.select([fd], [], [], timeout)
        chunk = os.read(fd, 4096) if ready else b""
        if not chunk:
            detail = log.read_text() if log is not None and log.exists() else ""
            raise RuntimeError(f"{what} did not become ready:\n{detail}")
        data += chunk
    line, _, rest = data.partition(b"\n")
    if rest:
        _pending[fd] = rest
    return line.decode() + "\n"


@dataclass
class Proxy:
    proc: subprocess.Popen[bytes]
    ports: dict[str, int]
    admin_port: int
    log_path: Path
    config_path: Path
    notify_fd: int
    workers: list[int] = field(default_factory=list)
    """Pids of the worker processes (the daemon's own pid with ``workers: 1``)."""
    stopped: bool = field(default=False)

    def reload(self, config: dict[str, Any]) -> dict[str, Any]:
        """Rewrite the config file, SIGHUP, and wait for the daemon's verdict on it."""
        tmp_path = self.config_path.parent
        write_config(tmp_path, _with_defaults(tmp_path, config), self.config_path.name)
        self.proc.send_signal(signal.SIGHUP)
        state: dict[str, Any] = json.loads(
            _read_line(self.notify_fd, START_TIMEOUT, "reload", self.log_path)
        )
        if state["state"] == "reloaded":
            self.ports = state["listeners"]
        return state

    def next_state(self, timeout: float = START_TIMEOUT) -> dict[str, Any]:
        """The daemon's next ``--ready-fd`` line (e.g. ``worker_replaced``)."""
        state: dict[str, Any] = json.loads(
            _read_line(self.notify_fd, timeout, "next state", self.log_path)
        )
        self.workers = state["workers"]
        return state

    def port(self, listener: str) -> int:
        return self.ports[listener]

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.admin_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            body: bytes = resp.read()
        return body.decode()

    def metric(self, name: str, **labels: str) -> float:
        """Value of one sample, 0.0 when the labelled series does not exist yet."""
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in self.metrics().splitlines():
            if line.startswith("#") or " " not in line:
                continue
            key, value = line.rsplit(" ", 1)
            metric, _, rest = key.partition("{")
            got = ",".join(sorted(rest.rstrip("}").split(","))) if rest else ""
            if metric == name and got == want:
                return float(value)
        return 0.0

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=timeout)
        if not self.stopped:
            _pending.pop(self.notify_fd, None)
            os.close(self.notify_fd)
        self.stopped = True
        return code


def write_config(tmp_path: Path, config: dict[str, Any], name: str = "alb.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _with_defaults(tmp_path: Path, config: dict[str, Any]) -> dict[str, Any]:
    """One process unless a test asks for workers: most tests are about the data plane."""
    return {
        "admin": {"listen": "127.0.0.1:9900"},
        "state_dir": str(tmp_path / "state"),
        "workers": 1,
        **config,
    }


def start_proxy(
    tmp_path: Path, config: dict[str, Any], env: Mapping[str, str] | None = None
) -> Proxy:
    """``env``: the daemon's whole environment (default: this process's), e.g. to set or
    leave out ``ALB_ADMIN_TOKEN``."""
    path = write_config(tmp_path, _with_defaults(tmp_path, config))
    log_path = tmp_path / "proxy.log"
    read_fd, write_fd = os.pipe()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-P",  # the installed package, whatever the working directory holds
                "-m",
                "alb_proxy",
                "run",
                "--config",
                str(path),
                "--ephemeral-ports",
                "--ready-fd",
                str(write_fd),
            ],
            stdout=log,
            stderr=log,
            pass_fds=(write_fd,),
            cwd=tmp_path,
            env=None if env is None else dict(env),
        )
    os.close(write_fd)
    try:
        ready = json.loads(_read_line(read_fd, START_TIMEOUT, "alb-proxy", log_path))
    except BaseException:
        proc.kill()
        proc.wait()
        os.close(read_fd)
        raise
    return Proxy(
        proc, ready["listeners"], ready["admin"], log_path, path, read_fd, ready["workers"]
    )


def run_cli(
    *args: str, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-P", "-m", "alb_proxy", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
    )


@dataclass
class Backend:
    proc: subprocess.Popen[bytes]
    port: int

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def start_demo_backend() -> Backend:
    proc = subprocess.Popen(
        [sys.executable, "-m", "alb_proxy", "demo-backend", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    line = _read_line(proc.stdout.fileno(), START_TIMEOUT, "demo backend", None)
    return Backend(proc, int(line.rsplit(":", 1)[1]))


# -- clients ---------------------------------------------------------------------------------


def client_context(cafile: Path | None = None, **kwargs: Any) -> ssl.SSLContext:
    """A client context that trusts ``cafile`` and does not check host names (SNI tests send
    names the certificate may not cover on purpose; the fingerprint is what is checked)."""
    ctx = ssl.create_default_context(cafile=str(cafile) if cafile else None)
    ctx.check_hostname = False
    if cafile is None:
        ctx.verify_mode = ssl.CERT_NONE
    for key, value in kwargs.items():
        setattr(ctx, key, value)
    return ctx


def fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def served_fingerprint(
    port: int, server_name: str | None, ctx: ssl.SSLContext | None = None
) -> str:
    """SHA-256 of the leaf certificate the proxy sends for ``server_name`` (None: no SNI)."""
    ctx = ctx or client_context()
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return fingerprint(der)


def openssl_s_client(port: int, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", *args],
        input=stdin.decode(),
        capture_output=True,
        text=True,
        timeout=30,
    )


def s_client_fingerprint(port: int, *args: str) -> str:
    """The leaf certificate ``openssl s_client`` received, as a SHA-256 fingerprint."""
    done = openssl_s_client(port, *args)
    start = done.stdout.find("-----BEGIN CERTIFICATE-----")
    end = done.stdout.find("-----END CERTIFICATE-----")
    assert start >= 0, done.stdout + done.stderr
    pem = done.stdout[start : end + len("-----END CERTIFICATE-----")] + "\n"
    return fingerprint(ssl.PEM_cert_to_DER_cert(pem))


class RecordingBackend:
    """A raw TCP backend that records every byte it receives and answers each request head
    with ``answer`` (default: a tiny 200). Proves what did or did not reach a backend."""

    def __init__(
        self,
        answer: bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        *,
        close_after_answer: bool = False,
        gate: threading.Event | None = None,
        answers_per_connection: int | None = None,
    ) -> None:
        self.answer = answer
        self.close_after_answer = close_after_answer
        self.answers_per_connection = answers_per_connection
        """When given, a request past this many on one connection is met with a close, unanswered
        (a keep-alive connection the backend gave up on just as the proxy reused it)."""
        self.gate = gate
        """When given, each answer waits for it: a request held in flight until a test says."""
        self.arrived = threading.Event()
        """Set once a request head has been received: the request is in flight."""
        self.connections = 0
        self.received = bytearray()
        self._lock = threading.Lock()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        answered = 0
        with conn:
            buffer = b""
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                with self._lock:
                    self.received += data
                buffer += data
                while b"\r\n\r\n" in buffer:
                    _, buffer = buffer.split(b"\r\n\r\n", 1)
                    if answered == self.answers_per_connection:
                        return
                    answered += 1
                    self.arrived.set()
                    if self.gate is not None:
                        self.gate.wait(60)
                    conn.sendall(self.answer)
                    if self.close_after_answer:
                        return

    def close(self) -> None:
        self._sock.close()


class WebSocket:
    """A minimal WebSocket client over an already connected socket (plain or TLS)."""

    def __init__(self, sock: socket.socket, host: str = "ws.example.test") -> None:
        from alb_proxy.demo_backend import encode_ws_frame, parse_ws_frame

        self._encode, self._parse = encode_ws_frame, parse_ws_frame
        self.sock = sock
        key = base64.b64encode(os.urandom(16))
        sock.sendall(
            b"GET /ws HTTP/1.1\r\nHost: " + host.encode() + b"\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: " + key + b"\r\n\r\n"
        )
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            assert chunk, data
            data += chunk
        self.head, rest = data.split(b"\r\n\r\n", 1)
        self.buffer = bytearray(rest)

    def echo(self, payload: bytes) -> bytes:
        self.sock.sendall(self._encode(0x2, payload, mask=os.urandom(4)))
        while (frame := self._parse(self.buffer)) is None:
            chunk = self.sock.recv(65536)
            assert chunk, "tunnel closed"
            self.buffer += chunk
        opcode, echoed, used = frame
        del self.buffer[:used]
        assert opcode == 0x2
        return echoed
