"""Shared fixtures: a demo backend and a small PKI written to disk once per session."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from certfactory import DAY, NOW, make_ca, make_server, write_pair, write_pem
from cryptography.hazmat.primitives.serialization import Encoding
from harness import Backend, fingerprint, start_demo_backend

import alb_proxy

SOURCES = Path(__file__).resolve().parent.parent / "alb_proxy"


def pytest_sessionstart(session: pytest.Session) -> None:
    """The suite tests the installed package (compiled, see setup.py), which ``make`` reinstalls
    when a source changes: refuse to run against an install older than the sources."""
    installed = Path(alb_proxy.__file__).resolve().parent
    if installed == SOURCES:
        return  # run from the source tree (an editable or uncompiled setup): nothing to compare
    stale = [
        str(source.relative_to(SOURCES))
        for source in sorted(SOURCES.rglob("*.py"))
        if not (copy := installed / source.relative_to(SOURCES)).exists()
        or copy.read_bytes() != source.read_bytes()
    ]
    if stale:
        pytest.exit(
            f"the installed alb_proxy ({installed}) is older than the sources ({', '.join(stale)}):"
            " run `make test`, which reinstalls it",
            returncode=2,
        )


@pytest.fixture(scope="session")
def demo_backend() -> Iterator[Backend]:
    backend = start_demo_backend()
    yield backend
    backend.stop()


@dataclass(frozen=True)
class ServerFiles:
    cert: Path
    key: Path
    fingerprint: str

    def entry(self, cert_id: str) -> dict[str, str]:
        return {"id": cert_id, "kind": "server", "cert": str(self.cert), "key": str(self.key)}


@dataclass(frozen=True)
class Pki:
    ca_file: Path
    default: ServerFiles
    exact: ServerFiles
    wildcard: ServerFiles
    dual_ec: ServerFiles
    dual_rsa: ServerFiles
    expired: ServerFiles


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A root, an intermediate, and the server certificates the SNI tests tell apart."""
    out = tmp_path_factory.mktemp("pki")
    root = make_ca("alb-proxy test root")
    inter = make_ca("alb-proxy test intermediate", issuer=root)

    def server(name: str, names: list[str], **kwargs: object) -> ServerFiles:
        leaf = make_server(inter, names, **kwargs)  # type: ignore[arg-type]
        cert, key = write_pair(out, name, leaf, chain=[inter])
        return ServerFiles(cert, key, fingerprint(leaf.cert.public_bytes(Encoding.DER)))

    return Pki(
        ca_file=write_pem(out / "root.pem", root.cert.public_bytes(Encoding.PEM)),
        default=server("default", ["default.example.test"]),
        exact=server("exact", ["exact.example.test"]),
        wildcard=server("wildcard", ["*.wild.example.test"]),
        dual_ec=server("dual-ec", ["dual.example.test"]),
        dual_rsa=server("dual-rsa", ["dual.example.test"], key_type="RSA"),
        expired=server(
            "expired", ["old.example.test"], not_after=NOW - DAY, not_before=NOW - 30 * DAY
        ),
    )
