"""The console's operations as pure functions: a config in, the changed config out.

Each raises ``OperationError`` for what is wrong about the request itself (an unknown listener:
404; something in use: 409). Whether the resulting config is acceptable is decided afterwards by
the same rules as a config file (``config.rules``), and by loading its certificates, so an
operation can never let in what a file could not.
"""

from __future__ import annotations

from dataclasses import replace

from alb_proxy.config.model import (
    Certificate,
    Config,
    Listener,
    Server,
    ServerGroup,
)
from alb_proxy.errors import AlbError


class OperationError(AlbError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _listener(config: Config, name: str) -> Listener:
    found = config.listener(name)
    if found is None:
        raise OperationError(404, f"no listener named '{name}'")
    return found


def _group(config: Config, group_id: str) -> ServerGroup:
    found = config.server_group(group_id)
    if found is None:
        raise OperationError(404, f"no server group '{group_id}'")
    return found


def _with_listener(config: Config, updated: Listener) -> Config:
    return replace(
        config, listeners=tuple(updated if x.name == updated.name else x for x in config.listeners)
    )


def _with_group(config: Config, updated: ServerGroup) -> Config:
    return replace(
        config,
        server_groups=tuple(updated if g.id == updated.id else g for g in config.server_groups),
    )


def _certificates_of(listener: Listener) -> Listener:
    if listener.certificates is None:
        raise OperationError(
            409, f"listener '{listener.name}' ({listener.protocol.value}) takes no certificates"
        )
    return listener


# -- certificates on a listener ------------------------------------------------------------------


def set_default_certificate(config: Config, listener: str, cert_id: str) -> Config:
    current = _certificates_of(_listener(config, listener))
    assert current.certificates is not None
    certs = replace(
        current.certificates,
        default=cert_id,
        additional=tuple(c for c in current.certificates.additional if c != cert_id),
    )
    return _with_listener(config, replace(current, certificates=certs))


def add_additional_certificate(config: Config, listener: str, cert_id: str) -> Config:
    current = _certificates_of(_listener(config, listener))
    assert current.certificates is not None
    if cert_id == current.certificates.default or cert_id in current.certificates.additional:
        raise OperationError(409, f"'{cert_id}' is already a certificate of '{listener}'")
    certs = replace(current.certificates, additional=(*current.certificates.additional, cert_id))
    return _with_listener(config, replace(current, certificates=certs))


def remove_additional_certificate(config: Config, listener: str, cert_id: str) -> Config:
    current = _certificates_of(_listener(config, listener))
    assert current.certificates is not None
    if cert_id == current.certificates.default:
        raise OperationError(
            409,
            f"'{cert_id}' is the default certificate of '{listener}': set another default first",
        )
    if cert_id not in current.certificates.additional:
        raise OperationError(404, f"'{cert_id}' is not an additional certificate of '{listener}'")
    certs = replace(
        current.certificates,
        additional=tuple(c for c in current.certificates.additional if c != cert_id),
    )
    return _with_listener(config, replace(current, certificates=certs))


# -- mutual authentication and policy --------------------------------------------------------------


def set_mutual_authentication(
    config: Config, listener: str, enabled: bool, ca_certificates: tuple[str, ...] | None = None
) -> Config:
    current = _listener(config, listener)
    mtls = current.mutual_authentication
    mtls = replace(
        mtls,
        enabled=enabled,
        ca_certificates=mtls.ca_certificates if ca_certificates is None else ca_certificates,
    )
    return _with_listener(config, replace(current, mutual_authentication=mtls))


def replace_ca_certificates(
    config: Config, listener: str, ca_certificates: tuple[str, ...]
) -> Config:
    current = _listener(config, listener)
    mtls = replace(current.mutual_authentication, ca_certificates=ca_certificates)
    return _with_listener(config, replace(current, mutual_authentication=mtls))


def set_security_policy(config: Config, listener: str, policy: str) -> Config:
    current = _listener(config, listener)
    if current.certificates is None:
        raise OperationError(
            409,
            f"listener '{listener}' ({current.protocol.value}) terminates no TLS: "
            "it takes no security policy",
        )
    return _with_listener(config, replace(current, security_policy=policy))


# -- listeners ---------------------------------------------------------------------------------


def create_listener(config: Config, listener: Listener) -> Config:
    if config.listener(listener.name) is not None:
        raise OperationError(409, f"a listener named '{listener.name}' exists already")
    return replace(config, listeners=(*config.listeners, listener))


def delete_listener(config: Config, name: str) -> Config:
    _listener(config, name)
    return replace(config, listeners=tuple(x for x in config.listeners if x.name != name))


def set_listener_enabled(config: Config, name: str, enabled: bool) -> Config:
    return _with_listener(config, replace(_listener(config, name), enabled=enabled))


# -- server groups -----------------------------------------------------------------------------


def _find_server(group: ServerGroup, address: str) -> Server:
    found = next((s for s in group.servers if s.address == address), None)
    if found is None:
        raise OperationError(404, f"no server {address} in server group '{group.id}'")
    return found


def add_server(config: Config, group_id: str, server: Server) -> Config:
    group = _group(config, group_id)
    if any(s.address == server.address for s in group.servers):
        raise OperationError(409, f"{server.address} is already in server group '{group_id}'")
    return _with_group(config, replace(group, servers=(*group.servers, server)))


def remove_server(config: Config, group_id: str, address: str) -> Config:
    group = _group(config, group_id)
    _find_server(group, address)
    return _with_group(
        config, replace(group, servers=tuple(s for s in group.servers if s.address != address))
    )


def set_server_weight(config: Config, group_id: str, address: str, weight: int) -> Config:
    group = _group(config, group_id)
    _find_server(group, address)
    return _with_group(
        config,
        replace(
            group,
            servers=tuple(
                replace(s, weight=weight) if s.address == address else s for s in group.servers
            ),
        ),
    )


# -- the certificate store ----------------------------------------------------------------------


def add_certificate(config: Config, certificate: Certificate) -> Config:
    if config.certificate(certificate.id) is not None:
        raise OperationError(409, f"a certificate with id '{certificate.id}' exists already")
    return replace(config, certificates=(*config.certificates, certificate))


def certificate_users(config: Config, cert_id: str) -> list[str]:
    """Names of the listeners that reference ``cert_id`` in any role."""
    users = []
    for listener in config.listeners:
        refs: set[str] = set(listener.mutual_authentication.ca_certificates)
        if listener.certificates is not None:
            refs |= {listener.certificates.default, *listener.certificates.additional}
        if cert_id in refs:
            users.append(listener.name)
    return users


def delete_certificate(config: Config, cert_id: str) -> Config:
    if config.certificate(cert_id) is None:
        raise OperationError(404, f"no certificate '{cert_id}'")
    users = certificate_users(config, cert_id)
    if users:
        raise OperationError(
            409, f"certificate '{cert_id}' is in use by listener(s) {', '.join(users)}"
        )
    return replace(config, certificates=tuple(c for c in config.certificates if c.id != cert_id))
