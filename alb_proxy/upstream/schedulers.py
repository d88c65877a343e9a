"""Schedulers: which server of a group takes the next request. Pure: no I/O, no clock.

A scheduler knows servers only by index into the group's server list; health and in-flight counts
live apart (keyed by address, so they survive a reload) and reach the scheduler as arguments or as
callables given at construction. ``eligible`` is how the caller skips unhealthy servers without
rebuilding the scheduler, so a server coming back resumes its share at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

MAX_WEIGHT = 100
"""Weights are 0–100, as in the model; 0 means "no new requests"."""


class Scheduler(Protocol):
    """What the upstream layer asks of every scheduler (``wrr`` now; ``wlc``, ``sch`` later)."""

    def pick(
        self, eligible: Callable[[int], bool] | None = None, *, client_ip: str | None = None
    ) -> int | None:
        """Index of the server for the next request, or None when no server can take it.

        ``client_ip`` is what a source-IP hash (``sch``) needs; schedulers that don't use it
        ignore it, so the caller can always pass it.
        """
        ...


class SmoothWeightedRoundRobin:
    """nginx's smooth weighted round-robin: exact shares per cycle, spread out, not in bursts.

    Each pick adds every eligible server's weight to its running ``current``, chooses the highest
    (first on a tie) and subtracts the eligible total from it. Weights 5, 1, 1 give
    ``a a b a c a a``, where a plain weighted round-robin would send five in a row to ``a``.
    Servers that are ineligible for a pick neither gain nor lose, like nginx's down peers.
    """

    def __init__(self, weights: Sequence[int]) -> None:
        for index, weight in enumerate(weights):
            if not 0 <= weight <= MAX_WEIGHT:
                raise ValueError(f"weight of server {index} is {weight}, not 0–{MAX_WEIGHT}")
        self._weights = tuple(weights)
        self._current = [0] * len(self._weights)

    @property
    def weights(self) -> tuple[int, ...]:
        return self._weights

    def pick(
        self, eligible: Callable[[int], bool] | None = None, *, client_ip: str | None = None
    ) -> int | None:
        """Index of the next server; None if no eligible server has a weight above 0."""
        del client_ip  # round-robin does not depend on the client
        best: int | None = None
        total = 0
        for index, weight in enumerate(self._weights):
            if weight == 0 or (eligible is not None and not eligible(index)):
                continue
            self._current[index] += weight
            total += weight
            if best is None or self._current[index] > self._current[best]:
                best = index
        if best is not None:
            self._current[best] -= total
        return best
