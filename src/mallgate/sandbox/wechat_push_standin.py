"""The Official Account push stand-in: WeChat's side of ``wechat.index/``.

``/wechat-mp`` is a form that sends a message or event push of any type to the service
exactly as WeChat does: ``signature`` / ``timestamp`` / ``nonce`` / ``openid`` in the query,
and in compatible or safe mode ``encrypt_type=aes`` + ``msg_signature`` with the body
encrypted under the sandbox's EncodingAESKey. The service's answer is shown as it came and,
when encrypted, checked (MsgSignature) and decrypted. ``POST /wechat-mp/push`` with JSON
answers the same as JSON (tests, scripts). Like the pay form, results are kept in this
process's memory for the page after the redirect.
"""

from __future__ import annotations

import itertools
import secrets
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Final, Literal
from urllib.parse import parse_qsl, urlencode

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from mallgate.channels.wechat_crypto import CryptoError, WXBizMsgCrypt
from mallgate.channels.wechat_messages import ForbiddenXml, MalformedPush, read_xml, to_xml
from mallgate.clock import Clock, default_clock
from mallgate.sandbox.pages import render

if TYPE_CHECKING:
    from mallgate.sandbox.app import SandboxState, StandIn

Mode = Literal["plaintext", "compatible", "safe"]
MODES: Final = ("plaintext", "compatible", "safe")
ORIGINAL_ID: Final = "gh_0000000000a1"  # the sandbox Official Account's original id
DEFAULT_OPENID: Final = "oSandboxFollower000000000001"
MAX_SHOWN: Final = 50
SECTION_ROWS: Final = 5
_FORM_LIMIT: Final = 16 * 1024

# Every type WeChat pushes, each with the fields it carries (values the form cannot set are samples).
KINDS: Final[dict[str, dict[str, str]]] = {
    "text": {"MsgType": "text", "Content": "{text}"},
    "image": {"MsgType": "image", "PicUrl": "https://example.com/p.jpg", "MediaId": "media_image_1"},
    "voice": {"MsgType": "voice", "MediaId": "media_voice_1", "Format": "amr", "Recognition": "{text}"},
    "video": {"MsgType": "video", "MediaId": "media_video_1", "ThumbMediaId": "thumb_1"},
    "shortvideo": {"MsgType": "shortvideo", "MediaId": "media_short_1", "ThumbMediaId": "thumb_2"},
    "location": {
        "MsgType": "location",
        "Location_X": "23.134521",
        "Location_Y": "113.358803",
        "Scale": "20",
        "Label": "{text}",
    },
    "link": {"MsgType": "link", "Title": "{text}", "Description": "a link", "Url": "https://example.com/"},
    "subscribe": {"MsgType": "event", "Event": "subscribe", "EventKey": "{event_key}", "Ticket": "{ticket}"},
    "unsubscribe": {"MsgType": "event", "Event": "unsubscribe", "EventKey": ""},
    "SCAN": {"MsgType": "event", "Event": "SCAN", "EventKey": "{event_key}", "Ticket": "{ticket}"},
    "LOCATION": {
        "MsgType": "event",
        "Event": "LOCATION",
        "Latitude": "23.137466",
        "Longitude": "113.352425",
        "Precision": "119.385040",
    },
    "CLICK": {"MsgType": "event", "Event": "CLICK", "EventKey": "{event_key}"},
    "VIEW": {"MsgType": "event", "Event": "VIEW", "EventKey": "https://example.com/menu", "MenuId": "1"},
    "TEMPLATESENDJOBFINISH": {
        "MsgType": "event",
        "Event": "TEMPLATESENDJOBFINISH",
        "MsgID": "{msg_id}",
        "Status": "success",
    },
}


class PushInvalid(ValueError):
    pass


