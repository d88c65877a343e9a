"""Build the data plane's snapshot from a validated config.

A snapshot is the one immutable thing the data plane reads: for every listener, its TLS
contexts (built here, never in the handshake path) and its route to a server group. It is built
beside the one being served; anything wrong (an unreadable file, a key that does not match, a
policy OpenSSL refuses) raises ``ConfigError`` with the field path, and the old snapshot keeps
serving. Building does file reads and OpenSSL calls, so it runs before binding and off the hot path.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from alb_proxy.certs.ca import CaBundle, load_ca_bundle
from alb_proxy.certs.pem import read_pem_file
from alb_proxy.certs.server import ServerCertificate, load_server_certificate
from alb_proxy.certs.sni import SniIndex, covers
from alb_proxy.config.model import CertificateKind, Config, Listener, Protocol
from alb_proxy.errors import AlbError, ConfigError, Problem
from alb_proxy.http.forward import RouteSettings
from alb_proxy.listeners.quic import QuicCertificate, QuicCertificates, QuicPlan
from alb_proxy.listeners.tcp import ListenerPlan
from alb_proxy.observability.log import event
from alb_proxy.observability.metrics import Metrics
from alb_proxy.tls.contexts import CertMaterial, ListenerTls, build_listener_tls
from alb_proxy.tls.policies import POLICIES
from alb_proxy.upstream.group import Backend, GroupRuntime
from alb_proxy.upstream.health import CheckSpec, HealthRegistry, parse_codes
from alb_proxy.upstream.pool import ConnectionPool

Material = Mapping[str, bytes]
"""The bytes of every certificate, chain and key file a config names, by path as written.

