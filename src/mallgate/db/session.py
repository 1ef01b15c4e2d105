"""The engine and sessions. Services own transactions: `async with db.transaction() as s:`."""

from __future__ import annotations

import asyncio
import fcntl
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from mallgate.private_files import ensure_private_file

T = TypeVar("T")

# A failed statement's error message carries its parameters (mobile numbers, code hashes,
# tokens), and error messages end up in logs.
HIDE_PARAMETERS = True


def engine_for(url: str, *, connect_timeout: float = 2.0, pool_size: int = 10) -> AsyncEngine:
    """An engine tuned for each backend; connect timeouts keep a dead database from hanging a request."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if backend == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:":
            ensure_private_file(Path(database))
        kwargs = {"connect_args": {"timeout": 30}}
        if not database or database == ":memory:":
            kwargs["poolclass"] = StaticPool
    elif backend == "postgresql":
        kwargs.update(pool_size=pool_size, connect_args={"timeout": connect_timeout})
    elif backend in ("mysql", "mariadb"):
        kwargs.update(
            pool_size=pool_size,
            pool_recycle=3600,
            connect_args={"connect_timeout": connect_timeout, "charset": "utf8mb4"},
        )
    engine = create_async_engine(url, hide_parameters=HIDE_PARAMETERS, **kwargs)
    if backend == "sqlite":
        _tune_sqlite(engine)
    return engine


def _tune_sqlite(engine: AsyncEngine | Engine) -> None:
    sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine

    @event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control from the driver so that BEGIN IMMEDIATE can be issued:
        # a deferred transaction that reads and then writes fails at once with SQLITE_BUSY
        # when another writer got in between, instead of waiting its turn.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed notification survives a power cut before 'success' is answered.
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        # Writers take the write lock up front and queue on busy_timeout; readers don't block anyone.
        conn.exec_driver_sql("BEGIN " + conn.get_execution_options().get(SQLITE_BEGIN, "IMMEDIATE"))


class _SqliteWriteLock:
    """Queues SQLite writers across worker processes with flock, which wakes a waiter at once.

    SQLite's own busy handler sleeps in growing steps (up to 100 ms) while another
    process holds the write lock, which turns two busy workers into long stalls.
    Held only around synchronous work, so it never waits on the event loop. The lock
    file stays open (opening and closing it cost up to a millisecond under the lock);
    it is opened by the process that locks it, since a descriptor inherited across a
    fork shares its flock with the parent and would exclude nothing.
    """

    def __init__(self, database: str) -> None:
        self.path = f"{database}.writelock" if database and database != ":memory:" else ""
        self.local = threading.Lock()
        self.fd = -1
        self.pid = 0

    def __enter__(self) -> None:
        self.local.acquire()
        if self.path:
            if self.pid != os.getpid():
                self.fd, self.pid = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600), os.getpid()
            fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *_exc: object) -> None:
        if self.path:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        self.local.release()

    def close(self) -> None:
        if self.pid == os.getpid() and self.fd >= 0:
            os.close(self.fd)
        self.fd, self.pid = -1, 0


@contextmanager
def _safety(connection: Connection, durable: bool) -> Iterator[None]:
    """synchronous=NORMAL for one non-durable transaction, FULL again after it.

    Set on the driver's connection, outside any transaction (SQLite refuses it inside). A
    connection that could not be set back is discarded: none may return to the pool NORMAL.
    """
    if durable:
        yield
        return
    raw = connection.connection.dbapi_connection
    assert raw is not None
    raw.execute("PRAGMA synchronous=NORMAL")
    try:
        yield
    finally:
        try:
            raw.execute("PRAGMA synchronous=FULL")
        except Exception:
            connection.invalidate()
            raise


SQLITE_BEGIN = "mallgate_sqlite_begin"
_READ_ONLY = {SQLITE_BEGIN: "DEFERRED"}


class Database:
    def __init__(self, url: str, *, connect_timeout: float = 2.0) -> None:
        self.url = url
        self.engine = engine_for(url, connect_timeout=connect_timeout)
        self.backend = self.engine.dialect.name
        self._sessions = async_sessionmaker(self.engine, expire_on_commit=False, autoflush=False)
        self._sync_sessions: sessionmaker[Session] | None = None
        if self.backend == "sqlite":
            # aiosqlite hops to its thread and back for every cursor call; a batch of writes
            # is far cheaper as one plain-sqlite3 call on a worker thread.
            sync_url = make_url(url).set(drivername="sqlite")
            sync_engine = create_engine(
                sync_url,
                hide_parameters=HIDE_PARAMETERS,
                connect_args={"timeout": 30, "check_same_thread": False},
            )
            _tune_sqlite(sync_engine)
            self._sync_sessions = sessionmaker(sync_engine, expire_on_commit=False, autoflush=False)
            self._write_lock = _SqliteWriteLock(make_url(url).database or "")

    async def run_write(self, work: Callable[[Session], T], *, durable: bool = True) -> T:
        """Run synchronous ORM work in one write transaction; commits on success.

        On SQLite the whole unit runs on a worker thread over plain sqlite3; elsewhere it runs
        through `AsyncSession.run_sync` over the async driver.

        `durable=False` is for bookkeeping whose loss in a power cut costs nothing that matters
        (never money, never a notice or what it changed; today: repeat counts, push claims,
        logins): its commit does not wait for the disk.
        SQLite commits it with synchronous=NORMAL (the WAL stays intact; the next durable
        commit, of any connection, makes it durable too), PostgreSQL with
        synchronous_commit=off; MySQL has no per-transaction switch and stays durable.
        """
        if self._sync_sessions is not None:
            factory = self._sync_sessions
            engine = factory.kw["bind"]
            lock = self._write_lock

            def in_thread() -> T:
                # Check the connection out before taking the lock: the lock covers
                # BEGIN IMMEDIATE ... COMMIT and nothing else.
                with engine.connect() as connection:
                    with _safety(connection, durable), lock, factory(bind=connection) as session:
                        with session.begin():
                            return work(session)

            return await asyncio.to_thread(in_thread)
        async with self.transaction() as session:
            if not durable and self.backend == "postgresql":
                await session.execute(text("SET LOCAL synchronous_commit TO OFF"))
            return await session.run_sync(work)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """One unit of work: commits on success, rolls back on any exception."""
        async with self._sessions() as session, session.begin():
            yield session

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        """A transaction that only reads: on SQLite it takes no write lock."""
        async with self._sessions() as session:
            await session.connection(execution_options=_READ_ONLY)
            try:
                yield session
            finally:
                # Detach first: a rollback expires what the session holds, and the caller may
                # still read the objects it loaded.
                session.expunge_all()
                await session.rollback()

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execution_options(**_READ_ONLY)
            await conn.execute(text("SELECT 1"))

    async def dispose(self) -> None:
        await self.engine.dispose()
        if self._sync_sessions is not None:
            bind = self._sync_sessions.kw["bind"]
            await asyncio.to_thread(bind.dispose)
            self._write_lock.close()
