"""Test harness: the real app over real HTTP, on every database that can be reached.

Tests that take the `backend` fixture (directly or through `server`/`client`)
run once per database: SQLite always, PostgreSQL and MySQL/MariaDB when
`scripts/test` (or the environment) provides them. Each run creates its own
database and drops it afterwards, so runs never see each other's rows.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from sqlalchemy.engine import make_url

from mallgate.app import create_app
from mallgate.clock import Clock
from mallgate.db.migrate import upgrade
from mallgate.db.servers import create_database, drop_database
from mallgate.settings import Settings
from support import ADMIN_TOKEN

PG_DEFAULT = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
MYSQL_DEFAULT = "mysql+asyncmy://root@127.0.0.1:3306/test"


def _reachable(url: str) -> bool:
    parsed = make_url(url)
    try:
        with socket.create_connection((parsed.host or "127.0.0.1", parsed.port or 0), timeout=1):
            return True
    except OSError:
        return False


def _backends() -> dict[str, str]:
    """name -> server URL; from MALLGATE_TEST_DATABASES, else whatever answers locally."""
    pg = os.environ.get("MALLGATE_TEST_PG_URL", PG_DEFAULT)
    my = os.environ.get("MALLGATE_TEST_MYSQL_URL", MYSQL_DEFAULT)
    wanted = os.environ.get("MALLGATE_TEST_DATABASES")
    if wanted:
        names = [n.strip() for n in wanted.split(",") if n.strip()]
    else:
        names = ["sqlite"] + [n for n, u in (("postgresql", pg), ("mysql", my)) if _reachable(u)]
    urls = {"sqlite": "", "postgresql": pg, "mysql": my}
    unknown = set(names) - set(urls)
    if unknown:
        raise pytest.UsageError(f"unknown test databases: {sorted(unknown)}")
    return {n: urls[n] for n in names}


BACKENDS = _backends()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", list(BACKENDS), indirect=True, scope="session")


_LABELLED: list[str] = []  # the database whose block of progress lines is being printed


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """A header line where the tests of another database begin.

    pytest runs the tests grouped by database, so the progress showed the same file names
    once per database with nothing saying which block was which.
    """
    callspec = getattr(item, "callspec", None)
    name = str(callspec.params.get("backend", "")) if callspec is not None else ""
    if _LABELLED[-1:] == [name]:
        return
    _LABELLED.append(name)
    reporter = item.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    if getattr(reporter, "_width_of_current_line", 0):
        # A line of progress is open: end it as pytest would, with its [ nn%] (private helpers,
        # hence optional); in -v mode pytest has written it already.
        finish = getattr(reporter, "_write_progress_information_filling_space", None)
        if reporter.verbosity <= 0 and getattr(reporter, "_show_progress_info", False) and finish:
            finish()
        reporter.write("\n")
    header = f"---------- database: {name or 'none'} ----------"
    # Where pytest shows file names it starts their line with a newline; in -q mode nothing does.
    reporter.write(header if reporter.showfspath else header + "\n")
    reporter.currentfspath = None  # the next file's name is written again, under the header


def pytest_terminal_summary(terminalreporter: Any) -> None:
    line = "=" * 20
    terminalreporter.write_line(
        f"{line} DATABASES TESTED: {', '.join(BACKENDS)} {line}", bold=True, yellow=len(BACKENDS) < 3
    )
    missing = {"sqlite", "postgresql", "mysql"} - set(BACKENDS)
    if missing:
        terminalreporter.write_line(f"NOT TESTED ON: {', '.join(sorted(missing))}", red=True, bold=True)


@dataclass
class Backend:
    name: str
    url: str


@pytest.fixture(scope="session")
async def backend(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Backend]:
    kind: str = request.param
    if kind == "sqlite":
        path = tmp_path_factory.mktemp("sqlite") / "mallgate.db"
        url = f"sqlite+aiosqlite:///{path}"
        await asyncio.to_thread(upgrade, url)
        yield Backend(kind, url)
        return
    name = f"mallgate_t_{os.getpid()}_{secrets.token_hex(3)}"
    url = await create_database(BACKENDS[kind], name)
    try:
        await asyncio.to_thread(upgrade, url)  # every run migrates from empty
        yield Backend(kind, url)
    finally:
        await drop_database(BACKENDS[kind], name)


class TestClock(Clock):
    """The wall clock plus an offset tests can move forward."""

    __test__ = False

    def __init__(self) -> None:
        self.offset = 0.0
        super().__init__(now=lambda: time.time() + self.offset)

    def advance(self, seconds: float) -> None:
        self.offset += seconds


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Server:
    url: str
    api: str
    backend: Backend
    settings: Settings
    clock: TestClock
    app: Any


def make_settings(backend: Backend, var_dir: Path, port: int, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": backend.url,
        "var_dir": var_dir,
        "public_url": f"http://127.0.0.1:{port}",
        "admin_token": ADMIN_TOKEN,
        "sandbox": True,
        **overrides,
    }
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture(scope="session")
def sandbox_var(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # One sandbox key set for the whole run: RSA key generation is the slow part.
    return tmp_path_factory.mktemp("var")


async def start_server(
    settings: Settings, clock: TestClock, port: int
) -> tuple[Any, uvicorn.Server, asyncio.Task[None]]:
    app = create_app(settings, clock=clock)
    # As `mallgate serve` runs it: mallgate.forwarded, not uvicorn, reads X-Forwarded-For.
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", proxy_headers=False
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    for _ in range(200):
        if server.started:
            break
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    return app, server, task


@asynccontextmanager
async def other_server(
    server: Server, clock: TestClock | None = None, **overrides: Any
) -> AsyncIterator[httpx.AsyncClient]:
    """A second server on the same database, with other settings (and its own clock)."""
    port = free_port()
    settings = make_settings(server.backend, server.settings.var_dir, port, **overrides)
    _app, uv, task = await start_server(settings, clock or TestClock(), port)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            yield http
    finally:
        uv.should_exit = True
        await task


@pytest.fixture(scope="session")
async def server(backend: Backend, sandbox_var: Path) -> AsyncIterator[Server]:
    port = free_port()
    clock = TestClock()
    settings = make_settings(backend, sandbox_var, port)
    app, uv, task = await start_server(settings, clock, port)
    url = f"http://127.0.0.1:{port}"
    yield Server(
        url=url, api=url + settings.base_path, backend=backend, settings=settings, clock=clock, app=app
    )
    uv.should_exit = True
    await task


@pytest.fixture(scope="session")
async def client(server: Server) -> AsyncIterator[httpx.AsyncClient]:
    # Idle connections are dropped before uvicorn's 5 s keep-alive ends, so no request races a close.
    limits = httpx.Limits(keepalive_expiry=2)
    async with httpx.AsyncClient(base_url=server.url, timeout=30, limits=limits) as http:
        yield http


@pytest.fixture(scope="session")
def admin_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture(autouse=True)
def _reset_clock(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "server" in request.fixturenames:
        request.getfixturevalue("server").clock.offset = 0.0
