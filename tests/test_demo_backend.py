"""The demo backend on port 0, driven by an h11 client or raw bytes, on asyncio and uvloop."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import h11
import pytest
import uvloop

from alb_proxy.demo_backend import CHUNK, serve_demo_backend

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[1]
LoopFactory = Callable[[], asyncio.AbstractEventLoop]


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_factory(request: pytest.FixtureRequest) -> LoopFactory:
    return asyncio.new_event_loop if request.param == "asyncio" else uvloop.new_event_loop


def run(loop_factory: LoopFactory, test: Callable[[int], Awaitable[T]]) -> T:
    """Run ``test(port)`` against a fresh backend; fail if the loop saw an unhandled error."""

    async def main() -> T:
        errors: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
        async with demo_backend() as port:
            result = await test(port)
        assert errors == []
        return result

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(main())


@contextlib.asynccontextmanager
async def demo_backend() -> AsyncIterator[int]:
    bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve_demo_backend("127.0.0.1", 0, ready=bound.set_result))
    first: list[asyncio.Future[Any]] = [bound, task]
    await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()  # startup failed: raise its error
    try:
        yield bound.result()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@dataclass
class Reply:
    status: int
    headers: dict[bytes, bytes]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    """An h11 client connection: one request at a time, keep-alive when both sides allow it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = h11.Connection(h11.CLIENT)

    @classmethod
    async def open(cls, port: int) -> Client:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()

    async def request(
        self,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes | list[bytes] = b"",
    ) -> Reply:
        if self.conn.our_state is h11.DONE:
            self.conn.start_next_cycle()
        all_headers = [("host", "backend.test"), *headers]
        if isinstance(body, bytes) and body:
            all_headers.append(("content-length", str(len(body))))
        self.send(h11.Request(method=method, target=target, headers=all_headers))
        for chunk in [body] if isinstance(body, bytes) else body:
            self.send(h11.Data(data=chunk))
        self.send(h11.EndOfMessage())
        response = await self.next_event()
        assert isinstance(response, h11.Response)
        data = bytearray()
        while not isinstance(event := await self.next_event(), h11.EndOfMessage):
            assert isinstance(event, h11.Data)
            data += event.data
        return Reply(response.status_code, dict(response.headers), bytes(data))

    def send(self, event: h11.Event) -> None:
        self.writer.write(self.conn.send(event) or b"")

    async def next_event(self) -> h11.Event:
        while True:
            event = self.conn.next_event()
            if isinstance(event, h11.Event):
                return event
            self.conn.receive_data(await self.reader.read(CHUNK))


async def one_request(port: int, method: str, target: str, **kwargs: Any) -> Reply:
    client = await Client.open(port)
    try:
        return await client.request(method, target, **kwargs)
    finally:
        await client.close()


