"""Time and randomness, injected so that tests can pin them."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone

BEIJING = timezone(timedelta(hours=8), "Asia/Shanghai")


@dataclass
class Clock:
    """Wall clock plus nonce source; replace `now` / `nonce` in tests."""

    now: Callable[[], float] = time.time
    nonce: Callable[[int], str] = field(default=lambda n: secrets.token_hex(n))

    def utcnow(self) -> datetime:
        return datetime.fromtimestamp(self.now(), UTC)

    def beijing(self) -> datetime:
        return datetime.fromtimestamp(self.now(), BEIJING)


default_clock = Clock()
