"""The control plane: every change goes validate → build beside → persist → swap, one at a time.

Changes are serialised by one lock, and a caller may pin the generation it read (``If-Match``),
so two operators can never interleave into a state neither asked for. Building a snapshot reads
files and makes SSL contexts; it runs in a worker thread on fresh objects (never on a live
context), and the swap itself happens on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime

from alb_proxy.certs.ca import load_ca_bundle
from alb_proxy.certs.server import load_server_certificate
from alb_proxy.config.dump import dump_config
from alb_proxy.config.model import Certificate, CertificateKind, Config
from alb_proxy.config.rules import check_config
from alb_proxy.control.operations import OperationError, add_certificate, delete_certificate
from alb_proxy.control.snapshot import (
    Material,
    Snapshot,
    certificate_problems,
    material_digest,
    read_material,
)
from alb_proxy.control.store import CertificateRecord, Store
from alb_proxy.errors import ConfigError
from alb_proxy.observability.log import event
from alb_proxy.observability.metrics import Metrics

Operation = Callable[[Config], Config]
Build = Callable[[Config, int, Material | None], Snapshot]
"""Builds the snapshot of a validated config at a generation from the certificate bytes given
(None: read the files), making its SSL contexts."""

MAX_NAME_LENGTH = 128
"""A certificate's name is a label for people (its id is made from it): a line, not a page."""


class PreconditionFailed(OperationError):
    def __init__(self, expected: int, current: int) -> None:
        super().__init__(412, f"generation is {current}, not {expected}: re-read and retry")


class ControlPlane:
    def __init__(
        self,
        store: Store,
        snapshot: Snapshot,
        build: Build,
        publish: Callable[[Snapshot], Awaitable[None]],
        metrics: Metrics,
    ) -> None:
        self.store = store
        self.snapshot = snapshot
        self._build = build
        self._publish = publish
        self._metrics = metrics
        self._lock = asyncio.Lock()

    @property
    def generation(self) -> int:
        return self.snapshot.generation

    async def change(
        self,
        description: str,
        operation: Operation,
        *,
        if_match: int | None = None,
        record: CertificateRecord | None = None,
        record_pem: bytes = b"",
        forget: str | None = None,
        file_sha256: str | None = None,
    ) -> Snapshot:
        """Apply one operation; on any refusal nothing changes and the old snapshot serves."""
        async with self._lock:
            current = self.snapshot
            if if_match is not None and if_match != current.generation:
                raise PreconditionFailed(if_match, current.generation)
            config = operation(current.config)
            material = await asyncio.to_thread(read_material, config)
            if (
                dump_config(config) == dump_config(current.config)
                and material_digest(material) == current.material_digest
            ):
                return current  # nothing to do (not even a replaced certificate file)
            problems = check_config(config)
            if problems:
                cert_problems = await asyncio.to_thread(certificate_problems, config)
                raise ConfigError([*problems, *cert_problems])
            generation = current.generation + 1
            snapshot = await asyncio.to_thread(self._build, config, generation, material)
            try:
                await self._publish(snapshot)
            except OSError as exc:
                raise OperationError(409, f"cannot serve the change: {exc}") from exc
            try:
                await asyncio.to_thread(
                    self.store.save,
                    generation,
                    dump_config(config),
                    description,
                    add=record,
                    add_pem=record_pem,
                    remove=forget,
                    file_sha256=file_sha256,
                )
            except BaseException:
                await self._publish(current)  # not persisted: serve what the store says
                raise
            self.snapshot = snapshot
            self._metrics.config_generation.set(generation)
            event(logging.INFO, "change applied", generation=generation, operation=description)
            return snapshot

    async def apply_config(
        self,
        config: Config,
        source: str,
        *,
        if_match: int | None = None,
        file_sha256: str | None = None,
    ) -> Snapshot:
        """Make the running state match a whole config (``ctl apply -f``, SIGHUP)."""
        running = self.snapshot.config
        # The process-level settings cannot move under a running daemon.
        if config.workers != running.workers:
            event(
                logging.WARNING,
                "workers changes take effect at the next start",
                running=running.workers or "auto",
                configured=config.workers or "auto",
            )
        settled = replace(
            config, admin=running.admin, state_dir=running.state_dir, workers=running.workers
        )
        # The uploads are listed under the change lock: one uploaded or deleted while this
        # change waited for it is seen, neither dropped from the running state nor looked for.
        return await self.change(
            f"apply {source}",
            lambda _: with_uploads(settled, self.store),
            if_match=if_match,
            file_sha256=file_sha256,
        )

    async def upload(
        self,
        name: str,
        kind: CertificateKind,
        cert_pem: bytes,
        key_pem: bytes | None = None,
        chain_pem: bytes | None = None,
        *,
        if_match: int | None = None,
    ) -> tuple[str, Snapshot]:
        """Validate exactly like a config certificate, store it, and add it to the config."""
        if not 0 < len(name) <= MAX_NAME_LENGTH or not name.isprintable():
            raise OperationError(
                422, f"a certificate name is 1 to {MAX_NAME_LENGTH} printable characters"
            )
        now = datetime.now(UTC)
        if kind is CertificateKind.SERVER:
            if key_pem is None:
                raise OperationError(422, "a server certificate needs its private key")
            loaded = load_server_certificate("upload", cert_pem, key_pem, chain_pem, now=now)
            stored_pem, fingerprint = loaded.chain_pem, loaded.fingerprint_sha256
        else:
            bundle = load_ca_bundle("upload", cert_pem, now=now)
            stored_pem, fingerprint = bundle.pem, bundle.fingerprints[0]
        cert_id = f"{_slug(name)}-{secrets.token_hex(3)}"
        cert_path, key_path = self.store.stage_files(cert_id, stored_pem, key_pem)
        certificate = Certificate(id=cert_id, kind=kind, cert=cert_path, key=key_path)
        record = CertificateRecord(
            cert_id, name, kind.value, fingerprint, now.isoformat(timespec="seconds")
        )
        try:
            snapshot = await self.change(
                f"upload {kind.value} certificate {cert_id}",
                lambda config: add_certificate(config, certificate),
                if_match=if_match,
                record=record,
                record_pem=stored_pem,
            )
        except BaseException:
            self.store.remove_files(cert_id)
            raise
        return cert_id, snapshot

    async def delete_certificate(self, cert_id: str, *, if_match: int | None = None) -> Snapshot:
        snapshot = await self.change(
            f"delete certificate {cert_id}",
            lambda config: delete_certificate(config, cert_id),
            if_match=if_match,
            forget=cert_id,
        )
        self.store.remove_files(cert_id)
        return snapshot


def with_uploads(config: Config, store: Store) -> Config:
    """``config`` plus every certificate uploaded to the store that it does not declare itself.

    Uploaded certificates belong to the certificate store, not to a config file: making the
    running state match a file (apply, SIGHUP, an edited file at start) changes listeners,
    groups and the file's own certificates, and leaves uploads alone; only ``certs delete``
    removes one. A file may name uploaded certificates by id."""
    declared = {c.id for c in config.certificates}
    uploads = tuple(
        Certificate(
            id=record.id,
            kind=CertificateKind(record.kind),
            cert=store.certs_dir / f"{record.id}.pem",
            key=store.keys_dir / f"{record.id}.key"
            if record.kind == CertificateKind.SERVER.value
            else None,
        )
        for record in sorted(store.records().values(), key=lambda r: r.uploaded_at)
        if record.id not in declared
    )
    return replace(config, certificates=(*config.certificates, *uploads)) if uploads else config


def _slug(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return (slug or "cert")[:40]
