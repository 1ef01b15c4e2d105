"""``wechat.index/`` (with or without the slash): the Official Account's server URL and message push.

Answers are WeChat's, not the JSON envelope: the ``echostr`` of a URL check, a reply XML
(encrypted when the push was), or ``success``. A refusal is HTTP 4xx with a short plain text
and never ``success``, so WeChat (or whoever forged the request) is not told it was taken:

- 404 ``wechat_mp.not_configured``: no token (the Official Account is not set up);
- 503 ``wechat_mp.aes_not_configured``: an encrypted push without the EncodingAESKey and AppID;
- 403 ``timestamp expired``: ``timestamp`` more than 5 minutes from now (either way), or not one;
- 403 ``invalid signature``: ``signature`` (checked in every mode, plaintext included);
- 403 ``invalid msg_signature`` / ``appid mismatch``: an encrypted push not ours;
- 403 ``plaintext push refused``: with ``MALLGATE_WECHAT_MP__SAFE_MODE_ONLY``;
- 400 ``xml refused``: a DOCTYPE or entities; 400 ``cannot decrypt``: an ``Encrypt`` that is not one;
- 503 ``try again``: the push could not be claimed (the database down or its queue full).

XML that does not parse, lacks a field, or is of an unknown type is answered ``success`` and
logged: WeChat would only retry the same bytes.
"""

from __future__ import annotations

import logging
import re
from typing import Final

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response
from starlette.routing import Route

from mallgate.channels.wechat_crypto import AppIdMismatch, CryptoError, WXBizMsgCrypt, verify_signature
from mallgate.channels.wechat_messages import ForbiddenXml, MalformedPush, from_fields, read_xml
from mallgate.deps import RuntimeDep
from mallgate.routes.lane import Endpoint
from mallgate.runtime import Runtime, get_runtime
from mallgate.services import wechat_push

log = logging.getLogger("mallgate.wechat_mp")

router = APIRouter()

PATHS: Final = ("/wechat.index/", "/wechat.index")
MAX_SKEW: Final = 300  # seconds: WeChat's pushes carry the time they were sent
_TIMESTAMP: Final = re.compile(r"[0-9]{1,12}")
# Echoed into the encrypted reply's CDATA: WeChat's nonces are digits.
_NONCE: Final = re.compile(r"[0-9A-Za-z_-]{1,64}")
XML: Final = "application/xml"


