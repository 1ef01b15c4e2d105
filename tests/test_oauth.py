"""Official Account web login (`oauth`, `oauth/url`) through the real app and the sandbox's consent page."""

from __future__ import annotations

import asyncio
import secrets
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from conftest import Server, other_server
from mallgate.channels.wechat_api import WechatApiError
from mallgate.channels.wechat_oauth import WechatOAuth, authorize_url
from mallgate.db.models import Identity, User
from mallgate.db.session import Database
from mallgate.sandbox.app import WECHAT_MINI_APP_ID, WECHAT_MP_APP_ID
from mallgate.services import accounts
from mallgate.services.wechat_oauth import MEMORY_SECONDS
from support import PROFILE_KEYS, admin_create_user, admin_get_user

SANDBOX = "/_sandbox/wechat"
SHOP_PAGE = "https://shop.example.com/wechat/back?from=menu"


def person() -> str:
    return "p" + secrets.token_hex(6)


async def consent(
    client: httpx.AsyncClient,
    *,
    name: str = "",
    scope: str = "snsapi_userinfo",
    state: str = "",
    appid: str = WECHAT_MP_APP_ID,
    decision: str = "allow",
    **fields: str,
) -> dict[str, str]:
    """What the sandbox's consent page redirects to, as query values (code, state)."""
    form = {
        "appid": appid,
        "redirect_uri": SHOP_PAGE,
        "response_type": "code",
        "scope": scope,
        "state": state,
        "name": name or person(),
        "decision": decision,
        **fields,
    }
    answer = await client.post(f"{SANDBOX}/connect/oauth2/authorize", data=form)
    assert answer.status_code == 302, answer.text
    location = urlsplit(answer.headers["location"])
    assert location.netloc == "shop.example.com" and location.path == "/wechat/back"
    query = {k: v[0] for k, v in parse_qs(location.query, keep_blank_values=True).items()}
    assert query.pop("from") == "menu"  # the page's own query is kept
    return query


async def new_code(client: httpx.AsyncClient, **options: Any) -> str:
    code = (await consent(client, **options))["code"]
    assert len(code) == 32
    return code


async def oauth(client: httpx.AsyncClient, **values: Any) -> dict[str, Any]:
    answer = await client.post("/api/oauth", data=values)
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


async def logged_in(client: httpx.AsyncClient, **values: Any) -> dict[str, str]:
    body = await oauth(client, **values)
    assert body["status"] == 1, body
    profile: dict[str, str] = body["data"]
    return profile


async def counts(client: httpx.AsyncClient) -> dict[str, int]:
    found: dict[str, int] = (await client.get(f"{SANDBOX}/_test/oauth/counts")).json()
    return found


@asynccontextmanager
async def database(server: Server) -> AsyncIterator[Database]:
    db = Database(server.settings.resolved_database_url)
    try:
        yield db
    finally:
        await db.dispose()


async def stored_user(server: Server, user_id: str) -> User:
    async with database(server) as db, db.read() as session:
        user = await session.get(User, int(user_id))
        assert user is not None
        return user


# ------------------------------------------------------------------ the flow


async def test_oauth_url_leads_through_the_consent_page_to_a_login(
    client: httpx.AsyncClient, server: Server
) -> None:
    body = (await client.get("/api/oauth/url", params={"redirect_uri": SHOP_PAGE})).json()
    assert body["status"] == 1, body
    url, state = body["data"]["url"], body["data"]["state"]
    assert url == (
        f"{server.url}{SANDBOX}/connect/oauth2/authorize?appid={WECHAT_MP_APP_ID}"
        "&redirect_uri=https%3A%2F%2Fshop.example.com%2Fwechat%2Fback%3Ffrom%3Dmenu"
        f"&response_type=code&scope=snsapi_userinfo&state={state}#wechat_redirect"
    )
    assert len(state) == 32 and state.isalnum()
    page = await client.get(url.split("#")[0])
    assert page.status_code == 200 and 'name="decision"' in page.text and "SANDBOX" in page.text
    back = await consent(client, state=state, nickname="小明", sex="1")
    assert back["state"] == state
    profile = await logged_in(client, code=back["code"], state=state)
    assert set(profile) == PROFILE_KEYS and all(isinstance(v, str) for v in profile.values())
    assert profile["nickname"] == "小明" and profile["sex"] == "1" and profile["last_ip"] == "127.0.0.1"
    info = (await client.get("/api/user/info", headers={"Auth-Token": profile["token"]})).json()
    assert info["data"]["id"] == profile["id"]


