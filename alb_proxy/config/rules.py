"""Validation rules: what a well-typed ``Config`` must also satisfy (DESIGN.md §1).

Pure: a ``Config`` in, a list of ``Problem`` out, no I/O, so the loader, the control plane (a
runtime change is checked as the whole config it would produce) and tests all use the same rules.
Every problem is reported, named by the listener / certificate / server group and field it
concerns. Checks that need the files (a private key matches its certificate) belong to ``certs``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection, Iterable, Iterator, Sequence

from alb_proxy.config.model import (
    Certificate,
    CertificateKind,
    Config,
    Edition,
    Listener,
    Protocol,
    Scheduler,
    ServerGroup,
)
from alb_proxy.errors import Problem

PREDEFINED_POLICIES: tuple[str, ...] = (
    "tls_cipher_policy_1_0",
    "tls_cipher_policy_1_1",
    "tls_cipher_policy_1_2",
    "tls_cipher_policy_1_2_strict",
    "tls_cipher_policy_1_2_strict_with_1_3",
    "tls_cipher_policy_1_0_to_1_3",
)
"""Ids of the predefined security policies (``alb_proxy.tls.policies`` defines them)."""

TLS13_POLICIES: tuple[str, ...] = (
    "tls_cipher_policy_1_2_strict_with_1_3",
    "tls_cipher_policy_1_0_to_1_3",
)
"""Policies that enable TLS 1.3, the only version QUIC speaks."""

MAX_WORKERS = 64

HEALTH_CHECK_CODES = ("http_2xx", "http_3xx", "http_4xx", "http_5xx")

_KIND = {CertificateKind.SERVER: "a server certificate", CertificateKind.CA: "a CA certificate"}


def check_config(
    config: Config,
    *,
    policies: Collection[str] = PREDEFINED_POLICIES,
    tls13_policies: Collection[str] = TLS13_POLICIES,
) -> list[Problem]:
    """Every rule ``config`` breaks; empty when it can be served.

    ``policies`` / ``tls13_policies`` are parameters so that the caller can add custom policies.
    """
    problems = [
        *_blank("instance.name", config.instance.name),
        *_check_admin(config.admin.listen),
        *_unique("certificates", "id", [c.id for c in config.certificates]),
        *_unique("server_groups", "id", [g.id for g in config.server_groups]),
        *_unique("listeners", "name", [x.name for x in config.listeners]),
        *_check_ports(config.listeners),
        *_check_workers(config.workers),
    ]
    for i, cert in enumerate(config.certificates):
        problems += _check_certificate(f"certificates[{cert.id or i}]", cert)
    for i, group in enumerate(config.server_groups):
        problems += _check_server_group(f"server_groups[{group.id or i}]", group)
    for i, listener in enumerate(config.listeners):
        path = f"listeners[{listener.name or i}]"
        problems += _check_listener(path, listener, policies, tls13_policies)
        problems += _check_references(path, listener, config)
    return problems


def _check_workers(workers: int | None) -> Iterator[Problem]:
    if workers is not None:
        yield from _between("workers", workers, 1, MAX_WORKERS)


def _blank(path: str, value: str) -> Iterator[Problem]:
    if not value:
        yield Problem(path, "must not be empty")


def _between(path: str, value: float, low: int, high: int, unit: str = "") -> Iterator[Problem]:
    if not low <= value <= high:  # also refuses NaN
        yield Problem(path, f"must be between {low} and {high}{unit}, got {value}")


def _positive(path: str, value: float) -> Iterator[Problem]:
    if not value > 0:
        yield Problem(path, f"must be greater than 0, got {value}")


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""Ids and names: they become file names in ``state_dir``, URL path segments and metric
labels, so nothing that could climb out of a directory or need quoting."""


def _unique(section: str, key: str, names: Iterable[str]) -> Iterator[Problem]:
    seen: set[str] = set()
    reported: set[str] = set()
    for i, name in enumerate(names):
        if not name:
            yield Problem(f"{section}[{i}].{key}", "must not be empty")
        elif not _NAME.fullmatch(name):
            yield Problem(
                f"{section}[{i}].{key}",
                f"{name!r}: use letters, digits, '.', '_' and '-' (at most 128, "
                "starting with a letter or digit)",
            )
        elif name in seen and name not in reported:
            reported.add(name)
            yield Problem(f"{section}[{name}].{key}", "defined more than once")
        seen.add(name)


