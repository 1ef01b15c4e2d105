"""wechat.index/: the URL check, pushes in plaintext, compatible and safe mode, every type, replies,
duplicates across workers and machines, the referrer, refusals, bad input and the 5 s deadline.

Pushes are built here by hand and encrypted with wechatpy (an independent WXBizMsgCrypt), and
encrypted replies are opened with wechatpy too, so the service is checked against another
implementation of WeChat's side, not against itself.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
import xmltodict
from sqlalchemy import text
from test_sandbox_payments import sandbox_state
from wechatpy.crypto import WeChatCrypto

from conftest import Server, other_server
from mallgate.channels import wechat_crypto
from mallgate.channels.wechat_messages import REGISTRY, GenericEvent, GenericMessage, parse
from mallgate.db.session import engine_for
from mallgate.sandbox.app import MOUNT
from mallgate.services import wechat_push
from mallgate.settings import WechatMpSettings
from support import ADMIN, unique

PATHS = ("/wechat.index/", "/wechat.index")
MODES = ("plaintext", "compatible", "safe")
GH = "gh_0000000000a1"

# One push of every type, the fields as WeChat's docs show them (the common ones are added).
SAMPLES: dict[str, str] = {
    "text": "<MsgType><![CDATA[text]]></MsgType><Content><![CDATA[{word}]]></Content><MsgId>{msg_id}</MsgId>",
    "image": "<MsgType><![CDATA[image]]></MsgType><PicUrl><![CDATA[https://e.com/p.jpg]]></PicUrl>"
    "<MediaId><![CDATA[m1]]></MediaId><MsgId>{msg_id}</MsgId>",
    "voice": "<MsgType><![CDATA[voice]]></MsgType><MediaId><![CDATA[m2]]></MediaId>"
    "<Format><![CDATA[amr]]></Format>"
    "<Recognition><![CDATA[腾讯]]></Recognition><MsgId>{msg_id}</MsgId>",
    "video": "<MsgType><![CDATA[video]]></MsgType><MediaId><![CDATA[m3]]></MediaId>"
    "<ThumbMediaId><![CDATA[t3]]></ThumbMediaId><MsgId>{msg_id}</MsgId>",
    "shortvideo": "<MsgType><![CDATA[shortvideo]]></MsgType><MediaId><![CDATA[m4]]></MediaId>"
    "<ThumbMediaId><![CDATA[t4]]></ThumbMediaId><MsgId>{msg_id}</MsgId>",
    "location": "<MsgType><![CDATA[location]]></MsgType><Location_X>23.134521</Location_X>"
    "<Location_Y>113.358803</Location_Y><Scale>20</Scale><Label><![CDATA[位置信息]]></Label><MsgId>{msg_id}</MsgId>",
    "link": "<MsgType><![CDATA[link]]></MsgType><Title><![CDATA[公众平台官网链接]]></Title>"
    "<Description><![CDATA[公众平台官网链接]]></Description><Url><![CDATA[https://mp.weixin.qq.com/]]></Url>"
    "<MsgId>{msg_id}</MsgId>",
    "event:subscribe": "<MsgType><![CDATA[event]]></MsgType><Event><![CDATA[subscribe]]></Event>",
    "event:unsubscribe": "<MsgType><![CDATA[event]]></MsgType><Event><![CDATA[unsubscribe]]></Event>",
    "event:SCAN": "<MsgType><![CDATA[event]]></MsgType><Event><![CDATA[SCAN]]></Event>"
    "<EventKey><![CDATA[123123]]></EventKey><Ticket><![CDATA[TICKET]]></Ticket>",
    "event:LOCATION": "<MsgType><![CDATA[event]]></MsgType><Event><![CDATA[LOCATION]]></Event>"
    "<Latitude>23.137466</Latitude><Longitude>113.352425</Longitude><Precision>119.385040</Precision>",
    "event:CLICK": "<MsgType><![CDATA[event]]></MsgType><Event><![CDATA[CLICK]]></Event>"
    "<EventKey><![CDATA[V1001_TODAY_MUSIC]]></EventKey>",
    "event:VIEW": "<MsgType><![CDATA[event]]></MsgType><Event><![CDATA[VIEW]]></Event>"
    "<EventKey><![CDATA[https://www.qq.com/]]></EventKey><MenuId>1</MenuId>",
    "event:TEMPLATESENDJOBFINISH": "<MsgType><![CDATA[event]]></MsgType>"
    "<Event><![CDATA[TEMPLATESENDJOBFINISH]]></Event><MsgID>{msg_id}</MsgID><Status><![CDATA[success]]></Status>",
}


def msg_id() -> int:
    return secrets.randbits(62)


def openid() -> str:
    return "o" + secrets.token_hex(13)


def xml_of(inner: str, *, user: str, at: int | None = None) -> str:
    at = int(time.time()) if at is None else at
    return (
        f"<xml><ToUserName><![CDATA[{GH}]]></ToUserName><FromUserName><![CDATA[{user}]]></FromUserName>"
        f"<CreateTime>{at}</CreateTime>{inner}</xml>"
    )


def sample(key: str, *, user: str, word: str = "hello", at: int | None = None) -> str:
    return xml_of(SAMPLES[key].format(word=word, msg_id=msg_id()), user=user, at=at)


@dataclass
class WeChat:
    """WeChat's side of the push, by hand and with wechatpy's crypto."""

    server: Server
    client: httpx.AsyncClient
    token: str
    aes_key: str
    app_id: str

    @property
    def crypto(self) -> WeChatCrypto:
        return WeChatCrypto(self.token, self.aes_key, self.app_id)

    async def push(
        self,
        xml: str | bytes,
        mode: str = "plaintext",
        *,
        path: str = "/wechat.index/",
        timestamp: str | None = None,
        nonce: str | None = None,
        signature: str | None = None,
        msg_signature: str | None = None,
        app_id: str | None = None,
        http: httpx.AsyncClient | None = None,
    ) -> httpx.Response:
        timestamp = timestamp or str(int(self.server.clock.now()))
        nonce = nonce or str(secrets.randbelow(10**9))
        query = {
            "signature": signature or wechat_crypto.signature(self.token, timestamp, nonce),
            "timestamp": timestamp,
            "nonce": nonce,
            "openid": "o",
        }
        body = xml.encode() if isinstance(xml, str) else xml
        if mode != "plaintext":
            crypto = WeChatCrypto(self.token, self.aes_key, app_id or self.app_id)
            sealed = xmltodict.parse(crypto.encrypt_message(body.decode(), nonce, timestamp))["xml"]
            query["encrypt_type"] = "aes"
            query["msg_signature"] = msg_signature or sealed["MsgSignature"]
            if mode == "safe":
                to_user = f"<ToUserName><![CDATA[{GH}]]></ToUserName>"
                outer = f"<xml>{to_user}<Encrypt><![CDATA[{sealed['Encrypt']}]]></Encrypt></xml>"
            else:  # compatible: the plaintext fields and the Encrypt
                outer = (
                    body.decode().removesuffix("</xml>")
                    + f"<Encrypt><![CDATA[{sealed['Encrypt']}]]></Encrypt></xml>"
                )
            body = outer.encode()
        http = http or self.client
        base = self.server.settings.base_path
        return await http.post(
            f"{base}{path}?{urlencode(query)}", content=body, headers={"Content-Type": "text/xml"}
        )

    def reply(self, answer: httpx.Response, mode: str) -> dict[str, Any] | None:
        """The reply as a dict, None for `success`; an encrypted one checked and opened by wechatpy."""
        assert answer.status_code == 200, answer.text
        if answer.text == "success":
            return None
        if mode == "plaintext":
            assert "<Encrypt>" not in answer.text
            return dict(xmltodict.parse(answer.text)["xml"])
        sealed = xmltodict.parse(answer.text)["xml"]
        assert set(sealed) == {"Encrypt", "MsgSignature", "TimeStamp", "Nonce"}
        opened = self.crypto.decrypt_message(
            answer.text, sealed["MsgSignature"], sealed["TimeStamp"], sealed["Nonce"]
        )
        return dict(xmltodict.parse(opened)["xml"])


def _runtime(server: Server) -> Any:
    return server.app.state.runtime


@pytest.fixture
def wechat(server: Server, client: httpx.AsyncClient) -> WeChat:
    mp = _runtime(server).settings.wechat_mp
    return WeChat(server, client, mp.token, mp.aes_key, mp.app_id)


@pytest.fixture
async def rules(client: httpx.AsyncClient) -> AsyncIterator[list[int]]:
    """Reply rules a test creates, deleted after it (the database is shared by the whole run)."""
    made: list[int] = []
    yield made
    for rule_id in made:
        await client.delete(f"/admin/wechat/replies/{rule_id}", headers=ADMIN)


async def add_rule(client: httpx.AsyncClient, made: list[int], **fields: Any) -> dict[str, Any]:
    answer = (await client.post("/admin/wechat/replies", json=fields, headers=ADMIN)).json()
    assert answer["status"] == 1, answer
    made.append(answer["data"]["id"])
    data: dict[str, Any] = answer["data"]
    return data


async def rows(server: Server, sql: str, **params: Any) -> list[Any]:
    engine = engine_for(server.backend.url)
    try:
        async with engine.connect() as conn:
            return list((await conn.execute(text(sql), params)).all())
    finally:
        await engine.dispose()


async def follower(server: Server, user: str) -> list[Any]:
    return await rows(
        server, "SELECT referrer, unsubscribed_at FROM wechat_followers WHERE openid = :o", o=user
    )


# ---------------------------------------------------------------------------------------------
# the URL check


@pytest.mark.parametrize("path", PATHS)
async def test_url_check_echoes_only_under_a_good_signature(wechat: WeChat, path: str) -> None:
    api = wechat.server.settings.base_path + path
    now = str(int(wechat.server.clock.now()))
    good = {"timestamp": now, "nonce": "1514711492", "echostr": "4375120948345356249"}
    good["signature"] = wechat_crypto.signature(wechat.token, now, "1514711492")
    answer = await wechat.client.get(api, params=good)
    assert answer.status_code == 200 and answer.text == "4375120948345356249"
    assert answer.headers["content-type"].startswith("text/plain")
    bad = await wechat.client.get(
        api, params={**good, "signature": "f464b24fc39322e44b38aa78f5edd27bd1441696"}
    )
    assert bad.status_code == 403 and "4375120948345356249" not in bad.text
    stale_ts = str(int(wechat.server.clock.now()) - 301)
    stale = {
        **good,
        "timestamp": stale_ts,
        "signature": wechat_crypto.signature(wechat.token, stale_ts, "1514711492"),
    }
    answer = await wechat.client.get(api, params=stale)
    assert answer.status_code == 403 and answer.text == "timestamp expired"


async def test_not_configured_answers_so(server: Server) -> None:
    async with other_server(server, sandbox=False) as http:
        answer = await http.get(f"{server.settings.base_path}/wechat.index/", params={"echostr": "x"})
        assert answer.status_code == 404 and answer.text == "wechat_mp.not_configured"
        answer = await http.post(f"{server.settings.base_path}/wechat.index", content=b"<xml/>")
        assert answer.status_code == 404 and answer.text == "wechat_mp.not_configured"


# ---------------------------------------------------------------------------------------------
# every type, every mode


def test_every_type_has_its_class_and_fields() -> None:
    user = openid()
    for key, cls in REGISTRY.items():
        push = parse(sample(key, user=user))
        assert type(push) is cls and push.from_user == user and push.to_user == GH, key
    location = parse(sample("location", user=user))
    assert location.latitude == pytest.approx(23.134521) and location.label == "位置信息"  # type: ignore[attr-defined]
    template = parse(sample("event:TEMPLATESENDJOBFINISH", user=user))
    assert template.status == "success" and template.msg_id  # type: ignore[attr-defined]
    assert parse(sample("event:SCAN", user=user)).scene == "123123"  # type: ignore[attr-defined]
    assert set(REGISTRY) == set(SAMPLES)
    unknown = parse(xml_of("<MsgType>miniprogrampage</MsgType><Title>t</Title><MsgId>1</MsgId>", user=user))
    assert type(unknown) is GenericMessage and unknown.fields["Title"] == "t"
    event = parse(
        xml_of(
            "<MsgType>event</MsgType><Event>scancode_push</Event><ScanCodeInfo><ScanType>qrcode</ScanType></ScanCodeInfo>",
            user=user,
        )
    )
    assert type(event) is GenericEvent and event.fields["ScanCodeInfo/ScanType"] == "qrcode"


@pytest.mark.parametrize("mode", MODES)
async def test_every_message_and_event_type_through_the_app(
    server: Server, wechat: WeChat, mode: str
) -> None:
    user = openid()
    for key in SAMPLES:
        answer = await wechat.push(sample(key, user=user), mode)
        assert answer.status_code == 200 and answer.text == "success", (key, answer.text)
    handled = await rows(server, "SELECT msg_type, outcome FROM wechat_pushes WHERE from_user = :u", u=user)
    assert sorted(handled) == sorted((key, "replied") for key in SAMPLES)


@pytest.mark.parametrize("mode", MODES)
async def test_an_unknown_type_is_a_generic_message_answered_success(
    server: Server, wechat: WeChat, mode: str
) -> None:
    user = openid()
    unknown = xml_of(f"<MsgType><![CDATA[miniprogrampage]]></MsgType><MsgId>{msg_id()}</MsgId>", user=user)
    assert (await wechat.push(unknown, mode)).text == "success"
    event = xml_of("<MsgType>event</MsgType><Event>scancode_waitmsg</Event><EventKey>k</EventKey>", user=user)
    assert (await wechat.push(event, mode)).text == "success"
    handled = await rows(server, "SELECT msg_type FROM wechat_pushes WHERE from_user = :u", u=user)
    assert sorted(r[0] for r in handled) == ["generic:event:scancode_waitmsg", "generic:miniprogrampage"]


# ---------------------------------------------------------------------------------------------
# replies


@pytest.mark.parametrize("mode", MODES)
async def test_replies_in_each_mode(
    wechat: WeChat, client: httpx.AsyncClient, rules: list[int], mode: str
) -> None:
    exact, part = unique("kw"), unique("part")
    await add_rule(client, rules, kind="keyword", match="exact", keyword=exact, type="text", text="精确回复")
    await add_rule(
        client, rules, kind="keyword", match="contains", keyword=part, type="image", media_id="MEDIA1"
    )
    news_word = unique("news")
    articles = [
        {"title": "标题", "description": "d", "pic_url": "https://e.com/a.jpg", "url": "https://e.com/a"}
    ]
    await add_rule(
        client, rules, kind="keyword", match="exact", keyword=news_word, type="news", articles=articles * 2
    )
    user = openid()

    reply = wechat.reply(await wechat.push(sample("text", user=user, word=f" {exact.lower()} "), mode), mode)
    assert reply is not None and reply["MsgType"] == "text" and reply["Content"] == "精确回复"
    assert reply["ToUserName"] == user and reply["FromUserName"] == GH and int(reply["CreateTime"]) > 0

    reply = wechat.reply(await wechat.push(sample("text", user=user, word=f"我想要 {part} 谢谢"), mode), mode)
    assert reply is not None and reply["MsgType"] == "image" and reply["Image"] == {"MediaId": "MEDIA1"}

    reply = wechat.reply(await wechat.push(sample("text", user=user, word=news_word), mode), mode)
    assert reply is not None and reply["MsgType"] == "news"
    assert reply["ArticleCount"] == "1"  # to a user's message WeChat shows one article
    assert (
        reply["Articles"]["item"]["Title"] == "标题" and reply["Articles"]["item"]["Url"] == "https://e.com/a"
    )

    # An exact rule does not fire on a text that merely contains it; no rule: success.
    assert wechat.reply(await wechat.push(sample("text", user=user, word=f"x{exact}x"), mode), mode) is None


@pytest.mark.parametrize("mode", MODES)
async def test_subscribe_welcome_in_each_mode(
    wechat: WeChat, client: httpx.AsyncClient, rules: list[int], mode: str
) -> None:
    articles = [{"title": f"欢迎 {i}", "url": f"https://e.com/{i}"} for i in range(3)]
    await add_rule(client, rules, kind="subscribe", type="news", articles=articles)
    reply = wechat.reply(await wechat.push(sample("event:subscribe", user=openid()), mode), mode)
    assert reply is not None and reply["MsgType"] == "news" and reply["ArticleCount"] == "3"
    await add_rule(client, rules, kind="subscribe", type="text", text="欢迎关注")  # the newest wins
    reply = wechat.reply(await wechat.push(sample("event:subscribe", user=openid()), mode), mode)
    assert reply is not None and reply["Content"] == "欢迎关注"
    # Other events get no welcome.
    assert wechat.reply(await wechat.push(sample("event:CLICK", user=openid()), mode), mode) is None


async def test_the_replies_admin_api(client: httpx.AsyncClient, rules: list[int]) -> None:
    made = await add_rule(client, rules, kind="keyword", keyword=unique("kw"), text="hi")
    assert made["match"] == "exact" and made["type"] == "text" and made["content"] == {"text": "hi"}
    listed = (await client.get("/admin/wechat/replies", headers=ADMIN)).json()["data"]
    assert made in listed
    for bad, field in (
        ({"kind": "other", "text": "x"}, "kind"),
        ({"kind": "keyword", "keyword": "k", "match": "regex", "text": "x"}, "match"),
        ({"kind": "keyword", "text": "x"}, "keyword"),
        ({"kind": "subscribe", "type": "voice"}, "type"),
        ({"kind": "subscribe", "type": "news", "articles": "[]"}, "articles"),
        (
            {"kind": "subscribe", "type": "news", "articles": [{"title": "t", "url": "javascript:x"}]},
            "articles",
        ),
        ({"kind": "subscribe", "type": "image"}, "media_id"),
    ):
        answer = (await client.post("/admin/wechat/replies", json=bad, headers=ADMIN)).json()
        assert answer["status"] == 0 and answer["code"].startswith("param.") and answer["field"] == field, bad
    assert (await client.get("/admin/wechat/replies")).status_code == 401
    gone = await client.delete(f"/admin/wechat/replies/{made['id']}", headers=ADMIN)
    assert gone.json()["status"] == 1
    again = (await client.delete(f"/admin/wechat/replies/{made['id']}", headers=ADMIN)).json()
    assert again["code"] == "wechat.reply_not_found"


# ---------------------------------------------------------------------------------------------
# duplicates


@pytest.fixture
def handled(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every push `wechat_push.handle` runs, on any server of this process."""
    calls: list[str] = []
    real = wechat_push.handle

    async def counting(runtime: Any, push: Any) -> str:
        calls.append(push.from_user)
        return await real(runtime, push)

    monkeypatch.setattr(wechat_push, "handle", counting)
    yield calls


