"""Mini Program login (`auth`) through the real app and the sandbox's jscode2session / getuserphonenumber."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import time
from typing import Any

import httpx
import pytest
from test_oauth import BlackHole, database, logged_in, new_code
from test_spread import login as spread_login
from test_spread import make_goods, scene_of
from test_spread import qrcode as spread_qrcode

from conftest import Server, other_server
from mallgate.channels.wechat_mini import OpenDataRefused, decrypt_open_data, encrypt_open_data
from mallgate.db.models import Identity
from mallgate.sandbox.app import WECHAT_APP_APP_ID, WECHAT_MINI_APP_ID, WECHAT_MP_APP_ID
from mallgate.secret_key import open_session_key, resolve
from mallgate.services import accounts, mini_login
from support import PROFILE_KEYS, admin_create_user, admin_get_user, unique_mobile

SANDBOX = "/_sandbox/wechat"


def person() -> str:
    return "m" + secrets.token_hex(6)


async def mint(client: httpx.AsyncClient, **values: Any) -> dict[str, str]:
    answer = await client.post(f"{SANDBOX}/_test/mini/code", json={"name": person(), **values})
    assert answer.status_code == 200, answer.text
    found: dict[str, str] = answer.json()
    return found


async def phone_code(client: httpx.AsyncClient, phone: str, **values: str) -> str:
    answer = await client.post(f"{SANDBOX}/_test/mini/phone_code", json={"phone": phone, **values})
    code: str = answer.json()["code"]
    return code


async def auth(client: httpx.AsyncClient, **values: Any) -> dict[str, Any]:
    answer = await client.post("/api/auth", json=values)
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


async def auth_ok(client: httpx.AsyncClient, **values: Any) -> dict[str, str]:
    body = await auth(client, **values)
    assert body["status"] == 1, body
    assert set(body["data"]) == PROFILE_KEYS and body["data"]["token"]
    profile: dict[str, str] = body["data"]
    return profile


async def refused(client: httpx.AsyncClient, expected: str, /, **values: Any) -> dict[str, Any]:
    body = await auth(client, **values)
    assert body["status"] == 0 and body["code"] == expected, body
    assert body["info"]
    return body


async def fail_next(client: httpx.AsyncClient, endpoint: str, errcode: int = 0, delay: float = 0) -> None:
    answer = await client.post(
        f"{SANDBOX}/_test/mini/fail_next", json={"endpoint": endpoint, "errcode": errcode, "delay": delay}
    )
    assert answer.status_code == 200


async def identity_of(server: Server, openid: str) -> Identity:
    async with database(server) as db, db.read() as session:
        found = await session.scalar(select_identity(openid))
        assert isinstance(found, Identity)
        return found


def select_identity(openid: str) -> Any:
    from sqlalchemy import select

    return select(Identity).where(Identity.app_id == WECHAT_MINI_APP_ID, Identity.openid == openid)


# ------------------------------------------------------------------ new and returning users


async def test_a_new_user_logs_in_with_the_profile_and_a_token(
    client: httpx.AsyncClient, server: Server
) -> None:
    minted = await mint(client)
    user_info = {"nickName": "小程序用户", "avatarUrl": "https://thirdwx.qlogo.cn/a/132", "gender": 2}
    profile = await auth_ok(client, code=minted["code"], userInfo=user_info)
    assert profile["nickname"] == "小程序用户" and profile["sex"] == "2"
    [identity] = (await admin_get_user(client, profile["id"]))["identities"]
    assert identity == {
        "provider": "wechat",
        "app_id": WECHAT_MINI_APP_ID,
        "openid": minted["openid"],
        "unionid": minted["unionid"],
    }
    # The token works.
    me = await client.post("/api/user/info", data={"token": profile["token"]})
    assert me.json()["data"]["id"] == profile["id"], me.text


async def test_a_returning_user_is_the_same_user_with_a_new_session_key(
    client: httpx.AsyncClient, server: Server
) -> None:
    name = person()
    first = await mint(client, name=name)
    one = await auth_ok(client, code=first["code"])
    stored_first = (await identity_of(server, first["openid"])).session_key
    second = await mint(client, name=name)
    assert second["openid"] == first["openid"] and second["session_key"] != first["session_key"]
    two = await auth_ok(client, code=second["code"], userInfo=json.dumps({"nickName": "改名了"}))
    assert two["id"] == one["id"] and two["token"] != one["token"] and two["nickname"] == "改名了"
    identity = await identity_of(server, first["openid"])
    assert identity.session_key and identity.session_key != stored_first
    binding = mini_login.session_key_binding(identity.provider, identity.app_id, identity.openid)
    assert open_session_key(resolve(server.settings), identity.session_key, binding) == second["session_key"]
    # WeChat's anonymous placeholder (what getUserProfile answers today) keeps the stored name.
    three = await auth_ok(
        client, code=(await mint(client, name=name))["code"], userInfo={"nickName": "微信用户"}
    )
    assert three["id"] == one["id"] and three["nickname"] == "改名了"


async def test_a_returning_login_learns_a_unionid_once_and_writes_the_login(
    client: httpx.AsyncClient, server: Server
) -> None:
    name = person()
    minted = await mint(client, name=name, no_unionid="1")
    first = await auth_ok(client, code=minted["code"])
    openid = minted["openid"]
    assert (await identity_of(server, openid)).unionid is None
    unionid = "u_late_" + secrets.token_hex(6)
    second = await auth_ok(
        client, code=(await mint(client, name=name, unionid=unionid))["code"], userInfo={"gender": 1}
    )
    assert second["id"] == first["id"]
    assert (await identity_of(server, openid)).unionid == unionid
    # A unionid once stored is WeChat's word: another one later does not replace it.
    await auth_ok(
        client, code=(await mint(client, name=name, unionid="u_other_" + secrets.token_hex(6)))["code"]
    )
    assert (await identity_of(server, openid)).unionid == unionid
    # What the answer said was written: the stored user reads the same, and the new token works.
    stored = await admin_get_user(client, second["id"])
    assert stored["sex"] == "1" and stored["last_ip"] and stored["last_login"]
    me = await client.post("/api/user/info", data={"token": second["token"]})
    assert me.json()["data"]["id"] == second["id"] and me.json()["data"]["sex"] == "1", me.text


async def test_the_session_key_is_in_no_answer_no_log_and_not_stored_in_clear(
    client: httpx.AsyncClient, server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    minted = await mint(client)
    answer = await client.post("/api/auth", json={"code": minted["code"]})
    raw_key = minted["session_key"]
    assert raw_key not in answer.text and "session_key" not in answer.text
    identity = await identity_of(server, minted["openid"])
    assert identity.session_key and raw_key not in identity.session_key
    assert base64.b64decode(raw_key) not in base64.b64decode(identity.session_key)
    assert raw_key not in caplog.text
    # Bound to its identity: a sealed value copied onto another does not open there.
    assert open_session_key(resolve(server.settings), identity.session_key, "wechat:other:openid") is None


async def test_concurrent_first_logins_of_one_openid_make_one_user(
    client: httpx.AsyncClient, server: Server
) -> None:
    name = person()
    codes = [(await mint(client, name=name))["code"] for _ in range(4)]
    profiles = await asyncio.gather(*(auth_ok(client, code=code) for code in codes))
    assert len({p["id"] for p in profiles}) == 1 and len({p["token"] for p in profiles}) == 4
    assert len((await admin_get_user(client, profiles[0]["id"]))["identities"]) == 1


# ------------------------------------------------------------------ one person


async def test_unionid_links_official_account_mini_program_and_app_into_one_user(
    client: httpx.AsyncClient, server: Server
) -> None:
    name = person()
    unionid = "u_link_" + secrets.token_hex(8)
    oa = await logged_in(client, code=await new_code(client, name=name, unionid=unionid))
    mini = await auth_ok(client, code=(await mint(client, name=name, unionid=unionid))["code"])
    assert mini["id"] == oa["id"]
    async with database(server) as db, db.transaction() as session:
        # The APP's WeChat login (issue 10's `users`) goes through the same helper.
        app_user, created = await accounts.wechat_user(
            session,
            server.clock.utcnow().replace(tzinfo=None),
            app_id=WECHAT_APP_APP_ID,
            openid="o_app_" + secrets.token_hex(8),
            unionid=unionid,
        )
        assert not created and str(app_user.id) == oa["id"]
    apps = {i["app_id"]: i["unionid"] for i in (await admin_get_user(client, oa["id"]))["identities"]}
    assert apps == {WECHAT_MP_APP_ID: unionid, WECHAT_MINI_APP_ID: unionid, WECHAT_APP_APP_ID: unionid}


async def test_without_a_unionid_nobody_is_linked_and_a_client_sent_unionid_is_not_trusted(
    client: httpx.AsyncClient,
) -> None:
    victim = await logged_in(client, code=await new_code(client, unionid="u_victim_" + secrets.token_hex(6)))
    victim_union = (await admin_get_user(client, victim["id"]))["identities"][0]["unionid"]
    minted = await mint(client, no_unionid="1")
    profile = await auth_ok(client, code=minted["code"], userInfo={"nickName": "x", "unionId": victim_union})
    assert profile["id"] != victim["id"]
    [identity] = (await admin_get_user(client, profile["id"]))["identities"]
    assert identity["unionid"] is None


# ------------------------------------------------------------------ codes


async def test_an_invalid_or_reused_code_is_refused(client: httpx.AsyncClient) -> None:
    await refused(client, "auth.code_invalid", code="x" * 32)
    await refused(client, "auth.code_invalid", code="bad code!")
    minted = await mint(client)
    await auth_ok(client, code=minted["code"])
    body = await refused(client, "auth.code_used", code=minted["code"])
    assert "wx.login" in body["info"]
    await refused(client, "param.missing", code="")


async def test_platform_busy_and_rate_limit_are_answered_with_their_own_codes(
    client: httpx.AsyncClient,
) -> None:
    minted = await mint(client)
    await fail_next(client, "jscode2session", -1)
    await refused(client, "auth.busy", code=minted["code"])
    await fail_next(client, "jscode2session", 45011)
    body = await refused(client, "auth.too_frequent", code=minted["code"])
    assert body["retry_after"] == 60
    await fail_next(client, "jscode2session", 40226)
    body = await refused(client, "auth.platform_error", code=minted["code"])
    assert body["errcode"] == 40226 and "40226" in body["info"]
    # None spent the code.
    await auth_ok(client, code=minted["code"])


async def test_a_slow_hanging_or_unreachable_platform_answers_within_5_seconds(
    client: httpx.AsyncClient, server: Server
) -> None:
    minted = await mint(client)
    await fail_next(client, "jscode2session", delay=8)
    started = time.monotonic()
    body = await refused(client, "auth.unavailable", code=minted["code"])
    assert time.monotonic() - started < 5.0 and body["info"] == "微信服务暂时无法访问，请稍后再试"
    hole = BlackHole()
    try:
        async with other_server(server, wechat={"api_base": f"http://127.0.0.1:{hole.port}"}) as cut_off:
            started = time.monotonic()
            body = (await cut_off.post("/api/auth", data={"code": "a" * 32})).json()
            assert time.monotonic() - started < 5.0
            assert body["status"] == 0 and body["code"] == "auth.unavailable"
    finally:
        hole.close()


async def test_not_configured_without_the_sandbox(client: httpx.AsyncClient, server: Server) -> None:
    async with other_server(server, sandbox=False) as plain:
        body = (await plain.post("/api/auth", data={"code": "a" * 32})).json()
        assert body["status"] == 0 and body["code"] == "wechat_mini.not_configured"


# ------------------------------------------------------------------ userInfo and encryptedData


@pytest.mark.parametrize(
    "user_info",
    [
        "not json",
        "[1, 2]",
        json.dumps({"nickName": 5, "avatarUrl": ["x"], "gender": "male"}),
        json.dumps({"nickName": "x" * 5000}),
        {"nickName": None, "gender": True, "avatarUrl": "javascript:alert(1)"},
        12345,
        ["a"],
    ],
)
async def test_bad_user_info_is_ignored_field_by_field(client: httpx.AsyncClient, user_info: Any) -> None:
    profile = await auth_ok(client, code=(await mint(client))["code"], userInfo=user_info)
    assert profile["nickname"] == "微信用户" and profile["sex"] == "0"


async def test_user_info_takes_each_good_field_and_leaves_the_bad_ones(client: httpx.AsyncClient) -> None:
    info = {"nickName": "好名字", "gender": "oops", "avatarUrl": 7}
    profile = await auth_ok(client, code=(await mint(client))["code"], userInfo=json.dumps(info))
    assert profile["nickname"] == "好名字" and profile["sex"] == "0"


async def encrypted(
    client: httpx.AsyncClient, code: str, data: dict[str, Any], **watermark: Any
) -> dict[str, str]:
    answer = await client.post(
        f"{SANDBOX}/_test/mini/encrypt", json={"code": code, "data": data, "watermark": watermark}
    )
    found: dict[str, str] = answer.json()
    return found


async def test_encrypted_data_is_decrypted_with_the_session_key_and_used(client: httpx.AsyncClient) -> None:
    minted = await mint(client, no_unionid="1")
    unionid = "u_sealed_" + secrets.token_hex(6)
    data = {"openId": minted["openid"], "nickName": "加密昵称", "gender": 1, "unionId": unionid}
    sealed = await encrypted(client, minted["code"], data)
    profile = await auth_ok(client, code=minted["code"], userInfo={"nickName": "明文昵称"}, **sealed)
    assert profile["nickname"] == "加密昵称" and profile["sex"] == "1"
    [identity] = (await admin_get_user(client, profile["id"]))["identities"]
    assert identity["unionid"] == unionid  # WeChat-sealed: trusted


@pytest.mark.parametrize(
    "spoil",
    ["other_appid", "old", "garbage", "bad_iv", "other_openid"],
)
async def test_bad_encrypted_data_is_ignored_and_the_login_stands(
    client: httpx.AsyncClient, spoil: str
) -> None:
    minted = await mint(client)
    data = {"openId": minted["openid"], "nickName": "不该用上"}
    watermark: dict[str, Any] = {}
    if spoil == "other_appid":
        watermark = {"appid": "wx_someone_else"}
    elif spoil == "old":
        watermark = {"timestamp": int(time.time()) - 3600}
    elif spoil == "other_openid":
        data["openId"] = "o_someone_else"
    sealed = await encrypted(client, minted["code"], data, **watermark)
    if spoil == "garbage":
        sealed["encryptedData"] = "!!not base64!!"
    elif spoil == "bad_iv":
        sealed["iv"] = base64.b64encode(b"0" * 16).decode()
    profile = await auth_ok(client, code=minted["code"], **sealed)
    assert profile["nickname"] == "微信用户"


# WeChat's decryption demo (WXBizDataCrypt), as published with it and copied by every SDK.
DEMO_KEY = "tiihtNczf5v6AKRyjwEUhQ=="
DEMO_IV = "r7BXXKkLb8qrSNn05n0qiA=="
DEMO_DATA = (
    "CiyLU1Aw2KjvrjMdj8YKliAjtP4gsMZMQmRzooG2xrDcvSnxIMXFufNstNGTyaGS9uT5geRa0W4oTOb1WT7fJlAC+oNPdbB+3hVbJSRg"
    "v+4lGOETKUQz6OYStslQ142dNCuabNPGBzlooOmB231qMM85d2/fV6ChevvXvQP8Hkue1poOFtnEtpyxVLW1zAo6/1Xx1COxFvrc2d"
    "7UL/lmHInNlxuacJXwu0fjpXfz/YqYzBIBzD6WUfTIF9GRHpOn/Hz7saL8xz+W//FRAUid1OksQaQx4CMs8LOddcQhULW4ucetDf96"
    "JcR3g0gfRK4PC7E/r7Z6xNrXd2UIeorGj5Ef7b1pJAYB6Y5anaHqZ9J6nKEBvB4DnNLIVWSgARns/8wR2SiRS7MNACwTyrGvt9ts8p1"
    "2PKFdlqYTopNHR1Vf7XjfhQlVsAJdNiKdYmYVoKlaRv85IfVunYzO0IKXsyl7JCUjCpoG20f0a04COwfneQAGGwd5oa+T8yO5hzuyDb"
    "/XcxxmK01EpqOyuxINew=="
)
DEMO_APPID = "wx4f4bc4dec97d474b"
DEMO_TIME = 1477314187


def test_the_official_demo_vector_decrypts_and_its_watermark_is_checked() -> None:
    found = decrypt_open_data(DEMO_KEY, DEMO_DATA, DEMO_IV, app_id=DEMO_APPID, now=DEMO_TIME + 5, max_age=600)
    assert found["openId"] == "oGZUI0egBJY1zhBYw2KhdUfwVJJE"
    assert found["unionId"] == "ocMvos6NjeKLIBqg5Mr9QjxrP1FA"
    assert found["watermark"] == {"timestamp": DEMO_TIME, "appid": DEMO_APPID}
    for app_id, now in (
        ("wx_other", DEMO_TIME),
        (DEMO_APPID, DEMO_TIME + 601),
        (DEMO_APPID, DEMO_TIME - 120),
    ):
        with pytest.raises(OpenDataRefused):
            decrypt_open_data(DEMO_KEY, DEMO_DATA, DEMO_IV, app_id=app_id, now=now, max_age=600)
    with pytest.raises(OpenDataRefused):  # another session_key: bad padding or not JSON, never a crash
        decrypt_open_data(
            "HyVFkGl5F5OQWJZZaNzBBg==", DEMO_DATA, DEMO_IV, app_id=DEMO_APPID, now=DEMO_TIME, max_age=600
        )
    # Our sealing (the sandbox's) is the inverse.
    again = encrypt_open_data(DEMO_KEY, DEMO_IV, found)
    assert decrypt_open_data(DEMO_KEY, again, DEMO_IV, app_id=DEMO_APPID, now=DEMO_TIME, max_age=600) == found


# ------------------------------------------------------------------ phone numbers


async def test_phone_code_binds_the_mobile(client: httpx.AsyncClient) -> None:
    mobile = unique_mobile()
    minted = await mint(client)
    profile = await auth_ok(client, code=minted["code"], phone_code=await phone_code(client, mobile))
    assert profile["mobile"] == mobile and profile["username"] == mobile


async def test_a_mobile_bound_to_another_user_is_refused_never_merged(
    client: httpx.AsyncClient, server: Server
) -> None:
    mobile = unique_mobile()
    owner = await admin_create_user(client, mobile=mobile, nickname="号主")
    minted = await mint(client)
    body = await refused(
        client, "auth.mobile_taken", code=minted["code"], phone_code=await phone_code(client, mobile)
    )
    assert "已绑定其他账号" in body["info"]
    assert (await admin_get_user(client, str(owner["id"])))["identities"] == []
    # The refusal came inside the login's one write: the user it was making is not there either.
    async with database(server) as db, db.read() as session:
        assert await session.scalar(select_identity(minted["openid"])) is None
    # Nothing was made: a new code logs in a new user without that mobile.
    again = await auth_ok(client, code=(await mint(client, openid=minted["openid"]))["code"])
    assert again["mobile"] == "" and again["id"] != str(owner["id"])


async def test_a_bad_or_reused_phone_code_is_refused(client: httpx.AsyncClient) -> None:
    code = await phone_code(client, unique_mobile())
    await auth_ok(client, code=(await mint(client))["code"], phone_code=code)
    await refused(client, "auth.phone_code_invalid", code=(await mint(client))["code"], phone_code=code)
    await refused(client, "auth.phone_code_invalid", code=(await mint(client))["code"], phone_code="b" * 32)
    await refused(client, "auth.phone_code_invalid", code="a" * 32, phone_code="bad code!")
    other_app = await phone_code(client, unique_mobile(), appid=WECHAT_MP_APP_ID)
    await refused(client, "auth.phone_code_invalid", code=(await mint(client))["code"], phone_code=other_app)


# ------------------------------------------------------------------ referrers


async def test_without_the_share_resolver_a_numeric_scene_names_the_referrer_of_a_new_user_only(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The server runs in this process: the resolver of issue 11 is taken away for this test.
    monkeypatch.setattr(mini_login, "_scene_resolver", lambda: None)
    referrer = await admin_create_user(client, nickname="分享者")
    name = person()
    profile = await auth_ok(client, code=(await mint(client, name=name))["code"], scene=str(referrer["id"]))
    assert (await admin_get_user(client, profile["id"]))["spread_id"] == str(referrer["id"])
    later = await admin_create_user(client, nickname="后来的")
    await auth_ok(client, code=(await mint(client, name=name))["code"], scene=str(later["id"]))
    assert (await admin_get_user(client, profile["id"]))["spread_id"] == str(referrer["id"])
    odd = await auth_ok(client, code=(await mint(client))["code"], scene="abc!@#", spread_id="undefined")
    assert (await admin_get_user(client, odd["id"]))["spread_id"] == ""


async def test_the_share_resolver_when_present_decides_what_a_scene_names(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    sharer = await admin_create_user(client, nickname="扫码分享者")
    asked: list[str] = []

    async def resolve_scene(_session: Any, scene: str) -> int | None:
        asked.append(scene)
        return int(sharer["id"]) if scene == "s_known" else None

    monkeypatch.setattr(mini_login, "_scene_resolver", lambda: resolve_scene)
    known = await auth_ok(client, code=(await mint(client))["code"], scene="s_known")
    assert (await admin_get_user(client, known["id"]))["spread_id"] == str(sharer["id"])
    # A numeric scene is the resolver's to name too: no user id guessed from it.
    unknown = await auth_ok(client, code=(await mint(client))["code"], scene=str(sharer["id"]))
    assert (await admin_get_user(client, unknown["id"]))["spread_id"] == ""
    assert asked == ["s_known", str(sharer["id"])]


async def test_a_scanned_share_code_makes_its_sharer_the_referrer(
    server: Server, client: httpx.AsyncClient
) -> None:
    # Issue 11's real codes: spread/qrcode stores an opaque scene, auth resolves it.
    token, sharer_id = await spread_login(client)
    url = (await spread_qrcode(client, id=await make_goods(client), token=token))["data"]
    scene = (await scene_of(server, url)).code
    profile = await auth_ok(client, code=(await mint(client))["code"], scene=scene)
    assert (await admin_get_user(client, profile["id"]))["spread_id"] == str(sharer_id)


# ------------------------------------------------------------------ the stand-in


async def test_the_stand_in_answers_with_wechats_error_codes(client: httpx.AsyncClient) -> None:
    async def session(**params: str) -> dict[str, Any]:
        answer: dict[str, Any] = (await client.get(f"{SANDBOX}/sns/jscode2session", params=params)).json()
        return answer

    minted = await mint(client)
    base = {"appid": WECHAT_MINI_APP_ID, "grant_type": "authorization_code"}
    assert (await session(**base, secret="0" * 32, js_code=minted["code"]))["errcode"] in (40001, 40125)
    assert (await session(**{**base, "appid": "wxnobody"}, secret="x", js_code="y"))["errcode"] == 40013
    phone = await client.post(
        f"{SANDBOX}/wxa/business/getuserphonenumber", params={"access_token": "nope"}, json={"code": "x"}
    )
    assert phone.json()["errcode"] == 40001
    counts = (await client.get(f"{SANDBOX}/_test/mini/counts")).json()
    assert set(counts) == {"jscode2session", "getuserphonenumber"}


async def test_the_console_page_mints_codes_that_log_in(client: httpx.AsyncClient) -> None:
    page = await client.get(f"{SANDBOX}/mini")
    assert page.status_code == 200 and "wx.login" in page.text
    made = await client.post(f"{SANDBOX}/mini/code", data={"name": person()})
    assert made.status_code == 303
    shown = await client.get(f"{SANDBOX}/{made.headers['location'].removeprefix('../')}")
    code = shown.text.split("wx.login code: <code>")[1].split("</code>")[0]
    await auth_ok(client, code=code)
    phone = await client.post(f"{SANDBOX}/mini/phone_code", data={"phone": unique_mobile(), "country": "86"})
    assert phone.status_code == 303 and "kind=phone" in phone.headers["location"]
    console = await client.get("/_sandbox/")
    assert "WeChat Mini Program" in console.text
