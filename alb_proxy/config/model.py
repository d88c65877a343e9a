"""The configuration model: what a user configures, as frozen, typed values.

Nothing here does I/O. The loader (``load.py``) builds these objects from YAML, refusing unknown
keys; the rules that relate objects to each other live in ``rules.py``. Paths are kept as given
and resolved against the daemon's working directory by the layers that open them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

DEFAULT_SECURITY_POLICY = "tls_cipher_policy_1_2_strict_with_1_3"


class Edition(StrEnum):
    BASIC = "Basic"
    STANDARD = "Standard"
    WAF = "WAF"


class Protocol(StrEnum):
    HTTP = "HTTP"
    HTTPS = "HTTPS"
    QUIC = "QUIC"

    @property
    def transport(self) -> str:
        """``tcp`` or ``udp``: two listeners may share a port only on different transports."""
        return "udp" if self is Protocol.QUIC else "tcp"


class CertificateKind(StrEnum):
    SERVER = "server"
    CA = "ca"


class Scheduler(StrEnum):
    WRR = "wrr"
    """Smooth weighted round-robin."""
    WLC = "wlc"
    """Weighted least connections."""
    SCH = "sch"
    """Consistent hash on the client's source IP."""


@dataclass(frozen=True)
class Instance:
    name: str
    """Shown in logs and metrics."""
    edition: Edition = Edition.STANDARD
    """Basic instances have no mutual authentication and no custom security policies."""


@dataclass(frozen=True)
class Admin:
    listen: str = "127.0.0.1:9900"
    """``host:port`` of the admin API and ``/metrics``; loopback unless you mean otherwise."""
    token_file: Path | None = None
    """File holding the bearer token; ``ALB_ADMIN_TOKEN`` is used when unset."""


@dataclass(frozen=True)
class Certificate:
    id: str
    """How listeners refer to this certificate."""
    kind: CertificateKind
    """``server`` (with a private key) or ``ca`` (trust anchors for mutual authentication)."""
    cert: Path
    """PEM file: the certificate, optionally followed by its chain (or a CA bundle)."""
    key: Path | None = None
    """PEM private key of a server certificate; unencrypted. Never logged."""
    chain: Path | None = None
    """Optional separate PEM file with the intermediates of a server certificate."""


@dataclass(frozen=True)
class Server:
    host: str
    port: int
    weight: int = 100
    """0–100; 0 takes no new requests."""

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class HealthCheck:
    enabled: bool = False
    protocol: str = "http"
    """``http`` (request ``path``, expect ``codes``) or ``tcp`` (connect only)."""
    path: str = "/health"
    method: str = "GET"
    host: str | None = None
    """Host header of the check; the server's address when unset."""
    codes: tuple[str, ...] = ("http_2xx", "http_3xx")
    interval_s: float = 2.0
    timeout_s: float = 5.0
    healthy_threshold: int = 3
    unhealthy_threshold: int = 3


@dataclass(frozen=True)
class ServerGroup:
    id: str
    servers: tuple[Server, ...]
    scheduler: Scheduler = Scheduler.WRR
    health_check: HealthCheck = field(default_factory=HealthCheck)
    connect_timeout_s: float = 5.0
    """How long to wait for a TCP connection to a server before answering 502."""


@dataclass(frozen=True)
class ListenerCertificates:
    default: str
    """Id of the server certificate served when SNI matches nothing else."""
    additional: tuple[str, ...] = ()
    """Ids of further server certificates chosen by SNI."""


@dataclass(frozen=True)
class ClientCertHeaders:
    """Which ``X-Forwarded-Clientcert-*`` headers the backend receives for a verified client."""

    subjectdn: bool = True
    issuerdn: bool = True
    fingerprint: bool = True
    serial: bool = True
    clientverify: bool = True

    def enabled(self) -> tuple[str, ...]:
        return tuple(name for name, on in vars(self).items() if on)


@dataclass(frozen=True)
class MutualAuthentication:
    enabled: bool = False
    ca_certificates: tuple[str, ...] = ()
    """Ids of CA certificates a client certificate must chain to."""
    headers: ClientCertHeaders = field(default_factory=ClientCertHeaders)
    """Client-certificate headers forwarded to backends; each can be switched off."""


@dataclass(frozen=True)
class ForwardAction:
    forward: str
    """Id of the server group that receives the listener's requests."""


@dataclass(frozen=True)
class Listener:
    name: str
    protocol: Protocol
    port: int
    default_action: ForwardAction
    bind: str = "0.0.0.0"
    """Local address to listen on."""
    certificates: ListenerCertificates | None = None
    """Required for HTTPS and QUIC, refused for HTTP."""
    security_policy: str = DEFAULT_SECURITY_POLICY
    """A predefined policy id (see ``alb_proxy.tls.policies``)."""
    mutual_authentication: MutualAuthentication = field(default_factory=MutualAuthentication)
    http2: bool = True
    """Offer HTTP/2 by ALPN on HTTPS listeners."""
    quic_upgrade: str | None = None
    """Name of a QUIC listener advertised to clients with ``Alt-Svc``."""
    enabled: bool = True
    """A stopped listener keeps its configuration but releases its port."""
    idle_timeout_s: float = 15.0
    """Close a client connection idle this long between requests."""
    request_timeout_s: float = 60.0
    """Answer 504 when the backend has not answered within this time."""
    max_header_bytes: int = 65536
    """Largest request head (HTTP/1.1) or header section (HTTP/2, HTTP/3) accepted; 431 above."""


@dataclass(frozen=True)
class Config:
    instance: Instance
    certificates: tuple[Certificate, ...] = ()
    server_groups: tuple[ServerGroup, ...] = ()
    listeners: tuple[Listener, ...] = ()
    admin: Admin = field(default_factory=Admin)
    state_dir: Path = Path("./state")
    """Certificate store and changes applied at runtime."""
    workers: int | None = None
    """Data-plane processes sharing the ports; unset: one per CPU this process may run on.
    1 serves everything in the daemon's own process. Read at start only."""

    def certificate(self, cert_id: str) -> Certificate | None:
        return next((c for c in self.certificates if c.id == cert_id), None)

    def server_group(self, group_id: str) -> ServerGroup | None:
        return next((g for g in self.server_groups if g.id == group_id), None)

    def listener(self, name: str) -> Listener | None:
        return next((x for x in self.listeners if x.name == name), None)
