"""spread/qrcode and spread/scene: Mini Program codes whose opaque scene names goods, page and sharer."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from test_qrcode import decode
from test_sandbox_payments import sandbox_state

from conftest import Server, other_server
from mallgate.channels.wechat_wxa import SCENE_SHAPE
from mallgate.db.models import SceneCode
from mallgate.runtime import Runtime
from mallgate.sandbox.wechat_wxa_standin import RESOURCE_KEY, WxaStandIn
from mallgate.services.spread import media_dir, resolve_scene
from support import ADMIN, admin_create_user, unique, unique_mobile

PASSWORD = "Spread-pass-2026"
GOODS_PAGE = "pages/goods/detail"


def wxa(server: Server) -> WxaStandIn:
    found = sandbox_state(server).resources[RESOURCE_KEY]
    assert isinstance(found, WxaStandIn)
    return found


def runtime_of(server: Server) -> Runtime:
    runtime: Runtime = server.app.state.runtime
    return runtime


async def make_goods(client: httpx.AsyncClient) -> int:
    answer = (
        await client.post("/admin/goods", json={"name": unique("G"), "price": "9.90"}, headers=ADMIN)
    ).json()
    assert answer["status"] == 1, answer
    return int(answer["data"]["id"])


async def login(client: httpx.AsyncClient) -> tuple[str, int]:
    mobile = unique_mobile()
    user = await admin_create_user(client, mobile=mobile, password=PASSWORD)
    answer = (await client.post("/api/public/login", json={"username": mobile, "password": PASSWORD})).json()
    assert answer["status"] == 1, answer
    return str(answer["data"]["token"]), int(user["id"])


async def qrcode(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    answer: dict[str, Any] = (await client.post("/api/spread/qrcode", json=body)).json()
    return answer


def code_count(server: Server) -> int:
    return len(wxa(server).book.codes(10_000))


async def scene_of(server: Server, url: str) -> SceneCode:
    code = Path(urlsplit(url).path).stem
    async with runtime_of(server).db.read() as session:
        row = await session.get(SceneCode, code)
    assert row is not None
    return row


async def test_a_code_decodes_to_the_page_and_an_opaque_scene(
    server: Server, client: httpx.AsyncClient
) -> None:
    token, user_id = await login(client)
    goods_id = await make_goods(client)
    answer = await qrcode(client, id=goods_id, type=GOODS_PAGE, token=token)
    assert answer["status"] == 1 and answer["info"] == "ok", answer
    url = answer["data"]
    assert url.startswith(server.settings.public_url + "/media/spread/") and url.endswith(".png")
    image = await client.get(urlsplit(url).path)
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    page, _, scene = decode(image.content).partition("?scene=")
    assert page == GOODS_PAGE
    # Opaque: neither id appears in it, it fits WeChat's 32 characters and charset.
    assert SCENE_SHAPE.fullmatch(scene) and len(scene) <= 32
    assert str(goods_id) not in scene or len(scene) == 16
    row = await scene_of(server, url)
    assert (row.code, row.page, row.goods_id, row.sharer_id) == (scene, GOODS_PAGE, goods_id, user_id)
    # Public images: 0644 (everything else under var/ is 0600).
    stored = media_dir(server.settings) / row.media_path
    assert stat.S_IMODE(os.stat(stored).st_mode) == 0o644


async def test_the_second_call_is_served_from_the_cache(server: Server, client: httpx.AsyncClient) -> None:
    token, _ = await login(client)
    goods_id = await make_goods(client)
    first = await qrcode(client, id=goods_id, token=token)  # `type` defaults to the goods page
    before = code_count(server)
    second = await qrcode(client, id=goods_id, type=GOODS_PAGE, token=token)
    assert first["status"] == second["status"] == 1 and first["data"] == second["data"]
    assert code_count(server) == before  # no upstream call
    # Another sharer of the same goods gets a code of their own.
    other_token, _ = await login(client)
    third = await qrcode(client, id=goods_id, token=other_token)
    assert third["status"] == 1 and third["data"] != first["data"] and code_count(server) == before + 1


async def test_spread_scene_resolves_to_the_right_sharer(server: Server, client: httpx.AsyncClient) -> None:
    token, user_id = await login(client)
    goods_id = await make_goods(client)
    url = (await qrcode(client, id=goods_id, token=token))["data"]
    scene = (await scene_of(server, url)).code
    answer = (await client.get("/api/spread/scene", params={"scene": scene})).json()
    assert answer == {
        "info": "ok",
        "status": 1,
        "data": {"goods_id": str(goods_id), "sharer_id": str(user_id), "page": GOODS_PAGE},
    }
    async with runtime_of(server).db.read() as session:
        assert await resolve_scene(session, scene) == user_id


@pytest.mark.parametrize("forged", ["edit", "ids", "too_long", "bad_chars"])
async def test_a_forged_scene_is_refused(server: Server, client: httpx.AsyncClient, forged: str) -> None:
    token, user_id = await login(client)
    goods_id = await make_goods(client)
    scene = (await scene_of(server, (await qrcode(client, id=goods_id, token=token))["data"])).code
    tampered = {
        "edit": scene[:-1] + ("A" if scene[-1] != "A" else "B"),
        "ids": f"g={goods_id}&u={user_id}",
        "too_long": scene * 3,
        "bad_chars": scene[:10] + "%20",
    }[forged]
    answer = (await client.get("/api/spread/scene", params={"scene": tampered})).json()
    assert answer["status"] == 0 and answer["code"] in ("spread.scene_unknown", "param.too_long"), answer
    async with runtime_of(server).db.read() as session:
        assert await resolve_scene(session, tampered) is None


async def test_refusals(server: Server, client: httpx.AsyncClient) -> None:
    token, _ = await login(client)
    goods_id = await make_goods(client)
    before = code_count(server)
    no_token = await qrcode(client, id=goods_id)
    assert no_token["status"] == 0 and no_token["code"] == "auth.required"
    for bad_id in ("abc", "1.5", "", -3):
        answer = await qrcode(client, id=bad_id, token=token)
        assert answer["status"] == 0 and answer["code"] in ("param.invalid", "param.missing"), answer
    unknown = await qrcode(client, id=goods_id + 10_000, token=token)
    assert unknown["status"] == 0 and unknown["code"] == "goods.not_found" and unknown["info"] == "商品不存在"
    page = await qrcode(client, id=goods_id, type="pages/admin/secret", token=token)
    assert page["status"] == 0 and page["code"] == "spread.page_not_allowed" and GOODS_PAGE in page["info"]
    assert code_count(server) == before
    async with runtime_of(server).db.read() as session:
        from sqlalchemy import select

        rows = (await session.execute(select(SceneCode).where(SceneCode.goods_id == goods_id))).all()
    assert rows == []  # nothing stored for refused requests


async def test_a_wechat_error_answers_its_message_and_is_not_cached(
    server: Server, client: httpx.AsyncClient
) -> None:
    token, _ = await login(client)
    goods_id = await make_goods(client)
    wxa(server).book.queue_fault({"errcode": 41030, "errmsg": "invalid page rid: 1-2-3"})
    failed = await qrcode(client, id=goods_id, token=token)
    assert failed["status"] == 0 and failed["code"] == "wechat.api_error" and failed["errcode"] == 41030
    assert "41030 invalid page" in failed["info"] and "rid" not in failed["info"]
    wxa(server).book.queue_fault({"errcode": 40129, "errmsg": "invalid scene hint: [s4myva0106wxa3]"})
    hinted = await qrcode(client, id=goods_id, token=token)
    assert hinted["info"].endswith("40129 invalid scene"), hinted
    # The next request asks WeChat again (an error is never the cached image).
    again = await qrcode(client, id=goods_id, token=token)
    assert again["status"] == 1, again


async def test_pages_come_from_the_allow_list_setting(server: Server, client: httpx.AsyncClient) -> None:
    token, _ = await login(client)
    goods_id = await make_goods(client)
    pages = "pages/shop/item,pages/goods/detail"
    async with other_server(server, spread={"pages": pages}) as other:
        answer = (
            await other.post(
                "/api/spread/qrcode", json={"id": goods_id, "type": "pages/shop/item", "token": token}
            )
        ).json()
        assert answer["status"] == 1, answer
        image = await other.get(urlsplit(answer["data"]).path)
    assert decode(image.content).startswith("pages/shop/item?scene=")


async def test_concurrent_first_calls_ask_wechat_once(server: Server, client: httpx.AsyncClient) -> None:
    import asyncio

    token, _ = await login(client)
    goods_id = await make_goods(client)
    before = code_count(server)
    answers = await asyncio.gather(*(qrcode(client, id=goods_id, token=token) for _ in range(6)))
    assert {a["status"] for a in answers} == {1} and len({a["data"] for a in answers}) == 1
    assert code_count(server) == before + 1
