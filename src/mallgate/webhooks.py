"""For the mall's backend: checking that an event really came from mallgate.

Each event is POSTed with ``Mallgate-Signature: t=<unix seconds>,v1=<hex>``, where
``v1`` is HMAC-SHA256, keyed by ``MALLGATE_WEBHOOK__SECRET``, of ``"<t>." + body``
(the raw bytes as received), and ``Mallgate-Event-Id``: the same id may arrive
more than once (delivery is at least once), so the receiver deduplicates on it.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Final

SIGNATURE_HEADER: Final = "Mallgate-Signature"
EVENT_ID_HEADER: Final = "Mallgate-Event-Id"
DEFAULT_TOLERANCE: Final = 300


class WebhookRejected(ValueError):
    """The signature header is missing, malformed, stale or does not match."""


def signature(body: bytes, secret: str, timestamp: int) -> str:
    """The header value for `body` sent at `timestamp`."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify_webhook(
    body: bytes,
    header: str | None,
    secret: str,
    tolerance: float = DEFAULT_TOLERANCE,
    *,
    now: float | None = None,
) -> int:
    """Checks a delivery; returns its timestamp, or raises WebhookRejected.

    `tolerance` is how old (or how far ahead) the timestamp may be, in seconds, so that a
    recorded delivery cannot be replayed later.
    """
    if not header:
        raise WebhookRejected("no signature")
    parts: dict[str, list[str]] = {}
    for item in header.split(","):
        key, sep, value = item.strip().partition("=")
        if sep:
            parts.setdefault(key, []).append(value)
    stamps = parts.get("t", [])
    if len(stamps) != 1 or not stamps[0].isdigit():
        raise WebhookRejected("no timestamp")
    timestamp = int(stamps[0])
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        raise WebhookRejected("timestamp outside the tolerance")
    expected = signature(body, secret, timestamp).partition(",v1=")[2]
    # Any v1 may match (a secret being rotated signs with both); compared in constant time.
    if not any(hmac.compare_digest(expected, given) for given in parts.get("v1", [])):
        raise WebhookRejected("signature does not match")
    return timestamp
