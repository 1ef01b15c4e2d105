"""What is wrong with a database URL, or with reaching its database, in one line with the fix.

A newcomer's wrong URL used to end in a 200-700-line traceback whose last line named a
driver exception. These functions turn the failures a user can cause (a URL SQLAlchemy
cannot use, a database that does not exist, a port nobody listens on, a refused login)
into one sentence; anything else is a bug and is left to raise. No text returned here
contains the URL's password.
"""

from __future__ import annotations

import socket
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError

# The async driver mallgate ships for each database SQLAlchemy knows.
DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+asyncpg",
    "mysql": "mysql+asyncmy",
    "mariadb": "mysql+asyncmy",
}
EXAMPLES = "postgresql+asyncpg://user:password@host/db, mysql+asyncmy://user:password@host/db or sqlite+aiosqlite:///path.db"
# asyncmy / MySQL error numbers a user causes.
MYSQL_UNKNOWN_DATABASE = 1049
MYSQL_ACCESS_DENIED = (1044, 1045, 1698)
MYSQL_CANNOT_CONNECT = (2003, 2005)


def masked(url: str) -> str:
    """The URL as it may be shown: the password replaced by ***; unparsable ones not at all."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return "(unparsable)"


def url_problem(url: str) -> str | None:
    """Why SQLAlchemy's async engine cannot use `url`, with the fix; None when it can."""
    try:
        parsed = make_url(url)
        parsed.port  # noqa: B018 - a port that is not a number raises here
    except (ArgumentError, ValueError):
        return f"not a database URL: use {EXAMPLES}"
    name = parsed.drivername
    backend = parsed.get_backend_name()
    if backend == "postgres":
        return f"{name}:// is not a name SQLAlchemy knows: use postgresql+asyncpg://"
    wanted = DRIVERS.get(backend)
    if wanted is None:
        return f"unknown database {name}://: use {EXAMPLES}"
    try:
        dialect = parsed.get_dialect(_is_async=True)
    except NoSuchModuleError:
        return f"unknown driver {name}://: use {wanted}://"
    if not dialect.is_async:
        return f"{name}:// is a synchronous driver, mallgate needs an async one: use {wanted}://"
    try:
        dialect.import_dbapi()
    except ImportError:
        return f"the driver of {name}:// is not installed: use {wanted}://"
    if backend != "sqlite" and not parsed.database:
        return f"names no database: add it after the host ({wanted}://user:password@host/mallgate)"
    return None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, the driver error SQLAlchemy wrapped, and the exceptions it was raised from."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        orig = current.orig if isinstance(current, DBAPIError) else None
        todo.extend(
            [orig if isinstance(orig, BaseException) else None, current.__cause__, current.__context__]
        )


def _where(parsed: URL) -> str:
    default = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306}.get(parsed.get_backend_name())
    return f"{parsed.host or 'localhost'}:{parsed.port or default}"


def _first_line(exc: BaseException) -> str:
    text = str(exc.args[1] if len(exc.args) > 1 else exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def connection_problem(exc: BaseException, url: str, *, timeout: float) -> str | None:
    """What failed reaching the database of `url` and what to do; None when `exc` is not that."""
    parsed = make_url(url)
    where = _where(parsed)
    database = parsed.database or ""
    chain = list(_chain(exc))
    names = {type(e).__name__ for e in chain}
    mysql_codes = {e.args[0] for e in chain if len(e.args) > 1 and isinstance(e.args[0], int)}
    if "InvalidCatalogNameError" in names or MYSQL_UNKNOWN_DATABASE in mysql_codes:
        return f'database "{database}" does not exist on {where}: create it (CREATE DATABASE {database})'
    refused_login = [
        e
        for e in chain
        if type(e).__name__ in ("InvalidAuthorizationSpecificationError", "InvalidPasswordError")
        or (e.args and e.args[0] in MYSQL_ACCESS_DENIED)
    ]
    if refused_login:
        return f"{where} refused the login ({_first_line(refused_login[0])}): check the user and password"
    for error in chain:
        if isinstance(error, ConnectionRefusedError):
            return f"nothing listens on {where}: start the database, or fix the host and port"
        if isinstance(error, socket.gaierror):
            return f"host {parsed.host} is not known: fix the host name"
        if isinstance(error, TimeoutError):
            return f"no answer from {where} within {timeout:g} s: is the host right, and the port open?"
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_problem(chain, database)
    for error in chain:
        if isinstance(error, OSError):
            return f"cannot reach {where}: {error.strerror or error}"
    for error in chain:
        if isinstance(error, DBAPIError):
            return f"the database at {where} answered: {_first_line(error.orig or error)}"
    return None


def _sqlite_problem(chain: list[BaseException], path: str) -> str | None:
    for error in chain:
        if isinstance(error, OSError) and _about(error, path):
            return (
                f"cannot create the SQLite file {path}: {error.strerror or error}: fix the path or its folder"
            )
        if isinstance(error, sqlite3.Error | DBAPIError):
            return f"cannot use the SQLite file {path}: {_first_line(error)}"
    return None


def _about(error: OSError, path: str) -> bool:
    """Whether `error` is about the database file or one of its folders (not, say, var/secret_key)."""
    if error.filename is None:
        return False
    database, named = Path(path).absolute(), Path(str(error.filename)).absolute()
    return named == database or named in database.parents


def without(text: str, url: str) -> str:
    """`text` with the URL's password blanked, should a driver ever have quoted it."""
    try:
        password = make_url(url).password
    except (ArgumentError, ValueError):
        return text
    return text.replace(str(password), "***") if password else text
