"""APP login (`users`): WeChat, QQ and Apple tokens through the real app and the sandbox's stand-ins."""

from __future__ import annotations

import base64
import json
import secrets
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import select

from conftest import Server, TestClock, free_port, make_settings, other_server, start_server
from mallgate.channels.qq import QQConnect, parse_graph
from mallgate.channels.wechat_oauth import WechatOAuth
from mallgate.db.models import Identity
from mallgate.db.session import Database
from mallgate.sandbox.app import (
    APPLE_BUNDLE_ID,
    MOUNT,
    QQ_APP_ID,
    WECHAT_APP_APP_ID,
    WECHAT_MINI_APP_ID,
    WECHAT_MP_APP_ID,
)
from mallgate.sandbox.apple_standin import AppleStandIn
from support import admin_get_user

WECHAT = f"{MOUNT}/wechat"
QQ = f"{MOUNT}/qq"
APPLE = f"{MOUNT}/apple"
SHOP_PAGE = "https://shop.example.com/back"


def person() -> str:
    return "p" + secrets.token_hex(6)


async def users(client: httpx.AsyncClient, **values: Any) -> dict[str, Any]:
    answer = await client.post("/api/users", data=values)
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


async def logged_in(client: httpx.AsyncClient, **values: Any) -> dict[str, str]:
    body = await users(client, **values)
    assert body["status"] == 1 and body["info"] == "登录成功", body
    assert body["data"]["token"]
    profile: dict[str, str] = body["data"]
    return profile


async def refused(client: httpx.AsyncClient, code: str, **values: Any) -> str:
    body = await users(client, **values)
    assert body["status"] == 0 and body["code"] == code, body
    info: str = body["info"]
    assert info
    return info


# ------------------------------------------------------------------ tokens from the stand-ins


async def wechat_code(client: httpx.AsyncClient, appid: str, name: str) -> str:
    form = {
        "appid": appid,
        "redirect_uri": SHOP_PAGE,
        "response_type": "code",
        "scope": "snsapi_userinfo",
        "state": "s1",
        "name": name,
        "decision": "allow",
    }
    answer = await client.post(f"{WECHAT}/connect/oauth2/authorize", data=form)
    assert answer.status_code == 302, answer.text
    code = httpx.URL(answer.headers["location"]).params["code"]
    return code


async def wechat_app_token(client: httpx.AsyncClient, server: Server, name: str) -> tuple[str, str]:
    """What the WeChat OpenSDK leaves the APP with: (openid, access_token) for our APP app id."""
    app = server.app.state.runtime.settings.wechat_app
    grant = await WechatOAuth(server.url + WECHAT, client).exchange_code(
        app.app_id, app.app_secret, await wechat_code(client, WECHAT_APP_APP_ID, name)
    )
    return grant.openid, grant.access_token


async def qq_token(client: httpx.AsyncClient, **form: str) -> dict[str, str]:
    answer = await client.post(f"{QQ}/_test/mint", json={"name": person(), **form})
    minted: dict[str, str] = answer.json()
    return minted


async def apple_token(client: httpx.AsyncClient, **form: Any) -> str:
    answer = await client.post(f"{APPLE}/_test/mint", json={"sub": f"000{secrets.token_hex(4)}.x.1", **form})
    token: str = answer.json()["identity_token"]
    return token


def claims_of(token: str) -> dict[str, Any]:
    found: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return found


@asynccontextmanager
async def database(server: Server) -> AsyncIterator[Database]:
    db = Database(server.settings.resolved_database_url)
    try:
        yield db
    finally:
        await db.dispose()


async def identity_row(server: Server, provider: str, openid: str) -> Identity:
    async with database(server) as db, db.read() as session:
        found = (
            await session.scalars(
                select(Identity).where(Identity.provider == provider, Identity.openid == openid)
            )
        ).one()
        return found


# ------------------------------------------------------------------ WeChat


