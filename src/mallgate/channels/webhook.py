"""The webhook sender: every outbox event POSTed, signed, to the mall's own backend."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Final

import httpx

from mallgate.services.outbox_errors import TransientError
from mallgate.webhooks import EVENT_ID_HEADER, SIGNATURE_HEADER, signature

if TYPE_CHECKING:
    from mallgate.runtime import Runtime
    from mallgate.services.outbox_worker import Event

NAME: Final = "webhook"


def body_of(event: Event) -> bytes:
    """The JSON the mall's backend receives (docs/API.md, "Events to the mall's backend")."""
    document = {
        "id": event.id,
        "topic": event.topic,
        "created_at": event.created_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "data": event.payload,
    }
    return json.dumps(document, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()


class WebhookSender:
    """Wants every event; a 2xx ends it, anything else (or no answer) is retried for a day."""

    name = NAME

    def __init__(self, url: str, secret: str, timeout: float) -> None:
        self.url = url
        self.secret = secret
        self.timeout = timeout

    def wants(self, event: Event) -> bool:
        return True

    async def send(self, runtime: Runtime, event: Event) -> None:
        body = body_of(event)
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            EVENT_ID_HEADER: str(event.id),
            SIGNATURE_HEADER: signature(body, self.secret, int(runtime.clock.now())),
            "User-Agent": "mallgate-webhook",
        }
        try:
            answer = await runtime.http.post(self.url, content=body, headers=headers, timeout=self.timeout)
        except httpx.HTTPError as exc:
            # The exception's text, never the URL's query or the secret.
            raise TransientError(f"no answer: {type(exc).__name__}") from exc
        if not 200 <= answer.status_code < 300:
            # Even a 4xx: the mall's backend may be mid-deploy; "retried for a day, a 2xx ends it".
            raise TransientError(f"HTTP {answer.status_code}")