@dataclass(frozen=True)
class PushRequest:
    kind: str = "text"
    mode: Mode = "safe"
    openid: str = DEFAULT_OPENID
    text: str = "hello"
    event_key: str = ""
    repeat: int = 1  # deliveries of the same push, as WeChat's retries

    @classmethod
    def of(cls, values: Mapping[str, Any]) -> PushRequest:
        unknown = set(values) - {"kind", "mode", "openid", "text", "event_key", "repeat"}
        if unknown:
            raise PushInvalid(f"unknown field {sorted(unknown)[0]}")
        kind = str(values.get("kind") or "text")
        mode = str(values.get("mode") or "safe")
        if kind not in KINDS:
            raise PushInvalid(f"kind must be one of {', '.join(KINDS)}")
        if mode not in MODES:
            raise PushInvalid("mode must be plaintext, compatible or safe")
        openid = str(values.get("openid") or DEFAULT_OPENID)
        if not openid.isascii() or not 1 <= len(openid) <= 64:
            raise PushInvalid("openid: up to 64 ASCII characters")
        try:
            repeat = int(values.get("repeat") or 1)
        except (TypeError, ValueError):
            raise PushInvalid("repeat must be a number") from None
        if not 1 <= repeat <= 4:
            raise PushInvalid("repeat: 1 to 4 deliveries (WeChat sends at most 4)")
        text, event_key = str(values.get("text") or ""), str(values.get("event_key") or "")
        if len(text) > 2000 or len(event_key) > 200:
            raise PushInvalid("text or event_key too long")
        return cls(kind, mode, openid, text, event_key, repeat)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Delivery:
    status: int | None
    body: str
    reply: str  # decrypted when the answer was encrypted
    note: str  # what the stand-in made of the answer


@dataclass(frozen=True)
class Shown:
    id: str
    request: PushRequest
    sent: str  # the plaintext push
    deliveries: list[Delivery]
    at: float


def push_fields(request: PushRequest, *, now: int, msg_id: int) -> dict[str, str]:
    """The plaintext fields of one push of `request.kind`."""
    fields = {"ToUserName": ORIGINAL_ID, "FromUserName": request.openid, "CreateTime": str(now)}
    values = {
        "text": request.text,
        "event_key": request.event_key,
        "ticket": "gQH47joAAAAAAAAAASxodHRwOi8vd2VpeGluLnFxLmNvbS9xL2FQ" if request.event_key else "",
        "msg_id": str(msg_id),
    }
    for name, template in KINDS[request.kind].items():
        value = template.format(**values)
        if value or name == "EventKey":
            fields[name] = value
    if fields["MsgType"] != "event":
        fields["MsgId"] = str(msg_id)
    return fields


def signed_push(
    crypto: WXBizMsgCrypt, fields: Mapping[str, str], mode: str, *, timestamp: str, nonce: str
) -> tuple[dict[str, str], bytes]:
    """(query, body) of a push as WeChat sends it in `mode`."""
    plain = to_xml(fields)
    query = {
        "signature": crypto.signature(timestamp, nonce),
        "timestamp": timestamp,
        "nonce": nonce,
        "openid": fields["FromUserName"],
    }
    if mode == "plaintext":
        return query, plain.encode()
    encrypted = crypto.encrypt(plain.encode())
    query.update(encrypt_type="aes", msg_signature=crypto.msg_signature(timestamp, nonce, encrypted))
    outer: dict[str, str] = {"ToUserName": fields["ToUserName"]}
    if mode == "compatible":
        outer = dict(fields)
    outer["Encrypt"] = encrypted
    return query, to_xml(outer).encode()


def read_answer(crypto: WXBizMsgCrypt, status: int, body: bytes) -> tuple[str, str]:
    """(reply, note): the reply in plaintext, and what the answer is, as WeChat would judge it."""
    text = body.decode("utf-8", "replace")
    if status != 200:
        return "", f"refused (HTTP {status})"
    if text in ("success", ""):
        return "", "success: no reply"
    try:
        fields = read_xml(body)
    except (ForbiddenXml, MalformedPush):
        return "", "not XML: the user would see 该公众号暂时无法提供服务"
    if "Encrypt" not in fields:
        return text, "plaintext reply"
    given, timestamp = fields.get("MsgSignature", ""), fields.get("TimeStamp", "")
    try:
        reply = crypto.verify_and_decrypt(given, timestamp, fields.get("Nonce", ""), fields["Encrypt"])
        return reply.decode(), "encrypted reply"
    except (CryptoError, UnicodeDecodeError) as exc:
        return "", f"encrypted reply that does not check: {exc}"


