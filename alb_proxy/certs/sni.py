"""Which certificates answer a ClientHello's server name: a pure index, built once per change.

Rules (DESIGN §2): exact match on a DNS name → wildcard match (``*.example.com`` covers exactly one
label) → the listener's default certificate. No server name or an IP literal → default. An exact
match rules wildcards out entirely. Names of the default certificate count like any other.

A *group* is the tuple of certificate ids served together for a name: at most one per key type,
because OpenSSL holds one certificate per key type in a context and picks by what the client
supports (RSA and ECDSA side by side). Among candidates of one key type we prefer one valid at
``now``, then the later expiry, then the one listed first. All of this is resolved in ``build``,
so ``select`` (on every handshake) is a normalisation and at most two dict lookups, and
``groups`` tells the caller every context it must build before the first handshake.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

Group = tuple[str, ...]
"""Ids of the certificates served together, in listing order (default first)."""


@dataclass(frozen=True)
class CertInfo:
    """What SNI selection needs to know about a certificate (see ``ServerCertificate.info``)."""

    id: str
    key_type: str
    """``RSA``, ``EC``, ...: at most one certificate of each type per group."""
    dns_names: tuple[str, ...]
    """DNS names it serves, wildcards as ``*.example.com``; case and a trailing dot don't matter."""
    not_before: datetime
    not_after: datetime


class SniIndex:
    """Immutable after ``build``; safe to share between connections and threads."""

    __slots__ = ("_default", "_exact", "_groups", "_rebuild_at", "_wildcard")

    def __init__(
        self,
        default: Group,
        exact: Mapping[str, Group],
        wildcard: Mapping[str, Group],
        rebuild_at: datetime | None = None,
    ) -> None:
        """Use ``build``; this takes the already resolved tables. ``wildcard`` is keyed by the
        parent domain: ``*.example.com`` is stored under ``example.com``."""
        self._default = default
        self._exact = dict(exact)
        self._wildcard = dict(wildcard)
        self._groups = tuple(dict.fromkeys([default, *exact.values(), *wildcard.values()]))
        self._rebuild_at = rebuild_at

    @classmethod
    def build(cls, default: CertInfo, additional: Sequence[CertInfo], now: datetime) -> SniIndex:
        by_id: dict[str, CertInfo] = {}
        for cert in (default, *additional):
            by_id.setdefault(cert.id, cert)  # the default listed again as additional counts once
        certs = list(by_id.values())
        rank = {c.id: i for i, c in enumerate(certs)}
        exact: dict[str, list[CertInfo]] = {}
        wildcard: dict[str, list[CertInfo]] = {}
        for cert in certs:
            for name in map(normalize, cert.dns_names):
                if name.startswith("*."):
                    if is_host_name(name[2:]):
                        wildcard.setdefault(name[2:], []).append(cert)
                elif is_host_name(name):
                    exact.setdefault(name, []).append(cert)

        interned: dict[Group, Group] = {}

        def group(candidates: Sequence[CertInfo]) -> Group:
            best: dict[str, CertInfo] = {}
            for cert in candidates:
                held = best.get(cert.key_type)
                if held is None or _preference(cert, now, rank) < _preference(held, now, rank):
                    best[cert.key_type] = cert
            ids = tuple(sorted((c.id for c in best.values()), key=rank.__getitem__))
            return interned.setdefault(ids, ids)

        boundaries = [t for c in certs for t in (c.not_before, c.not_after) if t > now]
        return cls(
            group([default]),
            {name: group(found) for name, found in exact.items()},
            {parent: group(found) for parent, found in wildcard.items()},
            min(boundaries, default=None),
        )

    def select(self, server_name: str | None) -> Group:
        """The certificate ids to serve for a ClientHello's server name; never raises."""
        if not server_name:
            return self._default
        name = normalize(server_name)
        if not is_host_name(name):
            return self._default
        found = self._exact.get(name)
        if found is not None:
            return found
        label, _, parent = name.partition(".")
        if label and parent:
            return self._wildcard.get(parent, self._default)
        return self._default

    def groups(self) -> tuple[Group, ...]:
        """Every distinct group ``select`` can return, the default group first."""
        return self._groups

    @property
    def rebuild_at(self) -> datetime | None:
        """The next instant a certificate becomes valid or expires: from then on "prefer the
        valid one" may choose differently, so build a new index then. None: never."""
        return self._rebuild_at


def normalize(name: str) -> str:
    """Lowercase, one trailing dot removed: ``Example.COM.`` and ``example.com`` are one name."""
    name = name.lower()
    return name[:-1] if name.endswith(".") else name


def covers(pattern: str, name: str) -> bool:
    """Whether a certificate name (``pattern``, maybe ``*.example.com``) covers ``name`` by
    the same rules as selection; a wildcard ``name`` is covered only by the same wildcard."""
    pattern, name = normalize(pattern), normalize(name)
    if pattern == name:
        return True
    if not pattern.startswith("*.") or name.startswith("*."):
        return False
    label, _, parent = name.partition(".")
    return bool(label) and parent == pattern[2:]


def is_host_name(name: str) -> bool:
    """Cheap filter applied alike to certificate names and server names, so an IP literal never
    matches: IPv6 has colons, and IPv4 ends in a numeric label, which no DNS host name does
    (top-level domains are never all-numeric, RFC 3696 §2). Wildcards elsewhere than a whole
    leftmost label (``w*.example.com``) are not honoured either, as browsers don't."""
    last_label = name.rpartition(".")[2]
    return bool(name) and ":" not in name and "*" not in name and not last_label.isdigit()


def _preference(cert: CertInfo, now: datetime, rank: Mapping[str, int]) -> tuple[bool, float, int]:
    """Sort key, lower is better: valid now, then later expiry, then listed earlier.

    Validity is taken half-open, [not_before, not_after), so that at ``rebuild_at`` (a boundary)
    the new index already sees the change."""
    valid = cert.not_before <= now < cert.not_after
    return (not valid, -cert.not_after.timestamp(), rank[cert.id])
