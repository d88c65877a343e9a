"""Schedulers: which server of a group takes the next request. Pure: no I/O, no clock.

Theory of operation
-------------------
A scheduler knows servers only by index into the group's server list. Health reaches it per call
as ``eligible``, so an unhealthy server is skipped without rebuilding anything; a config change
builds a new scheduler beside the old one (weights are fixed for a scheduler's life). Each kind
picks in O(log n) or better, where the old smooth round-robin scanned every server per pick:

``wrr`` (:class:`WeightedRoundRobin`)
    Worst-case fair weighted fair queueing (WF²Q+, Bennett & Zhang) with every server always
    backlogged. Request k of server i "starts" at virtual time (k-1)/w_i and is "due" at k/w_i;
    virtual time advances 1/sum(w) per pick. A pick takes the earliest due among servers whose
    next request has started (two heaps: waiting by start, ready by due time). Plain
    earliest-deadline-first (no start condition) sends weights 5, 1, 1 as ``a a a a a b c``;
    the start condition gives ``a b a a c a a`` (runs of at most 3, nginx's order has 4) and
    keeps every server within one request of its exact share after every pick, so each cycle of
    sum(w) picks gives each server exactly its weight.

``wlc`` (:class:`WeightedLeastConnections`)
    The server minimising (in_flight + 1) / weight, kept in an indexed binary heap (a position
    map, sift up/down on started/finished). Ties go to the server least recently started, which
    is round-robin among equals: with lowest-index ties, a lightly loaded group of equal servers
    would send everything to the first one.

``sch`` (:class:`SourceIpHash`)
    A consistent-hash ring of virtual nodes placed by each server's key (its address), so a
    server keeps its clients when others are added or removed. Lookup is a bisect.

Skipping ineligible servers must not disturb the others. ``wlc`` searches its heap best-first
and changes nothing; it checks every unhealthy server lighter than its answer on each pick, the
least an exact answer can do when health is asked per call rather than announced. ``sch``
walks clockwise to the next eligible server, so an unhealthy server's clients come back to it
once it is healthy. ``wrr`` cannot simply push a skipped server back unchanged: its due time
would stay in the past while the others advance, and on recovery it would take a burst of
requests to "catch up". So a skipped server is deferred as if it had been served (neither
gaining nor losing, like nginx's down peers), which also keeps the skipped pops per pick in
proportion to the unhealthy share of weight, not to the number of unhealthy servers.
"""

from __future__ import annotations

import hashlib
import math
import struct
from array import array
from bisect import bisect_left
from collections.abc import Callable, Sequence
from heapq import heapify, heappop, heappush
from typing import Protocol

MAX_WEIGHT = 100
"""Weights are 0–100, as in the model; 0 means "no new requests"."""

KINDS = ("wrr", "wlc", "sch")
"""The ``scheduler`` values of a server group (``config.model.Scheduler``)."""

VNODES_PER_WEIGHT = 4
"""Ring points per unit of weight (400 for the default weight 100).

A server's share of the ring is a sum of random arcs, so its spread is about 1/sqrt(points):
400 points give about ±5 % of a server's fair share, i.e. 10 % ± 1 point each for ten equal
servers. More points cost build time and memory (1,000 servers of weight 100: 400,000 points,
3.2 MB, about 0.25 s to build); the count depends only on the server's own weight, so changing
one server never moves the others' points.
"""

Eligible = Callable[[int], bool]
"""Whether server ``index`` may take a new request now (its health, kept by the caller)."""


class Scheduler(Protocol):
    """What the upstream layer asks of every scheduler."""

    def pick(self, client_ip: str, eligible: Eligible | None = None) -> int | None:
        """Index of the server for a new request, or None if no server with weight > 0 is
        eligible. ``client_ip`` is what ``sch`` hashes; the others ignore it."""
        ...

    def started(self, index: int) -> None:
        """A request began on server ``index`` (call it right after ``pick``; ``wlc`` counts)."""
        ...

    def finished(self, index: int) -> None:
        """The request started on server ``index`` ended."""
        ...


def make_scheduler(
    kind: str,
    weights: Sequence[int],
    *,
    keys: Sequence[str] | None = None,
    in_flight: Sequence[int] | None = None,
) -> Scheduler:
    """Build a scheduler of ``kind`` (``wrr``, ``wlc`` or ``sch``) for servers of ``weights``.

    ``keys`` are stable server names (their addresses): ``sch`` places ring points by them, so
    a server keeps its clients when others are added, removed or reordered; by default a server
    is named by its index, which only stays stable when servers are added or removed at the end.
    ``in_flight`` seeds ``wlc``'s counts, so a scheduler built on reload knows the requests
    still running. Kinds that do not use ``keys`` or ``in_flight`` ignore them. Raises
    ValueError for an unknown kind, a weight outside 0–100, or keys/counts that do not fit.
    """
    if kind == "wrr":
        return WeightedRoundRobin(weights)
    if kind == "wlc":
        return WeightedLeastConnections(weights, in_flight)
    if kind == "sch":
        return SourceIpHash(weights, keys)
    raise ValueError(f"unknown scheduler {kind!r}, not one of {', '.join(KINDS)}")


