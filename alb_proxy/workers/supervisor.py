"""The control plane's side of the worker processes: start them, feed them, replace them.

Theory of operation
-------------------
Every worker gets every publication (generation, the validated config as data, and each
listener's socket token and port), and the sockets of its slot the first time they appear. A
publication is done when every live worker has answered that it serves it: an accepted change
is then seen by the next handshake in every process, and the admin API answers only after that.

A worker that exits is replaced (at once the first time, then with a growing pause while it
keeps dying young, so a worker that cannot start does not spin). The replacement gets the
current publication and its slot's sockets, which the control plane kept open: connections the
kernel queued on them meanwhile are served, not reset. A worker that does not answer a
publication in time is killed and replaced the same way, so every worker converges on the
current state or is visibly being restarted (``alb_worker_restarts_total``, a log line).

Metrics: ``/metrics`` asks every worker for its samples and merges them (``merge.py``). The
counters of a worker that died are kept as last scraped, so totals do not go backwards.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import logging
import os
import socket
import sys
import sysconfig
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import alb_proxy
from alb_proxy.errors import AlbError
from alb_proxy.listeners.sockets import BoundSet
from alb_proxy.observability.log import event
from alb_proxy.observability.merge import Family, merge
from alb_proxy.observability.metrics import Metrics
from alb_proxy.workers.channel import MAX_FDS, Channel, Message

PUBLISH_TIMEOUT_S = 30.0
"""A worker that has not applied a publication by then is killed and replaced."""
REQUEST_TIMEOUT_S = 5.0
"""For metrics and status requests."""
YOUNG_S = 10.0
"""A worker that dies younger than this is restarted after a growing pause."""
MAX_PAUSE_S = 30.0


@dataclass(frozen=True)
class Publication:
    generation: int
    config: dict[str, Any]
    """The validated config, as ``dump_config`` writes it."""
    sockets: Mapping[str, BoundSet]
    material: Mapping[str, bytes] = field(default_factory=dict, repr=False)
    """The certificate and key bytes the generation is built from (``control.snapshot``)."""


@dataclass
class _Worker:
    slot: int
    process: asyncio.subprocess.Process
    channel: Channel
    started: float
    generation: int | None = None
    """The generation it acknowledged last."""
    tokens: set[int] = field(default_factory=set)
    """Sockets already sent to it."""
    replies: dict[int, asyncio.Future[Message]] = field(default_factory=dict)
    last_families: list[Family] = field(default_factory=list)


class Workers:
    def __init__(
        self,
        count: int,
        metrics: Metrics,
        *,
        log_level: str,
        drain_timeout: float,
        on_replaced: Callable[[int, int], None] | None = None,
    ) -> None:
        self.count = count
        self._on_replaced = on_replaced
        """Called with (slot, pid) once a replacement serves the current publication."""
        self._metrics = metrics
        self._log_level = log_level
        self._drain_timeout = drain_timeout
        self._slots: dict[int, _Worker] = {}
        self._current: Publication | None = None
        self._ids = itertools.count(1)
        self._stopping = False
        self._young_deaths = [0] * count
        self._retired: list[Family] = []
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def pids(self) -> list[int]:
        return [w.process.pid for _, w in sorted(self._slots.items())]

    async def start(self, publication: Publication) -> None:
        """Start every worker on ``publication``; returns once all of them serve it."""
        self._current = publication
        started = await asyncio.gather(*(self._spawn(slot) for slot in range(self.count)))
        served = await asyncio.gather(*(self._deliver(w, publication) for w in started))
        if not all(served):
            await self.stop()
            raise AlbError("a worker process failed to start (its log lines say why)")
        self._update_gauge()

    async def publish(self, publication: Publication) -> None:
        """Every live worker serves ``publication`` when this returns."""
        self._current = publication
        workers = list(self._slots.values())
        await asyncio.gather(*(self._deliver(w, publication) for w in workers))
        self._update_gauge()

    async def scrape(self) -> list[Family]:
        """The merged samples of every worker (and of those that died)."""
        workers = list(self._slots.values())
        replies = await asyncio.gather(
            *(self._request(w, {"type": "metrics"}, REQUEST_TIMEOUT_S) for w in workers),
            return_exceptions=True,
        )
        live = []
        for worker, reply in zip(workers, replies, strict=True):
            if isinstance(reply, dict) and reply.get("ok"):
                worker.last_families = reply["families"]
            live.append(worker.last_families)
        return merge([self._retired, *live])

    async def status(self) -> list[dict[str, Any]]:
        workers = [w for _, w in sorted(self._slots.items())]
        replies = await asyncio.gather(
            *(self._request(w, {"type": "status"}, REQUEST_TIMEOUT_S) for w in workers),
            return_exceptions=True,
        )
        now = time.monotonic()
        return [
            {
                "slot": w.slot,
                "pid": w.process.pid,
                "generation": w.generation,
                "uptime_s": round(now - w.started, 1),
                **{
                    key: reply.get(key) if isinstance(reply, dict) else None
                    for key in ("listeners", "connections")
                },
            }
            for w, reply in zip(workers, replies, strict=True)
        ]

    async def stop(self) -> None:
        """SIGTERM every worker (each drains), wait, kill what outlives the drain timeout."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        workers = list(self._slots.values())
        for worker in workers:
            if worker.process.returncode is None:
                worker.process.terminate()
        waits = [asyncio.ensure_future(w.process.wait()) for w in workers]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=self._drain_timeout + 5)
            for worker in workers:
                if worker.process.returncode is None:
                    worker.process.kill()
            await asyncio.gather(*pending, return_exceptions=True)
        for worker in workers:
            worker.channel.close()

    # -- one worker --------------------------------------------------------------------------

    async def _spawn(self, slot: int) -> _Worker:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-P",  # not the working directory's alb_proxy: the one this process runs
                "-m",
                "alb_proxy",
                "worker",
                "--slot",
                str(slot),
                "--channel-fd",
                str(theirs.fileno()),
                "--log-level",
                self._log_level,
                "--drain-timeout",
                str(self._drain_timeout),
                pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
                env=_worker_environment(),
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        holder: list[_Worker] = []
        channel = Channel(
            ours,
            lambda message, socks: self._received(holder[0], message, socks),
            lambda exc: self._channel_closed(holder[0], exc),
        )
        worker = _Worker(slot, process, channel, time.monotonic())
        holder.append(worker)
        self._slots[slot] = worker
        self._background(self._watch(worker))
        event(logging.INFO, "worker started", worker=slot, pid=process.pid)
        return worker

    async def _deliver(self, worker: _Worker, publication: Publication) -> bool:
        """Send ``publication`` (and the sockets ``worker`` has not had) and await its answer;
        a worker that does not apply it is killed (and replaced)."""
        new = [
            (bound.token, sock)
            for bound in publication.sockets.values()
            if bound.token not in worker.tokens and (sock := bound.sock_for(worker.slot))
        ]
        for start in range(0, len(new), MAX_FDS):
            chunk = new[start : start + MAX_FDS]
            worker.channel.send(
                {"type": "sockets", "tokens": [t for t, _ in chunk]}, [s for _, s in chunk]
            )
        worker.tokens = {bound.token for bound in publication.sockets.values()}
        message = {
            "type": "publish",
            "generation": publication.generation,
            "config": publication.config,
            # Over the worker's private socket pair only; never logged.
            "material": {
                path: base64.b64encode(data).decode("ascii")
                for path, data in publication.material.items()
            },
            "bindings": {
                name: [bound.token, bound.port, bound.sock_for(worker.slot) is not None]
                for name, bound in publication.sockets.items()
            },
        }
        try:
            reply = await self._request(worker, message, PUBLISH_TIMEOUT_S)
        except (TimeoutError, ConnectionError) as exc:
            reply = {"ok": False, "error": str(exc) or type(exc).__name__}
        if reply.get("ok"):
            worker.generation = publication.generation
            return True
        if worker.process.returncode is None and not self._stopping:
            event(
                logging.ERROR,
                "worker did not apply a publication: replacing it",
                worker=worker.slot,
                pid=worker.process.pid,
                generation=publication.generation,
                error=reply.get("error"),
            )
            worker.process.kill()
        return False

    async def _request(self, worker: _Worker, message: Message, timeout: float) -> Message:
        if worker.channel.closed:
            raise ConnectionError(f"worker {worker.slot} is gone")
        request_id = next(self._ids)
        reply: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        worker.replies[request_id] = reply
        worker.channel.send({**message, "id": request_id})
        try:
            return await asyncio.wait_for(reply, timeout)
        finally:
            worker.replies.pop(request_id, None)

    def _received(self, worker: _Worker, message: Message, socks: list[socket.socket]) -> None:
        for sock in socks:
            sock.close()  # workers send none
        reply = worker.replies.get(message.get("id", -1))
        if message["type"] == "reply" and reply is not None and not reply.done():
            reply.set_result(message)

    def _channel_closed(self, worker: _Worker, exc: Exception | None) -> None:
        for reply in worker.replies.values():
            if not reply.done():
                reply.set_exception(ConnectionError(f"worker {worker.slot} is gone"))
        if worker.process.returncode is None and not self._stopping:
            worker.process.kill()  # a worker without its channel cannot be told anything

    async def _watch(self, worker: _Worker) -> None:
        code = await worker.process.wait()
        worker.channel.close()
        if self._stopping or self._slots.get(worker.slot) is not worker:
            return
        del self._slots[worker.slot]
        self._retire(worker)
        self._metrics.worker_restarts_total.inc()
        self._update_gauge()
        lived = time.monotonic() - worker.started
        young = self._young_deaths[worker.slot] = (
            self._young_deaths[worker.slot] + 1 if lived < YOUNG_S else 0
        )
        pause = 0.0 if young <= 1 else min(MAX_PAUSE_S, 0.5 * 2 ** (young - 2))
        event(
            logging.WARNING,
            "worker exited: replacing it",
            worker=worker.slot,
            pid=worker.process.pid,
            code=code,
            after_s=round(pause, 1),
        )
        while not self._stopping and self._current is not None:
            await asyncio.sleep(pause)
            try:
                replacement = await self._spawn(worker.slot)
            except OSError as exc:
                pause = MAX_PAUSE_S
                event(logging.ERROR, "cannot start a worker", worker=worker.slot, error=exc)
                continue
            if await self._deliver(replacement, self._current) and self._on_replaced:
                self._on_replaced(replacement.slot, replacement.process.pid)
            self._update_gauge()
            return

    def _retire(self, worker: _Worker) -> None:
        """Keep a dead worker's counters (not its gauges: what they counted is gone)."""
        kept = [f for f in worker.last_families if f["type"] in ("counter", "histogram")]
        self._retired = merge([self._retired, kept])

    def _update_gauge(self) -> None:
        current = self._current.generation if self._current else None
        serving = sum(1 for w in self._slots.values() if w.generation == current)
        self._metrics.workers.set(serving)

    def _background(self, work: Any) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _worker_environment() -> dict[str, str]:
    """The environment a worker starts with: it must import the alb_proxy this process imported
    (the installed, compiled package; or a source tree run as ``python -m alb_proxy``), not
    whatever its working directory holds. ``-P`` keeps the working directory off its path; a
    package outside the interpreter's site directories has its parent put first."""
    env = dict(os.environ)
    root = str(Path(alb_proxy.__file__).resolve().parent.parent)
    site = {str(Path(sysconfig.get_path(name)).resolve()) for name in ("purelib", "platlib")}
    if root not in site:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env
