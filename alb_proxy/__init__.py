"""alb-proxy: a TLS-termination edge proxy that behaves like a cloud ALB listener."""

from __future__ import annotations

import importlib.machinery

__version__ = "0.1.0"


def build() -> str:
    """``compiled`` when the hot modules run as mypyc-compiled C (``setup.py``), else
    ``interpreted``: the same code either way, at different speeds."""
    from alb_proxy.http import h1wire

    compiled = h1wire.__file__ is not None and h1wire.__file__.endswith(
        tuple(importlib.machinery.EXTENSION_SUFFIXES)
    )
    return "compiled" if compiled else "interpreted"