async def test_new_user_with_snsapi_userinfo_takes_the_profile(
    client: httpx.AsyncClient, server: Server
) -> None:
    avatar = "https://thirdwx.qlogo.cn/mmopen/sandbox/132"
    before = await counts(client)
    code = await new_code(
        client, nickname="阿花🌸", sex="2", headimgurl=avatar, openid="o_new_" + secrets.token_hex(8)
    )
    profile = await logged_in(client, code=code)
    after = await counts(client)
    assert after["sns/userinfo"] == before["sns/userinfo"] + 1
    assert profile["nickname"] == "阿花🌸" and profile["sex"] == "2"
    assert (await stored_user(server, profile["id"])).avatar == avatar
    view = await admin_get_user(client, profile["id"])
    [identity] = view["identities"]
    assert identity["provider"] == "wechat" and identity["app_id"] == WECHAT_MP_APP_ID
    assert identity["openid"].startswith("o_new_") and identity["unionid"]


async def test_new_user_with_snsapi_base_has_the_openid_only(client: httpx.AsyncClient) -> None:
    before = await counts(client)
    code = await new_code(client, scope="snsapi_base", nickname="never seen")
    profile = await logged_in(client, code=code)
    after = await counts(client)
    assert after["sns/userinfo"] == before["sns/userinfo"]  # base scope: no profile call
    assert profile["nickname"] == "微信用户" and profile["sex"] == "0"
    [identity] = (await admin_get_user(client, profile["id"]))["identities"]
    assert identity["openid"] and identity["unionid"] is None  # WeChat gives no unionid for base


async def test_returning_user_gets_the_same_id_and_an_updated_profile(client: httpx.AsyncClient) -> None:
    name = person()
    first = await logged_in(client, code=await new_code(client, name=name, nickname="旧名字", sex="1"))
    # Silent login first: the profile stays as it was.
    silent = await logged_in(client, code=await new_code(client, name=name, scope="snsapi_base"))
    assert silent["id"] == first["id"] and silent["nickname"] == "旧名字"
    again = await logged_in(client, code=await new_code(client, name=name, nickname="新名字", sex="2"))
    assert again["id"] == first["id"]
    assert again["nickname"] == "新名字" and again["sex"] == "2"
    assert len({first["token"], silent["token"], again["token"]}) == 3
    # sex 0 is WeChat's "unknown" for everyone: it never overwrites a known one.
    unknown = await logged_in(client, code=await new_code(client, name=name, nickname="新名字", sex="0"))
    assert unknown["sex"] == "2"
    assert len((await admin_get_user(client, first["id"]))["identities"]) == 1


async def test_a_nickname_with_control_characters_is_stored_without_them(client: httpx.AsyncClient) -> None:
    # WeChat nicknames are the user's own text; NUL would break PostgreSQL's insert (a 500).
    profile = await logged_in(client, code=await new_code(client, nickname="a\x00b\x07c 😀" + "长" * 80))
    assert profile["nickname"] == "abc 😀" + "长" * 59


async def test_a_unionid_learnt_later_is_recorded(client: httpx.AsyncClient) -> None:
    name = person()
    base = await logged_in(client, code=await new_code(client, name=name, scope="snsapi_base"))
    full = await logged_in(client, code=await new_code(client, name=name))
    assert full["id"] == base["id"]
    [identity] = (await admin_get_user(client, base["id"]))["identities"]
    assert identity["unionid"]


async def test_unionid_links_the_identity_of_another_wechat_app(
    client: httpx.AsyncClient, server: Server
) -> None:
    unionid = "u_link_" + secrets.token_hex(8)
    async with database(server) as db, db.transaction() as session:
        # The same person logged in through the Mini Program first (issue 10's path, same helper).
        mini_user, created = await accounts.wechat_user(
            session,
            server.clock.utcnow().replace(tzinfo=None),
            app_id=WECHAT_MINI_APP_ID,
            openid="o_mini_" + secrets.token_hex(8),
            unionid=unionid,
        )
        assert created
        mini_id = str(mini_user.id)
    profile = await logged_in(client, code=await new_code(client, unionid=unionid, nickname="同一个人"))
    assert profile["id"] == mini_id
    apps = {i["app_id"]: i["unionid"] for i in (await admin_get_user(client, mini_id))["identities"]}
    assert apps == {WECHAT_MINI_APP_ID: unionid, WECHAT_MP_APP_ID: unionid}


