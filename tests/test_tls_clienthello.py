"""The ClientHello parser, on hellos from real clients (Python ``ssl``, ``openssl s_client``),
on hand-built edge cases, and under hypothesis: the only outcomes are ``None`` (need more
bytes), a ``ClientHello`` or ``ClientHelloError``."""

from __future__ import annotations

import ast
import functools
import shutil
import socket
import ssl
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alb_proxy.errors import AlbError
from alb_proxy.tls.clienthello import (
    MAX_BUFFERED,
    MAX_CLIENT_HELLO,
    MAX_RECORDS,
    ClientHello,
    ClientHelloError,
    parse_client_hello,
)

TLS12, TLS13 = 0x0303, 0x0304

# -- building hellos ---------------------------------------------------------------------------


def python_hello(
    server_hostname: str | None = "www.example.com",
    *,
    alpn: list[str] | None = None,
    minimum: ssl.TLSVersion | None = None,
    maximum: ssl.TLSVersion | None = None,
) -> bytes:
    """The first flight of a real Python ``ssl`` client, taken from its outgoing MemoryBIO."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    with warnings.catch_warnings():  # only for the TLS 1.0 client below
        warnings.filterwarnings("ignore", "ssl.TLSVersion.TLSv1", DeprecationWarning)
        if minimum is not None:
            ctx.minimum_version = minimum
        if maximum is not None:
            ctx.maximum_version = maximum
    if minimum is ssl.TLSVersion.TLSv1:
        ctx.set_ciphers("ALL:@SECLEVEL=0")
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    sslobj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        sslobj.do_handshake()
    return outgoing.read()


@functools.cache
def real_hellos() -> dict[str, bytes]:
    return {
        "sni": python_hello("www.example.com"),
        "no_sni": python_hello(None),
        "alpn": python_hello("api.example.com", alpn=["h2", "http/1.1"]),
        "tls12_only": python_hello("old.example.com", maximum=ssl.TLSVersion.TLSv1_2),
        "tls13_only": python_hello("new.example.com", minimum=ssl.TLSVersion.TLSv1_3),
        "tls10_only": python_hello(
            "legacy.example.com", minimum=ssl.TLSVersion.TLSv1, maximum=ssl.TLSVersion.TLSv1
        ),
    }


def message_of(hello: bytes) -> bytes:
    """The handshake message of a hello sent in one record (what every client here does)."""
    assert hello[0] == 22 and int.from_bytes(hello[3:5], "big") == len(hello) - 5
    return hello[5:]


def frame(message: bytes, sizes: list[int] | None = None, version: bytes = b"\x03\x01") -> bytes:
    """Put a handshake message into records of the given payload sizes (last one: the rest)."""
    out = bytearray()
    pos = 0
    for size in [*(sizes or []), len(message)]:
        chunk = message[pos : pos + size]
        if chunk:
            out += b"\x16" + version + len(chunk).to_bytes(2, "big") + chunk
        pos += len(chunk)
    return bytes(out)


def u16(n: int) -> bytes:
    return n.to_bytes(2, "big")


def vec8(data: bytes) -> bytes:
    return bytes([len(data)]) + data


def vec16(data: bytes) -> bytes:
    return u16(len(data)) + data


def ext(ext_type: int, data: bytes) -> bytes:
    return u16(ext_type) + vec16(data)


def sni_ext(*names: bytes, name_type: int = 0) -> bytes:
    return ext(0, vec16(b"".join(bytes([name_type]) + vec16(n) for n in names)))


def alpn_ext(*names: bytes) -> bytes:
    return ext(16, vec16(b"".join(vec8(n) for n in names)))


def versions_ext(*versions: int) -> bytes:
    return ext(43, vec8(b"".join(u16(v) for v in versions)))


def body(
    extensions: bytes | None = b"",
    *,
    version: int = TLS12,
    session_id: bytes = b"\x00" * 32,
    suites: bytes = b"\x13\x01\xc0\x2f",
    compression: bytes = b"\x00",
) -> bytes:
    """A ClientHello body; ``extensions=None`` omits the block (allowed before TLS 1.3)."""
    head = u16(version) + b"\x11" * 32 + vec8(session_id) + vec16(suites) + vec8(compression)
    return head if extensions is None else head + vec16(extensions)


def hello(body_bytes: bytes, msg_type: int = 1) -> bytes:
    """One record holding one handshake message."""
    return frame(bytes([msg_type]) + len(body_bytes).to_bytes(3, "big") + body_bytes)


def parse_error(data: bytes) -> str:
    with pytest.raises(ClientHelloError) as info:
        parse_client_hello(data)
    assert isinstance(info.value, AlbError)
    return info.value.reason


# -- real clients ------------------------------------------------------------------------------


def test_sni_from_a_python_client() -> None:
    parsed = parse_client_hello(real_hellos()["sni"])
    assert parsed is not None
    assert parsed.server_name == "www.example.com"
    assert parsed.alpn_protocols == ()
    assert parsed.legacy_version == TLS12
    assert TLS13 in parsed.supported_versions and TLS12 in parsed.supported_versions
    assert 0x1301 in parsed.cipher_suites  # TLS_AES_128_GCM_SHA256
    assert 0 in parsed.extension_types


def test_no_sni() -> None:
    parsed = parse_client_hello(real_hellos()["no_sni"])
    assert parsed is not None
    assert parsed.server_name is None
    assert 0 not in parsed.extension_types


def test_ip_literal_is_not_sent_as_sni() -> None:
    parsed = parse_client_hello(python_hello("127.0.0.1"))
    assert parsed is not None and parsed.server_name is None


def test_sni_is_returned_as_sent() -> None:
    for sent in ("WWW.Example.COM", "example.com.", "under_score.example"):
        parsed = parse_client_hello(python_hello(sent))
        assert parsed is not None and parsed.server_name == sent


def test_idn_arrives_as_a_labels() -> None:
    parsed = parse_client_hello(python_hello("bücher.example"))
    assert parsed is not None and parsed.server_name == "xn--bcher-kva.example"


def test_alpn() -> None:
    parsed = parse_client_hello(real_hellos()["alpn"])
    assert parsed is not None
    assert parsed.server_name == "api.example.com"
    assert parsed.alpn_protocols == ("h2", "http/1.1")


def test_tls12_only_client() -> None:
    parsed = parse_client_hello(real_hellos()["tls12_only"])
    assert parsed is not None
    assert parsed.server_name == "old.example.com"
    assert parsed.legacy_version == TLS12
    assert TLS13 not in parsed.supported_versions
    assert 0x1301 not in parsed.cipher_suites


def test_tls13_only_client() -> None:
    parsed = parse_client_hello(real_hellos()["tls13_only"])
    assert parsed is not None
    assert parsed.server_name == "new.example.com"
    assert parsed.legacy_version == TLS12  # frozen at 1.2 by RFC 8446
    assert parsed.supported_versions == (TLS13,)


def test_tls10_client() -> None:
    parsed = parse_client_hello(real_hellos()["tls10_only"])
    assert parsed is not None
    assert parsed.server_name == "legacy.example.com"
    assert parsed.legacy_version == 0x0301
    assert parsed.supported_versions == ()


@pytest.mark.parametrize("name", ["sni", "no_sni", "alpn", "tls12_only", "tls13_only"])
def test_every_split_point_needs_more_bytes_until_complete(name: str) -> None:
    data = real_hellos()[name]
    expected = parse_client_hello(data)
    assert isinstance(expected, ClientHello)
    for cut in range(len(data)):
        assert parse_client_hello(data[:cut]) is None, cut
    # Whatever follows the hello (e.g. early data) is not looked at.
    assert parse_client_hello(data + b"\x17\x03\x03\x00\x02zz") == expected
    assert parse_client_hello(data + b"\xff" * 10) == expected


@pytest.mark.parametrize("name", ["sni", "alpn"])
def test_hello_split_across_two_records(name: str) -> None:
    data = real_hellos()[name]
    expected = parse_client_hello(data)
    message = message_of(data)
    for split in range(1, len(message)):
        two = frame(message, [split])
        assert two.count(b"\x16\x03\x01") >= 2
        assert parse_client_hello(two) == expected, split
    two = frame(message, [len(message) // 2])
    for cut in range(len(two)):
        assert parse_client_hello(two[:cut]) is None, cut


def test_hello_of_exactly_the_size_limit_spanning_five_records() -> None:
    extensions = sni_ext(b"big.example") + alpn_ext(b"h2")
    fixed = len(body(extensions)) + 4  # + the padding extension's own header
    padded = body(extensions + ext(21, b"\x00" * (MAX_CLIENT_HELLO - fixed)))
    assert len(padded) == MAX_CLIENT_HELLO
    message = b"\x01" + len(padded).to_bytes(3, "big") + padded
    data = frame(message, [2**14] * 4)
    assert data.count(b"\x16\x03\x01\x40\x00") == 4
    parsed = parse_client_hello(data)
    assert parsed is not None
    assert parsed.server_name == "big.example" and parsed.alpn_protocols == ("h2",)
    assert parse_client_hello(data[:-1]) is None
    assert len(data) - 1 <= MAX_BUFFERED


def test_openssl_s_client_hello() -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is not installed: s_client's hello is not tested")
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(10)
        port = server.getsockname()[1]
        args = ["s_client", "-connect", f"127.0.0.1:{port}", "-servername", "s-client.example"]
        client = subprocess.Popen(
            [openssl, *args, "-alpn", "h2,http/1.1"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            conn, _ = server.accept()
            with conn:
                conn.settimeout(10)
                data = b""
                parsed = None
                while parsed is None:
                    chunk = conn.recv(4096)
                    assert chunk, "s_client closed before sending a whole ClientHello"
                    data += chunk
                    parsed = parse_client_hello(data)
        finally:
            client.kill()
            client.wait()
    assert parsed.server_name == "s-client.example"
    assert parsed.alpn_protocols == ("h2", "http/1.1")
    assert TLS13 in parsed.supported_versions


# -- not TLS, or not a ClientHello -------------------------------------------------------------


def test_plain_http() -> None:
    reason = parse_error(b"GET / HTTP/1.1\r\n")
    assert "not a TLS handshake" in reason and "plain HTTP" in reason
    assert "plain HTTP" in parse_error(b"P")  # refused on the first byte, no buffering


def test_sslv2_hello() -> None:
    v2 = b"\x80\x2e\x01\x03\x01\x00\x15\x00\x00\x00\x10" + b"\x00" * 37
    assert "SSLv2" in parse_error(v2)


@pytest.mark.parametrize(
    "data",
    [b"\x17\x03\x03\x00\x05hello", b"\x15\x03\x03\x00\x02\x02\x28", b"\x00", b"\x16\x02"],
)
def test_other_records_are_not_a_handshake(data: bytes) -> None:
    assert "not a TLS handshake" in parse_error(data)


def test_wrong_handshake_type_is_refused_from_its_header() -> None:
    server_hello_like = hello(body(), msg_type=2)
    assert "type 2" in parse_error(server_hello_like[:9])


def test_oversized_hello_is_refused_from_its_header() -> None:
    header = b"\x16\x03\x01\x40\x00" + b"\x01" + (MAX_CLIENT_HELLO + 1).to_bytes(3, "big")
    assert "limit" in parse_error(header)


@pytest.mark.parametrize(
    ("record", "words"),
    [
        (b"\x16\x03\x01\x40\x01", "16385 bytes"),
        (b"\x16\x03\x01\x00\x00", "empty"),
        (b"\x16\x04\x01\x00\x10", "version"),
    ],
)
def test_bad_record_headers(record: bytes, words: str) -> None:
    assert words in parse_error(record)


@pytest.mark.parametrize("record_type", [b"\x14", b"\x15", b"\x17"])
def test_handshake_interrupted_by_another_record(record_type: bytes) -> None:
    message = message_of(real_hellos()["sni"])
    first = frame(message[:50])
    assert parse_client_hello(first) is None
    assert "interrupted" in parse_error(first + record_type)
    assert "interrupted" in parse_error(first + record_type + b"\x03\x03\x00\x01\x01")


def test_record_count_is_bounded() -> None:
    message = message_of(real_hellos()["sni"])
    assert len(message) > MAX_RECORDS + 1
    at_limit = frame(message, [1] * (MAX_RECORDS - 1))
    assert parse_client_hello(at_limit) == parse_client_hello(real_hellos()["sni"])
    over = frame(message, [1] * MAX_RECORDS)
    assert "records" in parse_error(over)


def test_hello_without_extensions() -> None:
    parsed = parse_client_hello(hello(body(None, version=0x0301)))
    assert parsed == ClientHello(
        server_name=None,
        alpn_protocols=(),
        legacy_version=0x0301,
        supported_versions=(),
        cipher_suites=(0x1301, 0xC02F),
        extension_types=(),
    )


def test_grease_and_unknown_extensions_pass_through() -> None:
    extensions = (
        ext(0x0A0A, b"")
        + sni_ext(b"grease.example")
        + versions_ext(0x1A1A, TLS13, TLS12)
        + ext(0xFE0D, b"\x00" * 40)
        + alpn_ext(b"\x2a\x2a", b"h2")
        + ext(0x4A4A, b"\x00")
    )
    parsed = parse_client_hello(hello(body(extensions, suites=b"\x0a\x0a\x13\x01")))
    assert parsed is not None
    assert parsed.server_name == "grease.example"
    assert parsed.supported_versions == (0x1A1A, TLS13, TLS12)
    assert parsed.alpn_protocols == ("**", "h2")
    assert parsed.cipher_suites == (0x0A0A, 0x1301)
    assert parsed.extension_types == (0x0A0A, 0, 43, 0xFE0D, 16, 0x4A4A)


def test_first_host_name_wins_and_other_name_types_are_skipped() -> None:
    entries = b"\x07" + vec16(b"other") + b"\x00" + vec16(b"first.example")
    entries += b"\x00" + vec16(b"second.example")
    parsed = parse_client_hello(hello(body(ext(0, vec16(entries)))))
    assert parsed is not None and parsed.server_name == "first.example"
    parsed = parse_client_hello(hello(body(sni_ext(b"x.example", name_type=7))))
    assert parsed is not None and parsed.server_name is None


def test_longest_server_name() -> None:
    name = b"a" * 255
    parsed = parse_client_hello(hello(body(sni_ext(name))))
    assert parsed is not None and parsed.server_name == name.decode()


@pytest.mark.parametrize(
    "name", [b"caf\xc3\xa9.example", b"a\x00b.example", b"a b", b"tab\t.example", b"", b"a" * 256]
)
def test_invalid_server_names(name: bytes) -> None:
    assert "invalid server name" in parse_error(hello(body(sni_ext(name))))


MALFORMED: dict[str, bytes] = {
    "extensions longer than the hello": body()[:-2] + u16(10) + sni_ext(b"a")[:6],
    "one byte where the extensions start": body(None) + b"\x00",
    "extra bytes after the extensions": body(sni_ext(b"a.example")) + b"\x00",
    "extension data overruns the block": body(u16(0) + u16(50) + b"\x00" * 10),
    "half an extension header": body(b"\x00\x00\x00"),
    "sni list length too long": body(ext(0, u16(40) + b"\x00" + vec16(b"a.example"))),
    "sni list length too short": body(ext(0, u16(3) + b"\x00" + vec16(b"a.example"))),
    "sni name overruns the list": body(ext(0, vec16(b"\x00" + u16(30) + b"a.example"))),
    "bytes after the sni list": body(ext(0, vec16(b"\x00" + vec16(b"a.example")) + b"\x00")),
    "bytes after the alpn list": body(ext(16, vec16(b"\x02h2") + b"\x00")),
    "empty sni extension": body(ext(0, b"")),
    "empty sni list": body(ext(0, vec16(b""))),
    "empty alpn list": body(ext(16, vec16(b""))),
    "empty alpn name": body(ext(16, vec16(b"\x00\x02h2"))),
    "alpn name overruns": body(ext(16, vec16(b"\x05h2"))),
    "alpn list length wrong": body(ext(16, u16(9) + b"\x02h2")),
    "odd supported_versions": body(ext(43, vec8(b"\x03\x04\x03"))),
    "empty supported_versions": body(ext(43, vec8(b""))),
    "supported_versions trailing byte": body(ext(43, vec8(b"\x03\x04") + b"\x00")),
    "duplicate extension": body(sni_ext(b"a.example") + sni_ext(b"b.example")),
    "duplicate unknown extension": body(ext(99, b"") + ext(99, b"")),
    "session id of 33 bytes": body(session_id=b"\x00" * 33),
    "odd cipher suites": body(suites=b"\x13\x01\x00"),
    "no cipher suites": body(suites=b""),
    "no compression methods": body(compression=b""),
    "truncated random": u16(TLS12) + b"\x00" * 20,
    "empty body": b"",
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_hellos(case: str) -> None:
    reason = parse_error(hello(MALFORMED[case]))
    assert reason.startswith("malformed ClientHello") or "invalid" in reason


# -- properties --------------------------------------------------------------------------------

REAL = st.sampled_from(sorted(real_hellos()))


def check_outcome(data: bytes) -> ClientHello | None:
    """The three outcomes; ``None`` also promises the buffer is bounded."""
    try:
        result = parse_client_hello(data)
    except ClientHelloError as exc:
        assert exc.reason
        return None
    assert result is None or isinstance(result, ClientHello)
    if result is None:
        assert len(data) <= MAX_BUFFERED
    return result


@given(st.binary(max_size=600))
def test_arbitrary_bytes(data: bytes) -> None:
    check_outcome(data)


@given(st.binary(max_size=600), st.sampled_from([b"\x16\x03\x01", b"\x16\x03\x03\x01"]))
def test_arbitrary_bytes_behind_a_handshake_header(data: bytes, prefix: bytes) -> None:
    check_outcome(prefix + data)


@given(st.binary(max_size=400), st.integers(0, 3))
def test_arbitrary_hello_bodies(data: bytes, extra: int) -> None:
    check_outcome(hello(data + b"\x00" * extra))
    check_outcome(hello(body(data)))


@given(REAL, st.data())
def test_mutated_real_hellos(name: str, data: st.DataObject) -> None:
    original = real_hellos()[name]
    mutated = bytearray(original)
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        kind = data.draw(st.sampled_from(["flip", "set", "truncate", "extend", "insert", "delete"]))
        at = data.draw(st.integers(0, max(len(mutated) - 1, 0)), label="at")
        if kind == "flip" and mutated:
            mutated[at] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "set" and mutated:
            mutated[at] = data.draw(st.integers(0, 255))
        elif kind == "truncate":
            del mutated[at:]
        elif kind == "extend":
            mutated += data.draw(st.binary(min_size=1, max_size=50))
        elif kind == "insert":
            mutated[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del mutated[at : at + data.draw(st.integers(1, 8))]
    check_outcome(bytes(mutated))


@given(REAL, st.lists(st.integers(1, 300), max_size=10))
def test_any_record_framing_gives_the_same_hello(name: str, sizes: list[int]) -> None:
    original = real_hellos()[name]
    assert parse_client_hello(frame(message_of(original), sizes)) == parse_client_hello(original)


HOST_LABEL = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_", min_size=1)


@settings(max_examples=200)
@given(
    host=st.none() | st.lists(HOST_LABEL, min_size=1, max_size=4).map(".".join),
    alpn=st.lists(st.binary(min_size=1, max_size=20), max_size=4),
    others=st.dictionaries(
        st.integers(0, 0xFFFF).filter(lambda t: t not in (0, 16, 43)),
        st.binary(max_size=30),
        max_size=6,
    ),
    sizes=st.lists(st.integers(1, 100), max_size=5),
)
def test_built_hellos_round_trip(
    host: str | None, alpn: list[bytes], others: dict[int, bytes], sizes: list[int]
) -> None:
    extensions = [ext(t, d) for t, d in others.items()]
    types = list(others)
    if host is not None and len(host) <= 255:
        extensions.insert(len(extensions) // 2, sni_ext(host.encode()))
        types.insert(len(types) // 2, 0)
    else:
        host = None
    if alpn:
        extensions.append(alpn_ext(*alpn))
        types.append(16)
    hello_body = body(b"".join(extensions))
    message = b"\x01" + len(hello_body).to_bytes(3, "big") + hello_body
    assert parse_client_hello(frame(message, sizes)) == ClientHello(
        server_name=host,
        alpn_protocols=tuple(p.decode("latin-1") for p in alpn),
        legacy_version=TLS12,
        supported_versions=(),
        cipher_suites=(0x1301, 0xC02F),
        extension_types=tuple(types),
    )


# -- purity ------------------------------------------------------------------------------------


def test_parser_imports_no_io_modules() -> None:
    """Sans-I/O: neither the module's own imports nor what they pull in touch the network."""
    path = Path(__file__).resolve().parent.parent / "alb_proxy" / "tls" / "clienthello.py"
    imported: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported.isdisjoint({"asyncio", "socket", "ssl", "selectors"}), imported
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, alb_proxy.tls.clienthello; print(*sorted(sys.modules))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert "alb_proxy.tls.clienthello" in loaded
    assert {"asyncio", "socket", "ssl", "_ssl", "selectors"}.isdisjoint(loaded)