async def test_weixin_new_user_then_the_same_user_again(client: httpx.AsyncClient, server: Server) -> None:
    name = person()
    openid, token = await wechat_app_token(client, server, name)
    first = await logged_in(client, type="weixin", openid=openid, access_token=token)
    assert first["nickname"] == name  # sns/userinfo's nickname
    [identity] = (await admin_get_user(client, first["id"]))["identities"]
    assert identity["provider"] == "wechat" and identity["app_id"] == WECHAT_APP_APP_ID
    assert identity["openid"] == openid and identity["unionid"]
    again_openid, again_token = await wechat_app_token(client, server, name)
    assert again_openid == openid
    again = await logged_in(client, type="weixin", openid=openid, access_token=again_token)
    assert again["id"] == first["id"] and again["token"] != first["token"]
    assert len((await admin_get_user(client, first["id"]))["identities"]) == 1


async def test_weixin_official_account_mini_program_and_app_with_one_unionid_are_one_user(
    client: httpx.AsyncClient, server: Server
) -> None:
    name = person()
    oa = await client.post("/api/oauth", data={"code": await wechat_code(client, WECHAT_MP_APP_ID, name)})
    oa_profile = oa.json()["data"]
    openid, token = await wechat_app_token(client, server, name)
    app_profile = await logged_in(client, type="weixin", openid=openid, access_token=token)
    assert app_profile["id"] == oa_profile["id"]
    mini_code = (await client.post(f"{WECHAT}/_test/mini/code", json={"name": name})).json()["code"]
    mini = (await client.post("/api/auth", json={"code": mini_code})).json()
    assert mini["status"] == 1 and mini["data"]["id"] == oa_profile["id"], mini
    identities = (await admin_get_user(client, oa_profile["id"]))["identities"]
    assert {i["app_id"] for i in identities} == {WECHAT_MP_APP_ID, WECHAT_APP_APP_ID, WECHAT_MINI_APP_ID}
    assert len({i["unionid"] for i in identities}) == 1
    # Someone else's APP login is another user.
    other_openid, other_token = await wechat_app_token(client, server, person())
    other = await logged_in(client, type="weixin", openid=other_openid, access_token=other_token)
    assert other["id"] != oa_profile["id"]


async def test_weixin_trusts_no_openid_the_token_is_not_for(
    client: httpx.AsyncClient, server: Server
) -> None:
    victim_openid, _ = await wechat_app_token(client, server, person())
    _mine, my_token = await wechat_app_token(client, server, person())
    info = await refused(
        client, "users.token_invalid", type="weixin", openid=victim_openid, access_token=my_token
    )
    assert "openid" in info
    await refused(client, "users.token_invalid", type="weixin", openid=victim_openid, access_token="forged")
    await refused(client, "param.missing", type="weixin", access_token=my_token)


async def test_weixin_expired_token(client: httpx.AsyncClient, server: Server) -> None:
    openid, token = await wechat_app_token(client, server, person())
    await client.post(f"{WECHAT}/_test/oauth/expire", json={"access_token": token})
    info = await refused(client, "users.token_invalid", type="weixin", openid=openid, access_token=token)
    assert "过期" in info


# ------------------------------------------------------------------ QQ


async def test_qq_new_user_then_the_same_user_with_a_new_token(
    client: httpx.AsyncClient, server: Server
) -> None:
    name = person()
    minted = await qq_token(client, name=name, nickname="QQ昵称")
    first = await logged_in(client, type="qq", openid=minted["openid"], access_token=minted["access_token"])
    assert first["nickname"] == "QQ昵称"
    [identity] = (await admin_get_user(client, first["id"]))["identities"]
    assert identity == {
        "provider": "qq",
        "app_id": QQ_APP_ID,
        "openid": minted["openid"],
        "unionid": minted["unionid"],
    }
    assert (await identity_row(server, "qq", minted["openid"])).user_id == int(first["id"])
    again = await qq_token(client, name=name)
    # The openid is optional: the token's owner is what counts.
    second = await logged_in(client, type="qq", access_token=again["access_token"])
    assert second["id"] == first["id"]


