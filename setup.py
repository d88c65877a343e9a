"""Build hook: the data plane's hot modules are compiled to C with mypyc.

Everything else about the package is in ``pyproject.toml``. The modules below are what every
request and every handshake runs through; compiled, the same typed sources take about a quarter
less CPU per request (``benchmarks/``). They must stay mypyc-compatible: ``tests/test_compiled.py``
checks the rules that mypy alone does not, and the whole suite runs against the compiled build.

``ALB_PROXY_PURE=1`` builds a pure-Python package instead (no C compiler needed); it behaves the
same, more slowly.
"""

from __future__ import annotations

import os

from setuptools import setup

COMPILED = [
    "alb_proxy/certs/sni.py",
    "alb_proxy/http/fields.py",
    "alb_proxy/http/forward.py",
    "alb_proxy/http/h1.py",
    "alb_proxy/http/h1wire.py",
    "alb_proxy/http/h2.py",
    "alb_proxy/http/headers.py",
    "alb_proxy/http/stream.py",
    "alb_proxy/listeners/tcp.py",
    "alb_proxy/observability/metrics.py",
    "alb_proxy/tls/clientcert.py",
    "alb_proxy/tls/clienthello.py",
    "alb_proxy/tls/connection.py",
    "alb_proxy/tls/contexts.py",
    "alb_proxy/upstream/connection.py",
    "alb_proxy/upstream/group.py",
    "alb_proxy/upstream/health.py",
    "alb_proxy/upstream/pool.py",
]


def _extensions() -> list[object]:
    if os.environ.get("ALB_PROXY_PURE", "") not in ("", "0"):
        return []
    from mypyc.build import mypycify

    # One shared library, inside the package (not a top-level module beside it).
    return list(mypycify(COMPILED, opt_level="3", group_name="alb_proxy._compiled"))


setup(ext_modules=_extensions())
