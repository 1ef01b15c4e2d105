"""Creating and dropping whole databases on a PostgreSQL or MySQL server.

Used by the test suite and the benchmarks, which give every run a database of
its own so that runs never see each other's rows.
"""

from __future__ import annotations

from sqlalchemy.engine import URL, make_url


async def _execute(server: URL, statement: str) -> None:
    if server.get_backend_name() == "postgresql":
        import asyncpg

        conn = await asyncpg.connect(
            host=server.host,
            port=server.port,
            user=server.username,
            password=server.password,
            database=server.database,
        )
        try:
            await conn.execute(statement)
        finally:
            await conn.close()
        return
    import asyncmy

    conn = await asyncmy.connect(
        host=server.host, port=server.port or 3306, user=server.username, password=server.password or ""
    )
    try:
        async with conn.cursor() as cursor:
            await cursor.execute(statement)
    finally:
        conn.close()


async def create_database(server_url: str, name: str) -> str:
    """Create `name` on the server of `server_url`; returns the URL of the new database."""
    server = make_url(server_url)
    if server.get_backend_name() == "postgresql":
        await _execute(server, f'CREATE DATABASE "{name}"')
    else:
        await _execute(server, f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
    return server.set(database=name).render_as_string(hide_password=False)


async def drop_database(server_url: str, name: str) -> None:
    server = make_url(server_url)
    if server.get_backend_name() == "postgresql":
        await _execute(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    else:
        await _execute(server, f"DROP DATABASE IF EXISTS `{name}`")
