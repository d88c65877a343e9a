"""Health checks: pure threshold counting, then real checks against tiny backends on port 0."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from alb_proxy.upstream.health import (
    USER_AGENT,
    CheckSpec,
    HealthRegistry,
    Thresholds,
    Transition,
    check_once,
    parse_codes,
    split_address,
)

WAIT = 5.0  # generous bound on any awaited event; a hang fails the test instead of the run

# -- pure parts ------------------------------------------------------------------------------


def test_thresholds_count_consecutive_results_exactly() -> None:
    t = Thresholds(healthy_threshold=2, unhealthy_threshold=3)
    assert t.healthy
    results = [t.record(ok) for ok in (False, False, True, False, False)]
    assert results == [None] * 5 and t.healthy  # the success broke the streak
    assert t.record(False) == Transition(healthy=False, streak=3)
    assert [t.record(ok) for ok in (False, True, False, True)] == [None] * 4
    assert t.record(True) == Transition(healthy=True, streak=2)
    assert t.record(True) is None


def test_mark_down_forgets_the_streak() -> None:
    t = Thresholds(healthy_threshold=2, unhealthy_threshold=2)
    t.record(True)
    assert t.mark_down() is True and not t.healthy
    assert t.mark_down() is False
    assert t.record(True) is None  # the success before the mark-down does not count
    assert t.record(True) == Transition(healthy=True, streak=2)


def test_thresholds_of_one_flip_on_every_change() -> None:
    t = Thresholds(1, 1)
    assert t.record(True) is None
    assert t.record(False) == Transition(False, 1)
    assert t.record(True) == Transition(True, 1)


@given(
    rise=st.integers(1, 5),
    fall=st.integers(1, 5),
    results=st.lists(st.booleans(), max_size=60),
)
def test_transitions_need_exactly_a_full_streak(rise: int, fall: int, results: list[bool]) -> None:
    """Checked against a different model: the last ``threshold`` results in the input."""
    t = Thresholds(rise, fall)
    healthy = True
    for i, ok in enumerate(results):
        needed = rise if ok else fall
        full_streak = i + 1 >= needed and results[i + 1 - needed : i + 1] == [ok] * needed
        transition = t.record(ok)
        assert (transition is not None) == (ok is not healthy and full_streak)
        if transition is not None:
            assert transition == Transition(ok, needed)
            healthy = ok
        assert t.healthy is healthy


def test_parse_codes() -> None:
    assert parse_codes(("http_2xx", "http_3xx")) == frozenset({2, 3})
    assert parse_codes(["http_5xx", "http_5xx"]) == frozenset({5})
    with pytest.raises(ValueError, match="http_6xx"):
        parse_codes(["http_6xx"])
    with pytest.raises(ValueError, match="unknown code '200'"):
        parse_codes(["200"])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"protocol": "udp"},
        {"protocol": "http", "path": "health"},
        {"protocol": "http", "path": "/a b"},
        {"protocol": "http", "method": "GE T"},
        {"protocol": "http", "host": "a\r\nX: y"},
        {"protocol": "http", "codes": frozenset()},
        {"protocol": "http", "codes": frozenset({1})},
        {"protocol": "http", "interval": 0},
        {"protocol": "http", "timeout": -1},
        {"protocol": "tcp", "healthy_threshold": 0},
    ],
)
def test_check_spec_refuses_bad_values(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        CheckSpec(**kwargs)


def test_split_address() -> None:
    assert split_address("127.0.0.1:8081") == ("127.0.0.1", 8081)
    assert split_address("::1:80") == ("::1", 80)
    assert split_address("[::1]:80") == ("::1", 80)
    for bad in ("127.0.0.1", ":80", "host:0", "host:http", "host:70000"):
        with pytest.raises(ValueError):
            split_address(bad)


# -- helpers for the socket tests ------------------------------------------------------------


class ScriptedBackend:
    """An HTTP server whose n-th request gets ``script[n-1]`` (the last entry repeats).

    An int is a status to answer, None closes without answering, "hang" never answers.
    """

    def __init__(self, script: Sequence[int | str | None]) -> None:
        self.script = list(script)
        self.heads: list[bytes] = []
        self.connections = 0
        self._changed = asyncio.Condition()
        self._server: asyncio.Server | None = None
        self.address = ""

    @property
    def count(self) -> int:
        return len(self.heads)

    async def start(self, port: int = 0) -> ScriptedBackend:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", port)
        self.address = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(WAIT), self._changed:
            await self._changed.wait_for(lambda: self.count >= count)

    async def wait_connections(self, count: int) -> None:
        async with asyncio.timeout(WAIT), self._changed:
            await self._changed.wait_for(lambda: self.connections >= count)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with self._changed:
                self.connections += 1
                self._changed.notify_all()
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return  # a TCP check, or a check cancelled before it sent its request
            async with self._changed:
                self.heads.append(head)
                self._changed.notify_all()
            action = self.script[min(len(self.heads), len(self.script)) - 1]
            if action == "hang":
                await asyncio.Event().wait()
            if isinstance(action, int):
                writer.write(b"HTTP/1.1 %d X\r\nContent-Length: 0\r\n\r\n" % action)
        finally:
            writer.close()


class Changes:
    """on_change as a queue; each entry also records how many checks the backend had served."""

    def __init__(self, backend: ScriptedBackend | None = None) -> None:
        self.queue: asyncio.Queue[tuple[str, bool, str, int]] = asyncio.Queue()
        self.backend = backend

    def __call__(self, address: str, healthy: bool, reason: str) -> None:
        count = self.backend.count if self.backend is not None else -1
        self.queue.put_nowait((address, healthy, reason, count))

    async def next(self) -> tuple[str, bool, str, int]:
        async with asyncio.timeout(WAIT):
            return await self.queue.get()


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run(main: Callable[[], Awaitable[None]]) -> None:
    async def checked() -> None:
        errors: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
        await main()
        assert errors == []

    asyncio.run(checked())


def checker_tasks() -> set[asyncio.Task[Any]]:
    return {t for t in asyncio.all_tasks() if t.get_name().startswith("health check")}


FAST = {"interval": 0.02, "timeout": 1.0}

# -- active HTTP checks ------------------------------------------------------------------------


def test_http_check_honours_thresholds_exactly() -> None:
    # checks: 1 ok, 2-3 fail, 4 ok, 5-7 fail (down at 7), 8 ok, 9 fail, 10-11 ok (up at 11)
    script = [200, 503, 500, 302, 503, 404, None, 204, 503, 200, 200]

    async def main() -> None:
        backend = await ScriptedBackend(script).start()
        changes = Changes(backend)
        registry = HealthRegistry(on_change=changes)
        spec = CheckSpec("http", healthy_threshold=2, unhealthy_threshold=3, **FAST)
        registry.reconcile({backend.address: spec})
        assert registry.is_healthy(backend.address)
        down = await changes.next()
        assert down == (
            backend.address,
            False,
            "3 consecutive failures: closed before the status line",
            7,
        )
        assert not registry.is_healthy(backend.address)
        assert registry.snapshot() == {backend.address: False}
        assert await changes.next() == (backend.address, True, "2 consecutive successes", 11)
        assert registry.is_healthy(backend.address)
        await backend.wait_for(15)
        assert changes.queue.empty()
        await registry.close()
        await backend.stop()

    run(main)


def test_http_check_sends_the_configured_request() -> None:
    async def main() -> None:
        backend = await ScriptedBackend([200]).start()
        registry = HealthRegistry()
        spec = CheckSpec("http", path="/ready?deep=1", method="HEAD", **FAST)
        registry.reconcile({backend.address: spec})
        await backend.wait_for(1)
        await registry.close()
        lines = backend.heads[0].decode().split("\r\n")
        assert lines[0] == "HEAD /ready?deep=1 HTTP/1.1"
        headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines[1:] if line)}
        assert headers == {
            "host": backend.address,
            "user-agent": USER_AGENT,
            "connection": "close",
        }
        host, port = split_address(backend.address)
        assert await check_once(host, port, CheckSpec("http", host="app.example")) is None
        assert b"\r\nHost: app.example\r\n" in backend.heads[-1]
        await backend.stop()

    run(main)


def test_check_once_reports_what_failed() -> None:
    async def main() -> None:
        backend = await ScriptedBackend([503, None, "hang"]).start()
        host, port = split_address(backend.address)
        only_2xx = CheckSpec("http", codes=frozenset({2}), timeout=0.2)
        assert await check_once(host, port, only_2xx) == "status 503"
        assert await check_once(host, port, only_2xx) == "closed before the status line"
        assert await check_once(host, port, only_2xx) == "timeout after 0.2s"
        assert await check_once("127.0.0.1", free_port(), only_2xx) == "connect refused"
        await backend.stop()

    run(main)


def test_accepted_codes_decide() -> None:
    async def main() -> None:
        backend = await ScriptedBackend([404]).start()
        host, port = split_address(backend.address)
        assert await check_once(host, port, CheckSpec("http")) == "status 404"
        assert await check_once(host, port, CheckSpec("http", codes=frozenset({4}))) is None
        await backend.stop()

    run(main)


def test_garbage_answer_is_a_failed_check() -> None:
    async def main() -> None:
        async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
            writer.close()

        server = await asyncio.start_server(garbage, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        failure = await check_once("127.0.0.1", port, CheckSpec("http", timeout=1))
        assert failure is not None and failure.startswith("bad response: ")
        server.close()
        await server.wait_closed()

    run(main)


# -- active TCP checks -----------------------------------------------------------------------


def test_tcp_check_against_a_closed_port_then_a_listener() -> None:
    async def main() -> None:
        port = free_port()
        address = f"127.0.0.1:{port}"
        changes = Changes()
        registry = HealthRegistry(on_change=changes)
        spec = CheckSpec("tcp", healthy_threshold=1, unhealthy_threshold=2, **FAST)
        registry.reconcile({address: spec})
        assert (await changes.next())[:3] == (
            address,
            False,
            "2 consecutive failures: connect refused",
        )
        backend = await ScriptedBackend([200]).start(port)
        assert (await changes.next())[:3] == (address, True, "1 consecutive success")
        assert backend.count == 0  # a TCP check sends nothing
        await registry.close()
        await backend.stop()

    run(main)


# -- passive detection -----------------------------------------------------------------------


def test_passive_mark_down_and_cooldown_return() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        changes = Changes()
        registry = HealthRegistry(on_change=changes, passive_cooldown=0.1)
        address = "127.0.0.1:9"
        started = loop.time()
        registry.connect_failed(address, "connect refused")
        assert not registry.is_healthy(address)
        assert registry.snapshot() == {address: False}
        assert (await changes.next())[:3] == (
            address,
            False,
            "passive: connect failed: connect refused",
        )
        registry.connect_succeeded(address)  # stale evidence: does not end the cooldown
        assert not registry.is_healthy(address)
        assert (await changes.next())[:3] == (address, True, "passive cooldown over")
        assert loop.time() - started >= 0.1 - 0.01
        assert registry.is_healthy(address) and registry.snapshot() == {}
        await registry.close()

    run(main)


def test_another_failure_restarts_the_cooldown() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        changes = Changes()
        registry = HealthRegistry(on_change=changes, passive_cooldown=0.5)
        address = "127.0.0.1:9"
        registry.connect_failed(address, "refused")
        await changes.next()
        await asyncio.sleep(0.1)  # a deliberate gap between the two failures, not a wait
        assert not registry.is_healthy(address)  # still in the first cooldown
        second = loop.time()
        registry.connect_failed(address, "refused again")  # already down: no second report
        assert (await changes.next())[:3] == (address, True, "passive cooldown over")
        assert loop.time() - second >= 0.5 - 0.01
        await registry.close()

    run(main)


def test_passive_down_with_an_active_check_waits_for_the_check() -> None:
    async def main() -> None:
        backend = await ScriptedBackend([200]).start()
        changes = Changes(backend)
        # a tiny cooldown: if it applied, "passive cooldown over" would arrive first
        registry = HealthRegistry(on_change=changes, passive_cooldown=0.001)
        # marked down before its check exists: the check's first successes must bring it back
        registry.connect_failed(backend.address, "connect refused")
        assert (await changes.next())[1] is False
        spec = CheckSpec("http", healthy_threshold=3, unhealthy_threshold=1, **FAST)
        registry.reconcile({backend.address: spec})
        assert not registry.is_healthy(backend.address)
        assert await changes.next() == (backend.address, True, "3 consecutive successes", 3)
        # marked down while checked and healthy: down at once, back only through the check
        registry.connect_failed(backend.address, "reset")
        failed_at = backend.count
        assert await changes.next() == (
            backend.address,
            False,
            "passive: connect failed: reset",
            failed_at,
        )
        _, healthy, reason, count = await changes.next()
        assert (healthy, reason) == (True, "3 consecutive successes")
        assert count >= failed_at + 2  # 3 checks, one of which may have been in flight
        await registry.close()
        await backend.stop()

    run(main)


# -- reconcile and close ---------------------------------------------------------------------


def test_reconcile_keeps_state_and_stops_removed_checks() -> None:
    async def main() -> None:
        failing = await ScriptedBackend([503]).start()
        passing = await ScriptedBackend([200]).start()
        changes = Changes(failing)
        registry = HealthRegistry(on_change=changes, passive_cooldown=0.05)
        spec = CheckSpec("http", healthy_threshold=2, unhealthy_threshold=2, **FAST)
        registry.reconcile({failing.address: spec, passing.address: spec})
        assert (await changes.next())[:3] == (
            failing.address,
            False,
            "2 consecutive failures: status 503",
        )
        await passing.wait_for(1)
        (task,) = [t for t in checker_tasks() if t.get_name().endswith(failing.address)]

        # the passing server leaves; the failing one stays, same spec: same task, still down
        registry.reconcile({failing.address: spec})
        await failing.wait_for(failing.count + 3)
        stopped_at = passing.count
        await failing.wait_for(failing.count + 3)
        assert passing.count == stopped_at
        assert checker_tasks() == {task}
        assert not registry.is_healthy(failing.address)
        assert registry.snapshot() == {failing.address: False}
        assert changes.queue.empty()

        # its spec changes and it recovers: still down until the new healthy_threshold is met
        failing.script = [200]
        restarted_at = failing.count
        registry.reconcile({failing.address: CheckSpec("http", healthy_threshold=3, **FAST)})
        assert checker_tasks() != {task}
        _, healthy, reason, count = await changes.next()
        assert (healthy, reason) == (True, "3 consecutive successes")
        assert (
            restarted_at + 3 <= count <= restarted_at + 4
        )  # the old task's in-flight check may add one request

        # taken down by a passive failure, then its check is removed: the passive rule applies
        registry.connect_failed(failing.address, "refused")
        assert (await changes.next())[1:3] == (False, "passive: connect failed: refused")
        registry.reconcile({})
        assert (await changes.next())[1:3] == (True, "passive cooldown over")
        assert registry.snapshot() == {}
        await registry.close()
        assert checker_tasks() == set()
        await failing.stop()
        await passing.stop()

    run(main)


def test_reconcile_refuses_a_bad_address_without_changing_anything() -> None:
    async def main() -> None:
        registry = HealthRegistry()
        spec = CheckSpec("tcp", **FAST)
        with pytest.raises(ValueError, match="host:port"):
            registry.reconcile({f"127.0.0.1:{free_port()}": spec, "no-port": spec})
        assert checker_tasks() == set() and registry.snapshot() == {}
        await registry.close()

    run(main)


def test_close_cancels_checks_in_flight_and_timers() -> None:
    async def main() -> None:
        hanging = await ScriptedBackend(["hang"]).start()
        changes = Changes()
        registry = HealthRegistry(on_change=changes, passive_cooldown=0.05)
        registry.reconcile(
            {
                hanging.address: CheckSpec("http", interval=0.02, timeout=30),
                f"127.0.0.1:{free_port()}": CheckSpec("tcp", **FAST),
            }
        )
        registry.connect_failed("127.0.0.1:9", "refused")
        await changes.next()
        await hanging.wait_for(1)  # a check is now waiting on a backend that never answers
        async with asyncio.timeout(1):
            await registry.close()
        assert checker_tasks() == set()
        await asyncio.sleep(0.1)  # past the cooldown: its timer must not fire after close()
        assert changes.queue.empty()
        with pytest.raises(RuntimeError, match="closed"):
            registry.reconcile({})
        await hanging.stop()

    run(main)


def test_an_on_change_error_does_not_stop_the_checker() -> None:
    async def main() -> None:
        backend = await ScriptedBackend([503, 200, 503, 200]).start()
        seen: list[tuple[str, bool, str]] = []
        errors: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))

        def on_change(address: str, healthy: bool, reason: str) -> None:
            seen.append((address, healthy, reason))
            raise RuntimeError("metrics backend exploded")

        registry = HealthRegistry(on_change=on_change)
        spec = CheckSpec("http", healthy_threshold=1, unhealthy_threshold=1, **FAST)
        registry.reconcile({backend.address: spec})
        await backend.wait_for(4)
        await registry.close()
        assert [healthy for _, healthy, _ in seen][:3] == [False, True, False]
        assert all(isinstance(ctx["exception"], RuntimeError) for ctx in errors)
        assert len(errors) == len(seen)
        await backend.stop()

    asyncio.run(main())


def test_in_flight_counts() -> None:
    registry = HealthRegistry()
    registry.request_started("a:1")
    registry.request_started("a:1")
    registry.request_finished("a:1")
    assert registry.in_flight("a:1") == 1 and registry.in_flight("b:1") == 0
    registry.request_finished("a:1")
    registry.request_finished("a:1")  # an unmatched finish never goes negative
    assert registry.in_flight("a:1") == 0