async def stored_pushes(wechat: WeChat, user: str) -> int:
    return len(await rows(wechat.server, "SELECT dedupe_key FROM wechat_pushes WHERE from_user = :u", u=user))


@pytest.mark.parametrize("mode", MODES)
async def test_a_retried_push_is_handled_once_and_answered_alike(
    wechat: WeChat, client: httpx.AsyncClient, rules: list[int], handled: list[str], mode: str
) -> None:
    word = unique("dup")
    await add_rule(client, rules, kind="keyword", keyword=word, text="只回一次")
    user = openid()
    push = sample("text", user=user, word=word)
    replies = [wechat.reply(await wechat.push(push, mode), mode) for _ in range(4)]  # WeChat's retries
    assert all(r is not None and r["Content"] == "只回一次" for r in replies)
    # A user's message changes nothing but its reply: it is looked up again for a retry (a read),
    # and claimed once, with the reply, in one write.
    assert await stored_pushes(wechat, user) == 1
    event = sample("event:CLICK", user=user)
    for _ in range(3):
        assert (await wechat.push(event, mode)).text == "success"
    assert handled.count(user) == 4 + 1  # an event is handled only by the delivery that claims it
    assert await stored_pushes(wechat, user) == 2


async def test_concurrent_deliveries_across_two_servers_are_handled_once(
    server: Server, wechat: WeChat, client: httpx.AsyncClient, rules: list[int], handled: list[str]
) -> None:
    await add_rule(client, rules, kind="subscribe", type="text", text="欢迎")
    user = openid()
    push = sample("event:subscribe", user=user)
    async with other_server(server) as second:
        answers = await asyncio.gather(
            *(wechat.push(push, "safe", http=second if i % 2 else None) for i in range(6))
        )
    replies = [wechat.reply(a, "safe") for a in answers]
    assert handled.count(user) == 1
    # The first delivery gets the welcome; the others the same reply, or success while it was running.
    assert any(r is not None for r in replies)
    assert all(r is None or r["Content"] == "欢迎" for r in replies)
    assert len(await follower(server, user)) == 1