async def raw_exchange(port: int, data: bytes) -> bytes:
    """Send ``data``, then read until the backend closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    reply = await reader.read()
    writer.close()
    await writer.wait_closed()
    return reply


def pattern(size: int, offset: int = 0) -> bytes:
    return bytes((offset + i) % 256 for i in range(size))


def test_echoes_the_request_as_json(loop_factory: LoopFactory) -> None:
    async def test(port: int) -> None:
        client = await Client.open(port)
        reply = await client.request(
            "POST", "/a/b?x=1&y=%20", [("X-Custom", "A"), ("x-custom", "B")], b"hello"
        )
        local_port = client.writer.get_extra_info("sockname")[1]
        await client.close()
        assert reply.status == 200
        assert reply.headers[b"content-type"] == b"application/json"
        assert reply.json() == {
            "method": "POST",
            "path": "/a/b",
            "query": "x=1&y=%20",
            "headers": [
                ["host", "backend.test"],
                ["x-custom", "A"],
                ["x-custom", "B"],
                ["content-length", "5"],
            ],
            "body_bytes": 5,
            "body_sha256": hashlib.sha256(b"hello").hexdigest(),
            "server": f"demo-backend:{port}",
            "client": f"127.0.0.1:{local_port}",
        }

    run(loop_factory, test)


def test_bytes_streams_the_pattern(loop_factory: LoopFactory) -> None:
    size = 3 * CHUNK + 17

    async def test(port: int) -> tuple[Reply, Reply]:
        return (
            await one_request(port, "GET", f"/blob?bytes={size}"),
            await one_request(port, "GET", "/blob?bytes=0"),
        )

    reply, empty = run(loop_factory, test)
    assert reply.status == 200
    assert reply.headers[b"content-type"] == b"application/octet-stream"
    assert reply.headers[b"content-length"] == str(size).encode()
    assert reply.body == pattern(size)
    assert (empty.status, empty.headers[b"content-length"], empty.body) == (200, b"0", b"")


def test_delay_holds_only_its_own_request(loop_factory: LoopFactory) -> None:
    async def test(port: int) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        slow = asyncio.create_task(one_request(port, "GET", "/?delay=0.3"))
        fast = asyncio.create_task(one_request(port, "GET", "/health"))
        done, _ = await asyncio.wait([slow, fast], return_when=asyncio.FIRST_COMPLETED)
        assert done == {fast}
        assert (await slow).status == 200
        # uvloop's clock and timers work in whole milliseconds: allow for one.
        assert loop.time() - start >= 0.3 - 0.001

    run(loop_factory, test)


@pytest.mark.parametrize(
    ("target", "status", "body"),
    [
        ("/?status=503", 503, None),
        ("/health?status=500", 500, b"ok"),
        ("/health", 200, b"ok"),
        ("/?status=204", 204, b""),
        ("/?status=99", 400, b"status=99: must be 200\xe2\x80\x93599\n"),
        ("/?delay=inf", 400, b"delay=inf: must be 0\xe2\x80\x933600 seconds\n"),
        ("/?bytes=x", 400, None),
    ],
)
def test_status_health_and_bad_parameters(
    loop_factory: LoopFactory, target: str, status: int, body: bytes | None
) -> None:
    async def test(port: int) -> tuple[Reply, Reply]:
        client = await Client.open(port)
        first = await client.request("GET", target)
        second = await client.request("GET", "/health")  # the connection stays usable
        await client.close()
        return first, second

    first, second = run(loop_factory, test)
    assert first.status == status
    if body is not None:
        assert first.body == body
    else:
        assert first.body
    assert (second.status, second.body) == (200, b"ok")


def test_chunked_upload_is_hashed(loop_factory: LoopFactory) -> None:
    chunks = [os.urandom(n) for n in (1, CHUNK, 3 * CHUNK + 5, 0, 77)]

    async def test(port: int) -> Reply:
        headers = [("transfer-encoding", "chunked")]
        return await one_request(port, "PUT", "/up", headers=headers, body=chunks)

    echo = run(loop_factory, test).json()
    whole = b"".join(chunks)
    assert (echo["body_bytes"], echo["body_sha256"]) == (
        len(whole),
        hashlib.sha256(whole).hexdigest(),
    )
    assert ["transfer-encoding", "chunked"] in echo["headers"]


def test_keep_alive_serves_two_requests_on_one_connection(loop_factory: LoopFactory) -> None:
    async def test(port: int) -> tuple[Any, Any]:
        client = await Client.open(port)
        first = (await client.request("GET", "/one")).json()
        second = (await client.request("POST", "/two", body=b"x")).json()
        await client.close()
        return first, second

    first, second = run(loop_factory, test)
    assert (first["path"], second["path"]) == ("/one", "/two")
    assert first["client"] == second["client"]


def test_head_sends_length_but_no_body(loop_factory: LoopFactory) -> None:
    async def test(port: int) -> bytes:
        request = b"HEAD /?bytes=1000 HTTP/1.1\r\nhost: x\r\n\r\n"
        request += b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
        return await raw_exchange(port, request)

    reply = run(loop_factory, test)
    head, rest = reply.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"content-length: 1000" in head
    assert rest.startswith(b"HTTP/1.1 200 OK\r\n") and rest.endswith(b"\r\n\r\nok")


def test_expect_100_continue(loop_factory: LoopFactory) -> None:
    async def test(port: int) -> tuple[bytes, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n"
            b"expect: 100-continue\r\nconnection: close\r\n\r\n"
        )
        interim = await reader.readuntil(b"\r\n\r\n")
        writer.write(b"abc")
        final = await reader.read()
        writer.close()
        await writer.wait_closed()
        return interim, final

    interim, final = run(loop_factory, test)
    assert interim.startswith(b"HTTP/1.1 100 ")
    assert json.loads(final.split(b"\r\n\r\n", 1)[1])["body_bytes"] == 3


@pytest.mark.parametrize(
    "garbage",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: x\r\nbad header\r\n\r\n",
        b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(200) + b"\r\n\r\n",
    ],
)
def test_malformed_request_gets_400_and_close(loop_factory: LoopFactory, garbage: bytes) -> None:
    async def test(port: int) -> tuple[bytes, Reply]:
        reply = await raw_exchange(port, garbage)
        return reply, await one_request(port, "GET", "/health")

    reply, after = run(loop_factory, test)
    assert reply.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"connection: close" in reply
    assert (after.status, after.body) == (200, b"ok")


def test_client_vanishing_mid_body_hurts_nobody(loop_factory: LoopFactory) -> None:
    async def test(port: int) -> Reply:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\nshort")
        await writer.drain()
        writer.transport.abort()
        assert await reader.read() == b""
        return await one_request(port, "GET", "/health")

    assert run(loop_factory, test).body == b"ok"


@pytest.mark.slow
def test_one_gib_streams_with_flat_memory() -> None:
    size = 1 << 30
    expected = memoryview(pattern(4 * CHUNK + 256))

    async def test(port: int) -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET /?bytes={size} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        assert f"content-length: {size}\r\n".encode() in head
        received = 0
        while received < size:
            data = await reader.read(2 * CHUNK)
            assert data, "connection closed early"
            start = received % 256
            assert data == expected[start : start + len(data)]
            received += len(data)
        writer.close()
        await writer.wait_closed()
        return received

    peak_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert run(uvloop.new_event_loop, test) == size
    peak_after_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert peak_after_kib - peak_before_kib < 64 * 1024


def test_run_demo_backend_serves_until_interrupted() -> None:
    code = "from alb_proxy.demo_backend import run_demo_backend; run_demo_backend('127.0.0.1', 0)"
    with subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("demo backend listening on 127.0.0.1:"), line
        port = int(line.rsplit(":", 1)[1])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/x?y=1", timeout=10) as response:
            echo = json.load(response)
        assert (echo["path"], echo["query"], echo["server"]) == (
            "/x",
            "y=1",
            f"demo-backend:{port}",
        )
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=10)
        assert (proc.returncode, stderr) == (0, "")
