"""What every platform client shares: an HTTP client that verifies TLS and has a timeout.

A client given one (the service's shared `runtime.http`) leaves it open; a client
that made its own closes it.
"""

from __future__ import annotations

from typing import Self

import httpx


class PlatformClient:
    def __init__(self, http: httpx.AsyncClient | None, timeout: float) -> None:
        self._owns_http = http is None
        self._http = http or httpx.AsyncClient(verify=True, timeout=timeout)

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
