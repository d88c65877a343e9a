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
import time
from collections.abc import Coroutine
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alb_proxy import build
from alb_proxy.config.dump import dump_config
from alb_proxy.config.load import load_config, parse_config
from alb_proxy.config.model import Admin, Config
from alb_proxy.config.rules import MAX_WORKERS, check_config
from alb_proxy.control.admin import AdminServer
from alb_proxy.control.api import AdminApi
from alb_proxy.control.plane import Build, ControlPlane, with_uploads
from alb_proxy.control.snapshot import Material, Snapshot, build_snapshot
from alb_proxy.control.store import Store, write_atomic
from alb_proxy.control.views import expiring_in_use
from alb_proxy.dataplane import DataPlane
from alb_proxy.errors import AlbError, ConfigError
from alb_proxy.listeners.sockets import ListenerSockets, bindings
from alb_proxy.observability.log import event
from alb_proxy.observability.merge import families, merge, render
from alb_proxy.observability.metrics import Metrics
from alb_proxy.upstream.health import HealthRegistry
from alb_proxy.upstream.pool import ConnectionPool
from alb_proxy.workers.supervisor import Publication, Workers

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
    log_level: str = "INFO"
    """Passed on to worker processes."""


class Daemon:
    """The control plane process: store, admin API, signals, and the sockets of every port.

    With ``workers: 1`` it serves the traffic itself (one ``DataPlane`` in this process);
    otherwise it serves none and drives N worker processes, each with its own data plane on the
    same sockets (``workers/``). Either way a change is validated and built here first, so a
    refused change never reaches a data plane.
    """

    def __init__(self, file_config: Config, config_path: Path, options: RunOptions) -> None:
        self.config_path = config_path
        self.options = options
        self.metrics = Metrics()
        self.store = Store(file_config.state_dir)
        count = worker_count(file_config.workers)
        self.dataplane: DataPlane | None = None
        self.workers: Workers | None = None
        build: Build
        if count == 1:
            self.dataplane = DataPlane(self.metrics, options.drain_timeout)
            build = self.dataplane.build
        else:
            self.workers = Workers(
                count,
                self.metrics,
                log_level=options.log_level,
                drain_timeout=options.drain_timeout,
                on_replaced=lambda slot, pid: self._notify(
                    "worker_replaced", worker_slot=slot, worker_pid=pid
                ),
            )
            build = self._validate
        self.sockets = ListenerSockets(count, ephemeral=options.ephemeral_ports)
        snapshot = self._initial_snapshot(file_config, build)
        self.plane = ControlPlane(self.store, snapshot, build, self._publish, self.metrics)
        self.admin_token = _admin_token(file_config.admin, file_config.state_dir)
        self._ready = False
        self._started = time.monotonic()
        self._workers_started = False
        self._admin_port = 0
        self._background: set[asyncio.Future[object]] = set()

    @property
    def snapshot(self) -> Snapshot:
        return self.plane.snapshot

    def _validate(self, config: Config, generation: int, material: Material | None) -> Snapshot:
        """With workers, the control plane's own build only proves the config can be served
        (every certificate, key and SSL context); each worker builds the snapshot it serves
        from the same bytes."""
        return build_snapshot(
            config,
            ConnectionPool(),
            self.metrics,
            registry=HealthRegistry(),
            generation=generation,
            material=material,
        )

    def _initial_snapshot(self, file_config: Config, build: Build) -> Snapshot:
        """The store's state, unless the config file changed since it was imported and no
        change was made at runtime since then (nothing is lost by importing the file); a first
        start imports the file. Runtime changes are never dropped by a restart: an edited file
        is then only applied on request (SIGHUP, ``ctl apply -f``)."""
        stored = self.store.latest()
        file_sha = _sha256(self.config_path)
        file_changed = stored is not None and self.store.imported_file_sha256() != file_sha
        runtime_changes = stored is not None and not stored.operation.startswith(
            ("import ", "apply ")
        )
        if file_changed and runtime_changes:
            event(
                logging.WARNING,
                "config file changed since it was imported, but changes were made at runtime "
                "since: serving the store's state; SIGHUP or `alb-proxy ctl apply -f FILE` "
                "applies the file",
                file=self.config_path,
            )
        if stored is not None and (not file_changed or runtime_changes):
            config = replace(
                parse_config(stored.body),
                admin=file_config.admin,
                state_dir=file_config.state_dir,
                workers=file_config.workers,
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
            return build(config, stored.generation, None)
        generation = 1 if stored is None else stored.generation + 1
        file_config = with_uploads(file_config, self.store)
        snapshot = build(file_config, generation, None)
        if stored is not None:
            event(
                logging.WARNING,
                "config file changed since it was imported, and nothing was changed at runtime "
                "since: it replaces the running state",
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
        config = self.snapshot.config
        host, _, port = config.admin.listen.rpartition(":")
        admin = AdminServer(host.strip("[]"), int(port), AdminApi(self, self.admin_token))
        try:
            await self._publish(self.snapshot)
            self.metrics.config_generation.set(self.snapshot.generation)
            try:
                await admin.start(port_override=0 if self.options.ephemeral_ports else None)
            except OSError as exc:
                raise OSError(
                    exc.errno, f"admin.listen {config.admin.listen}: {exc.strerror or exc}"
                ) from exc
        except BaseException:
            self.sockets.close()
            if self.workers is not None:
                await self.workers.stop()
            raise
        self._admin_port = admin.bound_port
        self._ready = True
        event(
            logging.INFO,
            "ready",
            instance=config.instance.name,
            listeners=len(self.sockets.current),
            workers=len(self.workers.pids) if self.workers else 1,
            generation=self.snapshot.generation,
            build=build(),
        )
        self._notify("ready")
        watcher = asyncio.ensure_future(self._watch_expiry())
        await stop.wait()
        watcher.cancel()
        event(logging.INFO, "draining", timeout_s=self.options.drain_timeout)
        self._ready = False
        admin.close()
        self.sockets.close()  # stop accepting: the data planes hold the only other copies
        if self.dataplane is not None:
            await self.dataplane.drain()
        if self.workers is not None:
            await self.workers.stop()
        await asyncio.gather(*self._background, return_exceptions=True)
        self.store.close()
        event(logging.INFO, "stopped")
        return 0

    @property
    def ready(self) -> bool:
        return self._ready

    def bound_port(self, listener: str) -> int | None:
        bound = self.sockets.current.get(listener)
        return bound.port if bound is not None else None

    async def render_metrics(self) -> bytes:
        if self.workers is None:
            return self.metrics.render()
        return render(merge([families(self.metrics.registry), await self.workers.scrape()]))

    async def worker_status(self) -> list[dict[str, object]]:
        if self.workers is not None:
            return await self.workers.status()
        assert self.dataplane is not None
        return [
            {
                "slot": 0,
                "pid": os.getpid(),
                "generation": self.dataplane.generation,
                "uptime_s": round(time.monotonic() - self._started, 1),
                "listeners": list(self.dataplane.serving),
                "connections": self.metrics.accepted(),
            }
        ]

    async def reload(self) -> bool:
        """SIGHUP: make the running state match the config file, or change nothing."""
        try:
            config = await asyncio.to_thread(load_config, self.config_path, check=False)
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
        """Bind what is new (if a port is taken, nothing has changed yet), hand the snapshot
        and its sockets to the data plane(s), then release what is no longer served.

        New connections take the new plans; established ones keep the plans they started with.
        """
        _warn_expiring(snapshot)
        table = self.sockets.stage({name: p.address for name, p in snapshot.plans.items()})
        try:
            if self.dataplane is not None:
                self.metrics.workers.set(1)
                await self.dataplane.publish(snapshot, bindings(table, 0))
            else:
                assert self.workers is not None
                publication = Publication(
                    snapshot.generation, dump_config(snapshot.config), table, snapshot.material
                )
                if self._workers_started:
                    await self.workers.publish(publication)
                else:
                    await self.workers.start(publication)
                    self._workers_started = True
        except BaseException:
            self.sockets.rollback(table)
            raise
        before = self.sockets.current
        self.sockets.commit(table)
        for name, bound in table.items():
            if before.get(name) is not bound:
                plan = snapshot.plans[name]
                where = f"{plan.bind}:{bound.port}" + ("/udp" if plan.protocol == "QUIC" else "")
                event(
                    logging.INFO, "listening", listener=name, protocol=plan.protocol, address=where
                )
        for name in before.keys() - table.keys():
            event(logging.INFO, "listener released", listener=name)

    def _in_background(self, work: Coroutine[Any, Any, object]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _notify(self, state: str, **extra: object) -> None:
        """One JSON line per state change on ``--ready-fd`` (like sd_notify): ``ready`` with
        the bound ports once serving, then ``reloaded`` or ``reload_refused`` per SIGHUP."""
        if self.options.ready_fd is None:
            return
        line = {
            "state": state,
            "pid": os.getpid(),
            "generation": self.snapshot.generation,
            "listeners": self.sockets.ports(),
            "admin": self._admin_port,
            "workers": self.workers.pids if self.workers else [os.getpid()],
            **extra,
        }
        try:
            os.write(self.options.ready_fd, (json.dumps(line) + "\n").encode())
        except OSError:
            self.options = dataclasses.replace(self.options, ready_fd=None)  # reader went away


def worker_count(configured: int | None) -> int:
    """``workers`` as configured, else one per CPU this process may run on."""
    if configured is not None:
        return configured
    return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))


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


def _admin_token(admin: Admin, state_dir: Path) -> str:
    """``ALB_ADMIN_TOKEN``, else ``admin.token_file``, else one generated once and kept in
    ``state_dir/admin.token`` (0600) for local tools; the token itself is never logged."""
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV]
    path = admin.token_file or state_dir / "admin.token"
    if path.exists():
        try:
            token = path.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            detail = exc.strerror if isinstance(exc, OSError) else "not text"
            raise AlbError(f"admin token file {path}: {detail or exc}") from None
        if not token:
            raise AlbError(f"admin token file {path} is empty")
        return token
    if admin.token_file is not None:
        raise AlbError(f"admin.token_file: {path} does not exist")
    token = secrets.token_urlsafe(32)
    write_atomic(path, (token + "\n").encode(), 0o600)
    event(logging.INFO, "admin token generated", file=path)
    return token
