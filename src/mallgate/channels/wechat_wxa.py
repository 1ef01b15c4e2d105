"""The Mini Program's server API: ``wxa/getwxacodeunlimit`` (codes) and ``message/subscribe/send``.

getwxacodeunlimit answers the image itself (``Content-Type: image/jpeg`` or ``image/png``)
on success and WeChat's JSON error otherwise (still HTTP 200), so the answer is told apart
by its bytes, not by its status: a body that starts with ``{`` is the error.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Final

import httpx

from mallgate.channels.wechat_api import WechatApi, WechatApiError, WechatUnavailable

CODE_PATH: Final = "wxa/getwxacodeunlimit"
SUBSCRIBE_PATH: Final = "cgi-bin/message/subscribe/send"
# WeChat's scene: at most 32 visible characters of this set (no %, so nothing URL-encoded).
SCENE_MAX: Final = 32
SCENE_SHAPE: Final = re.compile(r"[0-9A-Za-z!#$&'()*+,/:;=?@._~-]{1,32}")
# The user refused, never subscribed, or spent the one-time grant.
REFUSED: Final = 43101
_IMAGE_MAGIC: Final = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8")


@dataclass(frozen=True)
class CodeRequest:
    scene: str
    page: str
    width: int = 430
    env_version: str = "release"
    check_path: bool = True

    def body(self) -> dict[str, Any]:
        return {
            "scene": self.scene,
            "page": self.page,
            "width": self.width,
            "env_version": self.env_version,
            "check_path": self.check_path,
        }


@dataclass(frozen=True)
class SubscribeMessage:
    touser: str
    template_id: str
    data: dict[str, str]
    page: str = ""
    miniprogram_state: str = "formal"
    lang: str = "zh_CN"

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "touser": self.touser,
            "template_id": self.template_id,
            "data": {k: {"value": v} for k, v in self.data.items()},
            "miniprogram_state": self.miniprogram_state,
            "lang": self.lang,
        }
        if self.page:
            body["page"] = self.page
        return body


class WechatWxa(WechatApi):
    """The two calls, on the WeChat API base (api.weixin.qq.com or the sandbox's /wechat)."""

    async def code_unlimited(self, access_token: str, request: CodeRequest) -> bytes:
        """The code's image bytes; WechatApiError when WeChat answered its JSON error."""
        content = json.dumps(request.body(), separators=(",", ":")).encode()
        try:
            response = await self._http.post(
                self.url(CODE_PATH),
                params={"access_token": access_token},
                content=content,
                headers={"Content-Type": "application/json"},
            )
        except httpx.HTTPError as exc:
            raise WechatUnavailable(f"{CODE_PATH}: {type(exc).__name__}") from exc
        return _image_or_error(response)

    async def send_subscribe(self, access_token: str, message: SubscribeMessage) -> str:
        """The msgid WeChat gave; WechatApiError (43101 refused, 40037 template...) otherwise."""
        answer = await self.post_json(SUBSCRIBE_PATH, {"access_token": access_token}, message.body())
        return str(answer.get("msgid", ""))


def _image_or_error(response: httpx.Response) -> bytes:
    body = response.content
    if body.startswith(_IMAGE_MAGIC):
        return body
    try:
        answer = json.loads(body)
    except ValueError as exc:
        raise WechatUnavailable(f"{CODE_PATH}: HTTP {response.status_code}, neither image nor JSON") from exc
    if isinstance(answer, dict) and answer.get("errcode") not in (0, None):
        code = answer["errcode"] if isinstance(answer["errcode"], int) else -1
        raise WechatApiError(code, str(answer.get("errmsg", "")), CODE_PATH)
    raise WechatUnavailable(f"{CODE_PATH}: HTTP {response.status_code}, JSON without an image")
