"""HTTP/1.1 messages on the wire, sans-I/O: bytes in, events out; heads and bodies out as bytes.

Theory of operation
-------------------
Parsing is llhttp's, through ``httptools``: a C state machine that is strict by default (it
refuses ``Content-Length`` with ``Transfer-Encoding``, duplicate lengths, obs-fold, bare LF,
invalid tokens and targets) and costs a fraction of a pure-Python parser, which matters on the
proxy's hot path where every request is parsed twice (client's request, backend's response).
What llhttp leaves to its caller is done here, once:

- **Limits.** llhttp has no size limit: a head still incomplete after ``max_head`` bytes, or a
  complete one larger than that, is a 431.
- **Refusals with their own status.** A transfer coding other than ``chunked`` (501), ``CONNECT``
  (405) and an unknown method (501) are told apart from plain malformation (400).
- **Upgrades.** llhttp stops at the head of an upgrade request or a ``101`` response and hands
  back the bytes after it (:class:`Switched`). Only WebSocket is switched to; any other upgrade
  request is parsed on as a plain request.
- **Response framing that depends on the request.** A response to ``HEAD`` has no body whatever
  its headers say; llhttp cannot be told so, so the reader ends the message after its head and
  retires itself (the connection is then not reused). A response framed by the end of the
  connection ends at :meth:`ResponseReader.eof`.
- **Bytes past a response** (a backend answering more than it was asked) are never parsed as
  the next response: they mark the reader spoiled, and the connection is not reused.

Events are named tuples (immutable, compared by value, and cheap to make: two per message on
the hot path); header names are lowercased, order kept.
Serialising is plain bytes formatting: whatever goes out was parsed (and so validated) on the
way in, by llhttp, h2 or aioquic, or set by the proxy itself.
"""

from __future__ import annotations

import enum
import re
from collections import deque
from typing import NamedTuple

import httptools

Header = tuple[bytes, bytes]


class BodyKind(enum.Enum):
    NONE = "none"
    LENGTH = "length"
    CHUNKED = "chunked"
    UNTIL_CLOSE = "until_close"


class RequestHead(NamedTuple):
    method: bytes
    target: bytes
    headers: list[Header]
    http11: bool
    """HTTP/1.1 (else HTTP/1.0: no chunked responses, no keep-alive)."""
    keep_alive: bool
    """The client will send another request on this connection (version and Connection)."""
    body: BodyKind
    websocket: bool = False
    """The client asks to switch to WebSocket (``Connection: upgrade``, ``Upgrade: websocket``)."""


class ResponseHead(NamedTuple):
    status: int
    reason: bytes
    headers: list[Header]
    keep_alive: bool
    body: BodyKind


class Data(NamedTuple):
    data: bytes


class End(NamedTuple):
    trailers: list[Header] = []  # noqa: RUF012 - never mutated: events are values


class Switched(NamedTuple):
    """The message before was an upgrade: ``rest`` (and all that follows) is not HTTP/1.1."""

    rest: bytes


Event = RequestHead | ResponseHead | Data | End | Switched


class _Stop(Exception):
    """Raised from a callback to stop llhttp at once (the reason is in ``_Reader._error``)."""


