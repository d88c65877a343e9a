"""The TLS layer's bulk-data cost: alb-proxy's TLS over ``ssl.MemoryBIO`` beside uvloop's own.

    .venv/bin/python benchmarks/tls_bulk.py [--mib 1024] [--runs 3]

One process serves ``--mib`` MiB of zeros to each client connection, either through
``TlsServerProtocol`` (the protocol every alb-proxy HTTPS listener runs) or through
``loop.create_server(ssl=...)`` (uvloop's built-in TLS transport), pinned to CPU 0; ``curl`` on
CPU 1 downloads it. Prints MiB/s and server CPU seconds per GiB for each, medians of
``--runs``, and the ratio: what driving OpenSSL from Python costs on large transfers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHUNK = b"\0" * (256 * 1024)


class _Sender(asyncio.Protocol):
    """Answers one HTTP request with ``size`` bytes, written as the transport drains."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.transport: asyncio.Transport | None = None
        self._paused = False
        self._left = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._left or b"\r\n\r\n" not in data or self.transport is None:
            return
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % self.size
        )
        self._left = self.size
        self._pump()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._pump()

    def _pump(self) -> None:
        while self._left and not self._paused and self.transport is not None:
            piece = CHUNK[: min(len(CHUNK), self._left)]
            self._left -= len(piece)
            self.transport.write(piece)
        if not self._left and self.transport is not None:
            self.transport.close()


def serve(kind: str, port_file: str, certs: Path, size: int) -> None:
    import uvloop
    from bare_relay import tls_server  # this script's directory is on sys.path

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certs / "site.pem", certs / "site.key")

    async def main() -> None:
        server = await tls_server(kind, ctx, lambda: _Sender(size), 0)
        Path(port_file).write_text(str(server.sockets[0].getsockname()[1]))
        await asyncio.Event().wait()

    uvloop.run(main())


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_once(kind: str, certs: Path, mib: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        port_file = os.path.join(tmp, "port")
        proc = subprocess.Popen(
            [
                "taskset",
                "-c",
                "0",
                sys.executable,
                __file__,
                "--serve",
                kind,
                "--port-file",
                port_file,
                "--certs",
                str(certs),
                "--mib",
                str(mib),
            ],
            cwd=ROOT,
        )
        try:
            deadline = time.monotonic() + 20
            while not os.path.exists(port_file) or not Path(port_file).read_text():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{kind} server did not start")
                time.sleep(0.05)
            port = int(Path(port_file).read_text())
            before = cpu_seconds(proc.pid)
            started = time.perf_counter()
            subprocess.run(
                [
                    "taskset",
                    "-c",
                    "1",
                    "curl",
                    "-sS",
                    "-k",
                    "-o",
                    "/dev/null",
                    f"https://127.0.0.1:{port}/",
                ],
                check=True,
            )
            elapsed = time.perf_counter() - started
            used = cpu_seconds(proc.pid) - before
        finally:
            proc.kill()
            proc.wait()
    return mib / elapsed, used / (mib / 1024)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--serve", choices=["memorybio", "builtin"])
    parser.add_argument("--port-file")
    parser.add_argument("--certs", type=Path)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port_file, args.certs, args.mib << 20)
        return 0
    for tool in ("curl", "taskset"):
        if shutil.which(tool) is None:
            print(f"missing tool: {tool}", file=sys.stderr)
            return 2
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with tempfile.TemporaryDirectory() as tmp:
        certs = Path(tmp) / "certs"
        subprocess.run(
            [sys.executable, "-m", "alb_proxy", "certs", "dev", "--out", str(certs)],
            check=True,
            capture_output=True,
            cwd=ROOT,
        )
        results = {
            kind: [run_once(kind, certs, args.mib) for _ in range(args.runs)]
            for kind in ("memorybio", "builtin")
        }
    med = {
        k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v))
        for k, v in results.items()
    }
    print("| TLS transport | MiB/s | server CPU-s per GiB |")
    print("|---|---|---|")
    for kind, (rate, cpu) in med.items():
        print(f"| {kind} | {rate:.0f} | {cpu:.2f} |")
    (mrate, mcpu), (brate, bcpu) = med["memorybio"], med["builtin"]
    print(f"| memorybio ÷ builtin | {mrate / brate:.2f}x | {mcpu / bcpu:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
