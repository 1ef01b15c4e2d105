"""Migrations: from empty to head and back on every database, and they match the models."""

from __future__ import annotations

import asyncio
import os
import secrets
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from conftest import BACKENDS
from mallgate.db.migrate import downgrade, upgrade
from mallgate.db.models import Base
from mallgate.db.servers import create_database, drop_database
from mallgate.db.session import engine_for


@pytest.fixture(params=list(BACKENDS))
async def empty_url(request: pytest.FixtureRequest, tmp_path: Path):
    kind = request.param
    if kind == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'm.db'}"
        return
    name = f"mallgate_m_{os.getpid()}_{secrets.token_hex(3)}"
    url = await create_database(BACKENDS[kind], name)
    try:
        yield url
    finally:
        await drop_database(BACKENDS[kind], name)


async def _tables(url: str) -> set[str]:
    engine = engine_for(url)
    try:
        async with engine.connect() as conn:
            return set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
    finally:
        await engine.dispose()


async def _diff(url: str) -> list[object]:
    engine = engine_for(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(
                lambda c: compare_metadata(MigrationContext.configure(c), Base.metadata)
            )
    finally:
        await engine.dispose()


async def test_upgrade_from_empty_downgrade_and_again(empty_url: str) -> None:
    await asyncio.to_thread(upgrade, empty_url)
    tables = await _tables(empty_url)
    assert set(Base.metadata.tables) <= tables
    assert await _diff(empty_url) == []
    await asyncio.to_thread(downgrade, empty_url)
    assert not (set(Base.metadata.tables) & await _tables(empty_url))
    await asyncio.to_thread(upgrade, empty_url)
    assert set(Base.metadata.tables) <= await _tables(empty_url)