async def test_qq_unionid_links_qq_identities_only(client: httpx.AsyncClient, server: Server) -> None:
    """A QQ unionid and a WeChat unionid live in two namespaces: even equal, they never link."""
    from mallgate.services import accounts

    minted = await qq_token(client)
    profile = await logged_in(client, type="qq", access_token=minted["access_token"])
    async with database(server) as db, db.transaction() as session:
        now = server.clock.utcnow().replace(tzinfo=None)
        wechat, created = await accounts.wechat_user(
            session,
            now,
            app_id=WECHAT_APP_APP_ID,
            openid="o" + secrets.token_hex(8),
            unionid=minted["unionid"],
        )
        assert created and wechat.id != int(profile["id"])
        who = accounts.Who("qq", "another-qq-app", "B" * 32, unionid=minted["unionid"])
        same, created = await accounts.platform_user(session, now, who)
        assert not created and same.id == int(profile["id"])


async def test_qq_openid_mismatch_and_foreign_app_are_refused(client: httpx.AsyncClient) -> None:
    victim = await qq_token(client)
    mine = await qq_token(client)
    info = await refused(
        client, "users.openid_mismatch", type="qq", openid=victim["openid"], access_token=mine["access_token"]
    )
    assert "openid" in info
    foreign = await qq_token(client, client_id="101999999")
    info = await refused(client, "users.foreign_app", type="qq", access_token=foreign["access_token"])
    assert "本应用" in info


async def test_qq_token_errors_are_told_apart(client: httpx.AsyncClient) -> None:
    expired = await qq_token(client)
    await client.post(f"{QQ}/_test/expire", json={"access_token": expired["access_token"]})
    assert "过期" in await refused(
        client, "users.token_invalid", type="qq", access_token=expired["access_token"]
    )
    revoked = await qq_token(client)
    await client.post(f"{QQ}/_test/revoke", json={"access_token": revoked["access_token"]})
    assert "100013" in await refused(
        client, "users.token_invalid", type="qq", access_token=revoked["access_token"]
    )
    assert "100016" in await refused(client, "users.token_invalid", type="qq", access_token="NOT" + "0" * 29)


async def test_qq_without_the_profile_permission_still_logs_in(client: httpx.AsyncClient) -> None:
    minted = await qq_token(client, no_userinfo="1", nickname="不会出现")
    profile = await logged_in(client, type="qq", access_token=minted["access_token"])
    assert profile["nickname"] != "不会出现"


async def test_qq_answers_jsonp_by_default_and_json_with_fmt(
    client: httpx.AsyncClient, server: Server
) -> None:
    minted = await qq_token(client)
    raw = await client.get(
        f"{QQ}/oauth2.0/me", params={"access_token": minted["access_token"], "unionid": "1"}
    )
    assert raw.text.startswith("callback( {") and raw.text.rstrip().endswith("} );")
    assert parse_graph("me", raw.text) == {
        "client_id": QQ_APP_ID,
        "openid": minted["openid"],
        "unionid": minted["unionid"],
    }
    plain = await client.get(
        f"{QQ}/oauth2.0/me", params={"access_token": minted["access_token"], "fmt": "json"}
    )
    assert plain.json() == {"client_id": QQ_APP_ID, "openid": minted["openid"]}  # no unionid=1: none
    error = await client.get(f"{QQ}/oauth2.0/me", params={"access_token": "nope"})
    assert parse_graph("me", error.text) == {
        "error": 100016,
        "error_description": "access token check failed",
    }
    owner = await QQConnect(server.url + QQ, client).me(minted["access_token"])
    assert (owner.client_id, owner.openid, owner.unionid) == (QQ_APP_ID, minted["openid"], minted["unionid"])
    info = await client.get(
        f"{QQ}/user/get_user_info",
        params={
            "access_token": minted["access_token"],
            "oauth_consumer_key": "1",
            "openid": minted["openid"],
        },
    )
    assert json.loads(info.text)["ret"] == 100016


# ------------------------------------------------------------------ Apple


