"""Small helpers the tests share (fixtures live in conftest.py)."""

from __future__ import annotations

import secrets
from decimal import Decimal
from typing import Any

import httpx

ADMIN_TOKEN = "test-admin-token-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def unique(prefix: str = "T") -> str:
    return f"{prefix}{secrets.token_hex(6)}"


def unique_mobile() -> str:
    return "13" + f"{secrets.randbelow(10**9):09d}"


async def admin_create_order(
    client: httpx.AsyncClient, amount: str = "9.90", kind: str = "goods", **extra: Any
) -> dict[str, Any]:
    body = {"order_no": unique("T"), "amount": amount, "kind": kind, **extra}
    response = await client.post("/admin/orders", json=body, headers=ADMIN)
    payload = response.json()
    assert payload["status"] == 1, payload
    data: dict[str, Any] = payload["data"]
    return data


async def admin_create_user(client: httpx.AsyncClient, **fields: Any) -> dict[str, Any]:
    response = await client.post("/admin/users", json=fields, headers=ADMIN)
    payload = response.json()
    assert payload["status"] == 1, payload
    data: dict[str, Any] = payload["data"]
    return data


async def admin_get_order(client: httpx.AsyncClient, order_no: str) -> dict[str, Any]:
    payload = (await client.get(f"/admin/orders/{order_no}", headers=ADMIN)).json()
    assert payload["status"] == 1, payload
    data: dict[str, Any] = payload["data"]
    return data


async def admin_get_user(client: httpx.AsyncClient, user_id: str) -> dict[str, Any]:
    payload = (await client.get(f"/admin/users/{user_id}", headers=ADMIN)).json()
    assert payload["status"] == 1, payload
    data: dict[str, Any] = payload["data"]
    return data


def money(value: str) -> Decimal:
    return Decimal(value)


# The keys of the user profile every login answers (the mall's document).
PROFILE_KEYS = {
    "id",
    "token",
    "username",
    "nickname",
    "group_name",
    "shop_count",
    "coupon_count",
    "mobile",
    "sex",
    "point",
    "amount",
    "last_ip",
    "last_login",
}
