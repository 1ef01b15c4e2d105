"""Mainland mobile numbers: 1[3-9] and nine digits, an optional +86/0086/86 in front."""

from __future__ import annotations

import re

from mallgate.envelope import ApiError

_MOBILE = re.compile(r"(?:\+86|0086|86)?(1[3-9]\d{9})")


def normalize_mobile(value: str) -> str:
    """The bare 11 digits, which is how numbers are stored and rate-limited."""
    match = _MOBILE.fullmatch(re.sub(r"[\s-]", "", value or ""))
    if match is None:
        raise ApiError("请输入正确的手机号", "mobile.invalid", field="username")
    return match.group(1)


def mask_mobile(mobile: str) -> str:
    return f"{mobile[:3]}****{mobile[-4:]}" if len(mobile) >= 7 else "****"
