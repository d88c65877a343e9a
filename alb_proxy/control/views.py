"""What the admin API shows of certificates, listeners and server groups: plain JSON values.

Built from the snapshot being served (whose certificates are already parsed), never from key
material: no view has a field a private key could reach.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from alb_proxy.certs.ca import CaBundle
from alb_proxy.certs.server import ServerCertificate
from alb_proxy.config.model import Listener, ServerGroup
from alb_proxy.control.operations import certificate_users
from alb_proxy.control.snapshot import Snapshot
from alb_proxy.control.store import CertificateRecord

EXPIRY_WARNING_DAYS = 30
_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}


def days_left(not_after: datetime, now: datetime) -> int:
    """Whole days to expiry; negative once expired, by whole days since (as the log's "expired
    ... (1 day ago)" counts them)."""
    return int((not_after - now).total_seconds() / 86400)


def certificate_view(
    snapshot: Snapshot, records: Mapping[str, CertificateRecord], cert_id: str, now: datetime
) -> dict[str, Any]:
    record = records.get(cert_id)
    view: dict[str, Any] = {
        "id": cert_id,
        "name": record.name if record else cert_id,
        "source": "upload" if record else "config",
        "used_by": certificate_users(snapshot.config, cert_id),
    }
    server = snapshot.server_certificates.get(cert_id)
    if server is not None:
        return view | _server_view(server, now)
    return view | _ca_view(snapshot.ca_bundles[cert_id], now)


def _server_view(cert: ServerCertificate, now: datetime) -> dict[str, Any]:
    size = _CURVES.get(cert.curve or "", cert.curve) or str(cert.key_bits)
    return {
        "kind": "server",
        "domains": [*cert.dns_names, *(str(ip) for ip in cert.ip_addresses)],
        "key_type": f"{cert.key_type} {size}",
        "not_before": cert.not_before.isoformat(),
        "not_after": cert.not_after.isoformat(),
        "days_left": days_left(cert.not_after, now),
        "fingerprint_sha256": cert.fingerprint_sha256,
        "serial": cert.serial,
        "subject": cert.subject,
        "issuer": cert.issuer,
        "warnings": list(cert.warnings),
    }


def _ca_view(bundle: CaBundle, now: datetime) -> dict[str, Any]:
    first = bundle.certificates[0]
    return {
        "kind": "ca",
        "domains": [],
        "key_type": None,
        "not_before": min(c.not_valid_before_utc for c in bundle.certificates).isoformat(),
        "not_after": bundle.not_after.isoformat(),
        "days_left": days_left(bundle.not_after, now),
        "fingerprint_sha256": bundle.fingerprints[0],
        "serial": format(first.serial_number, "x"),
        "subject": "; ".join(bundle.subjects),
        "issuer": first.issuer.rfc4514_string(),
        "warnings": list(bundle.warnings),
    }


def listener_view(
    snapshot: Snapshot, listener: Listener, bound_port: int | None, now: datetime
) -> dict[str, Any]:
    certs = listener.certificates
    mtls = listener.mutual_authentication
    referenced = [*([certs.default, *certs.additional] if certs else []), *mtls.ca_certificates]
    expiry = []
    for cert_id in referenced:
        server = snapshot.server_certificates.get(cert_id)
        ca = snapshot.ca_bundles.get(cert_id)
        not_after = server.not_after if server else ca.not_after if ca else None
        if not_after is not None:
            expiry.append(
                {
                    "id": cert_id,
                    "not_after": not_after.isoformat(),
                    "days_left": days_left(not_after, now),
                    "expired": not_after <= now,
                }
            )
    return {
        "name": listener.name,
        "protocol": listener.protocol.value,
        "port": listener.port,
        "bind": listener.bind,
        "enabled": listener.enabled,
        "state": "serving" if bound_port is not None else "stopped",
        "bound_port": bound_port,
        "certificates": (
            {"default": certs.default, "additional": list(certs.additional)} if certs else None
        ),
        "security_policy": listener.security_policy if certs else None,
        "mutual_authentication": {
            "enabled": mtls.enabled,
            "ca_certificates": list(mtls.ca_certificates),
        },
        "default_action": {"forward": listener.default_action.forward},
        "quic_upgrade": listener.quic_upgrade,
        "certificate_expiry": expiry,
    }


def expiry_warnings(listener: dict[str, Any]) -> list[str]:
    """What an operator who just changed a listener should read: its certificates that have
    expired (clients refuse them) or expire within EXPIRY_WARNING_DAYS."""
    warnings = []
    for entry in listener.get("certificate_expiry") or []:
        cert_id, left = entry["id"], entry["days_left"]
        if entry["expired"]:
            warnings.append(f"{listener['name']} serves {cert_id}, which has expired")
        elif left < EXPIRY_WARNING_DAYS:
            warnings.append(f"{listener['name']} serves {cert_id}, which expires in {left} days")
    return warnings


def server_group_view(group: ServerGroup) -> dict[str, Any]:
    return {
        "id": group.id,
        "scheduler": group.scheduler.value,
        "servers": [{"host": s.host, "port": s.port, "weight": s.weight} for s in group.servers],
    }


def expiring_in_use(snapshot: Snapshot, now: datetime) -> list[tuple[str, list[str], int]]:
    """``(certificate id, listeners using it, days left)`` for certificates in use that expire
    within :data:`EXPIRY_WARNING_DAYS` (or have expired): what an operator must hear about."""
    found = []
    for cert in snapshot.config.certificates:
        users = certificate_users(snapshot.config, cert.id)
        server = snapshot.server_certificates.get(cert.id)
        ca = snapshot.ca_bundles.get(cert.id)
        not_after = server.not_after if server else ca.not_after if ca else None
        if users and not_after is not None:
            left = days_left(not_after, now)
            if left < EXPIRY_WARNING_DAYS:
                found.append((cert.id, users, left))
    return found
