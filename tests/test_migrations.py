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


async def test_0002_keeps_existing_wallet_credits(empty_url: str) -> None:
    """Ledger rows written before the cause key get one (`credit:<order_no>`), on every database."""
    from sqlalchemy import text

    await asyncio.to_thread(upgrade, empty_url, "0001")
    engine = engine_for(empty_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO users (id, nickname, avatar, group_name, sex, point, balance, shop_count,"
                    " coupon_count, last_ip, created_at) VALUES (1, '', '', '', 0, 0, 9.90, 0, 0, '',"
                    " '2026-01-01 00:00:00')"
                )
            )
            await conn.execute(
                text(
                    "INSERT INTO wallet_entries (user_id, order_no, amount, created_at)"
                    " VALUES (1, 'R1', 9.90, '2026-01-01 00:00:00')"
                )
            )
        await asyncio.to_thread(upgrade, empty_url)
        async with engine.connect() as conn:
            keys = (await conn.execute(text("SELECT entry_key FROM wallet_entries"))).scalars().all()
        assert keys == ["credit:R1"]
        assert await _diff(empty_url) == []
    finally:
        await engine.dispose()
