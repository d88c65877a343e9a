"""The data plane of one process: the listeners it serves, and its backends' pool and health.

In a single process the daemon owns one; with worker processes each worker owns one and the
control plane process none. ``publish`` is the only way its state changes: a snapshot plus the
bindings of the listeners' sockets. New connections take the new plans; established ones keep
the plans they started with; a listener whose socket changed (a new address) is started on the
new socket while the old one drains.

Sockets are lent, not given: the data plane serves a duplicate of each descriptor, so the owner
(``listeners.sockets``) keeps its own and closes it on its own schedule.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Mapping
from dataclasses import replace
from typing import Any

from alb_proxy.config.model import Config
from alb_proxy.control.snapshot import Material, Snapshot, build_snapshot, health_checks
from alb_proxy.listeners.quic import QuicListener, QuicPlan
from alb_proxy.listeners.sockets import Binding
from alb_proxy.listeners.tcp import ListenerPlan, TcpListener
from alb_proxy.observability.log import event
from alb_proxy.observability.metrics import Metrics
from alb_proxy.upstream.health import HealthRegistry
from alb_proxy.upstream.pool import ConnectionPool

Listener = TcpListener | QuicListener


class DataPlane:
    def __init__(self, metrics: Metrics, drain_timeout: float) -> None:
        self.metrics = metrics
        self.pool = ConnectionPool()
        self.registry = HealthRegistry(on_change=self._health_changed)
        self.generation = 0
        self._drain_timeout = drain_timeout
        self._running: dict[str, tuple[int, Listener]] = {}
        self._draining: set[asyncio.Task[None]] = set()
        self._reported: set[str] = set()
        """Servers with an ``alb_upstream_server_healthy`` series."""

    def build(
        self,
        config: Config,
        generation: int,
        material: Material | None = None,
        *,
        log_warnings: bool = True,
    ) -> Snapshot:
        """A snapshot wired to this process's pool, health registry and metrics."""
        return build_snapshot(
            config,
            self.pool,
            self.metrics,
            registry=self.registry,
            generation=generation,
            log_warnings=log_warnings,
            material=material,
        )

    @property
    def serving(self) -> tuple[str, ...]:
        return tuple(self._running)

    async def publish(self, snapshot: Snapshot, bindings: Mapping[str, Binding]) -> None:
        """Serve ``snapshot``; ``bindings`` name every listener's socket token and port, with
        this process's descriptor where it serves the listener."""
        self.registry.reconcile(health_checks(snapshot.config))
        servers = {s.address for g in snapshot.config.server_groups for s in g.servers}
        for address in self._reported - servers:
            self.metrics.server_healthy.remove(address)  # a removed server is not "healthy"
        for address in servers:
            healthy = self.registry.is_healthy(address)
            self.metrics.server_healthy.labels(address).set(1 if healthy else 0)
        self._reported = servers
        served = {
            name: binding
            for name, binding in bindings.items()
            if binding.sock is not None and name in snapshot.plans
        }
        for name, (token, gone) in list(self._running.items()):
            if name not in served or served[name].token != token:
                del self._running[name]
                gone.stop_accepting()
                self._in_background(gone.drain(self._drain_timeout))
        for name, binding in served.items():
            if name in self._running:
                continue
            assert binding.sock is not None
            plan = snapshot.plans[name]
            listener: Listener = (
                QuicListener(plan, self.metrics)
                if isinstance(plan, QuicPlan)
                else TcpListener(plan, self.metrics)
            )
            await listener.start(binding.sock.dup())
            self._running[name] = (binding.token, listener)
        for name, (_, listener) in self._running.items():  # new connections only
            plan = snapshot.plans[name]
            if isinstance(listener, QuicListener) and isinstance(plan, QuicPlan):
                listener.plan = plan
            elif isinstance(listener, TcpListener) and isinstance(plan, ListenerPlan):
                listener.plan = _with_alt_svc(plan, bindings, snapshot)
        self.generation = snapshot.generation
        self.metrics.config_generation.set(snapshot.generation)

    async def drain(self) -> None:
        """Stop accepting, let requests in flight finish (bounded), then close the backends."""
        running = [listener for _, listener in self._running.values()]
        self._running.clear()
        await asyncio.gather(*(x.drain(self._drain_timeout) for x in running))
        await asyncio.gather(*self._draining, return_exceptions=True)
        await self.registry.close()
        self.pool.close_all()

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)

    def _health_changed(self, address: str, healthy: bool, reason: str) -> None:
        if address in self._reported:
            self.metrics.server_healthy.labels(address).set(1 if healthy else 0)
        event(
            logging.INFO if healthy else logging.WARNING,
            "server healthy" if healthy else "server unhealthy",
            server=address,
            reason=reason,
        )


def _with_alt_svc(
    plan: ListenerPlan, bindings: Mapping[str, Binding], snapshot: Snapshot
) -> ListenerPlan:
    """Advertise the QUIC listener by the port it is bound to (ephemeral ports included)."""
    if not plan.quic_upgrade:
        return plan
    quic = bindings.get(plan.quic_upgrade)
    if quic is None or not isinstance(snapshot.plans.get(plan.quic_upgrade), QuicPlan):
        return plan
    alt_svc = (b"alt-svc", f'h3=":{quic.port}"; ma=86400'.encode())
    route = replace(plan.route, response_headers=(*plan.route.response_headers, alt_svc))
    return replace(plan, route=route)