# ---------------------------------------------------------------------------------------------
# the referrer


async def test_the_referrer_of_a_new_follower_is_recorded_once(server: Server, wechat: WeChat) -> None:
    user = openid()
    key = unique("spread")
    qr = (
        "<MsgType>event</MsgType><Event>subscribe</Event>"
        "<EventKey><![CDATA[qrscene_{}]]></EventKey><Ticket>T</Ticket>"
    )
    assert (await wechat.push(xml_of(qr.format(key), user=user), "safe")).status_code == 200
    assert await follower(server, user) == [(key, None)]
    await wechat.push(sample("event:unsubscribe", user=user), "safe")
    assert (await follower(server, user))[0][1] is not None
    # Back through another QR code: still the first referrer, following again.
    await wechat.push(xml_of(qr.format("other"), user=user, at=int(time.time()) + 1), "safe")
    assert await follower(server, user) == [(key, None)]
    scan = "<MsgType>event</MsgType><Event>SCAN</Event><EventKey><![CDATA[{}]]></EventKey><Ticket>T</Ticket>"
    await wechat.push(xml_of(scan.format("third"), user=user, at=int(time.time()) + 2), "safe")
    assert await follower(server, user) == [(key, None)]
    # A follower never seen before (followed before this service): the scanned scene is its referrer.
    old = openid()
    await wechat.push(xml_of(scan.format("42"), user=old), "plaintext")
    assert await follower(server, old) == [("42", None)]
    plain = openid()
    await wechat.push(sample("event:subscribe", user=plain), "compatible")
    assert await follower(server, plain) == [("", None)]


