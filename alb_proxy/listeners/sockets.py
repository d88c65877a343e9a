"""Listening sockets: bound by the process that owns the ports, served by the data plane(s).

Why the binding is separate from serving: with worker processes, the control plane binds every
port itself, so a port in use refuses a change before anything moves, and a worker that dies
and is replaced finds its socket (and the connections queued on it) still there.

- A TCP listener gets one socket per worker slot, all joined with ``SO_REUSEPORT``, so the
  kernel spreads new connections across the workers' own accept queues. ``SO_REUSEPORT`` would
  also let another process of the same user join the port silently, so a probe bind without it
  comes first: a port somebody else holds is refused with ``EADDRINUSE``, as in one process.
- A QUIC listener gets one UDP socket, served by slot 0 only. The datagrams of a QUIC
  connection must reach the process holding its state; ``SO_REUSEPORT`` hashes on the address
  pair, which changes when a client migrates or its NAT rebinds, and routing by connection ID
  would need an eBPF program. One QUIC worker is correct; spreading QUIC is not attempted.

Each bound set carries a token. The data plane keeps a listener running while its token stays
the same and restarts it on the new socket when the token changes (the address changed).
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

BACKLOG = 1024
_tokens = itertools.count(1)


@dataclass(frozen=True)
class Address:
    """What a listener binds: a change of any part is a new socket."""

    transport: str
    """``tcp`` or ``udp``."""
    host: str
    port: int


@dataclass(frozen=True)
class Binding:
    """What one data plane is told about a listener's socket."""

    token: int
    port: int
    """The bound port (the configured one, or what the OS picked with ephemeral ports)."""
    sock: socket.socket | None = None
    """This process's own descriptor, or ``None`` where another slot serves the listener."""


@dataclass(frozen=True)
class BoundSet:
    address: Address
    token: int
    port: int
    sockets: tuple[socket.socket, ...]
    """One per slot for TCP; one for UDP (slot 0)."""

    def sock_for(self, slot: int) -> socket.socket | None:
        if self.address.transport == "udp":
            return self.sockets[0] if slot == 0 else None
        return self.sockets[slot]

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


class ListenerSockets:
    """The bound sockets of every served listener, by listener name.

    ``stage`` binds what a new set of listeners needs beside what is bound now (nothing changes
    if any bind fails); ``commit`` makes the staged table current and closes what it no longer
    uses. The owner stays on one thread (the event loop); nothing here is thread-safe.
    """

    def __init__(self, slots: int, *, ephemeral: bool = False) -> None:
        self.slots = slots
        self._ephemeral = ephemeral
        self.current: dict[str, BoundSet] = {}

    def stage(self, wanted: Mapping[str, Address]) -> dict[str, BoundSet]:
        table: dict[str, BoundSet] = {}
        for name, address in wanted.items():
            kept = self.current.get(name)
            if kept is not None and kept.address == address:
                table[name] = kept
        # A socket whose listener no longer wants it goes to a new listener on the same address:
        # a renamed listener, or two that swapped ports, keep serving (binding a second socket
        # on an address still held would fail).
        spare = {
            bound.address: bound
            for name, bound in self.current.items()
            if table.get(name) is not bound
        }
        fresh: list[BoundSet] = []
        try:
            for name, address in wanted.items():
                if name in table:
                    continue
                reused = spare.pop(address, None)
                if reused is not None:
                    table[name] = reused
                    continue
                bound = self._bind(name, address)
                fresh.append(bound)
                table[name] = bound
        except OSError:
            for bound in fresh:
                bound.close()
            raise
        return table

    def commit(self, table: dict[str, BoundSet]) -> None:
        keep = {id(bound) for bound in table.values()}
        for bound in self.current.values():
            if id(bound) not in keep:
                bound.close()
        self.current = table

    def rollback(self, table: Mapping[str, BoundSet]) -> None:
        """Close what ``stage`` bound for a table that will not be committed."""
        kept = {id(bound) for bound in self.current.values()}
        for bound in table.values():
            if id(bound) not in kept:
                bound.close()

    def close(self) -> None:
        self.commit({})

    def ports(self) -> dict[str, int]:
        return {name: bound.port for name, bound in self.current.items()}

    def _bind(self, name: str, address: Address) -> BoundSet:
        port = 0 if self._ephemeral else address.port
        where = f"listeners[{name}] {address.host}:{port}"
        try:
            if address.transport == "udp":
                sockets: tuple[socket.socket, ...] = (_udp_socket(address.host, port),)
            else:
                sockets = _tcp_sockets(address.host, port, self.slots)
        except OSError as exc:
            suffix = "/udp" if address.transport == "udp" else ""
            raise OSError(exc.errno, f"{where}{suffix}: {exc.strerror or exc}") from exc
        bound_port: int = sockets[0].getsockname()[1]
        return BoundSet(address, next(_tokens), bound_port, sockets)


def bindings(table: Mapping[str, BoundSet], slot: int) -> dict[str, Binding]:
    """What slot ``slot`` is told: every listener's port, and its own socket where it serves."""
    return {
        name: Binding(bound.token, bound.port, bound.sock_for(slot))
        for name, bound in table.items()
    }


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _tcp_sockets(host: str, port: int, slots: int) -> tuple[socket.socket, ...]:
    if slots == 1:
        return (_tcp_socket(host, port, reuse_port=False),)
    probe = _tcp_socket(host, port, reuse_port=False, listen=False)
    port = probe.getsockname()[1]
    probe.close()
    sockets: list[socket.socket] = []
    try:
        for _ in range(slots):
            sockets.append(_tcp_socket(host, port, reuse_port=True))
    except OSError:
        _close_all(sockets)
        raise
    return tuple(sockets)


def _tcp_socket(host: str, port: int, *, reuse_port: bool, listen: bool = True) -> socket.socket:
    family = _family(host)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        if listen:
            sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _udp_socket(host: str, port: int) -> socket.socket:
    family = _family(host)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _close_all(sockets: Iterable[socket.socket]) -> None:
    for sock in sockets:
        sock.close()
