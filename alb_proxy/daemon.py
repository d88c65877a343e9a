"""The process: load and validate, bind, serve, and drain on SIGTERM.

Order matters for users: everything that can be refused (config rules, certificate files, keys,
policies) is checked before a single port is bound, so a bad file exits with code 2 and leaves
whatever was running untouched.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alb_proxy.config.load import load_config
from alb_proxy.config.model import Config
from alb_proxy.control.admin import AdminServer
from alb_proxy.control.snapshot import Snapshot, build_snapshot
from alb_proxy.errors import ConfigError
from alb_proxy.listeners.tcp import ListenerPlan, TcpListener
from alb_proxy.observability.log import event
from alb_proxy.observability.metrics import Metrics
from alb_proxy.upstream.pool import ConnectionPool

DRAIN_TIMEOUT_S = 30.0


def _address(plan: ListenerPlan) -> tuple[str, str, int]:
    return (plan.protocol, plan.bind, plan.port)


@dataclass(frozen=True)
class RunOptions:
    ephemeral_ports: bool = False
    """Bind every listener and the admin API to a port the OS picks (tests, side-by-side runs)."""
    ready_fd: int | None = None
    """Write one JSON line with the bound ports to this descriptor once serving."""
    drain_timeout: float = DRAIN_TIMEOUT_S


class Daemon:
    def __init__(self, config: Config, config_path: Path, options: RunOptions) -> None:
        self.config = config
        self.config_path = config_path
        self.options = options
        self.metrics = Metrics()
        self.pool = ConnectionPool()
        self.snapshot: Snapshot = build_snapshot(config, self.pool, self.metrics)
        self.listeners: dict[str, TcpListener] = {}
        self._ready = False
        self._port_override = 0 if options.ephemeral_ports else None
        self._admin_port = 0
        self._changes = asyncio.Lock()
        self._background: set[asyncio.Future[object]] = set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._schedule_reload)
        async with self._changes:  # a SIGHUP during start-up waits for it
            for plan in self.snapshot.plans.values():
                await self._start_listener(plan)
        self.metrics.config_generation.set(self.snapshot.generation)
        host, _, port = self.config.admin.listen.rpartition(":")
        admin = AdminServer(host.strip("[]"), int(port), self.metrics, lambda: self._ready)
        await admin.start(port_override=self._port_override)
        self._ready = True
        event(
            logging.INFO,
            "ready",
            instance=self.config.instance.name,
            listeners=len(self.listeners),
            generation=self.snapshot.generation,
        )
        self._admin_port = admin.bound_port
        self._notify("ready")
        await stop.wait()
        event(logging.INFO, "draining", timeout_s=self.options.drain_timeout)
        self._ready = False
        admin.close()
        await asyncio.gather(
            *(x.drain(self.options.drain_timeout) for x in self.listeners.values())
        )
        await asyncio.gather(*self._background, return_exceptions=True)
        self.pool.close_all()
        event(logging.INFO, "stopped")
        return 0

    async def _start_listener(self, plan: ListenerPlan) -> None:
        listener = TcpListener(plan, self.metrics)
        await listener.start(port_override=self._port_override)
        self.listeners[plan.name] = listener

    def _schedule_reload(self) -> None:
        self._in_background(self.reload())

    def _in_background(self, work: Coroutine[Any, Any, object]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def reload(self) -> bool:
        """SIGHUP: re-read the config file; validate and build beside the running snapshot,
        then swap. A refused file changes nothing and says why."""
        async with self._changes:
            try:
                config = await asyncio.to_thread(load_config, self.config_path)
                snapshot = await asyncio.to_thread(build_snapshot, config, self.pool, self.metrics)
            except ConfigError as exc:
                self.metrics.config_reloads_total.labels("refused").inc()
                for problem in exc.problems:
                    event(logging.ERROR, "reload refused", problem=str(problem))
                self._notify("reload_refused", problems=[str(p) for p in exc.problems])
                return False
            await self._apply(snapshot)
            self.metrics.config_reloads_total.labels("applied").inc()
            event(logging.INFO, "config reloaded", generation=snapshot.generation)
            self._notify("reloaded")
            return True

    async def _apply(self, snapshot: Snapshot) -> None:
        """Swap plans in place where a listener keeps its address; rebind where it moved."""
        stale = [
            name
            for name, listener in self.listeners.items()
            if name not in snapshot.plans
            or _address(listener.plan) != _address(snapshot.plans[name])
        ]
        for name in stale:
            listener = self.listeners.pop(name)
            listener.stop_accepting()
            self._in_background(listener.drain(self.options.drain_timeout))
        for name, plan in snapshot.plans.items():
            if name in self.listeners:
                self.listeners[name].plan = plan  # new connections only; open ones keep theirs
            else:
                await self._start_listener(plan)
        self.snapshot = snapshot
        self.config = snapshot.config
        self.metrics.config_generation.set(snapshot.generation)

    def _notify(self, state: str, **extra: object) -> None:
        """One JSON line per state change on ``--ready-fd`` (like sd_notify): ``ready`` with
        the bound ports once serving, then ``reloaded`` or ``reload_refused`` per SIGHUP."""
        if self.options.ready_fd is None:
            return
        ports = {name: x.bound_port for name, x in self.listeners.items()}
        line = {
            "state": state,
            "pid": os.getpid(),
            "generation": self.snapshot.generation,
            "listeners": ports,
            "admin": self._admin_port,
            **extra,
        }
        try:
            os.write(self.options.ready_fd, (json.dumps(line) + "\n").encode())
        except OSError:
            self.options = dataclasses.replace(self.options, ready_fd=None)  # reader went away