class WireError(Exception):
    """The peer sent something that is not acceptable HTTP/1.1; ``status`` is the answer a
    client deserves (400, 431, 405, 501) or 502 for a backend."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


_ABSOLUTE_FORM = re.compile(
    rb"(?i:https?)://(?P<authority>[-A-Za-z0-9._~%!$&'()*+,;=:\[\]]+)"
    rb"(?P<path>/[^?#]*)?(?:\?(?P<query>[^#]*))?"
)
"""An http(s) URI as a request target (RFC 9112 §3.2.2), no userinfo, no fragment."""


def _origin_form(target: bytes, headers: list[Header], http11: bool) -> tuple[bytes, str]:
    """The target in origin form, and a problem (RFC 9112 §3.2: exactly one Host, required in
    HTTP/1.1). An absolute-form target wins over Host (§3.2.2): it becomes the path, and Host
    is set to its authority, so the backend and the proxy agree on the host. ``headers`` is
    changed in place in that case."""
    hosts = [i for i, (name, _) in enumerate(headers) if name == b"host"]
    if len(hosts) > 1:
        return target, "more than one Host header"
    if not target.startswith(b"/") and target != b"*":  # "*": OPTIONS only, checked by caller
        found = _ABSOLUTE_FORM.fullmatch(target)
        if found is None:  # "ftp://x/", a bare name, userinfo
            return target, "request target is neither a path nor an http(s) URI"
        authority, path, query = found.group("authority", "path", "query")
        if hosts:
            headers[hosts[0]] = (b"host", authority)
        else:
            headers.insert(0, (b"host", authority))
        return (path or b"/") + (b"?" + query if query is not None else b""), ""
    if not hosts and http11:
        return target, "HTTP/1.1 request without Host"
    return target, ""


def _tokens(headers: list[Header], wanted: bytes) -> set[bytes]:
    return {t.strip().lower() for n, v in headers if n == wanted for t in v.split(b",")}


class _Reader:
    """What requests and responses share: the callbacks llhttp calls, the head limit, events."""

    _too_large = 431
    """The status for a head over the limit."""

    def __init__(
        self,
        parser: httptools.HttpRequestParser | httptools.HttpResponseParser,
        max_head: int,
    ) -> None:
        self._parser = parser
        self._max_head = max_head
        self._events: deque[Event] = deque()
        self._headers: list[Header] = []
        self._trailers: list[Header] = []
        self._in_head = False
        self._head_size = 0
        """Of the head being parsed, as its fields arrive (names, values, separators)."""
        self._raw_head = 0
        """Bytes fed while the head was still incomplete (bounds a head that never ends)."""
        self._error: WireError | None = None
        self._codings: list[bytes] = []
        self._length: bytes | None = None

    def next_event(self) -> Event | None:
        """The next event, or None when more bytes are needed."""
        return self._events.popleft() if self._events else None

    @property
    def pending(self) -> bool:
        return bool(self._events)

    # llhttp's callbacks (httptools calls them by name)

    def on_message_begin(self) -> None:
        self._in_head = True
        self._head_size = 0
        self._raw_head = 0
        self._headers = []
        self._trailers = []
        self._codings = []
        self._length = None

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        self._head_size += len(name) + len(value) + 4
        if self._in_head:
            self._headers.append((name, value))
            if name == b"transfer-encoding":
                self._codings.append(value)
            elif name == b"content-length":
                self._length = value  # llhttp refuses two
        else:
            # Trailers count against the same limit as the head: else a client could send an
            # endless trailer section and have it kept.
            if self._head_size > self._max_head:
                self._error = WireError(self._too_large, f"trailers over {self._max_head} bytes")
                raise _Stop()
            self._trailers.append((name, value))

    def _body_kind(self) -> BodyKind:
        if self._codings:
            return BodyKind.CHUNKED  # llhttp refuses any other last coding
        if self._length is not None and self._length.strip() != b"0":
            return BodyKind.LENGTH
        return BodyKind.NONE

    def on_body(self, body: bytes) -> None:
        self._events.append(Data(body))

    def on_message_complete(self) -> None:
        self._events.append(End(self._trailers))

    def _after_feed(self, fed: int, began_in_head: bool) -> None:
        """Raise what a callback found; bound a head still incomplete after ``fed`` bytes (of
        which only a feed that began inside the head counts whole: one that began in a body
        ends with the next head's first bytes, counted as its fields arrive)."""
        if self._error is not None:
            raise self._error
        if self._in_head and began_in_head:
            self._raw_head += fed
            if self._raw_head > self._max_head:
                self._error = WireError(self._too_large, f"head over {self._max_head} bytes")
                raise self._error

    def _refusal(self, parse_error: WireError) -> WireError:
        """What to raise when llhttp stopped: the reason a callback found, if one did (a
        callback stops llhttp by raising), else llhttp's own."""
        return self._error if self._error is not None else parse_error

    def _head_too_large(self) -> bool:
        if self._head_size <= self._max_head:
            return False
        self._error = WireError(self._too_large, f"head of {self._head_size} bytes")
        return True


class RequestReader(_Reader):
    """A client's requests, one after another (pipelined requests queue up as events)."""

    def __init__(self, max_head: int = 64 * 1024) -> None:
        self._request_parser = httptools.HttpRequestParser(self)
        super().__init__(self._request_parser, max_head)
        self._url = b""
        self._websocket = False
        self._held: bytes | None = None
        self._replaying = False
        self._complete_events = 0
        """How many queued events (from the left) belong to requests parsed to their end."""

    def feed(self, data: bytes) -> None:
        """Parse ``data``; raises :class:`WireError`. After a :class:`Switched` event nothing
        is parsed until :meth:`resume` (the upgrade was refused) or ever (it was accepted).

        Requests complete before a bad one in the same bytes (pipelining) are served first:
        the error is then raised by :meth:`next_event` once they are taken."""
        if self._error is not None:
            raise self._error
        try:
            self._feed(data)
        except WireError as error:
            while len(self._events) > self._complete_events:
                self._events.pop()  # what the bad request had begun
            self._error = error
            if not self._events:
                raise

    def next_event(self) -> Event | None:
        if self._events:
            self._complete_events = max(0, self._complete_events - 1)
            return self._events.popleft()
        if self._error is not None:
            raise self._error
        return None

    @property
    def pending(self) -> bool:
        return bool(self._events) or self._error is not None

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self._error is None:  # else its head was refused: the end of a bad request
            self._complete_events = len(self._events)

    def _feed(self, data: bytes) -> None:
        if self._held is not None:
            self._held += data
            return
        began_in_head = self._in_head
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            if self._error is not None:
                raise self._error from None
            rest = data[upgrade.args[0] :]
            if self._websocket:
                self._held = rest
                self._events.append(Switched(rest))
            else:
                self._not_an_upgrade(rest)
            return
        except httptools.HttpParserInvalidMethodError:
            raise self._refusal(WireError(501, "unknown request method")) from None
        except httptools.HttpParserError as exc:
            raise self._refusal(WireError(400, str(exc) or "malformed request")) from None
        self._after_feed(len(data), began_in_head)

    def _not_an_upgrade(self, rest: bytes) -> None:
        """h2c and friends are not switched to: the request goes on as a plain one. llhttp has
        ended it at its head (an upgrade carries no body for llhttp), so its body is parsed by
        a fresh parser, fed the head again without the upgrade, then the rest."""
        assert isinstance(self._events[-1], End)
        self._events.pop()  # not the end after all
        self._complete_events = min(self._complete_events, len(self._events))
        head = self._replayed_head
        self._parser = self._request_parser = httptools.HttpRequestParser(self)
        self._replaying = True
        self.feed(head + rest)

    @property
    def _replayed_head(self) -> bytes:
        headers = [
            (n, v)
            for n, v in self._headers
            if n not in (b"upgrade", b"connection", b"http2-settings")
        ]
        return request_head(self._request_parser.get_method(), self._url, headers)

    def resume(self) -> None:
        """The upgrade was refused: what the client sent after the head is HTTP/1.1 again."""
        held, self._held = self._held, None
        if held:
            self.feed(held)

    def on_url(self, url: bytes) -> None:
        if not self._replaying:
            self._url += url  # llhttp may deliver a target split across feeds in pieces

    def on_message_begin(self) -> None:
        if self._replaying:
            return  # the head of a request already announced, fed again for its body
        super().on_message_begin()
        self._url = b""
        self._websocket = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._replaying:
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._replaying:
            self._replaying = False
            self._in_head = False
            return
        self._in_head = False
        parser = self._request_parser
        method = parser.get_method()
        headers = self._headers
        self._head_size += len(method) + len(self._url) + 12
        if self._head_too_large():
            return
        if self._codings:
            codings = {t.strip().lower() for v in self._codings for t in v.split(b",")}
            if codings != {b"chunked"}:
                self._error = WireError(501, f"transfer coding {b', '.join(sorted(codings))!r}")
                return
        if method == b"CONNECT":
            self._error = WireError(405, "CONNECT is not proxied")  # a reverse proxy, no tunnel
            return
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            # llhttp takes HTTP/0.9 (no headers, no framing) and "HTTP/2.0" as text; neither
            # can be forwarded faithfully as HTTP/1.1.
            if version.startswith("0."):
                self._error = WireError(400, "HTTP/0.9 requests are not supported")
            else:
                self._error = WireError(505, f"HTTP/{version} is not supported over HTTP/1")
            return
        http11 = version == "1.1"
        target, problem = _origin_form(self._url, headers, http11)
        if target == b"*" and method != b"OPTIONS":
            problem = "the asterisk target is for OPTIONS only"
        if problem:
            self._error = WireError(400, problem)
            return
        self._websocket = (
            parser.should_upgrade()
            and b"upgrade" in _tokens(headers, b"connection")
            and b"websocket" in _tokens(headers, b"upgrade")
        )
        self._events.append(
            RequestHead(
                method=method,
                target=target,
                headers=headers,
                http11=http11,
                keep_alive=parser.should_keep_alive(),
                body=self._body_kind(),
                websocket=self._websocket,
            )
        )


class ResponseReader(_Reader):
    """A backend's responses on one connection, each read for the request it answers."""

    _too_large = 502

    def __init__(self, max_head: int = 64 * 1024) -> None:
        self._response_parser = httptools.HttpResponseParser(self)
        super().__init__(self._response_parser, max_head)
        self._reason = b""
        self._head_request = False
        self._until_close = False
        self._complete = False
        self.spoiled = False
        """Bytes arrived that no request asked for, or the reader cannot go on (HEAD): the
        connection must not carry another request."""

    def expect(self, method: bytes) -> None:
        """The next response answers a ``method`` request."""
        self._head_request = method == b"HEAD"
        self._complete = False

    def feed(self, data: bytes) -> None:
        """Parse ``data``; raises :class:`WireError` (502) for a malformed response. Bytes past
        the end of the expected response spoil the reader instead of raising."""
        if self._error is not None:
            raise self._error
        if self.spoiled:
            return
        began_in_head = self._in_head
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._events.append(Switched(data[upgrade.args[0] :]))
            self.spoiled = True  # never HTTP/1.1 again
            return
        except httptools.HttpParserError as exc:
            if self._complete:
                self.spoiled = True  # garbage after a complete response: its own problem
                return
            raise self._refusal(WireError(502, str(exc) or "malformed response")) from None
        self._after_feed(len(data), began_in_head)

    def eof(self) -> bool:
        """The backend closed: True if that ended a response framed by the connection's end
        (an :class:`End` is queued); False if a response was cut short or never began."""
        if self._until_close and not self._complete:
            self._complete = True
            self._events.append(End())
            return True
        return False

    def on_message_begin(self) -> None:
        if self._complete:
            self.spoiled = True  # a second response to one request
        super().on_message_begin()
        self._reason = b""
        self._until_close = False

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_body(self, body: bytes) -> None:
        if not self.spoiled:
            super().on_body(body)

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self.spoiled:
            return  # a response nobody asked for: parsed to be discarded
        parser = self._response_parser
        status = parser.get_status_code()
        headers = self._headers
        self._head_size += len(self._reason) + 15
        if self._head_too_large():
            return
        if not 100 <= status <= 599:
            # llhttp reads any three digits; "099" is no 1xx and "999" no status a client knows.
            self._error = WireError(502, f"status {status:03d}")
            raise _Stop()
        if self._codings:
            codings = [t.strip().lower() for v in self._codings for t in v.split(b",")]
            if codings != [b"chunked"]:
                # Relaying would mean decoding it, or a client told "chunked" of a body
                # that is not: neither is what a load balancer does with a backend's answer.
                self._error = WireError(502, f"transfer coding {b', '.join(codings)!r}")
                raise _Stop()
        body = self._body_kind()
        if status < 200 or status in (204, 304) or self._head_request:
            body = BodyKind.NONE
        elif body is BodyKind.NONE and self._length is None:
            body = BodyKind.UNTIL_CLOSE
            self._until_close = True
        self._events.append(
            ResponseHead(
                status=status,
                reason=self._reason,
                headers=headers,
                keep_alive=parser.should_keep_alive() and not self._until_close,
                body=body,
            )
        )
        if self._head_request and status >= 200:
            # llhttp would wait for the body its headers announce; a HEAD response has none.
            self._complete = True
            self._events.append(End())
            self.spoiled = True

    def on_message_complete(self) -> None:
        if self._complete or self.spoiled or self._response_parser.get_status_code() < 200:
            return  # a HEAD response's end is queued already; a 1xx is its head alone
        super().on_message_complete()
        self._complete = True


# -- writing -------------------------------------------------------------------------------------


def _head_lines(headers: list[Header]) -> bytes:
    return b"".join(b"%s: %s\r\n" % (name, value) for name, value in headers)


def request_head(method: bytes, target: bytes, headers: list[Header]) -> bytes:
    return b"%s %s HTTP/1.1\r\n%s\r\n" % (method, target, _head_lines(headers))


def response_head(status: int, reason: bytes, headers: list[Header]) -> bytes:
    return b"HTTP/1.1 %d %s\r\n%s\r\n" % (status, reason, _head_lines(headers))


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def last_chunk(trailers: list[Header]) -> bytes:
    return b"0\r\n%s\r\n" % _head_lines(trailers)
