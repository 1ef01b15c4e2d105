"""The engine and sessions. Services own transactions: `async with db.transaction() as s:`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.pool import StaticPool


def engine_for(url: str, *, connect_timeout: float = 2.0, pool_size: int = 10) -> AsyncEngine:
    """An engine tuned for each backend; connect timeouts keep a dead database from hanging a request."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if backend == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
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
    engine = create_async_engine(url, **kwargs)
    if backend == "sqlite":
        _tune_sqlite(engine)
    return engine


def _tune_sqlite(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
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

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        # Writers take the write lock up front and queue on busy_timeout; readers don't block anyone.
        conn.exec_driver_sql("BEGIN " + conn.get_execution_options().get(SQLITE_BEGIN, "IMMEDIATE"))


SQLITE_BEGIN = "mallgate_sqlite_begin"
_READ_ONLY = {SQLITE_BEGIN: "DEFERRED"}


class Database:
    def __init__(self, url: str, *, connect_timeout: float = 2.0) -> None:
        self.url = url
        self.engine = engine_for(url, connect_timeout=connect_timeout)
        self.backend = self.engine.dialect.name
        self._sessions = async_sessionmaker(self.engine, expire_on_commit=False, autoflush=False)

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
                await session.rollback()

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execution_options(**_READ_ONLY)
            await conn.execute(text("SELECT 1"))

    async def dispose(self) -> None:
        await self.engine.dispose()
