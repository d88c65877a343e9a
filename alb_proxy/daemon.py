"""The process: load and validate, bind, serve, and drain on SIGTERM.

Order matters for users: everything that can be refused (config rules, certificate files, keys,
policies) is checked before a single port is bound, so a bad file exits with code 2 and leaves
whatever was running untouched.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from alb_proxy.config.model import Config
from alb_proxy.control.admin import AdminServer
from alb_proxy.control.snapshot import Snapshot, build_snapshot
from alb_proxy.listeners.tcp import TcpListener
from alb_proxy.observability.log import event
from alb_proxy.observability.metrics import Metrics
from alb_proxy.upstream.pool import ConnectionPool

DRAIN_TIMEOUT_S = 30.0


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

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        override = 0 if self.options.ephemeral_ports else None
        for plan in self.snapshot.plans.values():
            listener = TcpListener(plan, self.metrics)
            await listener.start(port_override=override)
            self.listeners[plan.name] = listener
        host, _, port = self.config.admin.listen.rpartition(":")
        admin = AdminServer(host.strip("[]"), int(port), self.metrics, lambda: self._ready)
        await admin.start(port_override=override)
        self._ready = True
        event(
            logging.INFO,
            "ready",
            instance=self.config.instance.name,
            listeners=len(self.listeners),
            generation=self.snapshot.generation,
        )
        self._announce(admin.bound_port)
        await stop.wait()
        event(logging.INFO, "draining", timeout_s=self.options.drain_timeout)
        self._ready = False
        admin.close()
        await asyncio.gather(
            *(x.drain(self.options.drain_timeout) for x in self.listeners.values())
        )
        self.pool.close_all()
        event(logging.INFO, "stopped")
        return 0

    def _announce(self, admin_port: int) -> None:
        if self.options.ready_fd is None:
            return
        ports = {name: x.bound_port for name, x in self.listeners.items()}
        line = json.dumps({"pid": os.getpid(), "listeners": ports, "admin": admin_port}) + "\n"
        with os.fdopen(self.options.ready_fd, "w") as f:
            f.write(line)
