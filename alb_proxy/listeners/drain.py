"""Draining a listener, whatever its protocol: let work in flight finish, cut what outlives it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection

from alb_proxy.observability.log import event


async def finish_or_cut(
    work: Collection[asyncio.Future[None]],
    timeout: float,
    listener: str,
    cut: Callable[[set[asyncio.Future[None]]], None],
) -> None:
    """Wait up to ``timeout`` for ``work``; then ``cut`` what is left (said once in the log)
    and give it a moment to unwind."""
    if not work:
        return
    _, pending = await asyncio.wait(work, timeout=timeout)
    if pending:
        event(
            logging.WARNING,
            "drain timeout: connections cut",
            listener=listener,
            connections=len(pending),
        )
        cut(pending)
        await asyncio.wait(pending, timeout=5.0)
