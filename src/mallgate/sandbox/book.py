"""A stand-in's records in one SQLite file, shared by the sandbox's worker processes."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

from mallgate.private_files import ensure_private_file


class SqliteBook:
    """The file (made 0600) and its write transaction; each stand-in adds its tables and queries."""

    def __init__(self, path: Path) -> None:
        ensure_private_file(path)
        self.path = path

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        # BEGIN IMMEDIATE: a check-then-write ("a code works once", "a nonce is new") holds across
        # the sandbox's worker processes, under the file's write lock.
        with closing(sqlite3.connect(self.path, timeout=30, isolation_level=None)) as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
