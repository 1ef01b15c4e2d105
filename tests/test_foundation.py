"""The envelope, parameters, limits, health, metrics and tokens (CONTRACT §1, §4)."""

from __future__ import annotations

import asyncio
import hashlib

import httpx
from sqlalchemy import inspect, select, text

from mallgate.db.models import Token
from mallgate.db.session import Database
from mallgate.services import tokens
from support import ADMIN, admin_create_order, admin_create_user, unique


async def test_healthz_reports_the_database(client: httpx.AsyncClient, server) -> None:
    response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.json()["data"]["database"] == {"mysql": "mysql"}.get(
        server.backend.name, server.backend.name
    )


async def test_metrics_count_requests_by_route(client: httpx.AsyncClient) -> None:
    await client.get("/floor")
    body = (await client.get("/metrics")).text
    assert 'mallgate_requests_total{method="GET",route="/floor",status="200"}' in body
    assert "mallgate_request_seconds_bucket" in body


async def test_missing_token_is_401_in_the_envelope(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/user/info")
    assert response.status_code == 401
    assert response.json()["status"] == 0
    assert response.json()["info"]


async def test_invalid_token_is_401(client: httpx.AsyncClient) -> None:
    for token in ("0" * 40, "not-a-token", "A" * 40):
        response = await client.get("/api/user/info", headers={"Auth-Token": token})
        assert response.status_code == 401, token
        assert response.json() == {
            "info": "登录已失效，请重新登录",
            "status": 0,
            "code": "auth.invalid_token",
        }


async def test_token_by_header_or_parameter_and_stored_hashed(client: httpx.AsyncClient, server) -> None:
    user = await admin_create_user(client, nickname="tok")
    db = Database(server.settings.resolved_database_url)
    try:
        async with db.transaction() as session:
            token = await tokens.issue(
                session,
                int(user["id"]),
                server.clock.utcnow().replace(tzinfo=None),
                __import__("datetime").timedelta(days=1),
            )
        assert len(token) == 40 and all(c in "0123456789abcdef" for c in token)
        by_header = await client.get("/api/user/info", headers={"Auth-Token": token})
        by_param = await client.post("/api/user/info", data={"token": token})
        by_json = await client.post("/api/user/info", json={"token": token})
        for response in (by_header, by_param, by_json):
            assert response.status_code == 200
            assert response.json()["data"]["id"] == user["id"]
        async with db.transaction() as session:
            stored = (await session.scalars(select(Token.token_hash))).all()
            assert hashlib.sha256(token.encode()).hexdigest() in stored
            # The clear token appears in no column of any table.
            tables = await session.run_sync(lambda s: inspect(s.connection()).get_table_names())
            for table in tables:
                rows = (await session.execute(text(f"SELECT * FROM {table}"))).all()
                assert not any(token in str(value) for row in rows for value in row), table
    finally:
        await db.dispose()


async def test_expired_token_is_refused(client: httpx.AsyncClient, server) -> None:
    from datetime import timedelta

    user = await admin_create_user(client)
    db = Database(server.settings.resolved_database_url)
    try:
        async with db.transaction() as session:
            token = await tokens.issue(
                session, int(user["id"]), server.clock.utcnow().replace(tzinfo=None), timedelta(hours=1)
            )
    finally:
        await db.dispose()
    assert (await client.get("/api/user/info", headers={"Auth-Token": token})).status_code == 200
    server.clock.advance(3601)
    assert (await client.get("/api/user/info", headers={"Auth-Token": token})).status_code == 401


async def test_cors_and_options(client: httpx.AsyncClient) -> None:
    preflight = await client.options(
        "/api/send_sms",
        headers={
            "Origin": "https://h5.example.com",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "Auth-Token, Content-Type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "*"
    assert "auth-token" in preflight.headers["access-control-allow-headers"].lower()
    bare = await client.options("/api/anything")
    assert bare.status_code == 200
    simple = await client.get("/healthz", headers={"Origin": "https://h5.example.com"})
    assert simple.headers["access-control-allow-origin"] == "*"


async def test_malformed_json_is_refused_clearly(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/admin/orders", content=b'{"amount": "1.00",', headers={**ADMIN, "Content-Type": "application/json"}
    )
    assert response.json() == {"info": "请求体不是合法的 JSON", "status": 0, "code": "body.invalid_json"}


async def test_wrong_content_type_is_refused(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/admin/orders", content=b"<xml/>", headers={**ADMIN, "Content-Type": "application/xml"}
    )
    assert response.status_code == 415
    assert response.json()["status"] == 0 and response.json()["code"] == "body.unsupported_type"


async def test_oversized_body_is_refused(client: httpx.AsyncClient) -> None:
    big = b"a=" + b"x" * (1024 * 1024 + 1)
    response = await client.post(
        "/admin/goods", content=big, headers={**ADMIN, "Content-Type": "application/x-www-form-urlencoded"}
    )
    assert response.status_code == 413
    assert response.json()["code"] == "body_too_large"


async def test_oversized_streamed_body_is_refused(client: httpx.AsyncClient) -> None:
    async def chunks():
        for _ in range(20):
            yield b"x" * 65536

    response = await client.post(
        "/admin/goods", content=chunks(), headers={**ADMIN, "Content-Type": "application/json"}
    )
    assert response.status_code == 413


async def test_notify_routes_have_a_64k_limit(client: httpx.AsyncClient) -> None:
    body = b"a=" + b"x" * (64 * 1024)
    for path in ("/api/pay/notify", "/api/wechat/notify"):
        response = await client.post(
            path, content=body, headers={"Content-Type": "application/x-www-form-urlencoded"}
        )
        assert response.status_code == 413, path


async def test_amounts_with_more_than_two_places_change_nothing(client: httpx.AsyncClient) -> None:
    order_no = unique("T")
    for amount in ("1.001", "abc", "-1.00", "0", 1.5, "1e3", ""):
        response = await client.post(
            "/admin/orders", json={"order_no": order_no, "amount": amount}, headers=ADMIN
        )
        payload = response.json()
        assert payload["status"] == 0, amount
        assert "amount" in payload["info"]
    missing = await client.get(f"/admin/orders/{order_no}", headers=ADMIN)
    assert missing.json()["status"] == 0


async def test_non_numeric_ids_are_refused(client: httpx.AsyncClient) -> None:
    response = await client.get("/admin/users/abc", headers=ADMIN)
    assert response.json()["status"] == 0 and response.json()["code"] == "param.invalid"
    response = await client.post("/admin/orders", json={"amount": "1.00", "user_id": "12x"}, headers=ADMIN)
    assert response.json()["status"] == 0 and "user_id" in response.json()["info"]


async def test_concurrent_orders_get_distinct_numbers(client: httpx.AsyncClient) -> None:
    created = await asyncio.gather(
        *(client.post("/admin/orders", json={"amount": "1.00"}, headers=ADMIN) for _ in range(10))
    )
    numbers = {r.json()["data"]["order_no"] for r in created}
    assert len(numbers) == 10


async def test_order_read_back_matches(client: httpx.AsyncClient) -> None:
    order = await admin_create_order(client, amount="12.50", subject="测试商品")
    assert order["status"] == "unpaid" and order["amount"] == "12.50"
    assert order["paid_amount"] == "0.00" and order["channel"] is None and order["trade_no"] is None


async def test_notify_metrics_are_labelled_by_route(client: httpx.AsyncClient) -> None:
    await client.post(
        "/api/pay/notify", content=b"a=1", headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    body = (await client.get("/metrics")).text
    assert 'mallgate_requests_total{method="POST",route="/api/pay/notify",status="200"}' in body
