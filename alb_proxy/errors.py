"""One root error for the project; each layer raises its own kind and carries what a user needs.

Errors are translated once per layer boundary (``raise ... from exc``): the config layer speaks of
field paths, the certificate layer of files and keys, the TLS layer of alerts, the upstream layer
of HTTP statuses.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


class AlbError(Exception):
    """Root of every error alb-proxy raises on purpose."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a configuration, named by the path of the field it concerns."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(AlbError):
    """A configuration (file or change) was refused; ``problems`` lists every reason found."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems: tuple[Problem, ...] = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class CertificateError(AlbError):
    """A certificate, chain or key cannot be used (not PEM, key mismatch, not a CA, ...)."""


class UpstreamError(AlbError):
    """A backend could not serve a request; ``status`` is what the client is answered."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status
