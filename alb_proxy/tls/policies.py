"""The predefined TLS security policies (``TLS_POLICIES.md``) and how they configure a context.

A policy is data: the TLS versions it allows and its TLS ≤ 1.2 cipher suites (OpenSSL names).
``apply_policy`` writes it into a fresh ``ssl.SSLContext``; it never opens a socket.

What the standard library and this OpenSSL (3.0) can and cannot express:

* **TLS 1.3 suites cannot be chosen**: Python's ``ssl`` has no binding for
  ``SSL_CTX_set_ciphersuites``, so every policy that allows TLS 1.3 serves OpenSSL's default
  suites, ``TLS13_SUITES_SERVED``. The published policies also list ``TLS_AES_128_CCM_SHA256``
  and ``TLS_AES_128_CCM_8_SHA256``; those are *not* served.
* **TLS 1.0 and 1.1** are refused by OpenSSL 3 at its default security level (their handshake
  signatures use SHA-1), so a policy allowing them appends ``@SECLEVEL=0`` to its cipher string;
  that lowers the level for contexts built with that policy only.
* ``DES-CBC3-SHA`` is not compiled into some builds (Debian's OpenSSL 3.0 among them): the
  policies keep the published list, OpenSSL ignores the unknown name, and
  ``unavailable_ciphers`` reports it so the docs and the startup log can say so.
* ``tls_cipher_policy_1_0_to_1_3`` allows TLS 1.0 and 1.1 but, as published, only AES-GCM
  suites, which exist in TLS 1.2 only: TLS 1.0/1.1 clients fail with "no shared cipher".
* A version set must be contiguous: OpenSSL takes a minimum and a maximum, not a set.
"""

from __future__ import annotations

import functools
import ssl
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from alb_proxy.errors import AlbError

TLS13_SUITES_SERVED: tuple[str, ...] = (
    "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",
    "TLS_AES_128_GCM_SHA256",
)
"""The TLS 1.3 suites every TLS 1.3 policy serves: OpenSSL's defaults, in its order."""

TLS13_SUITES_PUBLISHED: tuple[str, ...] = (
    "TLS_AES_128_GCM_SHA256",
    "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",
    "TLS_AES_128_CCM_SHA256",
    "TLS_AES_128_CCM_8_SHA256",
)
"""The TLS 1.3 suites the published policies list (the CCM ones are not served, see above)."""

_VERSION_ORDER = (
    ssl.TLSVersion.TLSv1,
    ssl.TLSVersion.TLSv1_1,
    ssl.TLSVersion.TLSv1_2,
    ssl.TLSVersion.TLSv1_3,
)
_LEGACY_VERSIONS = frozenset({ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1})
_DEPRECATED_VERSION_WARNING = r"ssl\.TLSVersion\.TLSv1(_1)? is deprecated"
_OPTIONS = ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_COMPRESSION


class PolicyError(AlbError):
    """A security policy is inconsistent, or OpenSSL cannot serve it."""


@dataclass(frozen=True)
class TlsPolicy:
    """One security policy: which TLS versions, and which TLS ≤ 1.2 cipher suites."""

    id: str
    """The name listeners use in ``security_policy``."""
    versions: frozenset[ssl.TLSVersion]
    """Allowed versions, a contiguous range of TLSv1 … TLSv1_3."""
    ciphers: tuple[str, ...]
    """OpenSSL names of the TLS ≤ 1.2 suites, in server preference order. TLS 1.3 suites are
    not configurable (``TLS13_SUITES_SERVED``); empty only for a TLS 1.3-only policy."""

    def __post_init__(self) -> None:
        indexes = sorted(_VERSION_ORDER.index(v) for v in self.versions if v in _VERSION_ORDER)
        if not self.versions or len(indexes) != len(self.versions):
            raise PolicyError(f"policy {self.id}: versions must be among TLSv1 … TLSv1_3")
        if indexes != list(range(indexes[0], indexes[-1] + 1)):
            raise PolicyError(
                f"policy {self.id}: versions must be contiguous (OpenSSL takes a min and a max)"
            )
        if not self.ciphers and self.versions != {ssl.TLSVersion.TLSv1_3}:
            raise PolicyError(f"policy {self.id}: TLS ≤ 1.2 needs at least one cipher suite")

    @property
    def minimum_version(self) -> ssl.TLSVersion:
        return min(self.versions, key=_VERSION_ORDER.index)

    @property
    def maximum_version(self) -> ssl.TLSVersion:
        return max(self.versions, key=_VERSION_ORDER.index)

    @property
    def allows_legacy_versions(self) -> bool:
        """TLS 1.0 or 1.1 allowed: the context needs OpenSSL security level 0."""
        return bool(self.versions & _LEGACY_VERSIONS)

    @property
    def cipher_string(self) -> str:
        """The string given to ``SSLContext.set_ciphers``."""
        suffix = ":@SECLEVEL=0" if self.allows_legacy_versions else ""
        return ":".join(self.ciphers) + suffix


