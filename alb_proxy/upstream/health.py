"""Backend health: active checks (HTTP or TCP) and passive detection, keyed by address.

Theory of operation
-------------------
One ``HealthRegistry`` lives as long as the daemon. It knows backends only by address
(``"host:port"``), never by server group or config generation, so a reload that keeps a server
keeps its health (STYLE item 5). The control plane turns each group's ``health_check`` into a
``CheckSpec`` and calls ``reconcile({address: spec})`` after every change; the data plane asks
``is_healthy(address)`` when it picks a server and reports ``connect_failed`` /
``connect_succeeded`` after each fresh connect.

- **Start healthy.** An address nobody has judged is healthy (HAProxy without ``init-state``), so
  a fresh start or a newly added server takes traffic at once instead of answering 503 until its
  first checks pass.
- **Active checks.** One asyncio task per checked address. A check is a fresh TCP connection:
  for ``tcp`` a completed connect is success; for ``http`` it sends ``METHOD path HTTP/1.1``
  (``Host`` = ``spec.host`` or the address, ``Connection: close``,
  ``User-Agent: alb-proxy-health``) and reads the status line with h11, skipping 1xx; success
  when the status class is in ``spec.codes``. ``spec.timeout`` bounds the whole check. Checks of
  one address never overlap: the task sleeps ``interval`` from the *end* of one check to the start
  of the next, so a slow or timing-out backend is probed less often rather than piled on. The
  first check runs as soon as the task starts.
- **Thresholds.** ``unhealthy_threshold`` consecutive failures take a healthy address down;
  ``healthy_threshold`` consecutive successes bring it back (``Thresholds``, pure, no clock).
- **Passive detection.** ``connect_failed`` takes an address down at once. With an active check,
  only that check brings it back (``healthy_threshold`` successes counted from the failure).
  Without one, it comes back by itself ``passive_cooldown`` seconds later (a ``call_later``
  timer, no polling): half-open, the next request tries it, and another connect failure starts a
  new cooldown. ``connect_succeeded`` never ends a cooldown early: the attempt may have started
  before the failure that caused it (nginx ignores such successes for the same reason).
- **Reconcile** keeps the health of addresses that stay, with fresh streak counters when their
  spec changed. An address that loses its active check while down falls back to the passive rule
  (back after ``passive_cooldown``); one that is healthy is simply forgotten.
- **Reporting.** ``on_change(address, healthy, reason)`` is called once per transition, from the
  loop thread. The checker tasks catch every error of a check (it is a failed check, with its
  detail in the reason) and never log; an exception raised by ``on_change`` itself goes to the
  loop's exception handler, like any failing callback, and the registry's state stays as decided.

Everything here runs on the event loop thread; nothing is thread-safe.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import h11

USER_AGENT = "alb-proxy-health"

STATUS_CLASSES = {f"http_{n}xx": n for n in (2, 3, 4, 5)}
"""Config names of the status classes a check may accept (``HealthCheck.codes``)."""

_READ_SIZE = 16 * 1024
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token (an HTTP method)
_VISIBLE = re.compile(r"[\x21-\x7e]+")  # visible ASCII: no spaces, no controls

OnChange = Callable[[str, bool, str], None]


def parse_codes(codes: Iterable[str]) -> frozenset[int]:
    """``("http_2xx", "http_3xx")`` -> ``frozenset({2, 3})``; ValueError on an unknown name."""
    classes: set[int] = set()
    for code in codes:
        if code not in STATUS_CLASSES:
            raise ValueError(f"unknown code {code!r} (known: {', '.join(STATUS_CLASSES)})")
        classes.add(STATUS_CLASSES[code])
    return frozenset(classes)


@dataclass(frozen=True)
class CheckSpec:
    """What one active check does; built by the control plane from a group's ``health_check``.

    Invalid values raise ValueError here, so a bad spec fails in ``reconcile``'s caller instead
    of as a check that fails forever.
    """

    protocol: str
    """``http`` (request ``path``, judge the status) or ``tcp`` (a completed connect is success)."""
    path: str = "/health"
    method: str = "GET"
    host: str | None = None
    """Host header of an HTTP check; the checked address when None."""
    codes: frozenset[int] = frozenset({2, 3})
    """Accepted status classes: 2 means 2xx (see ``parse_codes``)."""
    interval: float = 2.0
    """Seconds from the end of one check to the start of the next."""
    timeout: float = 5.0
    """Seconds for a whole check: connect, send the request, read the status line."""
    healthy_threshold: int = 3
    """Consecutive successes that bring an unhealthy address back."""
    unhealthy_threshold: int = 3
    """Consecutive failures that take a healthy address down."""

    def __post_init__(self) -> None:
        if self.protocol not in ("http", "tcp"):
            raise ValueError(f"protocol must be http or tcp, got {self.protocol!r}")
        if not (self.path.startswith("/") and _VISIBLE.fullmatch(self.path)):
            raise ValueError(f"path must start with '/' and be visible ASCII, got {self.path!r}")
        if not _TOKEN.fullmatch(self.method):
            raise ValueError(f"method is not an HTTP token: {self.method!r}")
        if self.host is not None and not _VISIBLE.fullmatch(self.host):
            raise ValueError(f"host must be visible ASCII, got {self.host!r}")
        if not self.codes or not self.codes <= set(STATUS_CLASSES.values()):
            raise ValueError(f"codes must be a non-empty subset of 2..5, got {set(self.codes)}")
        if not (self.interval > 0 and self.timeout > 0):
            raise ValueError("interval and timeout must be positive")
        if self.healthy_threshold < 1 or self.unhealthy_threshold < 1:
            raise ValueError("thresholds must be at least 1")


@dataclass(frozen=True)
class Transition:
    healthy: bool
    """The new state."""
    streak: int
    """How many consecutive results of that kind caused it."""


class Thresholds:
    """Consecutive-result counting for one address. Pure: no clock, no I/O."""

    def __init__(
        self, healthy_threshold: int, unhealthy_threshold: int, *, healthy: bool = True
    ) -> None:
        if healthy_threshold < 1 or unhealthy_threshold < 1:
            raise ValueError("thresholds must be at least 1")
        self._rise = healthy_threshold
        self._fall = unhealthy_threshold
        self._healthy = healthy
        self._last: bool | None = None
        self._streak = 0

    @property
    def healthy(self) -> bool:
        return self._healthy

    def record(self, ok: bool) -> Transition | None:
        """Count one check result; the transition it completes, if any."""
        self._streak = self._streak + 1 if ok is self._last else 1
        self._last = ok
        if ok is not self._healthy and self._streak >= (self._rise if ok else self._fall):
            self._healthy = ok
            return Transition(ok, self._streak)
        return None

    def mark_down(self) -> bool:
        """A passive failure: down at once, streak forgotten. True if it was healthy."""
        was_healthy, self._healthy = self._healthy, False
        self._last, self._streak = None, 0
        return was_healthy


def split_address(address: str) -> tuple[str, int]:
    """``"10.0.0.1:80"``, ``"::1:80"`` or ``"[::1]:80"`` -> (host, port); ValueError otherwise."""
    host, sep, port_text = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not (sep and host and port_text.isdigit() and 1 <= int(port_text) <= 65535):
        raise ValueError(f"not a host:port address: {address!r}")
    return host, int(port_text)


class _CheckFailed(Exception):
    """A check failed for a reason that is not an exception of the I/O layer."""


async def check_once(host: str, port: int, spec: CheckSpec) -> str | None:
    """Run one check against ``host:port``: None on success, else what failed."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(spec.timeout):
            reader, writer = await asyncio.open_connection(host, port)
            if spec.protocol == "tcp":
                return None
            host_header = spec.host if spec.host else _host_header(host, port)
            status = await _read_status(reader, writer, spec, host_header)
    except TimeoutError:
        return f"timeout after {spec.timeout:g}s"
    except ConnectionRefusedError:
        return "connect refused"
    except OSError as broken:
        stage = "connect failed" if writer is None else "connection error"
        return f"{stage}: {broken.strerror if broken.strerror else broken}"
    except _CheckFailed as failed:
        return str(failed)
    except h11.RemoteProtocolError as bad:
        return f"bad response: {bad}"
    except Exception as exc:  # a check never raises: whatever went wrong is a failed check
        return f"check error: {type(exc).__name__}: {exc}"
    finally:
        if writer is not None:
            writer.close()  # unread response bytes may make this an RST, as HAProxy's checks do
    return None if status // 100 in spec.codes else f"status {status}"


