"""HTTP/1.1 on the wire (sans-I/O): what is parsed, refused with which status, and written."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alb_proxy.http.h1wire import (
    BodyKind,
    Data,
    End,
    Event,
    RequestHead,
    RequestReader,
    ResponseHead,
    ResponseReader,
    Switched,
    WireError,
    chunk,
    last_chunk,
    request_head,
    response_head,
)


def drain(reader: RequestReader | ResponseReader) -> list[Event]:
    events = []
    while (ev := reader.next_event()) is not None:
        events.append(ev)
    return events


def requests(*chunks: bytes, max_head: int = 64 * 1024) -> list[Event]:
    reader = RequestReader(max_head)
    for data in chunks:
        reader.feed(data)
    return drain(reader)


def responses(method: bytes, *chunks: bytes) -> tuple[list[Event], ResponseReader]:
    reader = ResponseReader()
    reader.expect(method)
    for data in chunks:
        reader.feed(data)
    return drain(reader), reader


def test_a_request_with_a_chunked_body_and_trailers() -> None:
    events = requests(
        b"POST /up?x=1 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"2\r\nok\r\n0\r\nX-Sum: 1\r\n\r\n",
    )
    head = events[0]
    assert head == RequestHead(
        method=b"POST",
        target=b"/up?x=1",
        headers=[(b"host", b"a"), (b"transfer-encoding", b"chunked")],
        http11=True,
        keep_alive=True,
        body=BodyKind.CHUNKED,
    )
    assert events[1:] == [Data(b"ok"), End([(b"x-sum", b"1")])]


def test_a_head_split_anywhere_parses_the_same() -> None:
    raw = b"GET /some/long/target HTTP/1.1\r\nHost: example.test\r\nX-A: 1\r\n\r\n"
    whole = requests(raw)
    for cut in range(1, len(raw)):
        assert requests(raw[:cut], raw[cut:]) == whole


def test_pipelined_requests_queue_up_in_order() -> None:
    events = requests(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.0\r\n\r\n")
    heads = [e for e in events if isinstance(e, RequestHead)]
    assert [(h.target, h.http11, h.keep_alive) for h in heads] == [
        (b"/1", True, True),
        (b"/2", False, False),
    ]
    assert [type(e) for e in events] == [RequestHead, End, RequestHead, End]


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nBad Header: 1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n", 400),  # obs-fold
        (b"GET / HTTP/1.1\nHost: x\n\n", 400),  # bare LF
        (b"GET /a b HTTP/1.1\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
        (b"BREW / HTTP/1.1\r\n\r\n", 501),
        (b"CONNECT a:22 HTTP/1.1\r\nHost: a:22\r\n\r\n", 405),
        (b"GET /\r\n\r\n", 400),  # HTTP/0.9
        (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505),
        (b"GET / HTTP/1.2\r\nHost: x\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nX: " + b"a" * 3000 + b"\r\n\r\n", 431),
        (  # a length among the trailers could reframe what follows for a lenient recipient
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nContent-Length: 9\r\n\r\n",
            400,
        ),
    ],
)
def test_refusals_carry_the_status_to_answer(raw: bytes, status: int) -> None:
    with pytest.raises(WireError) as refused:
        requests(raw, max_head=2048)
    assert refused.value.status == status


def test_an_endless_head_is_refused_before_it_ends() -> None:
    reader = RequestReader(max_head=2048)
    reader.feed(b"GET / HTTP/1.1\r\n")
    with pytest.raises(WireError) as refused:
        for _ in range(100):
            reader.feed(b"X-Pad: " + b"p" * 60 + b"\r\n")
    assert refused.value.status == 431


def test_a_head_near_the_limit_split_over_feeds_is_accepted() -> None:
    raw = b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * 1900 + b"\r\n\r\n"
    assert isinstance(requests(raw[:1000], raw[1000:], max_head=2048)[0], RequestHead)


def test_websocket_upgrade_switches_and_a_refused_one_resumes() -> None:
    reader = RequestReader()
    reader.feed(
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nRAW"
    )
    head, end, switched = drain(reader)
    assert isinstance(head, RequestHead) and head.websocket
    assert isinstance(end, End) and switched == Switched(b"RAW")
    reader.feed(b"MORE")  # held while the backend decides
    assert drain(reader) == []
    reader2 = RequestReader()
    reader2.feed(
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    drain(reader2)
    reader2.resume()  # the backend said no: the bytes after the head are HTTP again
    heads = [e for e in drain(reader2) if isinstance(e, RequestHead)]
    assert [h.target for h in heads] == [b"/next"]


def test_other_upgrades_are_parsed_as_plain_requests() -> None:
    events = requests(
        b"GET /h2c HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
        b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    heads = [e for e in events if isinstance(e, RequestHead)]
    assert [(h.target, h.websocket) for h in heads] == [(b"/h2c", False), (b"/2", False)]
    assert not any(isinstance(e, Switched) for e in events)


def test_responses_with_each_framing() -> None:
    events, reader = responses(b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert events == [
        ResponseHead(200, b"OK", [(b"content-length", b"2")], True, BodyKind.LENGTH),
        Data(b"ok"),
        End(),
    ]
    assert not reader.spoiled
    events, _ = responses(
        b"GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nT: 1\r\n\r\n"
    )
    assert events[1:] == [Data(b"ok"), End([(b"t", b"1")])]
    events, reader = responses(b"GET", b"HTTP/1.1 200 OK\r\n\r\nuntil the end")
    assert isinstance(events[0], ResponseHead) and events[0].body is BodyKind.UNTIL_CLOSE
    assert not events[0].keep_alive
    assert reader.eof() and drain(reader) == [End()]


def test_informational_responses_come_before_the_final_one() -> None:
    events, _ = responses(
        b"POST",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
        b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n",
    )
    assert [(type(e).__name__, getattr(e, "status", None)) for e in events] == [
        ("ResponseHead", 100),
        ("ResponseHead", 103),
        ("ResponseHead", 201),
        ("End", None),
    ]


def test_a_head_response_ends_at_its_head_and_retires_the_connection() -> None:
    events, reader = responses(b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    assert [type(e) for e in events] == [ResponseHead, End]
    assert reader.spoiled


def test_bytes_past_a_response_spoil_the_reader_and_reach_nobody() -> None:
    for extra in (b"STOLEN", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"):
        events, reader = responses(
            b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + extra
        )
        assert events[-1] == End() and len(events) == 3
        assert reader.spoiled


def test_a_switch_hands_over_the_rest() -> None:
    events, reader = responses(
        b"GET",
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\nWS",
    )
    assert isinstance(events[0], ResponseHead) and events[0].status == 101
    assert events[-1] == Switched(b"WS") and reader.spoiled


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"this is not HTTP at all\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 099 Early\r\n\r\n",
        b"HTTP/1.1 000 Zero\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 999 Nine\r\nContent-Length: 0\r\n\r\n",
    ],
)
def test_malformed_responses_are_502(raw: bytes) -> None:
    with pytest.raises(WireError) as refused:
        responses(b"GET", raw)
    assert refused.value.status == 502


def test_writing() -> None:
    assert request_head(b"GET", b"/", [(b"host", b"a")]) == b"GET / HTTP/1.1\r\nhost: a\r\n\r\n"
    assert response_head(404, b"Not Found", []) == b"HTTP/1.1 404 Not Found\r\n\r\n"
    assert chunk(b"hello") == b"5\r\nhello\r\n"
    assert last_chunk([(b"x", b"1")]) == b"0\r\nx: 1\r\n\r\n"


@settings(max_examples=500)
@given(st.lists(st.binary(max_size=200), max_size=6))
def test_any_bytes_give_events_or_a_wire_error(chunks: list[bytes]) -> None:
    for reader in (RequestReader(max_head=1024), ResponseReader(max_head=1024)):
        try:
            for data in chunks:
                reader.feed(data)
            drain(reader)  # a bad request after good ones is raised once they are taken
        except WireError as exc:
            assert exc.status in (400, 405, 431, 501, 502, 505)


@settings(max_examples=300)
@given(
    st.lists(
        st.tuples(
            st.from_regex(rb"[a-z][a-z0-9-]{0,15}", fullmatch=True),
            st.from_regex(rb"[!-~]([ -~]{0,30}[!-~])?", fullmatch=True),
        ),
        max_size=8,
    ),
    st.binary(max_size=300),
    st.integers(min_value=1, max_value=50),
)
def test_what_is_written_parses_back(
    headers: list[tuple[bytes, bytes]], body: bytes, cut: int
) -> None:
    headers = [(n, v) for n, v in headers if n not in (b"content-length", b"transfer-encoding")]
    headers = [(b"host", b"a"), *(h for h in headers if h[0] != b"host")]
    raw = request_head(b"PUT", b"/x", [*headers, (b"transfer-encoding", b"chunked")])
    raw += chunk(body) if body else b""
    raw += last_chunk([(b"x-t", b"1")])
    reader = RequestReader()
    for start in range(0, len(raw), cut):
        reader.feed(raw[start : start + cut])
    events = drain(reader)
    head = events[0]
    assert isinstance(head, RequestHead)
    assert head.headers == [*headers, (b"transfer-encoding", b"chunked")]
    assert b"".join(e.data for e in events if isinstance(e, Data)) == body
    assert events[-1] == End([(b"x-t", b"1")])


def test_an_endless_trailer_section_is_refused() -> None:
    reader = RequestReader(max_head=2048)
    reader.feed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n")
    with pytest.raises(WireError) as refused:
        for _ in range(100):
            reader.feed(b"X-Pad: " + b"p" * 60 + b"\r\n")
    assert refused.value.status == 431


def test_a_pipelined_head_after_a_large_body_is_not_counted_with_it() -> None:
    body = b"b" * 100_000
    raw = b"POST /1 HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n%sGET /2 HTT" % (
        len(body),
        body,
    )
    reader = RequestReader(max_head=2048)
    reader.feed(raw)
    reader.feed(b"P/1.1\r\nHost: a\r\n\r\n")
    heads = [e for e in drain(reader) if isinstance(e, RequestHead)]
    assert [h.target for h in heads] == [b"/1", b"/2"]


@pytest.mark.parametrize("split", [False, True])
def test_an_h2c_upgrade_with_a_body_keeps_its_body(split: bool) -> None:
    head = (
        b"POST /form HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\nContent-Length: 5\r\n\r\n"
    )
    chunks = [head, b"hello"] if split else [head + b"hello"]
    events = requests(*chunks, b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n")
    assert [type(e) for e in events] == [RequestHead, Data, End, RequestHead, End]
    first = events[0]
    assert isinstance(first, RequestHead) and first.body is BodyKind.LENGTH
    assert not first.websocket
    assert events[1] == Data(b"hello")


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "more than one Host header"),
        (b"GET / HTTP/1.1\r\n\r\n", "HTTP/1.1 request without Host"),
    ],
)
def test_host_must_be_one_and_there(raw: bytes, problem: str) -> None:
    with pytest.raises(WireError, match=problem) as refused:
        requests(raw)
    assert refused.value.status == 400


def test_http_1_0_may_go_without_host() -> None:
    head = requests(b"GET /old HTTP/1.0\r\n\r\n")[0]
    assert isinstance(head, RequestHead) and head.headers == []


def test_an_absolute_form_target_wins_over_host() -> None:
    head = requests(b"GET http://good.example:8080/p?q=1 HTTP/1.1\r\nHost: evil.example\r\n\r\n")[0]
    assert isinstance(head, RequestHead)
    assert head.target == b"/p?q=1"
    assert head.headers == [(b"host", b"good.example:8080")]


def test_an_absolute_form_target_keeps_its_query_even_without_a_path() -> None:
    head = requests(b"GET HTTP://Evil.example?x=1 HTTP/1.1\r\n\r\n")[0]
    assert isinstance(head, RequestHead)
    assert (head.target, head.headers) == (b"/?x=1", [(b"host", b"Evil.example")])


@pytest.mark.parametrize(
    "target",
    [b"ftp://a.example/x", b"http://user@a.example/", b"http://", b"a.example/x", b"*"],
)
def test_targets_that_are_no_http_uri_nor_path_are_400(target: bytes) -> None:
    with pytest.raises(WireError) as refused:
        requests(b"GET " + target + b" HTTP/1.1\r\nHost: a\r\n\r\n")
    assert refused.value.status == 400
    options = requests(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n")[0]
    assert isinstance(options, RequestHead) and options.target == b"*"


def test_a_response_with_a_transfer_coding_other_than_chunked_is_502() -> None:
    with pytest.raises(WireError, match="transfer coding") as refused:
        responses(b"GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nxx")
    assert refused.value.status == 502


def test_response_trailers_are_bounded_too() -> None:
    reader = ResponseReader(max_head=1024)
    reader.expect(b"GET")
    reader.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n")
    with pytest.raises(WireError) as refused:
        for _ in range(100):
            reader.feed(b"X-Pad: " + b"p" * 60 + b"\r\n")
    assert refused.value.status == 502


def test_requests_before_a_bad_one_in_the_same_bytes_are_served_first() -> None:
    reader = RequestReader()
    reader.feed(
        b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /bad HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\r\n"
    )
    head = reader.next_event()
    assert isinstance(head, RequestHead) and head.target == b"/ok"
    assert isinstance(reader.next_event(), End)
    assert reader.pending  # the error is still to be answered
    with pytest.raises(WireError) as refused:
        reader.next_event()
    assert refused.value.status == 400