async def test_an_empty_unionid_never_links(client: httpx.AsyncClient, server: Server) -> None:
    async with database(server) as db, db.transaction() as session:
        now = server.clock.utcnow().replace(tzinfo=None)
        other, _ = await accounts.wechat_user(
            session, now, app_id=WECHAT_MINI_APP_ID, openid="o_empty_" + secrets.token_hex(8)
        )
        # A row written with "" rather than NULL (by older code or by hand) must not match either.
        session.add(
            Identity(
                user_id=other.id,
                provider="wechat",
                app_id=WECHAT_MINI_APP_ID,
                openid="o_blank_" + secrets.token_hex(8),
                unionid="",
                created_at=now,
            )
        )
        other_id = str(other.id)
    first = await logged_in(client, code=await new_code(client, no_unionid="1"))
    second = await logged_in(client, code=await new_code(client, no_unionid="1"))
    assert len({first["id"], second["id"], other_id}) == 3
    [identity] = (await admin_get_user(client, first["id"]))["identities"]
    assert identity["unionid"] is None


# ------------------------------------------------------------------ referrers


async def test_spread_id_is_recorded_at_creation_and_never_overwritten(client: httpx.AsyncClient) -> None:
    referrer = await admin_create_user(client, nickname="referrer")
    later = await admin_create_user(client, nickname="later referrer")
    name = person()
    created = await logged_in(client, code=await new_code(client, name=name), spread_id=referrer["id"])
    assert (await admin_get_user(client, created["id"]))["spread_id"] == referrer["id"]
    again = await logged_in(client, code=await new_code(client, name=name), spread_id=later["id"])
    assert again["id"] == created["id"]
    assert (await admin_get_user(client, created["id"]))["spread_id"] == referrer["id"]


async def test_an_existing_user_gets_no_referrer_later(client: httpx.AsyncClient) -> None:
    referrer = await admin_create_user(client, nickname="too late")
    name = person()
    created = await logged_in(client, code=await new_code(client, name=name))
    await logged_in(client, code=await new_code(client, name=name), spread_id=referrer["id"])
    assert (await admin_get_user(client, created["id"]))["spread_id"] == ""


async def test_self_referral_and_unknown_referrers_are_ignored(client: httpx.AsyncClient) -> None:
    name = person()
    created = await logged_in(client, code=await new_code(client, name=name), spread_id="999999999999")
    assert (await admin_get_user(client, created["id"]))["spread_id"] == ""
    await logged_in(client, code=await new_code(client, name=name), spread_id=created["id"])
    assert (await admin_get_user(client, created["id"]))["spread_id"] == ""
    # Malformed referrers are ignored, never refused: the login goes on.
    for bad in ("", "0", "undefined", "²", "-3", "9" * 40):
        assert (await oauth(client, code=await new_code(client), spread_id=bad))["status"] == 1, bad


# ------------------------------------------------------------------ codes


async def test_a_reloaded_code_is_answered_from_memory_with_one_upstream_call(
    client: httpx.AsyncClient,
) -> None:
    code = await new_code(client, nickname="reload")
    before = await counts(client)
    first = await logged_in(client, code=code, state="abc123")
    reloaded = await logged_in(client, code=code, state="abc123")
    after = await counts(client)
    assert after["sns/oauth2/access_token"] == before["sns/oauth2/access_token"] + 1
    assert after["sns/userinfo"] == before["sns/userinfo"] + 1
    assert reloaded["id"] == first["id"] and reloaded["token"] != first["token"]


async def test_a_reused_code_is_refused_once_the_memory_is_gone(
    client: httpx.AsyncClient, server: Server
) -> None:
    code = await new_code(client)
    await logged_in(client, code=code)
    server.clock.advance(MEMORY_SECONDS + 1)
    before = await counts(client)
    body = await oauth(client, code=code)
    assert body["status"] == 0 and body["code"] == "oauth.code_used"
    assert body["info"] == "授权码已被使用，请重新进入授权页面"
    assert (await counts(client))["sns/oauth2/access_token"] == before["sns/oauth2/access_token"] + 1


async def test_the_same_code_with_another_state_is_not_taken_from_memory(client: httpx.AsyncClient) -> None:
    code = await new_code(client)
    await logged_in(client, code=code, state="first")
    body = await oauth(client, code=code, state="second")
    assert body["status"] == 0 and body["code"] == "oauth.code_used"