async def test_apple_new_user_with_email_then_the_same_user(
    client: httpx.AsyncClient, server: Server
) -> None:
    token = await apple_token(client, email="a1b2@privaterelay.appleid.com")
    sub = claims_of(token)["sub"]
    first = await logged_in(client, type="apple", openid=sub, access_token=token)
    [identity] = (await admin_get_user(client, first["id"]))["identities"]
    assert identity == {"provider": "apple", "app_id": APPLE_BUNDLE_ID, "openid": sub, "unionid": None}
    assert (await identity_row(server, "apple", sub)).email == "a1b2@privaterelay.appleid.com"
    # Later tokens have no email: the one kept stays.
    again = await logged_in(client, type="apple", access_token=await apple_token(client, sub=sub))
    assert again["id"] == first["id"]
    assert (await identity_row(server, "apple", sub)).email == "a1b2@privaterelay.appleid.com"
    # A token with another email (the person changed the relay): that one is kept from now on.
    token = await apple_token(client, sub=sub, email="c3d4@privaterelay.appleid.com")
    assert (await logged_in(client, type="apple", access_token=token))["id"] == first["id"]
    assert (await identity_row(server, "apple", sub)).email == "c3d4@privaterelay.appleid.com"


@pytest.mark.parametrize(
    ("form", "words"),
    [
        ({"expires_in": "-120"}, "过期"),
        ({"aud": "com.example.other"}, "aud"),
        ({"iss": "https://appleid.example.com"}, "iss"),
    ],
)
async def test_apple_tokens_not_for_us_now_are_refused(
    client: httpx.AsyncClient, form: dict[str, str], words: str
) -> None:
    token = await apple_token(client, **form)
    assert words in await refused(client, "users.token_invalid", type="apple", access_token=token)


async def test_apple_openid_must_be_the_tokens_sub(client: httpx.AsyncClient) -> None:
    token = await apple_token(client)
    await refused(client, "users.openid_mismatch", type="apple", openid="000999.victim.1", access_token=token)


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


async def test_apple_forged_tokens_are_refused(client: httpx.AsyncClient, server: Server) -> None:
    genuine = await apple_token(client)
    header, claims = jwt.get_unverified_header(genuine), claims_of(genuine)
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    bad_signature = jwt.encode(claims, stranger, algorithm="RS256", headers={"kid": header["kid"]})
    assert "签名无效" in await refused(
        client, "users.token_invalid", type="apple", access_token=bad_signature
    )
    unknown_kid = jwt.encode(claims, stranger, algorithm="RS256", headers={"kid": "NOSUCHKID"})
    assert "密钥未知" in await refused(client, "users.token_invalid", type="apple", access_token=unknown_kid)
    unsigned = f"{_b64({'alg': 'none', 'kid': header['kid']})}.{_b64(claims)}."
    assert "RS256" in await refused(client, "users.token_invalid", type="apple", access_token=unsigned)
    # HS256 keyed with Apple's public key, the classic confusion forgery.
    published = (await client.get(f"{APPLE}/auth/keys")).json()["keys"]
    public = jwt.algorithms.RSAAlgorithm.from_jwk(json.dumps(published[0]))
    pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)  # type: ignore[union-attr]
    signing_input = f"{_b64({'alg': 'HS256', 'kid': published[0]['kid'], 'typ': 'JWT'})}.{_b64(claims)}"
    import hashlib
    import hmac

    mac = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    hs256 = f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
    assert "RS256" in await refused(client, "users.token_invalid", type="apple", access_token=hs256)
    # The genuine one still logs in.
    await logged_in(client, type="apple", access_token=genuine)


@asynccontextmanager
async def own_sandbox(server: Server, folder: Path) -> AsyncIterator[tuple[httpx.AsyncClient, TestClock]]:
    """A server with a sandbox folder (and Apple keys) of its own: rotation touches no other test."""
    port, clock = free_port(), TestClock()
    settings = make_settings(server.backend, folder, port)
    _app, uv, task = await start_server(settings, clock, port)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            yield http, clock
    finally:
        uv.should_exit = True
        await task


