"""Files under var/ hold what nobody but the service should read: they are made mode 0600."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def ensure_private_file(path: Path) -> None:
    """Create `path` empty with mode 0600 if it does not exist yet (its folder too).

    SQLite creates a missing database with the umask's mode (usually 0644), and its -wal
    and -shm files copy the database's mode: creating the file first keeps all three private.
    An empty file is a valid empty SQLite database.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass


def write_private(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically; the file is 0600 from its first byte.

    Writing first and chmod-ing after would leave the content readable for a moment.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(temporary, path)


def create_private(path: Path, data: bytes) -> bool:
    """Create `path` (0600) holding `data`, unless it exists; True when this call created it.

    Processes that start together may all try: the data is written to a private temporary
    file and then hard-linked into place, which fails if the name exists, so exactly one
    file wins and nobody ever reads a half-written one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            return False
        return True
    finally:
        temporary.unlink(missing_ok=True)

