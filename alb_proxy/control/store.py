"""Durable state in ``state_dir``: SQLite (WAL) for the desired config and the certificate
records, private keys in files of their own written 0600.

Every change is one transaction that stores the whole desired config under the next generation,
so a crash leaves either the old state or the new, and the history says what changed when.
Key files are written (temp file, fsync, rename) before the transaction that references them
commits; a refused or failed change removes what it staged.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alb_proxy.errors import AlbError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS configs (
    generation INTEGER PRIMARY KEY,
    applied_at TEXT NOT NULL,
    operation  TEXT NOT NULL,
    body       TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS certificates (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    kind        TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    cert_pem    BLOB NOT NULL,
    uploaded_at TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class StoredConfig:
    generation: int
    body: dict[str, Any]
    operation: str
    """What made this generation: ``import FILE``, ``apply FILE``, or a runtime operation."""


@dataclass(frozen=True)
class CertificateRecord:
    id: str
    name: str
    kind: str
    fingerprint: str
    uploaded_at: str


class StateError(AlbError):
    """``state_dir`` cannot be used: not a directory, not writable, a damaged database."""


class StateDirBusy(StateError):
    """Another daemon owns ``state_dir``: two writers would each number generations alone."""


class Store:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.certs_dir = state_dir / "certs"
        self.keys_dir = state_dir / "keys"
        if state_dir.exists() and not state_dir.is_dir():
            raise StateError(f"state_dir {state_dir} is not a directory")
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(state_dir, 0o700)
            self._lock_fd = _lock(state_dir / "lock")
            for directory, mode in ((self.certs_dir, 0o755), (self.keys_dir, 0o700)):
                directory.mkdir(parents=True, exist_ok=True)
                os.chmod(directory, mode)
        except OSError as exc:
            where = exc.filename or state_dir
            raise StateError(f"state_dir {where}: {exc.strerror or exc}") from None
        try:
            self._db = sqlite3.connect(
                state_dir / "state.db", isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            self._db.execute("SELECT count(*) FROM configs").fetchone()
        except sqlite3.Error as exc:
            os.close(self._lock_fd)
            raise StateError(
                f"state_dir {state_dir}: state.db cannot be used ({exc}); move it away to "
                "start from the config file again"
            ) from None

    def close(self) -> None:
        self._db.close()
        os.close(self._lock_fd)  # releases the lock

    def latest(self) -> StoredConfig | None:
        row = self._db.execute(
            "SELECT generation, body, operation FROM configs ORDER BY generation DESC LIMIT 1"
        ).fetchone()
        return None if row is None else StoredConfig(row[0], json.loads(row[1]), row[2])

    def save(
        self,
        generation: int,
        body: dict[str, Any],
        operation: str,
        *,
        add: CertificateRecord | None = None,
        add_pem: bytes = b"",
        remove: str | None = None,
        file_sha256: str | None = None,
    ) -> None:
        """Store the config of ``generation`` (and a certificate record change) atomically;
        ``file_sha256`` records which config file this state was imported from."""
        now = datetime.now(UTC).isoformat(timespec="seconds")
        with _transaction(self._db):
            self._db.execute(
                "INSERT INTO configs (generation, applied_at, operation, body) VALUES (?,?,?,?)",
                (generation, now, operation, json.dumps(body, sort_keys=True)),
            )
            if add is not None:
                self._db.execute(
                    "INSERT OR REPLACE INTO certificates VALUES (?,?,?,?,?,?)",
                    (add.id, add.name, add.kind, add.fingerprint, add_pem, add.uploaded_at),
                )
            if remove is not None:
                self._db.execute("DELETE FROM certificates WHERE id = ?", (remove,))
            if file_sha256 is not None:
                self._db.execute(
                    "INSERT OR REPLACE INTO meta VALUES ('file_sha256', ?)", (file_sha256,)
                )

    def imported_file_sha256(self) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'file_sha256'").fetchone()
        return None if row is None else str(row[0])

    def records(self) -> dict[str, CertificateRecord]:
        rows = self._db.execute(
            "SELECT id, name, kind, fingerprint, uploaded_at FROM certificates"
        ).fetchall()
        return {row[0]: CertificateRecord(*row) for row in rows}

    def history(self, limit: int = 20) -> list[tuple[int, str, str]]:
        rows = self._db.execute(
            "SELECT generation, applied_at, operation FROM configs "
            "ORDER BY generation DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [(int(r[0]), str(r[1]), str(r[2])) for r in rows]

    # -- key and certificate files --------------------------------------------------------------

    def stage_files(
        self, cert_id: str, cert_pem: bytes, key_pem: bytes | None
    ) -> tuple[Path, Path | None]:
        """Write ``certs/ID.pem`` and (0600) ``keys/ID.key`` atomically; returns both paths."""
        _require_plain(cert_id)
        cert_path = write_atomic(self.certs_dir / f"{cert_id}.pem", cert_pem, 0o644)
        key_path = None
        if key_pem is not None:
            key_path = write_atomic(self.keys_dir / f"{cert_id}.key", key_pem, 0o600)
        return cert_path, key_path

    def remove_files(self, cert_id: str) -> None:
        _require_plain(cert_id)
        for path in (self.certs_dir / f"{cert_id}.pem", self.keys_dir / f"{cert_id}.key"):
            path.unlink(missing_ok=True)


def _require_plain(cert_id: str) -> None:
    """The config rules allow only plain names; this guards the file system all the same."""
    if not cert_id or "/" in cert_id or "\\" in cert_id or cert_id.startswith("."):
        raise ValueError(f"not a plain certificate id: {cert_id!r}")


def _lock(path: Path) -> int:
    """Hold an exclusive ``flock`` on ``path`` for the life of the process (the kernel drops
    it when the process dies, so a crash never leaves a stale lock); the file names the pid."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise StateDirBusy(
            f"state_dir {path.parent} is in use by another alb-proxy (pid {holder}); "
            "stop it first, or give this one a state_dir of its own"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class _transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")


def write_atomic(path: Path, data: bytes, mode: int) -> Path:
    """Create with ``mode`` from the first byte (never a moment world-readable), fsync, rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path
