"""One log line per event, ``key=value`` after a short message, on stderr.

Values that may hold spaces are quoted. Private keys never reach this module: certificate
objects are logged by id and fingerprint only.
"""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger("alb_proxy")
_context = ""
"""``key=value`` pairs ending every line of this process (a worker says which it is)."""


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S%z")
    )
    root = logging.getLogger("alb_proxy")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)}
"""Control characters a peer could send (CR, LF, NUL, ESC) would forge lines or terminal
sequences in the log: each is written as ``\\xNN``."""


def fields(**values: object) -> str:
    """Render ``key=value`` pairs, quoting values with spaces or quotes, escaping controls."""
    parts = []
    for key, value in values.items():
        text = "-" if value is None else str(value)
        if not text or any(c in text for c in ' "=\\') or any(ord(c) in _CONTROL for c in text):
            escaped = text.replace("\\", "\\\\").replace('"', '\\"').translate(_CONTROL)
            text = '"' + escaped + '"'
        parts.append(f"{key}={text}")
    return " ".join(parts)


def set_context(**values: object) -> None:
    global _context
    _context = " " + fields(**values) if values else ""


def event(level: int, message: str, **values: object) -> None:
    if logger.isEnabledFor(level):
        logger.log(level, "%s %s%s", message, fields(**values), _context)
