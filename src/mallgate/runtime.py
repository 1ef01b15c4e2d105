"""What every request shares: settings, the database, one HTTP client, the clock."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import Request

from mallgate.clock import Clock, default_clock
from mallgate.db.session import Database
from mallgate.secret_key import resolve as resolve_secret_key
from mallgate.settings import Settings

# Outbound calls to the platforms: TLS verified, never waiting forever.
OUTBOUND_TIMEOUT = httpx.Timeout(10.0, connect=5.0)

# httpcore tries `import sniffio` for every lock it makes, several per request. sniffio is not
# installed (anyio 4.16 dropped it), and a failed import searches all of sys.path each time:
# about a quarter of a webhook delivery's CPU. Marked absent once, the import fails at once,
# with the same outcome (asyncio).
if importlib.util.find_spec("sniffio") is None:
    sys.modules["sniffio"] = None  # type: ignore[assignment]


@dataclass
class Runtime:
    settings: Settings
    db: Database
    http: httpx.AsyncClient
    # Keys the SMS code hashes (mallgate.secret_key); no default, so it is never silently empty.
    secret_key: bytes
    clock: Clock = field(default_factory=lambda: default_clock)
    sandbox_url: str | None = None
    # Per-process helpers that services create lazily (e.g. the notification group commit).
    services: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def create(cls, settings: Settings, clock: Clock | None = None) -> Runtime:
        secret_key = resolve_secret_key(settings)  # first: a bad key file stops start-up here
        return cls(
            settings=settings,
            secret_key=secret_key,
            db=Database(settings.resolved_database_url, connect_timeout=settings.db_timeout_seconds),
            http=httpx.AsyncClient(timeout=OUTBOUND_TIMEOUT, verify=True),
            clock=clock or default_clock,
        )

    async def close(self) -> None:
        await self.http.aclose()
        await self.db.dispose()


async def get_runtime(request: Request) -> Runtime:
    # async on purpose: FastAPI runs a plain-def dependency on a worker thread, which on
    # the notify path cost a tenth of the server's time for a dictionary lookup.
    runtime: Runtime = request.app.state.runtime
    return runtime
