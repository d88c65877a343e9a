"""HTTP/3 requests whose fields HTTP/1.1 cannot carry: refused with 400 on their stream, like
HTTP/2 and HTTP/1.1 (the check is shared, in ``http/fields.py``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from conftest import Pki
from h3client import h3_get
from harness import Backend, Proxy, start_proxy
from test_e2e_quic import single_quic_listener


@pytest.fixture(scope="module")
def proxy(
    pki: Pki, demo_backend: Backend, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Proxy]:
    config = single_quic_listener(demo_backend, pki)
    p = start_proxy(tmp_path_factory.mktemp("h3fields"), config)
    yield p
    assert p.stop() == 0
    assert " ERROR " not in p.log and "Traceback" not in p.log


@pytest.mark.parametrize(
    ("path", "headers"),
    [("/a b", []), ("/", [(b"x(a)", b"1")]), ("/", [(b"x-a", b"1\x0b2")])],
)
def test_fields_http11_cannot_carry_get_400_over_http3(
    proxy: Proxy, path: str, headers: list[tuple[bytes, bytes]]
) -> None:
    response, _ = h3_get(proxy.port("q"), "default.example.test", path, headers)
    assert response.status == 400
    assert bytes(response.body) == b"400 Bad Request\n"
    assert h3_get(proxy.port("q"), "default.example.test", "/fine")[0].status == 200