async def test_apple_key_rotation_and_the_refetch_limit(server: Server, tmp_path: Path) -> None:
    async with own_sandbox(server, tmp_path) as (http, clock):

        async def fetches() -> int:
            found: int = (await http.get(f"{APPLE}/_test/counts")).json()["auth/keys"]
            return found

        await logged_in(http, type="apple", access_token=await apple_token(http))
        assert await fetches() == 1
        await logged_in(http, type="apple", access_token=await apple_token(http, key="previous"))
        assert await fetches() == 1  # both published keys came in the first fetch
        rotated = (await http.post(f"{APPLE}/_test/rotate")).json()
        new_token = await apple_token(http)
        assert jwt.get_unverified_header(new_token)["kid"] == rotated["kid"]
        # Within 30 s of the last fetch an unknown kid fetches nothing.
        await refused(http, "users.token_invalid", type="apple", access_token=new_token)
        assert await fetches() == 1
        clock.advance(31)
        new_token = await apple_token(http)
        await logged_in(http, type="apple", access_token=new_token)  # one refetch, then it verifies
        assert await fetches() == 2
        # The former current key stays published: its tokens still verify, with no fetch.
        await logged_in(http, type="apple", access_token=await apple_token(http, key="previous"))
        stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        for kid in ("FORGED1", "FORGED2", "FORGED3"):
            forged = jwt.encode(claims_of(new_token), stranger, algorithm="RS256", headers={"kid": kid})
            await refused(http, "users.token_invalid", type="apple", access_token=forged)
        assert await fetches() == 2  # a stream of unknown kids: not one fetch more
        clock.advance(31)
        await refused(http, "users.token_invalid", type="apple", access_token=forged)
        assert await fetches() == 3
        # The console's forms: mint shows a token that logs in; rotate answers 303 back to the page.
        page = await http.post(f"{APPLE}/mint", data={"sub": "000777.console.1", "email": "c@example.com"})
        assert page.status_code == 200 and 'id="identity-token"' in page.text
        minted = page.text.split('<pre id="identity-token">', 1)[1].split("</pre>", 1)[0]
        assert claims_of(minted)["email"] == "c@example.com"
        rotate = await http.post(f"{APPLE}/rotate")
        assert rotate.status_code == 303
        assert len((await http.get(f"{APPLE}/auth/keys")).json()["keys"]) == 2


# ------------------------------------------------------------------ the platforms out of reach