# ---------------------------------------------------------------------------------------------
# refusals


@pytest.mark.parametrize("mode", MODES)
async def test_bad_signatures_and_stale_timestamps_are_refused(wechat: WeChat, mode: str) -> None:
    push = sample("text", user=openid())
    bad = await wechat.push(push, mode, signature="0" * 40)
    assert bad.status_code == 403 and bad.text == "invalid signature"
    now = int(wechat.server.clock.now())
    for stale in (now - 301, now + 301, 0):
        answer = await wechat.push(push, mode, timestamp=str(stale))
        assert answer.status_code == 403 and answer.text == "timestamp expired"
    answer = await wechat.push(push, mode, timestamp="1714036504.5")
    assert answer.status_code == 403
    # Just inside the window: taken.
    assert (await wechat.push(push, mode, timestamp=str(now - 290))).text == "success"


@pytest.mark.parametrize("mode", ["compatible", "safe"])
async def test_an_encrypted_push_not_ours_is_refused(wechat: WeChat, mode: str) -> None:
    push = sample("text", user=openid())
    answer = await wechat.push(push, mode, msg_signature="0" * 40)
    assert answer.status_code == 403 and answer.text == "invalid msg_signature"
    answer = await wechat.push(push, mode, app_id="wx1234567890abcdef")
    assert answer.status_code == 403 and answer.text == "appid mismatch"


