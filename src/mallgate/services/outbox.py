"""The outbox: events written in the same transaction as the state change that causes them.

A worker sends them later, with retries; a notify handler never calls out inline.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, insert

from mallgate.db.models import OutboxEvent, table_of

_INSERT = insert(table_of(OutboxEvent))


def add_event(conn: Connection, topic: str, payload: dict[str, Any], now: datetime) -> None:
    conn.execute(
        _INSERT,
        {
            "topic": topic,
            "payload": json.dumps(payload, ensure_ascii=False, sort_keys=True),
            "created_at": now,
            "available_at": now,
            "attempts": 0,
            "last_error": "",
        },
    )
