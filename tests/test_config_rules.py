"""Validation rules (DESIGN.md §1): each rule is checked by the exact message it gives."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from alb_proxy.config.model import (
    Admin,
    Certificate,
    CertificateKind,
    Config,
    Edition,
    ForwardAction,
    HealthCheck,
    Instance,
    Listener,
    ListenerCertificates,
    MutualAuthentication,
    Protocol,
    Server,
    ServerGroup,
)
from alb_proxy.config.rules import PREDEFINED_POLICIES, check_config

ROOT = Path(__file__).resolve().parents[1]

SITE = Certificate("cert-site", CertificateKind.SERVER, Path("site.pem"), key=Path("site.key"))
API = Certificate("cert-api", CertificateKind.SERVER, Path("api.pem"), key=Path("api.key"))
CA = Certificate("ca-clients", CertificateKind.CA, Path("ca.pem"))
WEB = ServerGroup("sg-web", servers=(Server("127.0.0.1", 8081),))
FORWARD = ForwardAction("sg-web")
HTTPS = Listener(
    name="https-443",
    protocol=Protocol.HTTPS,
    port=443,
    certificates=ListenerCertificates("cert-site", ("cert-api",)),
    mutual_authentication=MutualAuthentication(True, ("ca-clients",)),
    default_action=FORWARD,
)
QUIC = Listener(
    name="quic-443",
    protocol=Protocol.QUIC,
    port=443,
    certificates=ListenerCertificates("cert-site"),
    default_action=FORWARD,
)
HTTP = Listener(name="http-80", protocol=Protocol.HTTP, port=80, default_action=FORWARD)
BASE = Config(
    instance=Instance("test", Edition.STANDARD),
    certificates=(SITE, API, CA),
    server_groups=(WEB,),
    listeners=(HTTPS, QUIC, HTTP),
)


def messages(config: Config, **kwargs: Any) -> list[str]:
    return [str(p) for p in check_config(config, **kwargs)]


def with_listener(index: int, **changes: Any) -> Config:
    listeners = list(BASE.listeners)
    listeners[index] = replace(listeners[index], **changes)
    return replace(BASE, listeners=tuple(listeners))


def with_group(**changes: Any) -> Config:
    return replace(BASE, server_groups=(replace(WEB, **changes),))


def with_check(**changes: Any) -> Config:
    return with_group(health_check=replace(HealthCheck(), **changes))


def test_base_config_is_valid() -> None:
    assert messages(BASE) == []


def test_unused_certificates_and_server_groups_are_fine() -> None:
    spare_cert = Certificate("spare", CertificateKind.SERVER, Path("s.pem"), key=Path("s.key"))
    spare_group = ServerGroup("sg-spare", servers=(Server("10.0.0.1", 80),))
    config = replace(
        BASE,
        certificates=(*BASE.certificates, spare_cert),
        server_groups=(WEB, spare_group),
    )
    assert messages(config) == []


CASES: dict[str, tuple[Callable[[], Config], list[str]]] = {
    # identity
    "certificate id that could climb out of state_dir": (
        lambda: replace(
            BASE,
            certificates=(SITE, API, CA, replace(API, id="../../victim/data")),
        ),
        [
            "certificates[3].id: '../../victim/data': use letters, digits, '.', '_' and '-' "
            "(at most 128, starting with a letter or digit)"
        ],
    ),
    "listener name with a space": (
        lambda: with_listener(2, name="http 80"),
        [
            "listeners[2].name: 'http 80': use letters, digits, '.', '_' and '-' "
            "(at most 128, starting with a letter or digit)"
        ],
    ),
    "duplicate certificate id": (
        lambda: replace(BASE, certificates=(SITE, API, CA, replace(API, cert=Path("b.pem")))),
        ["certificates[cert-api].id: defined more than once"],
    ),
    "duplicate server group id": (
        lambda: replace(BASE, server_groups=(WEB, WEB, WEB)),
        ["server_groups[sg-web].id: defined more than once"],
    ),
    "duplicate listener name": (
        lambda: replace(BASE, listeners=(*BASE.listeners, replace(HTTP, port=81))),
        ["listeners[http-80].name: defined more than once"],
    ),
    "empty names": (
        lambda: replace(
            BASE,
            instance=Instance(""),
            certificates=(*BASE.certificates, replace(CA, id="")),
            listeners=(*BASE.listeners, replace(HTTP, name="", port=81)),
        ),
        [
            "instance.name: must not be empty",
            "certificates[3].id: must not be empty",
            "listeners[3].name: must not be empty",
        ],
    ),
    # ports and addresses
    "port zero": (
        lambda: with_listener(2, port=0),
        ["listeners[http-80].port: must be between 1 and 65535, got 0"],
    ),
    "port too high": (
        lambda: with_listener(2, port=65536),
        ["listeners[http-80].port: must be between 1 and 65535, got 65536"],
    ),
    "two TCP listeners on one port": (
        lambda: with_listener(2, port=443),
        ["listeners[http-80].port: TCP port 443 is already used by listener 'https-443'"],
    ),
    "two UDP listeners on one port": (
        lambda: replace(BASE, listeners=(*BASE.listeners, replace(QUIC, name="quic-b"))),
        ["listeners[quic-b].port: UDP port 443 is already used by listener 'quic-443'"],
    ),
    "the wildcard address overlaps a specific one": (
        lambda: with_listener(2, port=443, bind="127.0.0.1"),
        ["listeners[http-80].port: TCP port 443 is already used by listener 'https-443'"],
    ),
    "the IPv6 wildcard overlaps too": (
        lambda: replace(
            BASE,
            listeners=(replace(HTTPS, bind="127.0.0.1"), QUIC, replace(HTTP, port=443, bind="::")),
        ),
        ["listeners[http-80].port: TCP port 443 is already used by listener 'https-443'"],
    ),
    "bind is not an IP address": (
        lambda: with_listener(2, bind="localhost"),
        ["listeners[http-80].bind: expected an IP address, got 'localhost'"],
    ),
    # HTTP listeners
    "HTTP with certificates": (
        lambda: with_listener(2, certificates=ListenerCertificates("nope")),
        ["listeners[http-80].certificates: HTTP listeners take no certificates"],
    ),
    "HTTP with mutual authentication": (
        lambda: with_listener(2, mutual_authentication=MutualAuthentication(True)),
        ["listeners[http-80].mutual_authentication: HTTP listeners take no mutual authentication"],
    ),
    # certificates of TLS listeners
    "HTTPS without certificates": (
        lambda: with_listener(0, certificates=None),
        ["listeners[https-443].certificates: HTTPS listeners need a default server certificate"],
    ),
    "QUIC without certificates": (
        lambda: with_listener(1, certificates=None),
        ["listeners[quic-443].certificates: QUIC listeners need a default server certificate"],
    ),
    "unknown certificates": (
        lambda: with_listener(0, certificates=ListenerCertificates("nope", ("cert-api", "gone"))),
        [
            "listeners[https-443].certificates.default: unknown certificate 'nope'",
            "listeners[https-443].certificates.additional: unknown certificate 'gone'",
        ],
    ),
    "CA certificate served as a server certificate": (
        lambda: with_listener(1, certificates=ListenerCertificates("ca-clients", ("ca-clients",))),
        [
            "listeners[quic-443].certificates.default: "
            "'ca-clients' is a CA certificate, not a server certificate",
            "listeners[quic-443].certificates.additional: 'ca-clients' is listed more than once",
        ],
    ),
    "server certificate used as a CA": (
        lambda: with_listener(
            0, mutual_authentication=MutualAuthentication(True, ("cert-api", "nope"))
        ),
        [
            "listeners[https-443].mutual_authentication.ca_certificates: "
            "'cert-api' is a server certificate, not a CA certificate",
            "listeners[https-443].mutual_authentication.ca_certificates: "
            "unknown certificate 'nope'",
        ],
    ),
    "certificate listed twice": (
        lambda: with_listener(
            0,
            certificates=ListenerCertificates("cert-site", ("cert-api", "cert-site", "cert-api")),
            mutual_authentication=MutualAuthentication(True, ("ca-clients", "ca-clients")),
        ),
        [
            "listeners[https-443].certificates.additional: 'cert-site' is listed more than once",
            "listeners[https-443].certificates.additional: 'cert-api' is listed more than once",
            "listeners[https-443].mutual_authentication.ca_certificates: "
            "'ca-clients' is listed more than once",
        ],
    ),
    "disabled mutual authentication still names real CAs": (
        lambda: with_listener(2, mutual_authentication=MutualAuthentication(False, ("nope",))),
        ["listeners[http-80].mutual_authentication.ca_certificates: unknown certificate 'nope'"],
    ),
    # mutual authentication
    "mutual authentication on a Basic instance": (
        lambda: replace(BASE, instance=Instance("test", Edition.BASIC)),
        [
            "listeners[https-443].mutual_authentication: "
            "mutual authentication is not available on Basic instances"
        ],
    ),
    "mutual authentication on QUIC": (
        lambda: with_listener(1, mutual_authentication=MutualAuthentication(True, ("ca-clients",))),
        ["listeners[quic-443].mutual_authentication: QUIC listeners take no mutual authentication"],
    ),
    "mutual authentication without a CA": (
        lambda: with_listener(0, mutual_authentication=MutualAuthentication(True)),
        [
            "listeners[https-443].mutual_authentication.ca_certificates: "
            "mutual authentication needs at least one CA certificate"
        ],
    ),
    "mutual authentication with a QUIC upgrade": (
        lambda: with_listener(0, quic_upgrade="quic-443"),
        [
            "listeners[https-443].quic_upgrade: "
            "cannot be used with mutual authentication (QUIC listeners have none)"
        ],
    ),
    # quic_upgrade
    "QUIC upgrade without mutual authentication is fine": (
        lambda: with_listener(
            0, quic_upgrade="quic-443", mutual_authentication=MutualAuthentication()
        ),
        [],
    ),
    "QUIC upgrade to a missing listener": (
        lambda: with_listener(2, quic_upgrade="quic-8443"),
        ["listeners[http-80].quic_upgrade: no listener named 'quic-8443'"],
    ),
    "QUIC upgrade to a TCP listener": (
        lambda: with_listener(2, quic_upgrade="https-443"),
        ["listeners[http-80].quic_upgrade: 'https-443' is an HTTPS listener, not a QUIC listener"],
    ),
    # security policies
    "unknown policy": (
        lambda: with_listener(0, security_policy="tls_cipher_policy_9"),
        [
            "listeners[https-443].security_policy: unknown policy 'tls_cipher_policy_9' "
            f"(known: {', '.join(PREDEFINED_POLICIES)})"
        ],
    ),
    "QUIC with a policy without TLS 1.3": (
        lambda: with_listener(1, security_policy="tls_cipher_policy_1_2_strict"),
        [
            "listeners[quic-443].security_policy: "
            "QUIC needs TLS 1.3, which 'tls_cipher_policy_1_2_strict' does not enable"
        ],
    ),
    "QUIC with a TLS 1.3 policy": (
        lambda: with_listener(1, security_policy="tls_cipher_policy_1_0_to_1_3"),
        [],
    ),
    # certificate store
    "server certificate without a key": (
        lambda: replace(BASE, certificates=(replace(SITE, key=None), API, CA)),
        ["certificates[cert-site].key: a server certificate needs a private key"],
    ),
    "CA certificate with a key and a chain": (
        lambda: replace(
            BASE, certificates=(SITE, API, replace(CA, key=Path("k"), chain=Path("c")))
        ),
        [
            "certificates[ca-clients].key: a CA certificate takes no private key",
            "certificates[ca-clients].chain: "
            "a CA certificate takes no chain (put a bundle in cert)",
        ],
    ),
    # server groups
    "forward to a missing server group": (
        lambda: with_listener(2, default_action=ForwardAction("sg-gone")),
        ["listeners[http-80].default_action.forward: unknown server group 'sg-gone'"],
    ),
    "server group without servers": (
        lambda: with_group(servers=()),
        ["server_groups[sg-web].servers: needs at least one server"],
    ),
    "bad servers": (
        lambda: with_group(
            servers=(
                Server("", 0, weight=101),
                Server("10.0.0.1", 70000, weight=-1),
                Server("10.0.0.2", 80, weight=0),
                Server("10.0.0.2", 80),
            )
        ),
        [
            "server_groups[sg-web].servers[0].host: must not be empty",
            "server_groups[sg-web].servers[0].port: must be between 1 and 65535, got 0",
            "server_groups[sg-web].servers[0].weight: must be between 0 and 100, got 101",
            "server_groups[sg-web].servers[1].port: must be between 1 and 65535, got 70000",
            "server_groups[sg-web].servers[1].weight: must be between 0 and 100, got -1",
            "server_groups[sg-web].servers[3]: 10.0.0.2:80 is listed more than once",
        ],
    ),
    "unknown scheduler": (
        lambda: with_group(scheduler="rr"),
        ["server_groups[sg-web].scheduler: must be one of wrr, wlc, sch, got 'rr'"],
    ),
    "connect timeout": (
        lambda: with_group(connect_timeout_s=0.0),
        ["server_groups[sg-web].connect_timeout_s: must be greater than 0, got 0.0"],
    ),
    "health check timings": (
        lambda: with_check(interval_s=0.0, timeout_s=float("nan")),
        [
            "server_groups[sg-web].health_check.interval_s: must be greater than 0, got 0.0",
            "server_groups[sg-web].health_check.timeout_s: must be greater than 0, got nan",
        ],
    ),
    "health check thresholds": (
        lambda: with_check(healthy_threshold=0, unhealthy_threshold=11),
        [
            "server_groups[sg-web].health_check.healthy_threshold: must be between 1 and 10, got 0",
            "server_groups[sg-web].health_check.unhealthy_threshold: "
            "must be between 1 and 10, got 11",
        ],
    ),
    "health check protocol": (
        lambda: with_check(protocol="udp"),
        ["server_groups[sg-web].health_check.protocol: must be http or tcp, got 'udp'"],
    ),
    "health check path and codes": (
        lambda: with_check(path="health", codes=("http_2xx", "200")),
        [
            "server_groups[sg-web].health_check.path: must start with '/', got 'health'",
            "server_groups[sg-web].health_check.codes: "
            "unknown code '200' (known: http_2xx, http_3xx, http_4xx, http_5xx)",
        ],
    ),
    "a TCP health check needs no path": (
        lambda: with_check(protocol="tcp", path=""),
        [],
    ),
    # listener timeouts
    "listener timeouts": (
        lambda: with_listener(2, idle_timeout_s=0.5, request_timeout_s=601.0),
        [
            "listeners[http-80].idle_timeout_s: must be between 1 and 600 seconds, got 0.5",
            "listeners[http-80].request_timeout_s: must be between 1 and 600 seconds, got 601.0",
        ],
    ),
}


@pytest.mark.parametrize(("make", "expected"), CASES.values(), ids=CASES.keys())
def test_rule(make: Callable[[], Config], expected: list[str]) -> None:
    assert messages(make()) == expected


@pytest.mark.parametrize("listen", ["127.0.0.1:9900", "[::1]:9900", "localhost:1", "0.0.0.0:65535"])
def test_admin_listen_accepted(listen: str) -> None:
    assert messages(replace(BASE, admin=Admin(listen))) == []


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        ("9900", "expected host:port (IPv6 as [::1]:9900), got '9900'"),
        (":9900", "expected host:port (IPv6 as [::1]:9900), got ':9900'"),
        ("::1:9900", "expected host:port (IPv6 as [::1]:9900), got '::1:9900'"),
        ("[::1]", "expected host:port (IPv6 as [::1]:9900), got '[::1]'"),
        ("[localhost]:9900", "expected host:port (IPv6 as [::1]:9900), got '[localhost]:9900'"),
        ("127.0.0.1:0", "port must be between 1 and 65535, got '0'"),
        ("127.0.0.1:65536", "port must be between 1 and 65535, got '65536'"),
        ("127.0.0.1:http", "port must be between 1 and 65535, got 'http'"),
        ("127.0.0.1:", "port must be between 1 and 65535, got ''"),
        ("127.0.0.1:" + "9" * 5000, "port must be between 1 and 65535, got '" + "9" * 5000 + "'"),
    ],
)
def test_admin_listen_refused(listen: str, message: str) -> None:
    assert messages(replace(BASE, admin=Admin(listen))) == [f"admin.listen: {message}"]


def test_same_port_on_different_addresses_is_fine() -> None:
    config = replace(
        BASE,
        listeners=(
            replace(HTTPS, bind="127.0.0.1"),
            replace(QUIC, bind="127.0.0.1"),
            replace(HTTP, port=443, bind="127.0.0.2"),
        ),
    )
    assert messages(config) == []


def test_many_problems_are_reported_together() -> None:
    config = replace(
        BASE,
        instance=Instance("test", Edition.BASIC),
        listeners=(
            replace(HTTPS, certificates=ListenerCertificates("gone")),
            replace(QUIC, port=0),
            replace(HTTP, certificates=ListenerCertificates("cert-site"), port=443),
        ),
    )
    assert messages(config) == [
        "listeners[http-80].port: TCP port 443 is already used by listener 'https-443'",
        "listeners[https-443].certificates.default: unknown certificate 'gone'",
        "listeners[https-443].mutual_authentication: "
        "mutual authentication is not available on Basic instances",
        "listeners[quic-443].port: must be between 1 and 65535, got 0",
        "listeners[http-80].certificates: HTTP listeners take no certificates",
    ]


def test_policy_ids_are_a_parameter() -> None:
    config = with_listener(1, security_policy="custom-13")
    assert messages(config, policies=(*PREDEFINED_POLICIES, "custom-13")) == [
        "listeners[quic-443].security_policy: QUIC needs TLS 1.3, which 'custom-13' does not enable"
    ]
    policies = (*PREDEFINED_POLICIES, "custom-13")
    assert messages(config, policies=policies, tls13_policies=["custom-13"]) == []


@pytest.mark.parametrize("module", ["alb_proxy.config.model", "alb_proxy.config.rules"])
def test_pure_modules_do_no_io(module: str) -> None:
    """Imported alone, in a fresh interpreter, they pull in no networking module."""
    code = (
        f"import sys, {module}; "
        "print(sorted({'asyncio', 'socket', 'ssl', 'selectors'} & set(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