async def test_the_clock_moving_on_makes_a_captured_push_stale(wechat: WeChat) -> None:
    push = sample("text", user=openid())
    ts = str(int(wechat.server.clock.now()))
    wechat.server.clock.advance(301)
    answer = await wechat.push(push, "safe", timestamp=ts)
    assert answer.status_code == 403 and answer.text != "success"


async def test_safe_mode_only_refuses_plaintext(server: Server, wechat: WeChat) -> None:
    async with other_server(server, wechat_mp=WechatMpSettings(safe_mode_only=True)) as http:
        plain = await wechat.push(sample("text", user=openid()), "plaintext", http=http)
        assert plain.status_code == 403 and plain.text == "plaintext push refused"
        assert (await wechat.push(sample("text", user=openid()), "safe", http=http)).text == "success"
        assert (await wechat.push(sample("text", user=openid()), "compatible", http=http)).text == "success"


# ---------------------------------------------------------------------------------------------
# bad input

DOCTYPES = (
    '<?xml version="1.0"?><!DOCTYPE xml [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;&a;">]>'
    "<xml><Content>&b;</Content></xml>",
    '<!DOCTYPE xml [<!ENTITY x SYSTEM "file:///etc/passwd">]><xml><ToUserName>&x;</ToUserName></xml>',
    "<!DOCTYPE xml><xml><ToUserName>a</ToUserName></xml>",
)