class PushStandIn:
    def __init__(self, crypto: WXBizMsgCrypt, service_url: str, clock: Clock = default_clock) -> None:
        self.crypto = crypto
        self.service_url = service_url
        self.clock = clock
        self.http = httpx.AsyncClient(timeout=10)
        self._ids = itertools.count(1)
        self._msg_ids = itertools.count(int(clock.now()) * 1000)
        self.shown: OrderedDict[str, Shown] = OrderedDict()
        self.router = self._routes()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def send(self, request: PushRequest) -> Shown:
        now = int(self.clock.now())
        fields = push_fields(request, now=now, msg_id=next(self._msg_ids))
        deliveries = []
        for _ in range(request.repeat):
            # A retry is the same push, signed afresh (WeChat's retries carry new nonces).
            nonce = str(secrets.randbelow(10**9) + 1)
            query, body = signed_push(self.crypto, fields, request.mode, timestamp=str(now), nonce=nonce)
            deliveries.append(await self._deliver(query, body))
        shown = Shown(str(next(self._ids)), request, to_xml(fields), deliveries, self.clock.now())
        self.shown[shown.id] = shown
        while len(self.shown) > MAX_SHOWN:
            self.shown.popitem(last=False)
        return shown

    async def _deliver(self, query: dict[str, str], body: bytes) -> Delivery:
        url = f"{self.service_url}/wechat.index/?{urlencode(query)}"
        try:
            answer = await self.http.post(url, content=body, headers={"Content-Type": "text/xml"})
        except httpx.HTTPError as exc:
            return Delivery(None, "", "", f"no answer: {type(exc).__name__}")
        reply, note = read_answer(self.crypto, answer.status_code, answer.content)
        return Delivery(answer.status_code, answer.text[:4000], reply, note)

    def recent(self, count: int) -> list[Shown]:
        return list(reversed(self.shown.values()))[:count]

    def _routes(self) -> APIRouter:
        router = APIRouter()

        @router.get("/wechat-mp")
        async def page(request: Request, shown: str = "") -> Response:
            kept = self.shown.get(shown) if shown else None
            return render(
                request,
                "wechat_push.html",
                title="WeChat Official Account push",
                kinds=list(KINDS),
                modes=MODES,
                shown=kept,
                forgotten=bool(shown) and kept is None,
                pushes=self.recent(MAX_SHOWN),
                service_url=self.service_url,
            )

        @router.post("/wechat-mp/push")
        async def push(request: Request) -> Response:
            as_json = request.headers.get("content-type", "").startswith("application/json")
            body = await request.body()
            if len(body) > _FORM_LIMIT:
                return JSONResponse({"error": "body too large"}, status_code=413)
            try:
                values: Any = await request.json() if as_json else dict(parse_qsl(body.decode("utf-8")))
                if not isinstance(values, dict):
                    raise PushInvalid("a JSON object is expected")
                asked = PushRequest.of(values)
            except (PushInvalid, ValueError) as exc:
                if as_json:
                    return JSONResponse({"error": str(exc)}, status_code=400)
                return render(
                    request,
                    "message.html",
                    title="Push not sent",
                    message=str(exc),
                    rows=[],
                    status_code=400,
                )
            shown = await self.send(asked)
            if as_json:
                return JSONResponse(
                    {"id": shown.id, "sent": shown.sent, "deliveries": [asdict(d) for d in shown.deliveries]}
                )
            return RedirectResponse(f"../wechat-mp?shown={shown.id}", status_code=303)

        return router


def wechat_push_standin(state: SandboxState) -> StandIn:
    from mallgate.sandbox.app import WECHAT_MP_APP_ID, StandIn

    crypto = WXBizMsgCrypt(state.keys.wechat_mp_token, state.keys.wechat_mp_aes_key, WECHAT_MP_APP_ID)
    standin = PushStandIn(crypto, state.service_url)
    state.resources["wechat_push"] = standin

    async def recent() -> dict[str, Any]:
        return {"pushes": standin.recent(SECTION_ROWS), "kinds": list(KINDS), "modes": MODES}

    return StandIn(
        name="WeChat push",
        summary="sends the service signed (in safe mode encrypted) Official Account pushes, as WeChat does",
        router=standin.router,
        links=[("push a message", "/wechat-mp")],
        section="sections/wechat_push.html",
        context=recent,
        page="/wechat-mp",
    )