async def test_an_invalid_or_expired_code_is_refused(client: httpx.AsyncClient) -> None:
    unknown = await oauth(client, code="0" * 32)
    assert unknown["status"] == 0 and unknown["code"] == "oauth.code_invalid"
    assert unknown["info"] == "授权码无效或已过期，请重新进入授权页面"
    code = await new_code(client)
    assert (await client.post(f"{SANDBOX}/_test/oauth/expire", json={"code": code})).json() == {"expired": 1}
    expired = await oauth(client, code=code)
    assert expired["status"] == 0 and expired["code"] == "oauth.code_invalid"


async def test_a_code_of_another_app_is_refused(client: httpx.AsyncClient) -> None:
    code = await new_code(client, appid="wx00000000000000c3")  # the sandbox's APP, not the OA
    body = await oauth(client, code=code)
    assert body["status"] == 0 and body["code"] == "oauth.code_invalid"


async def test_a_snapshot_page_visitor_is_not_logged_in(client: httpx.AsyncClient) -> None:
    body = await oauth(client, code=await new_code(client, scope="snsapi_base", snapshot="1"))
    assert body["status"] == 0 and body["code"] == "oauth.snapshot_user"


# ------------------------------------------------------------------ states


@pytest.mark.parametrize(
    ("state", "code"),
    [
        ("a" * 129, "oauth.state_invalid"),
        ("ab-c", "oauth.state_invalid"),
        ("a b", "oauth.state_invalid"),
        ("²", "oauth.state_invalid"),
        ("状态", "oauth.state_invalid"),
        ("a\x00b", "param.invalid"),
        ("x" * 5000, "param.too_long"),
    ],
)
async def test_bad_states_are_refused(client: httpx.AsyncClient, state: str, code: str) -> None:
    before = await counts(client)
    body = await oauth(client, code=await new_code(client), state=state)
    assert body["status"] == 0 and body["code"] == code and body["info"]
    assert await counts(client) == before  # refused before WeChat is asked


async def test_a_state_of_128_letters_and_digits_is_taken(client: httpx.AsyncClient) -> None:
    state = ("Ab9" * 43)[:128]
    assert (await oauth(client, code=await new_code(client, state=state), state=state))["status"] == 1


async def test_require_state_takes_only_issued_states_each_once(
    client: httpx.AsyncClient, server: Server
) -> None:
    async with other_server(server, wechat_mp={"require_state": True}) as guarded:
        missing = await oauth(guarded, code=await new_code(client))
        assert missing["status"] == 0 and missing["code"] == "param.missing"
        before = await counts(client)
        forged = await oauth(guarded, code=await new_code(client), state="notissued1")
        assert forged["status"] == 0 and forged["code"] == "oauth.state_unknown"
        assert (await counts(client))["sns/oauth2/access_token"] == before["sns/oauth2/access_token"]
        issued = (await guarded.get("/api/oauth/url", params={"redirect_uri": SHOP_PAGE})).json()["data"]
        code = await new_code(client, state=issued["state"])
        first = await logged_in(guarded, code=code, state=issued["state"])
        # The page reloaded: the same code and state are answered again from memory.
        assert (await logged_in(guarded, code=code, state=issued["state"]))["id"] == first["id"]
        spent = await oauth(guarded, code=await new_code(client), state=issued["state"])
        assert spent["status"] == 0 and spent["code"] == "oauth.state_unknown"
    # Without the setting a state is only checked for its shape.
    assert (await oauth(client, code=await new_code(client), state="notissued1"))["status"] == 1


# ------------------------------------------------------------------ oauth/url


async def test_oauth_url_for_snsapi_base_and_its_refusals(client: httpx.AsyncClient) -> None:
    base = (
        await client.get("/api/oauth/url", params={"redirect_uri": SHOP_PAGE, "scope": "snsapi_base"})
    ).json()
    assert "&scope=snsapi_base&" in base["data"]["url"] and base["data"]["url"].endswith("#wechat_redirect")
    for params, code in [
        ({}, "param.missing"),
        ({"redirect_uri": "javascript:alert(1)"}, "oauth.redirect_uri_invalid"),
        ({"redirect_uri": "ftp://shop.example.com/"}, "oauth.redirect_uri_invalid"),
        ({"redirect_uri": "https://shop.example.com/#/home"}, "oauth.redirect_uri_invalid"),
        ({"redirect_uri": "https:///nohost"}, "oauth.redirect_uri_invalid"),
        ({"redirect_uri": "https://shop.example.com/²"}, "oauth.redirect_uri_invalid"),
        ({"redirect_uri": "https://shop.example.com/" + "a" * 2000}, "oauth.redirect_uri_invalid"),
        ({"redirect_uri": "https://shop.example.com/" + "a" * 10000}, "param.too_long"),
        ({"redirect_uri": SHOP_PAGE, "scope": "snsapi_login"}, "oauth.scope_invalid"),
    ]:
        body = (await client.get("/api/oauth/url", params=params)).json()
        assert body["status"] == 0 and body["code"] == code, (params, body)