@pytest.mark.parametrize("mode", MODES)
async def test_xml_with_a_doctype_or_entities_is_refused(wechat: WeChat, mode: str) -> None:
    for body in DOCTYPES:
        answer = await wechat.push(body, mode)
        assert answer.status_code == 400 and answer.text == "xml refused", (mode, body)


@pytest.mark.parametrize("mode", MODES)
async def test_malformed_or_incomplete_xml_is_answered_success(
    server: Server, wechat: WeChat, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="mallgate.wechat_mp")
    user = openid()
    for body in (
        "<xml><ToUserName>a</ToUserName>",
        "not xml at all",
        "<notxml><a>1</a></notxml>",
        xml_of("<MsgType>text</MsgType><MsgId>1</MsgId>", user=user),  # no Content
        xml_of("<MsgType>text</MsgType><Content>x</Content><MsgId>abc</MsgId>", user=user),
        "<xml><MsgType>text</MsgType><Content>no sender</Content></xml>",
        xml_of(
            "<MsgType>location</MsgType><Location_X>north</Location_X><Location_Y>1</Location_Y>"
            "<Scale>1</Scale><MsgId>1</MsgId>",
            user=user,
        ),
        xml_of("<MsgType>text</MsgType><Content>a</Content><Content>b</Content><MsgId>2</MsgId>", user=user),
    ):
        if mode != "plaintext" and not body.startswith("<xml>"):
            continue  # wechatpy cannot wrap what is not XML; the outer case is the plaintext one
        answer = await wechat.push(body, mode)
        assert answer.status_code == 200 and answer.text == "success", (mode, body)
    assert await rows(server, "SELECT id FROM wechat_pushes WHERE from_user = :u", u=user) == []
    logged = [r.getMessage() for r in caplog.records if r.name == "mallgate.wechat_mp"]
    assert any("<Content> missing" in m for m in logged) and any("repeated element" in m for m in logged)