def _host_header(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _read_status(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, spec: CheckSpec, host: str
) -> int:
    conn = h11.Connection(h11.CLIENT)
    headers = [("Host", host), ("User-Agent", USER_AGENT), ("Connection", "close")]
    request = h11.Request(method=spec.method, target=spec.path, headers=headers)
    head, end = conn.send(request), conn.send(h11.EndOfMessage())
    writer.write((head if head else b"") + (end if end else b""))
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await reader.read(_READ_SIZE)
            if not data:  # h11 would call this a protocol error; it is a plain close
                raise _CheckFailed("closed before the status line")
            conn.receive_data(data)
        elif isinstance(event, h11.Response):
            return event.status_code
        elif not isinstance(event, h11.InformationalResponse):  # a 1xx: the final one follows
            raise _CheckFailed(f"unexpected {type(event).__name__} before the status line")


@dataclass(eq=False)
class _State:
    """What the registry holds for one address it has an opinion about."""

    thresholds: Thresholds
    spec: CheckSpec | None = None
    """The active check, or None for an address only passive detection took down."""
    task: asyncio.Task[None] | None = None
    cooldown: asyncio.TimerHandle | None = None


def _plural(count: int, word: str) -> str:
    return f"{count} consecutive {word}{'' if count == 1 else 'es' if word.endswith('s') else 's'}"


class HealthRegistry:
    """Health and in-flight counts of every backend address; lives for the daemon's life.

    Addresses the registry holds no state for are healthy, so a snapshot or reload never has to
    register servers before they take traffic. After ``close()`` it only answers queries.
    """

    def __init__(
        self, *, on_change: OnChange | None = None, passive_cooldown: float = 10.0
    ) -> None:
        if passive_cooldown <= 0:
            raise ValueError("passive_cooldown must be positive")
        self._on_change = on_change
        self._cooldown = passive_cooldown
        self._states: dict[str, _State] = {}
        self._stopping: set[asyncio.Task[None]] = set()
        self._in_flight: dict[str, int] = {}
        self._closed = False

    # -- queries (the data plane's hot path) --------------------------------------------------

    def is_healthy(self, address: str) -> bool:
        """Whether new requests may go to ``address``; an unknown address is healthy."""
        state = self._states.get(address)
        return state is None or state.thresholds.healthy

    def snapshot(self) -> dict[str, bool]:
        """Every address with an active check or a passive mark-down, and its health."""
        return {address: state.thresholds.healthy for address, state in self._states.items()}

    def in_flight(self, address: str) -> int:
        """Requests currently out to ``address`` (for least-connections scheduling)."""
        return self._in_flight.get(address, 0)

    # -- data plane reports -------------------------------------------------------------------

    def request_started(self, address: str) -> None:
        self._in_flight[address] = self._in_flight.get(address, 0) + 1

    def request_finished(self, address: str) -> None:
        left = self._in_flight.get(address, 0) - 1
        if left > 0:
            self._in_flight[address] = left
        else:
            self._in_flight.pop(address, None)

    def connect_failed(self, address: str, detail: str) -> None:
        """Passive detection: a fresh connection to ``address`` failed; down at once."""
        if self._closed:
            return
        state = self._states.get(address)
        if state is None:
            state = self._states[address] = _State(Thresholds(1, 1))
        was_healthy = state.thresholds.mark_down()
        if state.spec is None:
            self._arm_cooldown(address, state)  # a failure while down restarts the cooldown
        if was_healthy:
            self._notify(address, False, f"passive: connect failed: {detail}")

    def connect_succeeded(self, address: str) -> None:
        """A fresh connection to ``address`` worked. Health is unchanged on purpose: a success
        cannot end a cooldown early (its attempt may predate the failure) nor overrule an active
        HTTP check (a port that accepts can still answer 503). Kept so the data plane reports
        both outcomes and a failure budget (nginx's ``max_fails``) can be added without it."""
        del address

    # -- control plane ------------------------------------------------------------------------

    def reconcile(self, checks: Mapping[str, CheckSpec]) -> None:
        """Make the active checks match ``checks`` (address -> spec); call from the loop.

        Every address is validated before anything changes, so a bad mapping changes nothing.
        """
        loop = asyncio.get_running_loop()
        if self._closed:
            raise RuntimeError("health registry is closed")
        targets = {address: split_address(address) for address in checks}
        for address, state in list(self._states.items()):
            if state.spec is not None and address not in checks:
                self._stop_task(state)
                state.spec = None
                if state.thresholds.healthy:
                    del self._states[address]
                else:
                    self._arm_cooldown(address, state)  # no check left to bring it back
        for address, spec in checks.items():
            known = self._states.get(address)
            if known is not None and known.spec == spec and known.task and not known.task.done():
                continue
            state = (
                known
                if known is not None
                else self._states.setdefault(address, _State(Thresholds(1, 1)))
            )
            self._stop_task(state)
            if state.cooldown is not None:
                state.cooldown.cancel()
                state.cooldown = None
            state.thresholds = Thresholds(
                spec.healthy_threshold, spec.unhealthy_threshold, healthy=state.thresholds.healthy
            )
            state.spec = spec
            host, port = targets[address]
            state.task = loop.create_task(
                self._check_loop(address, host, port, spec, state.thresholds),
                name=f"health check {address}",
            )

    async def close(self) -> None:
        """Stop every checker and timer and wait for the checkers to finish unwinding."""
        self._closed = True
        for state in self._states.values():
            self._stop_task(state)
            if state.cooldown is not None:
                state.cooldown.cancel()
                state.cooldown = None
        stopping, self._stopping = self._stopping, set()
        if stopping:
            await asyncio.gather(*stopping, return_exceptions=True)

    # -- internals ----------------------------------------------------------------------------

    async def _check_loop(
        self, address: str, host: str, port: int, spec: CheckSpec, thresholds: Thresholds
    ) -> None:
        # Runs until cancelled by reconcile or close. No await sits between a check's result and
        # its state update, so a cancelled task never writes state.
        while True:
            failure = await check_once(host, port, spec)
            transition = thresholds.record(failure is None)
            if transition is not None:
                if transition.healthy:
                    reason = _plural(transition.streak, "success")
                else:
                    reason = f"{_plural(transition.streak, 'failure')}: {failure}"
                self._notify(address, transition.healthy, reason)
            await asyncio.sleep(spec.interval)

    def _stop_task(self, state: _State) -> None:
        task, state.task = state.task, None
        if task is not None and not task.done():
            task.cancel()
            self._stopping.add(task)  # close() awaits it if it is still unwinding
            task.add_done_callback(self._stopping.discard)

    def _arm_cooldown(self, address: str, state: _State) -> None:
        if state.cooldown is not None:
            state.cooldown.cancel()
        loop = asyncio.get_running_loop()
        state.cooldown = loop.call_later(self._cooldown, self._cooldown_over, address, state)

    def _cooldown_over(self, address: str, state: _State) -> None:
        if self._states.get(address) is not state:
            return
        del self._states[address]  # half-open: unknown again, so healthy
        self._notify(address, True, "passive cooldown over")

    def _notify(self, address: str, healthy: bool, reason: str) -> None:
        if self._on_change is None:
            return
        try:
            self._on_change(address, healthy, reason)
        except Exception as exc:
            asyncio.get_running_loop().call_exception_handler(
                {"message": f"health on_change failed for {address}", "exception": exc}
            )
