"""A server group as the data plane sees it: its backends, how to pick one, and what to report.

Built with each snapshot; the scheduler's position restarts when the group changes, while
health and in-flight counts live in the daemon's :class:`HealthRegistry`, keyed by address, so
they survive any change that keeps the server.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from alb_proxy.upstream.health import HealthRegistry
from alb_proxy.upstream.schedulers import make_scheduler


@dataclass(frozen=True)
class Backend:
    host: str
    port: int
    weight: int
    address: str = field(init=False, compare=False)
    """``host:port``, the key of its health and pool (made once: it is read per request)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "address", f"{self.host}:{self.port}")


class GroupRuntime:
    def __init__(
        self,
        group_id: str,
        backends: Sequence[Backend],
        connect_timeout: float,
        *,
        scheduler: str = "wrr",
        registry: HealthRegistry | None = None,
    ) -> None:
        self.id = group_id
        self.backends = tuple(backends)
        self.connect_timeout = connect_timeout
        self.registry = registry if registry is not None else HealthRegistry()
        addresses = [b.address for b in self.backends]
        self._scheduler = make_scheduler(
            scheduler,
            [b.weight for b in self.backends],
            keys=addresses,
            in_flight=[self.registry.in_flight(a) for a in addresses],
        )

    def pick(self, client_ip: str, exclude: Collection[int] = ()) -> int | None:
        """Index of the backend for a new request: healthy, weight > 0, not in ``exclude``
        (servers that already refused this request). None when there is none (503)."""
        registry, backends = self.registry, self.backends
        return self._scheduler.pick(
            client_ip,
            lambda i: i not in exclude and registry.is_healthy(backends[i].address),
        )

    def started(self, index: int) -> None:
        self._scheduler.started(index)
        self.registry.request_started(self.backends[index].address)

    def finished(self, index: int) -> None:
        self._scheduler.finished(index)
        self.registry.request_finished(self.backends[index].address)

    def connect_failed(self, index: int, detail: str) -> None:
        self.registry.connect_failed(self.backends[index].address, detail)

    def connect_succeeded(self, index: int) -> None:
        self.registry.connect_succeeded(self.backends[index].address)