async def test_an_encrypted_push_without_encrypt_or_with_garbage(wechat: WeChat) -> None:
    user = openid()
    now = str(int(wechat.server.clock.now()))
    query = {"timestamp": now, "nonce": "1", "signature": wechat_crypto.signature(wechat.token, now, "1")}
    api = wechat.server.settings.base_path + "/wechat.index/"
    no_encrypt = await wechat.client.post(
        f"{api}?{urlencode({**query, 'encrypt_type': 'aes', 'msg_signature': 'x'})}",
        content=sample("text", user=user),
    )
    assert no_encrypt.status_code == 200 and no_encrypt.text == "success"
    garbage = "QUFBQQ=="
    signed = wechat_crypto.msg_signature(wechat.token, now, "1", garbage)
    answer = await wechat.client.post(
        f"{api}?{urlencode({**query, 'encrypt_type': 'aes', 'msg_signature': signed})}",
        content=f"<xml><Encrypt>{garbage}</Encrypt></xml>",
    )
    assert answer.status_code == 400 and answer.text == "cannot decrypt"


async def test_an_oversized_body_is_refused(wechat: WeChat) -> None:
    body = sample("text", user=openid(), word="x" * (65 * 1024))
    answer = await wechat.push(body)
    assert answer.status_code == 413


# ---------------------------------------------------------------------------------------------
# the deadline


