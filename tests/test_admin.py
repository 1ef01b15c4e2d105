"""The admin API of CONTRACT §4 and its guard."""

from __future__ import annotations

import httpx

from conftest import Server, other_server
from support import (
    ADMIN,
    admin_create_order,
    admin_create_user,
    admin_get_order,
    admin_get_user,
    unique,
    unique_mobile,
)


async def test_create_goods_and_read_orders_back(client: httpx.AsyncClient) -> None:
    response = await client.post("/admin/goods", json={"name": "苹果", "price": "5.50"}, headers=ADMIN)
    payload = response.json()
    assert payload["status"] == 1 and int(payload["data"]["id"]) > 0
    order = await admin_create_order(client, amount="5.50", kind="goods", subject="苹果")
    again = await admin_get_order(client, order["order_no"])
    assert again == order
    assert set(again) >= {
        "order_no",
        "kind",
        "status",
        "amount",
        "paid_amount",
        "refunded_amount",
        "channel",
        "trade_no",
        "paid_at",
    }


async def test_order_number_is_generated_and_unique(client: httpx.AsyncClient) -> None:
    generated = (await client.post("/admin/orders", json={"amount": "1.00"}, headers=ADMIN)).json()["data"]
    assert generated["order_no"]
    duplicate = await client.post(
        "/admin/orders", json={"amount": "1.00", "order_no": generated["order_no"]}, headers=ADMIN
    )
    assert duplicate.json()["status"] == 0 and duplicate.json()["code"] == "order.duplicate"


async def test_recharge_orders_need_an_existing_user(client: httpx.AsyncClient) -> None:
    no_user = await client.post("/admin/orders", json={"amount": "10.00", "kind": "recharge"}, headers=ADMIN)
    assert no_user.json()["status"] == 0
    ghost = await client.post(
        "/admin/orders", json={"amount": "10.00", "kind": "recharge", "user_id": 99999999}, headers=ADMIN
    )
    assert ghost.json()["code"] == "user.not_found"
    bad_kind = await client.post("/admin/orders", json={"amount": "10.00", "kind": "gift"}, headers=ADMIN)
    assert bad_kind.json()["code"] == "order.invalid_kind"


async def test_users_read_back_with_profile_strings(client: httpx.AsyncClient) -> None:
    mobile = unique_mobile()
    user = await admin_create_user(client, mobile=mobile, nickname="小明", password="secret123")
    assert user["mobile"] == mobile and user["nickname"] == "小明" and user["amount"] == "0.00"
    assert all(isinstance(v, str) for v in user.values())
    full = await admin_get_user(client, user["id"])
    assert full["spread_id"] == "" and full["identities"] == []
    assert full["id"] == user["id"]
    twice = await client.post("/admin/users", json={"mobile": mobile}, headers=ADMIN)
    assert twice.json()["code"] == "user.exists"
    bad = await client.post("/admin/users", json={"mobile": "12345"}, headers=ADMIN)
    assert bad.json()["code"] == "mobile.invalid"


async def test_unknown_ids_answer_not_found(client: httpx.AsyncClient) -> None:
    assert (await client.get("/admin/users/987654321", headers=ADMIN)).json()["code"] == "user.not_found"
    assert (await client.get(f"/admin/orders/{unique()}", headers=ADMIN)).json()["code"] == "order.not_found"


async def test_notifications_list_is_empty_for_a_new_order(client: httpx.AsyncClient) -> None:
    order = await admin_create_order(client)
    payload = (
        await client.get("/admin/notifications", params={"order_no": order["order_no"]}, headers=ADMIN)
    ).json()
    assert payload == {"info": "ok", "status": 1, "data": []}


async def test_wrong_or_missing_admin_token_is_refused(client: httpx.AsyncClient) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}):
        response = await client.post("/admin/goods", json={"name": "x", "price": "1.00"}, headers=headers)
        assert response.status_code == 401
        assert response.json()["status"] == 0


async def test_admin_api_is_absent_without_a_token(server: Server) -> None:
    async with other_server(server, admin_token="") as http:
        for headers in ({}, {"Authorization": "Bearer x"}, ADMIN):
            response = await http.post("/admin/goods", json={"name": "x", "price": "1.00"}, headers=headers)
            assert response.status_code == 404
        assert (await http.get("/healthz")).status_code == 200