# ------------------------------------------------------------------ bad input


async def test_bad_input_is_answered_never_a_500(client: httpx.AsyncClient) -> None:
    for value, code in [
        ({"code": ["x"]}, "param.invalid"),
        ({"code": {"a": 1}}, "param.invalid"),
        ({"code": True}, "oauth.code_invalid"),  # Params reads a bool as text too ("True")
        ({"code": 12345}, "oauth.code_invalid"),  # a number is read as text: no such code at WeChat
        ({"code": "²"}, "oauth.code_invalid"),
        ({"code": "a\x00b"}, "param.invalid"),
        ({"code": "x" * 200}, "oauth.code_invalid"),
        ({"code": "x" * 100_000}, "param.too_long"),
        ({}, "param.missing"),
        ({"code": "abc", "state": ["x"]}, "param.invalid"),
    ]:
        answer = await client.post("/api/oauth", json=value)
        assert answer.status_code == 200, (value, answer.text)
        body = answer.json()
        assert body["status"] == 0 and body["code"] == code and body["info"], (value, body)
    assert (await client.get("/api/oauth")).status_code == 405


# ------------------------------------------------------------------ configuration and outages


async def test_not_configured_without_the_sandbox(client: httpx.AsyncClient, server: Server) -> None:
    async with other_server(server, sandbox=False) as plain:
        for answer in (
            await plain.post("/api/oauth", data={"code": "a" * 32}),
            await plain.get("/api/oauth/url", params={"redirect_uri": SHOP_PAGE}),
        ):
            body = answer.json()
            assert body == {"info": "公众号未配置", "status": 0, "code": "wechat_mp.not_configured"}