async def test_a_push_that_cannot_be_claimed_is_not_answered_success(
    wechat: WeChat, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database down (or the claims' queue full): WeChat must send it again, so no `success`."""

    async def unavailable(*_args: Any, **_kwargs: Any) -> bool:
        raise wechat_push.NotClaimed("unavailable")

    monkeypatch.setattr(wechat_push, "claim", unavailable)
    for kind in ("text", "event:CLICK"):
        answer = await wechat.push(sample(kind, user=openid(), word=unique("down")), "safe")
        assert (answer.status_code, answer.text) == (503, "try again")


async def test_a_slow_handler_is_answered_success_and_finishes_afterwards(
    server: Server,
    wechat: WeChat,
    client: httpx.AsyncClient,
    rules: list[int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    word = unique("slow")
    await add_rule(client, rules, kind="keyword", keyword=word, text="太慢了")
    release = asyncio.Event()
    real = wechat_push.find_reply

    async def slow(runtime: Any, push: Any) -> Any:
        await release.wait()  # as long as the test says: past any deadline
        return await real(runtime, push)

    monkeypatch.setattr(wechat_push, "find_reply", slow)
    user = openid()
    push = sample("text", user=user, word=word)
    async with other_server(server, wechat_mp=WechatMpSettings(reply_deadline_seconds=0.2)) as http:
        answer = await wechat.push(push, "safe", http=http)
        assert answer.status_code == 200 and answer.text == "success"
        # A message is claimed together with its reply, so nothing is stored while it is looked up.
        assert await rows(server, "SELECT outcome FROM wechat_pushes WHERE from_user = :u", u=user) == []
        release.set()
        for _ in range(200):
            done = await rows(server, "SELECT outcome, reply FROM wechat_pushes WHERE from_user = :u", u=user)
            if done and done[0][0] not in ("handling", "replied"):
                break
            await asyncio.sleep(0.02)
        assert done == [("late", "")]  # finished; WeChat was told success, and so are its retries
        assert (await wechat.push(push, "safe", http=http)).text == "success"


# ---------------------------------------------------------------------------------------------
# the sandbox's push form


async def test_the_sandbox_pushes_every_type_in_every_mode(
    server: Server, client: httpx.AsyncClient, rules: list[int]
) -> None:
    word = unique("sbx")
    await add_rule(client, rules, kind="keyword", keyword=word, text="沙箱回复")
    for mode in MODES:
        sent = (
            await client.post(f"{MOUNT}/wechat-mp/push", json={"kind": "text", "mode": mode, "text": word})
        ).json()
        (delivery,) = sent["deliveries"]
        assert delivery["status"] == 200 and "沙箱回复" in delivery["reply"], delivery
        assert delivery["note"] == ("plaintext reply" if mode == "plaintext" else "encrypted reply")
        for kind in (
            "image",
            "voice",
            "video",
            "shortvideo",
            "location",
            "link",
            "subscribe",
            "unsubscribe",
            "SCAN",
            "LOCATION",
            "CLICK",
            "VIEW",
            "TEMPLATESENDJOBFINISH",
        ):
            sent = (
                await client.post(
                    f"{MOUNT}/wechat-mp/push", json={"kind": kind, "mode": mode, "event_key": "qrscene_7"}
                )
            ).json()
            assert [d["status"] for d in sent["deliveries"]] == [200], (kind, mode, sent)
    retried = (
        await client.post(f"{MOUNT}/wechat-mp/push", json={"kind": "text", "text": word, "repeat": 3})
    ).json()
    assert [d["reply"].count("沙箱回复") for d in retried["deliveries"]] == [1, 1, 1]
    refused = await client.post(f"{MOUNT}/wechat-mp/push", json={"kind": "nope"})
    assert refused.status_code == 400


async def test_the_sandbox_form_redirects_to_the_pushes_answer(
    server: Server, client: httpx.AsyncClient
) -> None:
    answer = await client.post(
        f"{MOUNT}/wechat-mp/push", data={"kind": "CLICK", "mode": "safe", "event_key": "K<b>"}
    )
    assert answer.status_code == 303 and answer.headers["location"].startswith("../wechat-mp?shown=")
    page = await client.get(f"{MOUNT}/wechat-mp?" + answer.headers["location"].split("?", 1)[1])
    assert page.status_code == 200 and "success: no reply" in page.text and "K&lt;b&gt;" in page.text
    console = (await client.get(f"{MOUNT}/")).text
    assert 'action="./wechat-mp/push"' in console
    assert any(s.name == "WeChat push" for s in sandbox_state(server).standins)
