"""Build the ``SSLContext`` objects of a listener, once, when a snapshot is built.

One context per group of certificates that SNI can select (usually one certificate; an RSA and
an ECDSA certificate for the same names share a context so OpenSSL picks by what the client
supports). Each context carries every setting of the listener: policy, ALPN, verify mode and CA
store, so the context chosen before the handshake is the whole truth for that connection.
Contexts are never changed after they are built; a change builds new ones.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from alb_proxy.certs.sni import is_host_name
from alb_proxy.errors import CertificateError
from alb_proxy.tls.clienthello import ClientHello
from alb_proxy.tls.policies import TlsPolicy, apply_policy


@dataclass(frozen=True)
class CertMaterial:
    """A server certificate as OpenSSL loads it: leaf then chain, and the private key."""

    chain_pem: bytes
    key_pem: bytes

    def __repr__(self) -> str:  # never let a key reach a log line through a repr
        return f"CertMaterial(chain_pem=<{len(self.chain_pem)} bytes>, key_pem=<redacted>)"


@dataclass(frozen=True)
class ListenerTls:
    """What a TLS listener needs per handshake: pick the context for a ClientHello."""

    select_ids: Callable[[str | None], tuple[str, ...]]
    contexts: Mapping[tuple[str, ...], ssl.SSLContext]
    covers: Callable[[tuple[str, ...], str], bool] = lambda group, host: True
    """Whether the certificates of a group cover a host name (HTTP/2 answers 421 if not)."""

    def select(self, hello: ClientHello | None) -> ssl.SSLContext:
        return self.contexts[self.select_ids(hello.server_name if hello is not None else None)]

    def authority_ok(self, server_name: str | None, host: str) -> bool:
        return authority_ok(self.select_ids, self.covers, server_name, host)


def authority_ok(
    select_ids: Callable[[str | None], tuple[str, ...]],
    covers: Callable[[tuple[str, ...], str], bool],
    server_name: str | None,
    host: str,
) -> bool:
    """May a request for ``host`` use a connection set up for ``server_name``? (HTTP/2 and
    HTTP/3 answer 421 when not.)

    A request for the very name the client connected with (or on a connection without SNI) is
    that client's own choice; a request for another name is a coalesced one, and is served only
    if the connection's certificate covers it."""
    if server_name is None or not is_host_name(server_name) or _same_name(server_name, host):
        return True  # an IP literal as SNI (some clients send one) names nothing either
    return covers(select_ids(server_name), host)


def _same_name(a: str, b: str) -> bool:
    return a.lower().rstrip(".") == b.lower().rstrip(".")


def build_context(
    certificates: Sequence[CertMaterial],
    policy: TlsPolicy,
    *,
    alpn: Sequence[str] = ("http/1.1",),
    client_ca_pem: bytes | None = None,
) -> ssl.SSLContext:
    """One server context with the given certificates, policy and (optional) client CA store."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    apply_policy(ctx, policy)
    for material in certificates:
        _load_chain(ctx, material)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    if client_ca_pem is not None:
        ctx.load_verify_locations(cadata=client_ca_pem.decode("ascii"))
        ctx.verify_mode = ssl.CERT_REQUIRED
        # An associated CA may be an intermediate: it is a trust anchor all the same.
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return ctx


def build_listener_tls(
    select_ids: Callable[[str | None], tuple[str, ...]],
    groups: Sequence[tuple[str, ...]],
    material: Mapping[str, CertMaterial],
    policy: TlsPolicy,
    *,
    alpn: Sequence[str] = ("http/1.1",),
    client_ca_pem: bytes | None = None,
    covers: Callable[[tuple[str, ...], str], bool] = lambda group, host: True,
) -> ListenerTls:
    """Build every context ``select_ids`` can ask for; fails before anything is served."""
    contexts = {
        group: build_context(
            [material[cert_id] for cert_id in group],
            policy,
            alpn=alpn,
            client_ca_pem=client_ca_pem,
        )
        for group in groups
    }
    return ListenerTls(select_ids=select_ids, contexts=contexts, covers=covers)


def _load_chain(ctx: ssl.SSLContext, material: CertMaterial) -> None:
    """``load_cert_chain`` reads files only: stage the PEMs in a private directory, then delete."""
    with tempfile.TemporaryDirectory(prefix="alb-tls-") as tmp:
        cert_path = Path(tmp, "chain.pem")
        key_path = Path(tmp, "key.pem")
        _write_private(cert_path, material.chain_pem)
        _write_private(key_path, material.key_pem)
        try:
            ctx.load_cert_chain(cert_path, key_path)
        except ssl.SSLError as exc:
            raise CertificateError(f"OpenSSL refused the certificate or key: {exc.reason}") from exc


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
