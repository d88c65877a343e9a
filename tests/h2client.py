"""A blocking HTTP/2 client on the ``h2`` library for tests: many streams on one connection."""

from __future__ import annotations

import select
import socket
import ssl
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events


@dataclass
class Stream:
    status: int = 0
    headers: dict[bytes, bytes] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    trailers: dict[bytes, bytes] = field(default_factory=dict)
    ended: bool = False
    reset: bool = False


class H2Client:
    def __init__(self, port: int, server_name: str | None = "localhost") -> None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.set_alpn_protocols(["h2"])
        raw = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock = ctx.wrap_socket(raw, server_hostname=server_name)
        assert self.sock.selected_alpn_protocol() == "h2"
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.conn.initiate_connection()
        self.streams: dict[int, Stream] = {}
        self.goaway = False
        self.goaway_code: int | None = None
        self.closed = False
        """The server closed the connection (or reset it)."""
        self._flush()

    def request(
        self,
        path: str,
        authority: str = "localhost",
        method: str = "GET",
        body: bytes | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        self.streams[stream_id] = Stream()
        self.conn.send_headers(
            stream_id,
            [
                (b":method", method.encode()),
                (b":scheme", b"https"),
                (b":authority", authority.encode()),
                (b":path", path.encode()),
                *(headers or []),
            ],
            end_stream=body is None,
        )
        if body is not None:
            self._send_body(stream_id, body)
        self._flush()
        return stream_id

    def _send_body(self, stream_id: int, body: bytes) -> None:
        view = memoryview(body)
        while view:
            window = min(
                self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size
            )
            if window <= 0:
                self._flush()
                self._pump()
                continue
            self.conn.send_data(stream_id, bytes(view[:window]))
            view = view[window:]
        self.conn.end_stream(stream_id)

    def reset(self, stream_id: int) -> None:
        self.conn.reset_stream(stream_id)
        self.streams[stream_id].reset = True
        self._flush()

    def wait(self, *stream_ids: int) -> None:
        """Read until every given stream (default: all) has ended or was reset."""
        wanted = stream_ids or tuple(self.streams)
        while not all(self.streams[s].ended or self.streams[s].reset for s in wanted):
            if not self._pump():
                break

    def ping_flood(self, count: int) -> None:
        """``count`` PING frames in one write; their ACKs are not read."""
        for i in range(count):
            self.conn.ping(i.to_bytes(8, "big"))
        self._flush()

    def settings_flood(self, count: int) -> None:
        """``count`` SETTINGS frames (each changing nothing) in one write."""
        for _ in range(count):
            self.conn.update_settings({})
        self._flush()

    def rapid_reset(self, count: int, path: str = "/", authority: str = "localhost") -> None:
        """CVE-2023-44487: ``count`` streams, each opened and at once reset, in one write."""
        for _ in range(count):
            stream_id = self.conn.get_next_available_stream_id()
            self.conn.send_headers(
                stream_id,
                [
                    (b":method", b"GET"),
                    (b":scheme", b"https"),
                    (b":authority", authority.encode()),
                    (b":path", path.encode()),
                ],
                end_stream=True,
            )
            self.conn.reset_stream(stream_id)
        self._flush()

    def read_ready(self) -> None:
        """Take in what the server has sent so far, without waiting for more."""
        while not self.closed and (self.sock.pending() or select.select([self.sock], [], [], 0)[0]):
            self._pump()

    def read_until_goaway(self) -> None:
        """Read until the server sends GOAWAY or closes the connection."""
        while not self.goaway and not self.closed:
            self._pump()

    def _pump(self) -> bool:
        try:
            data = self.sock.recv(65536)
        except (ConnectionError, ssl.SSLError):
            data = b""
        if not data:
            self.closed = True
            return False
        for ev in self.conn.receive_data(data):
            stream = self.streams.get(getattr(ev, "stream_id", 0) or 0)
            if isinstance(ev, h2.events.ResponseReceived) and stream:
                for name, value in ev.headers or []:
                    if name == b":status":
                        stream.status = int(value)
                    else:
                        stream.headers[name] = value
            elif isinstance(ev, h2.events.TrailersReceived) and stream:
                stream.trailers.update(ev.headers or [])
            elif isinstance(ev, h2.events.DataReceived) and stream:
                stream.body += ev.data or b""
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded) and stream:
                stream.ended = True
            elif isinstance(ev, h2.events.StreamReset) and stream:
                stream.reset = True
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.goaway = True
                self.goaway_code = ev.error_code
        self._flush()
        return True

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.closed:
            self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()