Read once by the control plane per change; every snapshot of that generation (the control
plane's own and each worker's) is built from these bytes, never from the files again, so a file
replaced on disk cannot make two workers serve different certificates, and a change that only
replaced files is still a change (SIGHUP after a certificate rotation)."""


@dataclass(frozen=True)
class Snapshot:
    generation: int
    config: Config
    server_certificates: Mapping[str, ServerCertificate]
    ca_bundles: Mapping[str, CaBundle]
    plans: Mapping[str, ListenerPlan | QuicPlan]
    material: Material = field(default_factory=dict, repr=False)
    """What the certificates were built from (holds private keys: never logged)."""

    @property
    def material_digest(self) -> str:
        return material_digest(self.material)


def material_paths(config: Config) -> list[Path]:
    return [
        path
        for cert in config.certificates
        for path in (cert.cert, cert.key, cert.chain)
        if path is not None
    ]


def read_material(config: Config) -> dict[str, bytes]:
    """Every file of the config that can be read; the loaders report the others."""
    material: dict[str, bytes] = {}
    for path in material_paths(config):
        with contextlib.suppress(AlbError):
            material[str(path)] = read_pem_file(path)
    return material


def material_digest(material: Material) -> str:
    digest = hashlib.sha256()
    for path in sorted(material):
        digest.update(hashlib.sha256(path.encode()).digest())
        digest.update(hashlib.sha256(material[path]).digest())
    return digest.hexdigest()


def load_certificates(
    config: Config,
    now: datetime,
    *,
    log_warnings: bool = True,
    material: Material | None = None,
) -> tuple[dict[str, ServerCertificate], dict[str, CaBundle]]:
    """Check every certificate of the config (from ``material``, else the files); every problem
    is reported at once."""
    servers: dict[str, ServerCertificate] = {}
    cas: dict[str, CaBundle] = {}
    problems: list[Problem] = []

    def read(path: Path) -> bytes:
        found = material.get(str(path)) if material is not None else None
        return found if found is not None else read_pem_file(path)

    for cert in config.certificates:
        path = f"certificates[{cert.id}]"
        try:
            if cert.kind is CertificateKind.SERVER:
                assert cert.key is not None  # enforced by the config rules
                chain = read(cert.chain) if cert.chain is not None else None
                servers[cert.id] = load_server_certificate(
                    cert.id, read(cert.cert), read(cert.key), chain, now=now
                )
            else:
                cas[cert.id] = load_ca_bundle(cert.id, read(cert.cert), now=now)
        except AlbError as exc:
            # The path names the certificate already; the loader's message starts with its id.
            problems.append(Problem(path, str(exc).removeprefix(f"{cert.id}: ")))
    if problems:
        raise ConfigError(problems)
    loaded: list[ServerCertificate | CaBundle] = [*servers.values(), *cas.values()]
    for item in loaded if log_warnings else ():
        for warning in item.warnings:
            event(logging.WARNING, "certificate warning", certificate=item.id, detail=warning)
    return servers, cas


def certificate_problems(config: Config, now: datetime | None = None) -> list[Problem]:
    """What loading the config's certificates would refuse, so that a config refused by the
    rules is refused with every problem at once (entries the rules already fault, such as a
    server certificate without a key, are left to the rules' message)."""
    loadable = tuple(
        c for c in config.certificates if c.kind is CertificateKind.CA or c.key is not None
    )
    try:
        load_certificates(
            replace(config, certificates=loadable), now or datetime.now(UTC), log_warnings=False
        )
    except ConfigError as exc:
        return list(exc.problems)
    return []


def build_snapshot(
    config: Config,
    pool: ConnectionPool,
    metrics: Metrics,
    *,
    registry: HealthRegistry | None = None,
    generation: int = 0,
    now: datetime | None = None,
    log_warnings: bool = True,
    material: Material | None = None,
) -> Snapshot:
    """``log_warnings``: log certificate warnings (once per change, by the control plane).
    ``material``: the certificate bytes to build from (default: read the files now)."""
    now = now or datetime.now(UTC)
    registry = registry or HealthRegistry()
    material = read_material(config) if material is None else material
    servers, cas = load_certificates(config, now, log_warnings=log_warnings, material=material)
    groups = {
        g.id: GroupRuntime(
            g.id,
            [Backend(s.host, s.port, s.weight) for s in g.servers],
            connect_timeout=g.connect_timeout_s,
            scheduler=g.scheduler.value,
            registry=registry,
        )
        for g in config.server_groups
    }
    plans: dict[str, ListenerPlan | QuicPlan] = {}
    problems: list[Problem] = []
    for listener in config.listeners:
        path = f"listeners[{listener.name}]"
        if not listener.enabled:
            continue  # stopped: configured, validated, not served
        route = RouteSettings(
            listener=listener.name,
            scheme="https" if listener.protocol is Protocol.HTTPS else "http",
            port=listener.port,
            group=groups[listener.default_action.forward],
            pool=pool,
            metrics=metrics,
            idle_timeout=listener.idle_timeout_s,
            request_timeout=listener.request_timeout_s,
            max_header_bytes=listener.max_header_bytes,
        )
        if listener.protocol is Protocol.QUIC:
            plans[listener.name] = QuicPlan(
                name=listener.name,
                bind=listener.bind,
                port=listener.port,
                route=replace(route, scheme="https"),
                certificates=_quic_certificates(listener, servers, now),
            )
            continue
        try:
            tls = _listener_tls(listener, servers, cas, now)
        except AlbError as exc:
            problems.append(Problem(path, str(exc)))
            continue
        plans[listener.name] = ListenerPlan(
            name=listener.name,
            protocol=listener.protocol.value,
            bind=listener.bind,
            port=listener.port,
            route=route,
            tls=tls,
            client_cert_headers=(
                listener.mutual_authentication.headers.enabled()
                if tls is not None and listener.mutual_authentication.enabled
                else ()
            ),
            quic_upgrade=listener.quic_upgrade,
        )
    problems += _quic_upgrade_coverage(config, servers)
    if problems:
        raise ConfigError(problems)
    return Snapshot(generation, config, servers, cas, plans, material)


def _quic_certificates(
    listener: Listener, servers: Mapping[str, ServerCertificate], now: datetime
) -> QuicCertificates:
    assert listener.certificates is not None  # enforced by the config rules
    ids = [listener.certificates.default, *listener.certificates.additional]
    index = SniIndex.build(servers[ids[0]].info, [servers[i].info for i in ids[1:]], now)
    return QuicCertificates(
        select_ids=index.select,
        covers=_group_covers(index, servers),
        by_id={
            i: QuicCertificate(
                servers[i].leaf, servers[i].chain, servers[i].private_key, servers[i].key_type
            )
            for i in ids
        },
    )


def _quic_upgrade_coverage(
    config: Config, servers: Mapping[str, ServerCertificate]
) -> list[Problem]:
    """A QUIC upgrade must not send clients to a listener that cannot prove the same names."""
    problems = []
    for listener in config.listeners:
        quic = config.listener(listener.quic_upgrade) if listener.quic_upgrade else None
        if quic is None or listener.certificates is None or quic.certificates is None:
            continue
        quic_ids = [quic.certificates.default, *quic.certificates.additional]
        quic_names = [n for i in quic_ids if i in servers for n in servers[i].dns_names]
        own_ids = [listener.certificates.default, *listener.certificates.additional]
        missing = sorted(
            {
                name
                for i in own_ids
                if i in servers
                for name in servers[i].dns_names
                if not any(covers(pattern, name) for pattern in quic_names)
            }
        )
        if missing:
            problems.append(
                Problem(
                    f"listeners[{listener.name}].quic_upgrade",
                    f"QUIC listener '{quic.name}' has no certificate for {', '.join(missing)}",
                )
            )
    return problems


def _listener_tls(
    listener: Listener,
    servers: Mapping[str, ServerCertificate],
    cas: Mapping[str, CaBundle],
    now: datetime,
) -> ListenerTls | None:
    if listener.protocol is not Protocol.HTTPS or listener.certificates is None:
        return None
    default = servers[listener.certificates.default]
    additional = [servers[cert_id] for cert_id in listener.certificates.additional]
    index = SniIndex.build(default.info, [c.info for c in additional], now)
    material = {
        c.id: CertMaterial(c.chain_pem, c.private_key_pem()) for c in (default, *additional)
    }
    client_ca_pem = None
    mtls = listener.mutual_authentication
    if mtls.enabled:
        client_ca_pem = b"".join(cas[ca_id].pem for ca_id in mtls.ca_certificates)
    return build_listener_tls(
        index.select,
        index.groups(),
        material,
        POLICIES[listener.security_policy],
        alpn=("h2", "http/1.1") if listener.http2 else ("http/1.1",),
        client_ca_pem=client_ca_pem,
        covers=_group_covers(index, servers),
    )


def _group_covers(
    index: SniIndex, servers: Mapping[str, ServerCertificate]
) -> Callable[[tuple[str, ...], str], bool]:
    """Whether the certificates of an SNI group cover a host name (421 when they do not)."""
    names = {
        group: tuple(
            name
            for cert_id in group
            for name in (*servers[cert_id].dns_names, *map(str, servers[cert_id].ip_addresses))
        )
        for group in index.groups()
    }

    def group_covers(group: tuple[str, ...], host: str) -> bool:
        return any(covers(pattern, host) for pattern in names.get(group, ()))

    return group_covers


def health_checks(config: Config) -> dict[str, CheckSpec]:
    """Address -> active check, for every server of a group with health checks enabled (the
    first group to name an address decides its check)."""
    checks: dict[str, CheckSpec] = {}
    for group in config.server_groups:
        hc = group.health_check
        if not hc.enabled:
            continue
        spec = CheckSpec(
            protocol=hc.protocol,
            path=hc.path,
            method=hc.method,
            host=hc.host,
            codes=parse_codes(hc.codes),
            interval=hc.interval_s,
            timeout=hc.timeout_s,
            healthy_threshold=hc.healthy_threshold,
            unhealthy_threshold=hc.unhealthy_threshold,
        )
        for server in group.servers:
            checks.setdefault(server.address, spec)
    return checks
