"""A worker process: one data plane on its own uvloop, driven by the control plane.

The supervisor starts it as ``python -m alb_proxy worker --slot N --channel-fd FD`` and talks
to it over that channel (``channel.py``), in order:

- ``sockets`` ``{tokens}`` with descriptors: listening sockets this worker may be told to serve;
- ``publish`` ``{id, generation, config, bindings: {name: [token, port, serve]}}``: build the
  snapshot of ``config`` (already validated by the control plane; built again here because SSL
  contexts cannot cross a process boundary) and serve it; sockets the publication no longer
  names are closed;
- ``metrics`` / ``status`` ``{id}``: answered at once, even while a publication is being built.

Every request is answered with ``{"type": "reply", "id": ..., "ok": ...}``. SIGTERM (or SIGINT)
drains and exits 0; SIGHUP is the control plane's business and is ignored here. A worker whose
channel closes has lost its control plane: it drains and exits too, so no orphan keeps a port.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import signal
import socket
from typing import Any

from alb_proxy.config.load import parse_config
from alb_proxy.dataplane import DataPlane
from alb_proxy.errors import AlbError
from alb_proxy.listeners.sockets import Binding
from alb_proxy.observability.log import event
from alb_proxy.observability.merge import families
from alb_proxy.observability.metrics import Metrics
from alb_proxy.workers.channel import Channel, Message


class Worker:
    def __init__(self, slot: int, channel_sock: socket.socket, drain_timeout: float) -> None:
        self.slot = slot
        self.metrics = Metrics()
        self.dataplane = DataPlane(self.metrics, drain_timeout)
        self._sockets: dict[int, socket.socket] = {}
        self._queue: asyncio.Queue[tuple[Message, list[socket.socket]]] = asyncio.Queue()
        self._stop = asyncio.Event()
        self._channel = Channel(channel_sock, self._received, self._channel_closed)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: None)
        applier = asyncio.ensure_future(self._apply_in_order())
        await self._stop.wait()
        applier.cancel()
        # The listeners serve duplicates of these: closing them now, with the control plane's
        # copies already closed, lets the kernel refuse new connections during the drain
        # instead of queueing them where nobody will accept them.
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()
        await self.dataplane.drain()
        self._channel.close()
        return 0

    def _received(self, message: Message, socks: list[socket.socket]) -> None:
        kind = message["type"]
        if kind == "metrics":
            self._reply(message, families=families(self.metrics.registry))
        elif kind == "status":
            self._reply(
                message,
                pid=os.getpid(),
                generation=self.dataplane.generation,
                listeners=list(self.dataplane.serving),
                connections=self.metrics.accepted(),
            )
        elif kind in ("sockets", "publish"):
            self._queue.put_nowait((message, socks))  # applied in the order sent
        else:
            for sock in socks:
                sock.close()
            self._reply(message, ok=False, error=f"unknown message type {kind!r}")

    async def _apply_in_order(self) -> None:
        while True:
            message, socks = await self._queue.get()
            if message["type"] == "sockets":
                self._sockets.update(zip(message["tokens"], socks, strict=True))
                continue
            try:
                await self._publish(message)
            except (AlbError, OSError, ValueError) as exc:
                event(logging.ERROR, "publication refused", error=str(exc))
                self._reply(message, ok=False, error=str(exc))
            else:
                self._reply(message, generation=message["generation"])

    async def _publish(self, message: Message) -> None:
        generation: int = message["generation"]
        config = parse_config(message["config"])
        material = {path: base64.b64decode(data) for path, data in message["material"].items()}
        snapshot = await asyncio.to_thread(
            self.dataplane.build, config, generation, material, log_warnings=False
        )
        bindings = {
            name: Binding(token, port, self._sockets.get(token) if serve else None)
            for name, (token, port, serve) in message["bindings"].items()
        }
        await self.dataplane.publish(snapshot, bindings)
        named = {binding.token for binding in bindings.values()}
        for token in [t for t in self._sockets if t not in named]:
            self._sockets.pop(token).close()

    def _reply(self, request: Message, ok: bool = True, **values: Any) -> None:
        self._channel.send({"type": "reply", "id": request.get("id"), "ok": ok, **values})

    def _channel_closed(self, exc: Exception | None) -> None:
        if not self._stop.is_set():
            event(logging.WARNING, "control plane gone: draining", error=exc)
            self._stop.set()


async def serve_worker(slot: int, channel_fd: int, drain_timeout: float) -> int:
    worker = Worker(slot, socket.socket(fileno=channel_fd), drain_timeout)
    return await worker.run()
