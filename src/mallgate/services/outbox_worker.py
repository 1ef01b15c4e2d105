"""The outbox worker: sends each outbox event through every sender that wants it.

A sender is one way out (the mall's webhook, a WeChat subscribe message). Each
(event, sender) pair is a delivery with its own attempts and backoff, recorded in
``outbox_deliveries``, so one event's webhook and subscribe message are retried
independently. Delivery is at least once: a crash between send and record sends
again, so every delivery carries the event id for the receiver to deduplicate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from mallgate.services.outbox_errors import DeliveryError, FinalError, TransientError

if TYPE_CHECKING:
    from mallgate.runtime import Runtime

__all__ = [
    "DeliveryError",
    "Event",
    "FinalError",
    "Sender",
    "TransientError",
    "register_sender",
    "registered_senders",
    "unregister_sender",
]


@dataclass(frozen=True)
class Event:
    """One outbox row as a sender sees it."""

    id: int
    topic: str
    payload: dict[str, Any]
    created_at: datetime

    @classmethod
    def from_row(cls, id: int, topic: str, payload: str, created_at: datetime) -> Event:
        return cls(id=id, topic=topic, payload=json.loads(payload), created_at=created_at)


@runtime_checkable
class Sender(Protocol):
    """One way out. `name` is stored with each delivery: keep it short and stable."""

    name: str

    def wants(self, event: Event) -> bool:
        """Whether this event is for this sender (usually by `event.topic`); no I/O."""
        ...

    async def send(self, runtime: Runtime, event: Event) -> None:
        """Deliver once; raise TransientError (retried with backoff) or FinalError (given up)."""
        ...


# Senders are plugged in at import time by the modules that provide them; the worker reads
# this registry at each pass, so a sender registered later is used from the next pass on.
_SENDERS: dict[str, Sender] = {}


def register_sender(sender: Sender) -> None:
    """Adds (or replaces, by name) a sender."""
    _SENDERS[sender.name] = sender


def unregister_sender(name: str) -> None:
    _SENDERS.pop(name, None)


def registered_senders() -> list[Sender]:
    return list(_SENDERS.values())
