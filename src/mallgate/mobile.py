"""Mainland mobile numbers: 1[3-9] and nine digits, an optional +86/0086/86 in front.

The loose rule on purpose: exact segment lists go stale as carriers open new
ones; the SMS provider has the last word on a number that passes here.
"""

from __future__ import annotations

import re

from mallgate.envelope import ApiError

_MOBILE = re.compile(r"(?:\+86|0086|86)?(1[3-9][0-9]{9})")
_SEPARATORS = re.compile(r"[\s-]")


def parse_mobile(value: str) -> str | None:
    """The bare 11 digits (how numbers are stored and rate-limited), or None."""
    match = _MOBILE.fullmatch(_SEPARATORS.sub("", value or ""))
    return match.group(1) if match else None


def normalize_mobile(value: str, field: str = "username") -> str:
    """The bare 11 digits, or the client's error naming the parameter."""
    mobile = parse_mobile(value)
    if mobile is None:
        raise ApiError("请输入正确的手机号", "mobile.invalid", field=field)
    return mobile


def mask_mobile(mobile: str) -> str:
    """138****0000: enough to tell numbers apart in a log, not enough to reuse."""
    if len(mobile) < 7:
        return "*" * len(mobile)
    return f"{mobile[:3]}****{mobile[-4:]}"