class BlackHole:
    """A TCP server that accepts and never answers: a platform that hangs."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def close(self) -> None:
        self.sock.close()


async def test_a_hanging_platform_answers_within_5_seconds(client: httpx.AsyncClient, server: Server) -> None:
    hole = BlackHole()
    qq = await qq_token(client)
    apple = await apple_token(client)
    try:
        overrides: dict[str, Any] = {
            "wechat": {"api_base": hole.url},
            "qq": {"api_base": hole.url + "/qq"},
            "apple": {"keys_url": hole.url + "/apple/auth/keys"},
        }
        async with other_server(server, **overrides) as cut_off:
            for values in (
                {"type": "weixin", "openid": "o" + "x" * 27, "access_token": "t" * 32},
                {"type": "qq", "access_token": qq["access_token"]},
                {"type": "apple", "access_token": apple},
            ):
                started = time.monotonic()
                body = (await cut_off.post("/api/users", data=values)).json()
                assert time.monotonic() - started < 5.0, values["type"]
                assert body == {
                    "info": "登录服务暂时无法访问，请稍后再试",
                    "status": 0,
                    "code": "users.unavailable",
                }
    finally:
        hole.close()


async def test_not_configured_without_the_sandbox(server: Server) -> None:
    async with other_server(server, sandbox=False) as plain:
        for kind, setting in (("weixin", "WECHAT_APP"), ("qq", "QQ"), ("apple", "APPLE")):
            body = (
                await plain.post("/api/users", data={"type": kind, "openid": "o1", "access_token": "t"})
            ).json()
            assert body["status"] == 0 and body["code"] == "users.not_configured" and setting in body["info"]


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("values", "code"),
    [
        ({"type": "weibo", "access_token": "t"}, "users.type_invalid"),
        ({"type": "²", "access_token": "t"}, "users.type_invalid"),
        ({"type": 1, "access_token": "t"}, "users.type_invalid"),
        ({"type": "qq"}, "param.missing"),
        ({"type": "qq", "access_token": ["a", "b"]}, "param.invalid"),
        ({"type": "qq", "access_token": {"a": 1}}, "param.invalid"),
        ({"type": "apple", "access_token": "a\x00b"}, "param.invalid"),
        ({"type": "apple", "access_token": "x" * 5000}, "param.too_long"),
        ({"type": "apple", "openid": "o" * 129, "access_token": "t"}, "param.too_long"),
        ({"type": "apple", "access_token": "²²²"}, "users.token_invalid"),
        ({"type": "apple", "access_token": "a.b.c"}, "users.token_invalid"),
        ({"type": "apple", "access_token": "x" * 4000}, "users.token_invalid"),
        ({"type": "qq", "access_token": "²"}, "users.token_invalid"),
        ({"type": "weixin", "openid": "o²", "access_token": "²"}, "users.token_invalid"),
    ],
)
async def test_bad_input_is_answered_never_a_500(
    client: httpx.AsyncClient, values: dict[str, Any], code: str
) -> None:
    answer = await client.post("/api/users", json=values)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["status"] == 0 and body["code"] == code and body["info"], body


async def test_a_huge_or_odd_apple_token_header_is_refused(client: httpx.AsyncClient) -> None:
    for header in ({"alg": "RS256"}, {"alg": "RS256", "kid": 7}, {"alg": "RS256", "kid": "k" * 2000}, [1, 2]):
        encoded = base64.urlsafe_b64encode(json.dumps(header).encode()).rstrip(b"=").decode()
        token = f"{encoded}.{_b64({'sub': 'x'})}.c2ln"
        await refused(client, "users.token_invalid", type="apple", access_token=token)


# ------------------------------------------------------------------ the console


async def test_the_console_mints_qq_tokens_and_shows_both_stand_ins(
    client: httpx.AsyncClient, server: Server
) -> None:
    console = (await client.get(f"{MOUNT}/")).text
    assert "QQ Connect" in console and "Sign in with Apple" in console
    page = await client.get(QQ)
    assert page.status_code == 200 and "SANDBOX" in page.text
    name = person()
    minted = await client.post(f"{QQ}/mint", data={"name": name, "nickname": "表单用户"})
    assert minted.status_code == 200 and 'id="minted"' in minted.text
    token = minted.text.split("<th>access_token</th><td><code>", 1)[1].split("</code>", 1)[0]
    profile = await logged_in(client, type="qq", access_token=token)
    assert profile["nickname"] == "表单用户"
    wechat_page = await client.post(f"{MOUNT}/wechat-app/mint", data={"name": name, "nickname": "APP用户"})
    assert wechat_page.status_code == 200 and 'id="minted"' in wechat_page.text
    cells = wechat_page.text.split('id="minted"', 1)[1].split("<code>")
    openid, token = cells[1].split("</code>", 1)[0], cells[2].split("</code>", 1)[0]
    app_profile = await logged_in(client, type="weixin", openid=openid, access_token=token)
    assert app_profile["nickname"] == "APP用户"
    apple_page = await client.get(APPLE)
    assert apple_page.status_code == 200 and "rotate" in apple_page.text
    ring = next(s for s in sandbox_resources(server) if isinstance(s, AppleStandIn)).ring
    assert len(ring.keys()) == 2


def sandbox_resources(server: Server) -> list[Any]:
    from starlette.routing import Mount

    for route in server.app.routes:
        if isinstance(route, Mount) and route.path == MOUNT:
            return list(route.app.state.sandbox.resources.values())  # type: ignore[attr-defined]
    raise AssertionError("the sandbox is not mounted")
