"""Alembic environment: runs migrations over the service's own async engine."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from mallgate.db.models import Base
from mallgate.db.session import engine_for

target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


async def _online() -> None:
    engine = engine_for(context.config.get_main_option("sqlalchemy.url") or "")
    try:
        async with engine.connect() as conn:
            await conn.run_sync(_run)
            await conn.commit()
    finally:
        await engine.dispose()


def _in_new_loop() -> None:
    asyncio.run(_online())


try:
    asyncio.get_running_loop()
except RuntimeError:
    _in_new_loop()
else:
    # Called from inside an event loop (the test suite): run on a thread of its own.
    import threading

    worker = threading.Thread(target=_in_new_loop)
    worker.start()
    worker.join()