def _checked_weights(weights: Sequence[int]) -> tuple[int, ...]:
    for index, weight in enumerate(weights):
        if isinstance(weight, bool) or not isinstance(weight, int):
            raise ValueError(f"weight of server {index} is {weight!r}, not an integer 0–100")
        if not 0 <= weight <= MAX_WEIGHT:
            raise ValueError(f"weight of server {index} is {weight}, not 0–{MAX_WEIGHT}")
    return tuple(weights)


class WeightedRoundRobin:
    """Smooth weighted round-robin in O(log n) per pick: WF²Q+ over two heaps (module doc).

    Virtual times are integers in units of 1/lcm(sum(w), w...), so ties are exact and shares
    never drift.
    """

    def __init__(self, weights: Sequence[int]) -> None:
        self.weights = _checked_weights(weights)
        positive = [w for w in self.weights if w]
        unit = math.lcm(sum(positive), *positive) if positive else 1
        self._tick = unit // sum(positive) if positive else 0  # virtual time per pick
        self._cost = [unit // w if w else 0 for w in self.weights]  # … per request of server i
        self._now = 0
        self._due = list(self._cost)  # when server i's next request is due (it starts at 0)
        self._ready = [(due, i) for i, due in enumerate(self._due) if self.weights[i]]
        heapify(self._ready)  # started (start <= now), by due time then index
        self._waiting: list[tuple[int, int]] = []  # not yet started, by start time then index

    def pick(self, client_ip: str, eligible: Eligible | None = None) -> int | None:
        """The next server in smooth weighted order; ineligible ones are deferred, not lost."""
        del client_ip  # round-robin does not depend on the client
        ready, waiting = self._ready, self._waiting
        skipped: list[int] = []
        chosen: int | None = None
        while True:
            while waiting and waiting[0][0] <= self._now:
                _, index = heappop(waiting)
                heappush(ready, (self._due[index], index))
            if ready:
                _, index = heappop(ready)
                if eligible is None or eligible(index):
                    chosen = index
                    break
                skipped.append(index)
            elif waiting:
                # Nothing started is eligible: jump to the next start (WF²Q+'s max(V, min S)).
                self._now = waiting[0][0]
            else:
                break
        for index in skipped:  # as if served now, so a recovered server does not burst
            self._advance(index, max(self._due[index], self._now))
        if chosen is not None:
            self._now += self._tick
            self._advance(chosen, self._due[chosen])
        return chosen

    def _advance(self, index: int, start: int) -> None:
        """Server ``index``'s next request starts at ``start``: file it as started or waiting."""
        self._due[index] = start + self._cost[index]
        if start <= self._now:
            heappush(self._ready, (self._due[index], index))
        else:
            heappush(self._waiting, (start, index))

    def started(self, index: int) -> None:
        """Round-robin does not count requests."""

    def finished(self, index: int) -> None:
        """Round-robin does not count requests."""


class WeightedLeastConnections:
    """The server with the fewest in-flight requests per unit of weight, O(log n) per event.

    Load is (in_flight + 1) * lcm(w...) / w, an integer, so equal ratios tie exactly; ties go to
    the server started least recently. ``pick`` changes nothing: ``started`` commits the choice.
    """

    def __init__(self, weights: Sequence[int], in_flight: Sequence[int] | None = None) -> None:
        self.weights = _checked_weights(weights)
        n = len(self.weights)
        counts = [0] * n if in_flight is None else list(in_flight)
        if len(counts) != n or any(count < 0 for count in counts):
            raise ValueError(f"in_flight needs {n} counts >= 0, got {in_flight!r}")
        unit = math.lcm(*[w for w in self.weights if w] or [1])
        self._cost = [unit // w if w else 0 for w in self.weights]
        self._in_flight = counts
        self._load = [(count + 1) * cost for count, cost in zip(counts, self._cost, strict=True)]
        self._last = list(range(n))  # tie-break: when the server last started a request
        self._clock = n
        members = sorted((i for i in range(n) if self.weights[i]), key=self._key)
        self._heap = members  # sorted is a valid heap
        self._pos = [-1] * n  # where server i sits in the heap; -1 = weight 0, never picked
        for position, index in enumerate(members):
            self._pos[index] = position

    def _key(self, index: int) -> tuple[int, int]:
        return self._load[index], self._last[index]

    def pick(self, client_ip: str, eligible: Eligible | None = None) -> int | None:
        """The least loaded eligible server: the heap's root, or a best-first search below it."""
        del client_ip
        heap = self._heap
        if not heap:
            return None
        if eligible is None or eligible(heap[0]):
            return heap[0]
        # Visit servers in load order through the heap's tree without moving anything: a
        # child is never lighter than its parent, so the first eligible one is the lightest.
        frontier: list[tuple[int, int, int]] = []
        position = 0
        while True:
            for child in (2 * position + 1, 2 * position + 2):
                if child < len(heap):
                    heappush(frontier, (*self._key(heap[child]), child))
            if not frontier:
                return None
            *_, position = heappop(frontier)
            if eligible(heap[position]):
                return heap[position]

    def started(self, index: int) -> None:
        """Count a request on ``index``; it moves down the heap past its new equals."""
        self._in_flight[index] += 1
        self._load[index] += self._cost[index]
        self._last[index] = self._clock
        self._clock += 1
        if self._pos[index] >= 0:
            self._sift_down(self._pos[index])

    def finished(self, index: int) -> None:
        """Uncount one; a finish with nothing counted (started before a reload) is ignored."""
        if self._in_flight[index] == 0:
            return
        self._in_flight[index] -= 1
        self._load[index] -= self._cost[index]
        if self._pos[index] >= 0:
            self._sift_up(self._pos[index])

    def _place(self, position: int, index: int) -> None:
        self._heap[position] = index
        self._pos[index] = position

    def _sift_up(self, position: int) -> None:
        heap, index = self._heap, self._heap[position]
        key = self._key(index)
        while position > 0:
            parent = (position - 1) // 2
            if self._key(heap[parent]) <= key:
                break
            self._place(position, heap[parent])
            position = parent
        self._place(position, index)

    def _sift_down(self, position: int) -> None:
        heap, index = self._heap, self._heap[position]
        key, size = self._key(index), len(heap)
        while (child := 2 * position + 1) < size:
            if child + 1 < size and self._key(heap[child + 1]) < self._key(heap[child]):
                child += 1
            if key <= self._key(heap[child]):
                break
            self._place(position, heap[child])
            position = child
        self._place(position, index)


class SourceIpHash:
    """Consistent hash of the client's source IP: one client, one server, while it is eligible.

    Each server has ``VNODES_PER_WEIGHT * weight`` points: 64-bit numbers read from
    SHAKE-256 of its key, so growing a weight keeps the existing points. A point's low bits hold
    the server's index, which keeps the ring one flat ``array`` of 8-byte entries. A client hashes
    (BLAKE2b, not ``hash()``, which is salted per process) to a position and takes the first
    point at or after it.
    """

    def __init__(self, weights: Sequence[int], keys: Sequence[str] | None = None) -> None:
        self.weights = _checked_weights(weights)
        n = len(self.weights)
        names = [str(i) for i in range(n)] if keys is None else list(keys)
        if len(names) != n or len(set(names)) != n:
            raise ValueError(f"keys need {n} distinct names, got {keys!r}")
        self._mask = (1 << max(n - 1, 1).bit_length()) - 1
        high = ~self._mask
        points: list[int] = []
        for index, (weight, name) in enumerate(zip(self.weights, names, strict=True)):
            count = weight * VNODES_PER_WEIGHT
            stream = hashlib.shake_256(name.encode()).digest(8 * count)
            points.extend(point & high | index for point in struct.unpack(f">{count}Q", stream))
        points.sort()
        self._ring = array("Q", points)
        self._servers = sum(1 for w in self.weights if w)

    def pick(self, client_ip: str, eligible: Eligible | None = None) -> int | None:
        """The client's server, or the next eligible one clockwise while that one is not."""
        ring = self._ring
        if not ring:
            return None
        digest = hashlib.blake2b(client_ip.encode(), digest_size=8).digest()
        position = bisect_left(ring, int.from_bytes(digest) & ~self._mask)
        first = ring[position % len(ring)] & self._mask
        if eligible is None or eligible(first):
            return first
        refused = {first}
        for step in range(1, len(ring)):
            if len(refused) == self._servers:
                break
            index = ring[(position + step) % len(ring)] & self._mask
            if index not in refused:
                if eligible(index):
                    return index
                refused.add(index)
        return None

    def started(self, index: int) -> None:
        """Hashing does not count requests."""

    def finished(self, index: int) -> None:
        """Hashing does not count requests."""