def _check_admin(listen: str) -> Iterator[Problem]:
    """``host:port``, IPv6 in brackets: the form the admin server and the CLI both parse."""
    host, sep, port = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        address = _ip_address(host[1:-1])
        valid_host = address is not None and address.version == 6
    else:
        valid_host = ":" not in host and _is_host(host)
    if not (sep and valid_host):
        yield Problem("admin.listen", f"expected host:port (IPv6 as [::1]:9900), got {listen!r}")
    elif not (port.isascii() and port.isdigit() and len(port) <= 5 and 1 <= int(port) <= 65535):
        yield Problem("admin.listen", f"port must be between 1 and 65535, got {port!r}")


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def _is_host(host: str) -> bool:
    """An IP literal or an RFC 1123 host name (what a resolver can be asked about)."""
    if _ip_address(host) is not None:
        return True
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    return len(host) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in labels)


def _check_certificate(path: str, cert: Certificate) -> Iterator[Problem]:
    if cert.kind is CertificateKind.SERVER and cert.key is None:
        yield Problem(f"{path}.key", "a server certificate needs a private key")
    if cert.kind is CertificateKind.CA:
        if cert.key is not None:
            yield Problem(f"{path}.key", "a CA certificate takes no private key")
        if cert.chain is not None:
            yield Problem(f"{path}.chain", "a CA certificate takes no chain (put a bundle in cert)")


def _check_server_group(path: str, group: ServerGroup) -> Iterator[Problem]:
    if not isinstance(group.scheduler, Scheduler):
        choices = ", ".join(Scheduler)
        yield Problem(f"{path}.scheduler", f"must be one of {choices}, got {group.scheduler!r}")
    yield from _positive(f"{path}.connect_timeout_s", group.connect_timeout_s)
    if not group.servers:
        yield Problem(f"{path}.servers", "needs at least one server")
    seen: set[str] = set()
    for i, server in enumerate(group.servers):
        yield from _blank(f"{path}.servers[{i}].host", server.host)
        if server.host.strip() and not _is_host(server.host):
            yield Problem(
                f"{path}.servers[{i}].host", f"not an IP address or host name: {server.host!r}"
            )
        yield from _between(f"{path}.servers[{i}].port", server.port, 1, 65535)
        yield from _between(f"{path}.servers[{i}].weight", server.weight, 0, 100)
        if server.address in seen:
            yield Problem(f"{path}.servers[{i}]", f"{server.address} is listed more than once")
        seen.add(server.address)
    check, hc = f"{path}.health_check", group.health_check
    yield from _positive(f"{check}.interval_s", hc.interval_s)
    yield from _positive(f"{check}.timeout_s", hc.timeout_s)
    yield from _between(f"{check}.healthy_threshold", hc.healthy_threshold, 1, 10)
    yield from _between(f"{check}.unhealthy_threshold", hc.unhealthy_threshold, 1, 10)
    if hc.protocol not in ("http", "tcp"):
        yield Problem(f"{check}.protocol", f"must be http or tcp, got {hc.protocol!r}")
    if hc.protocol == "http" and not hc.path.startswith("/"):
        yield Problem(f"{check}.path", f"must start with '/', got {hc.path!r}")
    for code in hc.codes:
        if code not in HEALTH_CHECK_CODES:
            choices = ", ".join(HEALTH_CHECK_CODES)
            yield Problem(f"{check}.codes", f"unknown code {code!r} (known: {choices})")


