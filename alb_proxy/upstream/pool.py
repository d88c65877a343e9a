"""Keep-alive connections to backend servers, pooled by address.

The pool belongs to the daemon, not to a snapshot, so a config change that keeps a server keeps
its idle connections. A connection the backend closed, or wrote to, while idle is noticed on
checkout (its parked stream was spoiled) and dropped, so a client never pays for it.
"""

from __future__ import annotations

from collections import deque

from alb_proxy.upstream.connection import BackendConnection


class ConnectionPool:
    def __init__(self, max_idle_per_server: int = 128) -> None:
        self._max_idle = max_idle_per_server
        self._idle: dict[str, deque[BackendConnection]] = {}

    async def acquire(
        self, host: str, port: int, connect_timeout: float, *, fresh: bool = False
    ) -> tuple[BackendConnection, bool]:
        """A connection to ``host:port`` and whether it was reused from the pool."""
        if not fresh:
            idle = self._idle.get(f"{host}:{port}")
            while idle:
                conn = idle.pop()  # most recently used first: least likely to have timed out
                if conn.unpark():
                    return conn, True
                conn.close()
        return await BackendConnection.open(host, port, connect_timeout), False

    def release(self, conn: BackendConnection) -> None:
        """Return a connection after a complete exchange, or close it if it can't be reused."""
        if not conn.ready_for_reuse():
            conn.close()
            return
        idle = self._idle.setdefault(conn.address, deque())
        if len(idle) >= self._max_idle:
            idle.popleft().close()
        conn.park()
        idle.append(conn)

    def idle_count(self, address: str) -> int:
        return len(self._idle.get(address, ()))

    def close_all(self) -> None:
        for idle in self._idle.values():
            while idle:
                idle.pop().close()
        self._idle.clear()
