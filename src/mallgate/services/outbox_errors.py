"""What a sender raises, so the outbox worker knows whether to try again."""

from __future__ import annotations


class DeliveryError(Exception):
    """A delivery did not happen; the message is recorded (keep secrets out of it)."""


class TransientError(DeliveryError):
    """Try again later, with backoff (network, 5xx, a busy token, a rate limit)."""


class FinalError(DeliveryError):
    """Never going to work (refused consent, no such user): recorded as failed, not retried."""
