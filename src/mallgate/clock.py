"""Time and randomness, injected so that tests can pin them."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

# The platforms' own protocol times (Alipay timestamps, WeChat Pay create_time) are Beijing time,
# whatever MALLGATE_TIME_ZONE says; China has kept +08:00 without summer time since 1991.
BEIJING = timezone(timedelta(hours=8), "Asia/Shanghai")
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


def zone_named(name: str) -> tzinfo:
    """The IANA time zone `name` (Asia/Shanghai, UTC, Europe/Berlin); ValueError says what is wrong.

    A machine without a time-zone database (no /usr/share/zoneinfo, no `tzdata` package) still
    knows the default, Asia/Shanghai, and UTC.
    """
    if name == "UTC":
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        if name == BEIJING.tzname(None):
            return BEIJING
        hint = (
            "" if available_timezones() else " (this machine has no time-zone database: pip install tzdata)"
        )
        raise ValueError(
            f"unknown time zone {name!r}: use an IANA name such as Asia/Shanghai or UTC{hint}"
        ) from None


def show_time(value: datetime, zone: tzinfo) -> str:
    """A time as the API shows it: in `zone`, `YYYY-MM-DD HH:MM:SS` (CONTRACT's format, no marker).

    Stored times are naive UTC; an aware value is converted from its own zone.
    """
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(zone).strftime(TIME_FORMAT)


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