class Refused(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


def _text(text: str, status: int = 200) -> PlainTextResponse:
    return PlainTextResponse(text, status_code=status)


def success() -> PlainTextResponse:
    return _text("success")


def _crypto(runtime: Runtime) -> WXBizMsgCrypt:
    """The app's crypto, built once per process (and again if the settings object changes)."""
    mp = runtime.settings.wechat_mp
    ident = (mp.token, mp.aes_key, mp.app_id)
    cached = runtime.services.get("wechat_mp.crypto")
    if isinstance(cached, WXBizMsgCrypt) and (cached.token, cached.encoding_aes_key, cached.app_id) == ident:
        return cached
    crypto = runtime.services["wechat_mp.crypto"] = WXBizMsgCrypt(*ident)
    return crypto


def _signed(request: Request, runtime: Runtime) -> tuple[str, str]:
    """(timestamp, nonce) of a request WeChat signed just now, else `Refused`."""
    mp = runtime.settings.wechat_mp
    if not mp.token:
        raise Refused(404, "wechat_mp.not_configured")
    query = request.query_params
    timestamp, nonce = query.get("timestamp", ""), query.get("nonce", "")
    if not _TIMESTAMP.fullmatch(timestamp) or abs(runtime.clock.now() - int(timestamp)) > MAX_SKEW:
        raise Refused(403, "timestamp expired")
    # The plain signature needs no EncodingAESKey: a plaintext-mode account may have none.
    given = query.get("signature", "")
    if not _NONCE.fullmatch(nonce) or not verify_signature(given, mp.token, timestamp, nonce):
        raise Refused(403, "invalid signature")
    return timestamp, nonce


async def url_check(request: Request, runtime: RuntimeDep) -> Response:
    """WeChat's server URL check: `echostr` back, verbatim, only under a good signature."""
    try:
        _signed(request, runtime)
    except Refused as refused:
        return _text(refused.text, refused.status)
    echostr = request.query_params.get("echostr")
    if echostr is None:
        return _text("echostr missing", 400)
    return _text(echostr)


def _malformed(reason: str) -> PlainTextResponse:
    log.warning("wechat push answered success without handling: %s", reason)
    return success()


async def push(request: Request, runtime: RuntimeDep) -> Response:
    """A message or event push: verified, decrypted, handled once, answered within the deadline."""
    mp = runtime.settings.wechat_mp
    try:
        timestamp, nonce = _signed(request, runtime)
        encrypted = request.query_params.get("encrypt_type", "raw").lower() == "aes"
        if not encrypted and mp.safe_mode_only:
            raise Refused(403, "plaintext push refused")
        if encrypted and not (mp.aes_key and mp.app_id):
            raise Refused(503, "wechat_mp.aes_not_configured")
        body = await request.body()
        fields = read_xml(body)
        if encrypted:
            fields = read_xml(_decrypt(runtime, request, fields, timestamp, nonce))
        message = from_fields(fields)
    except Refused as refused:
        log.info("wechat push refused: %s", refused.text)
        return _text(refused.text, refused.status)
    except ForbiddenXml as exc:
        log.warning("wechat push refused: XML with a %s", exc)
        return _text("xml refused", 400)
    except MalformedPush as exc:
        return _malformed(str(exc))
    try:
        reply = await wechat_push.receive(runtime, message)
    except wechat_push.NotClaimed as exc:
        # Never `success`: WeChat sends the push again, and a retry may find the database back.
        log.warning("wechat push not handled: claim %s", exc)
        return _text("try again", 503)
    if not reply:
        return success()
    if encrypted:
        now = str(int(runtime.clock.now()))
        sealed = _crypto(runtime).encrypt_reply(reply.encode(), timestamp=now, nonce=nonce)
        return Response(sealed, media_type=XML)
    return Response(reply.encode(), media_type=XML)


def _decrypt(runtime: Runtime, request: Request, outer: dict[str, str], timestamp: str, nonce: str) -> bytes:
    """The message inside an encrypted push (safe or compatible mode), checked to be ours."""
    encrypt = outer.get("Encrypt", "").strip()
    if not encrypt:
        raise MalformedPush("encrypt_type=aes without <Encrypt>")
    crypto = _crypto(runtime)
    given = request.query_params.get("msg_signature", "")
    if not crypto.verify_msg_signature(given, timestamp, nonce, encrypt):
        raise Refused(403, "invalid msg_signature")
    try:
        return crypto.decrypt(encrypt)
    except AppIdMismatch:
        raise Refused(403, "appid mismatch") from None
    except CryptoError as exc:
        log.warning("wechat push: a signed Encrypt that does not decrypt (%s)", exc)
        raise Refused(400, "cannot decrypt") from None


async def _index(request: Request) -> Response:
    runtime = await get_runtime(request)
    if request.method == "POST":
        return await push(request, runtime)
    return await url_check(request, runtime)


def lane_routes() -> list[Route]:
    """`wechat.index` for app.py's lane: WeChat's servers call it, never a browser."""
    return [Route(path, Endpoint(_index, "GET", "POST")) for path in PATHS]


# Also on the router: for /docs, and for the paths the lane does not match exactly.
for _path in PATHS:
    router.add_api_route(_path, url_check, methods=["GET"], response_class=PlainTextResponse)
    router.add_api_route(_path, push, methods=["POST"], response_class=PlainTextResponse)
