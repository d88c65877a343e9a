"""A server group as the data plane sees it: its backends and how to pick one."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from alb_proxy.upstream.schedulers import SmoothWeightedRoundRobin


@dataclass(frozen=True)
class Backend:
    host: str
    port: int
    weight: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class GroupRuntime:
    """Built with a snapshot; the scheduler's position restarts when the group changes."""

    def __init__(self, group_id: str, backends: Sequence[Backend], connect_timeout: float) -> None:
        self.id = group_id
        self.backends = tuple(backends)
        self.connect_timeout = connect_timeout
        self._scheduler = SmoothWeightedRoundRobin([b.weight for b in self.backends])

    def pick(self, client_ip: str) -> Backend | None:
        """The backend for a new request, or None when no server can take traffic (503)."""
        index = self._scheduler.pick()
        return None if index is None else self.backends[index]
