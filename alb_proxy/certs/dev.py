"""``alb-proxy certs dev``: a local CA and the certificates the example config names.

Files only, no daemon. Every run makes new keys and overwrites the files, so a leaked dev key is
fixed by running it again (clients must then trust the new ``ca.pem``). Each file is written to
a temporary name created with its final mode and renamed into place: a key file is never
readable by others, not even for a moment, and a crash never leaves half a file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

from cryptography.x509.oid import ExtendedKeyUsageOID

from alb_proxy.certs.describe import require_aware
from alb_proxy.certs.issue import Issued, issue, new_key
from alb_proxy.errors import CertificateError

LEAF_VALIDITY = timedelta(days=825)
"""The longest validity Apple platforms accept for certificates from a user-installed CA."""
CA_VALIDITY = timedelta(days=3650)
CLOCK_SKEW = timedelta(hours=1)
"""Certificates start this long before ``now`` so a peer whose clock is slow accepts them."""

SITE_NAMES = ("site.example.test", "*.site.example.test", "localhost")
SITE_ADDRESSES = ("127.0.0.1", "::1")
API_NAMES = ("api.example.test",)
CLIENT_NAME = "demo-client"


def write_dev_certificates(out_dir: Path, *, now: datetime) -> list[Path]:
    """Write CAs, server and client certificates with their keys; return the paths written.

    Trust ``ca.pem`` to reach the listeners. ``site.pem``, ``site-rsa.pem`` and ``api.pem`` hold
    the leaf then the CA (the full chain). ``client-ca.pem`` is the CA for mutual
    authentication; ``client.pem`` (CN=demo-client, clientAuth) is a certificate it issued.
    """
    require_aware(now)
    start = now - CLOCK_SKEW
    leaf_end = start + LEAF_VALIDITY  # the limit is on the whole span, skew included

    def authority(name: str) -> Issued:
        end = now + CA_VALIDITY
        return issue(name, issuer=None, not_before=start, not_after=end, ca=True, path_length=0)

    ca = authority("alb-proxy development CA")
    client_ca = authority("alb-proxy development client CA")

    def server(names: Sequence[str], addresses: Sequence[str], key_type: str) -> Issued:
        return issue(
            names[0],
            issuer=ca,
            not_before=start,
            not_after=leaf_end,
            key=new_key(key_type),
            dns_names=names,
            ip_addresses=addresses,
            extended_key_usage=[ExtendedKeyUsageOID.SERVER_AUTH],
        )

    client = issue(
        CLIENT_NAME,
        issuer=client_ca,
        not_before=start,
        not_after=leaf_end,
        extended_key_usage=[ExtendedKeyUsageOID.CLIENT_AUTH],
    )
    files: list[tuple[str, Issued, bytes]] = [
        ("ca", ca, b""),
        ("site", server(SITE_NAMES, SITE_ADDRESSES, "EC"), ca.cert_pem()),
        ("site-rsa", server(SITE_NAMES, SITE_ADDRESSES, "RSA"), ca.cert_pem()),
        ("api", server(API_NAMES, (), "EC"), ca.cert_pem()),
        ("client-ca", client_ca, b""),
        ("client", client, b""),
    ]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CertificateError(f"cannot create {out_dir}: {exc.strerror or exc}") from exc
    written = []
    for name, issued, chain in files:
        written.append(_write(out_dir / f"{name}.pem", issued.cert_pem() + chain, 0o644))
        written.append(_write(out_dir / f"{name}.key", issued.key_pem(), 0o600))
    return written


def _write(path: Path, data: bytes, mode: int) -> Path:
    """Replace ``path`` atomically with a file that had ``mode`` from its creation."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CertificateError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return path
