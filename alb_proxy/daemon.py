"""The process: load and validate, bind, serve, apply changes, and drain on SIGTERM.

Order matters for users: everything that can be refused (config rules, certificate files, keys,
policies) is checked before a single port is bound, so a bad file exits with code 2 and leaves
whatever was running untouched.

Where the running state comes from: the first start imports the config file into the store
(``state_dir``). From then on the store is the source of truth, so changes made at runtime
survive a restart; the config file is read again only when the operator says so (SIGHUP, or
``alb-proxy ctl apply -f FILE``), and then the running state is made to match it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import secrets
import signal
from collections.abc import Coroutine
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alb_proxy.config.dump import dump_config
from alb_proxy.config.load import load_config, parse_config
from alb_proxy.config.model import Admin, Config
from alb_proxy.config.rules import check_config
from alb_proxy.control.admin import AdminServer
from alb_proxy.control.api import AdminApi
from alb_proxy.control.plane import ControlPlane
from alb_proxy.control.snapshot import Snapshot, build_snapshot, health_checks
from alb_proxy.control.store import Store, write_atomic
from alb_proxy.control.views import expiring_in_use
from alb_proxy.errors import AlbError, ConfigError
from alb_proxy.listeners.quic import QuicListener, QuicPlan
from alb_proxy.listeners.tcp import ListenerPlan, TcpListener
from alb_proxy.observability.log import event
from alb_proxy.observability.metrics import Metrics
from alb_proxy.upstream.health import HealthRegistry
from alb_proxy.upstream.pool import ConnectionPool

DRAIN_TIMEOUT_S = 30.0
EXPIRY_CHECK_INTERVAL_S = 12 * 3600
TOKEN_ENV = "ALB_ADMIN_TOKEN"


@dataclass(frozen=True)
class RunOptions:
    ephemeral_ports: bool = False
    """Bind every listener and the admin API to a port the OS picks (tests, side-by-side runs)."""
    ready_fd: int | None = None
    """Write one JSON line per state change (ready, reloaded, ...) to this descriptor."""
    drain_timeout: float = DRAIN_TIMEOUT_S


class Daemon:
    def __init__(self, file_config: Config, config_path: Path, options: RunOptions) -> None:
        self.config_path = config_path
        self.options = options
        self.metrics = Metrics()
        self.pool = ConnectionPool()
        self.registry = HealthRegistry(on_change=self._health_changed)
        self.store = Store(file_config.state_dir)
        snapshot = self._initial_snapshot(file_config)
        self.plane = ControlPlane(
            self.store, snapshot, self.pool, self.metrics, self._publish, registry=self.registry
        )
        self.admin_token = _admin_token(file_config.admin, file_config.state_dir)
        self.listeners: dict[str, TcpListener | QuicListener] = {}
        self._ready = False
        self._port_override = 0 if options.ephemeral_ports else None
        self._admin_port = 0
        self._background: set[asyncio.Future[object]] = set()

    @property
    def snapshot(self) -> Snapshot:
        return self.plane.snapshot

    def _initial_snapshot(self, file_config: Config) -> Snapshot:
        """The store's state if the config file is the one it was imported from; otherwise
        the file (first start, or the operator edited it): the last thing touched wins."""
        stored = self.store.latest()
        file_sha = _sha256(self.config_path)
        if stored is not None and self.store.imported_file_sha256() == file_sha:
            config = replace(
                parse_config(stored.body), admin=file_config.admin, state_dir=file_config.state_dir
            )
            problems = check_config(config)
            if problems:
                raise ConfigError(problems)
            event(
                logging.INFO,
                "running state from the store",
                generation=stored.generation,
                state_dir=file_config.state_dir,
            )
            return build_snapshot(
                config,
                self.pool,
                self.metrics,
                registry=self.registry,
                generation=stored.generation,
            )
        generation = 1 if stored is None else stored.generation + 1
        snapshot = build_snapshot(
            file_config, self.pool, self.metrics, registry=self.registry, generation=generation
        )
        if stored is not None:
            event(
                logging.WARNING,
                "config file changed since it was imported: it replaces the running state",
                file=self.config_path,
                superseded_generation=stored.generation,
            )
        self.store.save(
            generation, dump_config(file_config), f"import {self.config_path}", file_sha256=file_sha
        )
        return snapshot

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._in_background(self.reload()))
        await self._publish(self.snapshot)
        self.metrics.config_generation.set(self.snapshot.generation)
        config = self.snapshot.config
        host, _, port = config.admin.listen.rpartition(":")
        api = AdminApi(self, self.admin_token)
        admin = AdminServer(host.strip("[]"), int(port), api)
        try:
            await admin.start(port_override=self._port_override)
        except OSError as exc:
            raise OSError(
                exc.errno, f"admin.listen {config.admin.listen}: {exc.strerror or exc}"
            ) from exc
        self._admin_port = admin.bound_port
        self._ready = True
        event(
            logging.INFO,
            "ready",
            instance=config.instance.name,
            listeners=len(self.listeners),
            generation=self.snapshot.generation,
        )
        self._notify("ready")
        watcher = asyncio.ensure_future(self._watch_expiry())
        await stop.wait()
        watcher.cancel()
        event(logging.INFO, "draining", timeout_s=self.options.drain_timeout)
        self._ready = False
        admin.close()
        await asyncio.gather(
            *(x.drain(self.options.drain_timeout) for x in self.listeners.values())
        )
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.registry.close()
        self.pool.close_all()
        self.store.close()
        event(logging.INFO, "stopped")
        return 0

    @property
    def ready(self) -> bool:
        return self._ready

    def bound_port(self, listener: str) -> int | None:
        running = self.listeners.get(listener)
        return running.bound_port if running is not None else None

    async def reload(self) -> bool:
        """SIGHUP: make the running state match the config file, or change nothing."""
        try:
            config = await asyncio.to_thread(load_config, self.config_path)
            await self.plane.apply_config(
                config, str(self.config_path), file_sha256=_sha256(self.config_path)
            )
        except AlbError as exc:
            self.metrics.config_reloads_total.labels("refused").inc()
            problems = (
                [str(p) for p in exc.problems] if isinstance(exc, ConfigError) else [str(exc)]
            )
            for problem in problems:
                event(logging.ERROR, "reload refused", problem=problem)
            self._notify("reload_refused", problems=problems)
            return False
        self.metrics.config_reloads_total.labels("applied").inc()
        event(logging.INFO, "config reloaded", generation=self.snapshot.generation)
        self._notify("reloaded")
        return True

    async def _watch_expiry(self) -> None:
        """Tell operators before they are hurt: in-use certificates near expiry, twice a day."""
        while True:
            await asyncio.sleep(EXPIRY_CHECK_INTERVAL_S)
            _warn_expiring(self.snapshot)

    async def _publish(self, snapshot: Snapshot) -> None:
        """Swap plans in place where a listener keeps its address; bind or release the rest.

        New connections take the new plan; established ones keep the plan they started with.
        QUIC listeners go first so HTTPS listeners can advertise their bound port (Alt-Svc).
        """
        _warn_expiring(snapshot)
        self.registry.reconcile(health_checks(snapshot.config))
        for group in snapshot.config.server_groups:
            for server in group.servers:
                healthy = self.registry.is_healthy(server.address)
                self.metrics.server_healthy.labels(server.address).set(1 if healthy else 0)
        stale = [
            name
            for name, running in self.listeners.items()
            if name not in snapshot.plans
            or _address(running.plan) != _address(snapshot.plans[name])
        ]
        # Bind what is new first: if a port is taken, nothing has changed yet.
        quic_first = sorted(snapshot.plans.values(), key=lambda p: not isinstance(p, QuicPlan))
        started: dict[str, TcpListener | QuicListener] = {}
        try:
            for plan in quic_first:
                if plan.name in self.listeners and plan.name not in stale:
                    continue
                listener: TcpListener | QuicListener = (
                    QuicListener(plan, self.metrics)
                    if isinstance(plan, QuicPlan)
                    else TcpListener(plan, self.metrics)
                )
                await listener.start(port_override=self._port_override)
                started[plan.name] = listener
        except OSError:
            for listener in started.values():
                listener.stop_accepting()
            raise
        for name in stale:
            gone = self.listeners.pop(name)
            gone.stop_accepting()
            self._in_background(gone.drain(self.options.drain_timeout))
            event(logging.INFO, "listener released", listener=name)
        self.listeners.update(started)
        for plan in quic_first:
            if isinstance(plan, ListenerPlan) and plan.quic_upgrade:
                plan = self._with_alt_svc(plan)
            self.listeners[plan.name].plan = plan  # new connections only

    def _with_alt_svc(self, plan: ListenerPlan) -> ListenerPlan:
        quic = self.listeners.get(plan.quic_upgrade or "")
        if not isinstance(quic, QuicListener):
            return plan
        alt_svc = (b"alt-svc", f'h3=":{quic.bound_port}"; ma=86400'.encode())
        route = replace(plan.route, response_headers=(*plan.route.response_headers, alt_svc))
        return replace(plan, route=route)

    def _health_changed(self, address: str, healthy: bool, reason: str) -> None:
        self.metrics.server_healthy.labels(address).set(1 if healthy else 0)
        event(
            logging.INFO if healthy else logging.WARNING,
            "server healthy" if healthy else "server unhealthy",
            server=address,
            reason=reason,
        )

    def _in_background(self, work: Coroutine[Any, Any, object]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

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


def _warn_expiring(snapshot: Snapshot) -> None:
    for cert_id, users, left in expiring_in_use(snapshot, datetime.now(UTC)):
        event(
            logging.WARNING,
            "certificate expires soon",
            certificate=cert_id,
            listeners=",".join(users),
            days_left=left,
        )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _address(plan: ListenerPlan | QuicPlan) -> tuple[str, str, int]:
    return (plan.protocol, plan.bind, plan.port)


def _admin_token(admin: Admin, state_dir: Path) -> str:
    """``ALB_ADMIN_TOKEN``, else ``admin.token_file``, else one generated once and kept in
    ``state_dir/admin.token`` (0600) for local tools; the token itself is never logged."""
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV]
    path = admin.token_file or state_dir / "admin.token"
    if path.exists():
        token = path.read_text().strip()
        if not token:
            raise AlbError(f"admin token file {path} is empty")
        return token
    if admin.token_file is not None:
        raise AlbError(f"admin.token_file: {path} does not exist")
    token = secrets.token_urlsafe(32)
    write_atomic(path, (token + "\n").encode(), 0o600)
    event(logging.INFO, "admin token generated", file=path)
    return token