def _ip_address(bind: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(bind)
    except ValueError:
        return None


def _check_ports(listeners: Sequence[Listener]) -> Iterator[Problem]:
    for i, listener in enumerate(listeners):
        other = next((x for x in listeners[:i] if _clash(listener, x)), None)
        if other is not None:
            transport = listener.protocol.transport.upper()
            yield Problem(
                f"listeners[{listener.name or i}].port",
                f"{transport} port {listener.port} is already used by listener {other.name!r}",
            )


def _clash(a: Listener, b: Listener) -> bool:
    """Same transport and port, and overlapping addresses (a wildcard overlaps every address)."""
    if (a.port, a.protocol.transport) != (b.port, b.protocol.transport) or not 0 < a.port < 65536:
        return False
    x, y = _ip_address(a.bind), _ip_address(b.bind)
    return x is not None and y is not None and (x == y or x.is_unspecified or y.is_unspecified)


def _check_listener(
    path: str, listener: Listener, policies: Collection[str], tls13: Collection[str]
) -> Iterator[Problem]:
    """Rules about one listener's own fields."""
    yield from _between(f"{path}.port", listener.port, 1, 65535)
    if _ip_address(listener.bind) is None:
        yield Problem(f"{path}.bind", f"expected an IP address, got {listener.bind!r}")
    yield from _between(f"{path}.idle_timeout_s", listener.idle_timeout_s, 1, 600, " seconds")
    yield from _between(f"{path}.max_header_bytes", listener.max_header_bytes, 1024, 1048576)
    yield from _between(f"{path}.request_timeout_s", listener.request_timeout_s, 1, 600, " seconds")
    policy = listener.security_policy
    if policy not in policies:
        known = ", ".join(policies)
        yield Problem(f"{path}.security_policy", f"unknown policy {policy!r} (known: {known})")
    elif listener.protocol is Protocol.QUIC and policy not in tls13:
        yield Problem(
            f"{path}.security_policy",
            f"QUIC needs TLS 1.3, which {policy!r} does not enable",
        )
    if listener.protocol is Protocol.HTTP:
        if listener.certificates is not None:
            yield Problem(f"{path}.certificates", "HTTP listeners take no certificates")
    elif listener.certificates is None:
        message = f"{listener.protocol.value} listeners need a default server certificate"
        yield Problem(f"{path}.certificates", message)


def _check_references(path: str, listener: Listener, config: Config) -> Iterator[Problem]:
    """Rules relating a listener to the instance, the certificate store and other listeners."""
    store = {c.id: c for c in config.certificates}
    if listener.certificates is not None and listener.protocol is not Protocol.HTTP:
        default = listener.certificates.default
        yield from _refs(f"{path}.certificates.default", [default], CertificateKind.SERVER, store)
        yield from _refs(
            f"{path}.certificates.additional",
            listener.certificates.additional,
            CertificateKind.SERVER,
            store,
            seen={default},
        )
    mtls, mtls_path = listener.mutual_authentication, f"{path}.mutual_authentication"
    yield from _refs(
        f"{mtls_path}.ca_certificates", mtls.ca_certificates, CertificateKind.CA, store
    )
    if mtls.enabled:
        if listener.protocol is not Protocol.HTTPS:
            message = f"{listener.protocol.value} listeners take no mutual authentication"
            yield Problem(mtls_path, message)
        elif config.instance.edition is Edition.BASIC:
            yield Problem(mtls_path, "mutual authentication is not available on Basic instances")
        elif not mtls.ca_certificates:
            yield Problem(
                f"{mtls_path}.ca_certificates",
                "mutual authentication needs at least one CA certificate",
            )
    if listener.quic_upgrade is not None:
        target = config.listener(listener.quic_upgrade)
        if target is None:
            yield Problem(f"{path}.quic_upgrade", f"no listener named {listener.quic_upgrade!r}")
        elif target.protocol is not Protocol.QUIC:
            yield Problem(
                f"{path}.quic_upgrade",
                f"{target.name!r} is an {target.protocol.value} listener, not a QUIC listener",
            )
        if mtls.enabled and listener.protocol is Protocol.HTTPS:
            yield Problem(
                f"{path}.quic_upgrade",
                "cannot be used with mutual authentication (QUIC listeners have none)",
            )
    group = listener.default_action.forward
    if config.server_group(group) is None:
        yield Problem(f"{path}.default_action.forward", f"unknown server group {group!r}")


def _refs(
    path: str,
    ids: Iterable[str],
    kind: CertificateKind,
    store: dict[str, Certificate],
    seen: set[str] | None = None,
) -> Iterator[Problem]:
    """Each id names a certificate of ``kind`` and is not listed twice (``seen``: listed before)."""
    seen = set(seen or ())
    for cert_id in ids:
        cert = store.get(cert_id)
        if cert_id in seen:
            yield Problem(path, f"{cert_id!r} is listed more than once")
        elif cert is None:
            yield Problem(path, f"unknown certificate {cert_id!r}")
        elif cert.kind is not kind:
            yield Problem(path, f"{cert_id!r} is {_KIND[cert.kind]}, not {_KIND[kind]}")
        seen.add(cert_id)