class BlackHole:
    """A TCP server that accepts and never answers: a WeChat that hangs."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port: int = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()


async def test_a_hanging_or_unreachable_platform_answers_within_5_seconds(
    client: httpx.AsyncClient, server: Server
) -> None:
    hole = BlackHole()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    try:
        for port in (hole.port, closed_port):
            async with other_server(server, wechat={"api_base": f"http://127.0.0.1:{port}"}) as cut_off:
                started = time.monotonic()
                body = (await cut_off.post("/api/oauth", data={"code": "a" * 32})).json()
                assert time.monotonic() - started < 5.0
                assert body["status"] == 0 and body["code"] == "oauth.unavailable"
                assert body["info"] == "微信服务暂时无法访问，请稍后再试"
    finally:
        hole.close()


# ------------------------------------------------------------------ the stand-in itself


async def test_the_stand_in_answers_sns_calls_with_wechats_error_codes(
    client: httpx.AsyncClient, server: Server
) -> None:
    api = WechatOAuth(server.url + SANDBOX, client)
    secret = server.settings.wechat_mp.app_secret
    app = server.app.state.runtime.settings.wechat_mp
    base = await api.exchange_code(app.app_id, app.app_secret, await new_code(client, scope="snsapi_base"))
    assert base.scopes == {"snsapi_base"} and not base.unionid and not base.userinfo_allowed
    await api.check_token(base.access_token, base.openid)  # sns/auth: ok
    with pytest.raises(WechatApiError) as unauthorized:
        await api.userinfo(base.access_token, base.openid)
    assert unauthorized.value.errcode == 48001
    with pytest.raises(WechatApiError) as other_openid:
        await api.check_token(base.access_token, "o_someone_else")
    assert other_openid.value.errcode == 40003
    with pytest.raises(WechatApiError) as unknown:
        await api.userinfo("not-a-token", base.openid)
    assert unknown.value.errcode == 40001
    await client.post(f"{SANDBOX}/_test/oauth/expire", json={"access_token": base.access_token})
    with pytest.raises(WechatApiError) as expired:
        await api.check_token(base.access_token, base.openid)
    assert expired.value.errcode == 42001
    for wrong, errcode in [
        ((app.app_id, "wrong-secret"), 40125),
        (("wx0000000000000fff", secret or "x"), 40013),
    ]:
        with pytest.raises(WechatApiError) as refused:
            await api.exchange_code(*wrong, await new_code(client))
        assert refused.value.errcode == errcode
    code = await new_code(client)
    full = await api.exchange_code(app.app_id, app.app_secret, code)
    assert full.userinfo_allowed and full.unionid.startswith("u")
    with pytest.raises(WechatApiError) as used:
        await api.exchange_code(app.app_id, app.app_secret, code)
    assert used.value.errcode == 40163
    assert "rid: " in used.value.errmsg


async def test_the_consent_page_refuses_what_wechat_refuses_and_denial_sends_only_the_state(
    client: httpx.AsyncClient,
) -> None:
    for query, shown in [
        ({"appid": WECHAT_MINI_APP_ID, "scope": "snsapi_base"}, "10016"),
        ({"appid": WECHAT_MP_APP_ID, "scope": "snsapi_login"}, "10005"),
        ({"scope": "snsapi_base"}, "10012"),
    ]:
        values = {"redirect_uri": SHOP_PAGE, "response_type": "code", **query}
        page = await client.get(f"{SANDBOX}/connect/oauth2/authorize", params=values)
        assert page.status_code == 400 and shown in page.text
    denied = await consent(client, state="s1", decision="deny")
    assert denied == {"state": "s1"}


async def test_the_console_shows_the_codes_and_the_landing_page_the_code(
    client: httpx.AsyncClient, server: Server
) -> None:
    openid = "o_console_" + secrets.token_hex(6)
    await new_code(client, openid=openid, nickname="<b>控制台</b>")
    console = await client.get("/_sandbox/")
    assert "WeChat OAuth" in console.text and openid in console.text
    assert "&lt;b&gt;控制台&lt;/b&gt;" in console.text  # escaped
    start = await client.get(f"{SANDBOX}/oauth/start", params={"scope": "snsapi_base"})
    assert start.status_code == 200 and f"{server.url}{SANDBOX}/oauth/landing" in start.text
    assert 'action="../../wechat/connect/oauth2/authorize"' in start.text
    landing = await client.get(f"{SANDBOX}/oauth/landing", params={"code": "C0DE", "state": "s"})
    assert landing.status_code == 200 and "code=C0DE" in landing.text


async def test_concurrent_posts_of_one_code_log_in_one_user(client: httpx.AsyncClient) -> None:
    code = await new_code(client)
    answers = await asyncio.gather(*(oauth(client, code=code) for _ in range(4)))
    ids = {a["data"]["id"] for a in answers if a["status"] == 1}
    assert len(ids) == 1
    # A post that reached WeChat after the first exchange but before it was remembered is refused.
    assert all(a["status"] == 1 or a["code"] == "oauth.code_used" for a in answers)


# ------------------------------------------------------------------ against wechatpy (test-only)


def test_the_authorize_url_is_the_one_wechatpy_builds() -> None:
    from wechatpy.oauth import WeChatOAuth

    for scope in ("snsapi_base", "snsapi_userinfo"):
        theirs = WeChatOAuth(WECHAT_MP_APP_ID, "secret", SHOP_PAGE, scope=scope, state="Abc123").authorize_url
        assert (
            authorize_url("https://open.weixin.qq.com", WECHAT_MP_APP_ID, SHOP_PAGE, scope, "Abc123")
            == theirs
        )


async def test_wechatpy_reads_the_stand_ins_answers(client: httpx.AsyncClient, server: Server) -> None:
    from wechatpy.exceptions import WeChatOAuthException
    from wechatpy.oauth import WeChatOAuth

    app = server.app.state.runtime.settings.wechat_mp
    code = await new_code(client, nickname="wechatpy", sex="1")
    sdk = WeChatOAuth(app.app_id, app.app_secret, SHOP_PAGE, scope="snsapi_userinfo")
    sdk.API_BASE_URL = f"{server.url}{SANDBOX}/"
    grant = await asyncio.to_thread(sdk.fetch_access_token, code)
    assert grant["scope"] == "snsapi_userinfo" and grant["expires_in"] == 7200 and grant["unionid"]
    info = await asyncio.to_thread(sdk.get_user_info)
    assert info["openid"] == grant["openid"] and info["nickname"] == "wechatpy" and info["sex"] == 1
    assert await asyncio.to_thread(sdk.check_access_token) is True
    with pytest.raises(WeChatOAuthException) as used:
        await asyncio.to_thread(sdk.fetch_access_token, code)
    assert used.value.errcode == 40163