_ECDHE_GCM = (
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES256-GCM-SHA384",
)
_ECDHE_CBC_SHA2 = (
    "ECDHE-ECDSA-AES128-SHA256",
    "ECDHE-ECDSA-AES256-SHA384",
    "ECDHE-RSA-AES128-SHA256",
    "ECDHE-RSA-AES256-SHA384",
)
_ECDHE_CBC_SHA1 = (
    "ECDHE-ECDSA-AES128-SHA",
    "ECDHE-ECDSA-AES256-SHA",
    "ECDHE-RSA-AES128-SHA",
    "ECDHE-RSA-AES256-SHA",
)
_RSA_KEY_EXCHANGE = (
    "AES128-GCM-SHA256",
    "AES256-GCM-SHA384",
    "AES128-SHA256",
    "AES256-SHA256",
    "AES128-SHA",
    "AES256-SHA",
    "DES-CBC3-SHA",
)
_STRICT = _ECDHE_GCM + _ECDHE_CBC_SHA2 + _ECDHE_CBC_SHA1
_FULL = _STRICT + _RSA_KEY_EXCHANGE


def _versions(*names: str) -> frozenset[ssl.TLSVersion]:
    return frozenset(ssl.TLSVersion[name] for name in names)


POLICIES: Mapping[str, TlsPolicy] = MappingProxyType(
    {
        p.id: p
        for p in (
            TlsPolicy("tls_cipher_policy_1_0", _versions("TLSv1", "TLSv1_1", "TLSv1_2"), _FULL),
            TlsPolicy("tls_cipher_policy_1_1", _versions("TLSv1_1", "TLSv1_2"), _FULL),
            TlsPolicy("tls_cipher_policy_1_2", _versions("TLSv1_2"), _FULL),
            TlsPolicy("tls_cipher_policy_1_2_strict", _versions("TLSv1_2"), _STRICT),
            TlsPolicy(
                "tls_cipher_policy_1_2_strict_with_1_3",
                _versions("TLSv1_2", "TLSv1_3"),
                _STRICT,
            ),
            TlsPolicy(
                "tls_cipher_policy_1_0_to_1_3",
                _versions("TLSv1", "TLSv1_1", "TLSv1_2", "TLSv1_3"),
                _ECDHE_GCM,
            ),
        )
    }
)
"""The predefined policies by id."""

DEFAULT_POLICY_ID = "tls_cipher_policy_1_2_strict_with_1_3"
"""The policy of a new HTTPS or QUIC listener."""


def apply_policy(ctx: ssl.SSLContext, policy: TlsPolicy) -> None:
    """Configure a fresh, not yet used context: versions, TLS ≤ 1.2 suites and options.

    Raises ``PolicyError`` when OpenSSL would serve none of the policy's TLS ≤ 1.2 suites (it
    otherwise drops unknown names silently). Never call it on a context already serving.
    """
    with warnings.catch_warnings():
        # Python warns on TLSv1/TLSv1_1 even when a policy asks for them on purpose.
        warnings.filterwarnings(
            "ignore", message=_DEPRECATED_VERSION_WARNING, category=DeprecationWarning
        )
        ctx.minimum_version = policy.minimum_version
        ctx.maximum_version = policy.maximum_version
    if policy.ciphers:
        try:
            ctx.set_ciphers(policy.cipher_string)
        except ssl.SSLError as exc:
            raise PolicyError(
                f"policy {policy.id}: OpenSSL {ssl.OPENSSL_VERSION} knows none of its cipher suites"
            ) from exc
        if not _tls12_cipher_names(ctx):  # set_ciphers raises for this today; do not rely on it
            raise PolicyError(f"policy {policy.id}: no TLS ≤ 1.2 cipher suite left")
    ctx.options |= _OPTIONS


@functools.cache
def unavailable_ciphers(policy: TlsPolicy) -> tuple[str, ...]:
    """The policy's suites this OpenSSL build cannot serve (configured, but silently absent)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    apply_policy(ctx, policy)
    served = _tls12_cipher_names(ctx)
    return tuple(name for name in policy.ciphers if name not in served)


def _tls12_cipher_names(ctx: ssl.SSLContext) -> frozenset[str]:
    """Names of the context's TLS ≤ 1.2 suites (``get_ciphers`` lists TLS 1.3 ones too)."""
    return frozenset(c["name"] for c in ctx.get_ciphers() if c["protocol"] != "TLSv1.3")
