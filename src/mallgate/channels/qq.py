"""QQ Connect (QQ互联) for a native APP login: who a user access_token belongs to, and their profile.

The QQ SDK hands the APP an ``access_token`` and an ``openid``; the APP forwards both. The
openid is only a claim: ``oauth2.0/me`` says whose token it is (``client_id``, the QQ app it
was issued to, and ``openid``; ``unionid`` with ``unionid=1``). Its answer comes by default
in the historic JSONP form ``callback( {...} );`` (served as text), with ``fmt=json`` without
the wrapper; `parse_graph` reads both. ``user/get_user_info`` gives nickname and avatar.

Errors: ``oauth2.0/me`` answers ``{"error": 100016, "error_description": "..."}``,
``get_user_info`` ``{"ret": <not 0>, "msg": "..."}``; both raise `QQApiError`. A network
failure or an answer that is not QQ's JSON raises `QQUnavailable`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

import httpx

from mallgate.channels.errors import ChannelError
from mallgate.channels.http import PlatformClient

DEFAULT_TIMEOUT: Final = 10.0
MISSING_TOKEN: Final = 100007
TOKEN_INVALID: Final = 100013  # revoked by the user, or expired and recycled
TOKEN_EXPIRED: Final = 100014
TOKEN_REVOKED: Final = 100015
TOKEN_CHECK_FAILED: Final = 100016
NOT_AUTHORISED: Final = 100030  # the user did not allow this API
# "Log in again": every code that says the token itself is no good.
TOKEN_REJECTED: Final = frozenset(
    {MISSING_TOKEN, TOKEN_INVALID, TOKEN_EXPIRED, TOKEN_REVOKED, TOKEN_CHECK_FAILED}
)
MAX_ANSWER: Final = 64 * 1024


class QQUnavailable(ChannelError):
    """QQ could not be reached, or answered something that is not its JSON."""


class QQApiError(ChannelError):
    def __init__(self, code: int, message: str, path: str) -> None:
        super().__init__(f"{path}: error {code}: {message}")
        self.code = code
        self.message = message

    @property
    def token_rejected(self) -> bool:
        return self.code in TOKEN_REJECTED


@dataclass(frozen=True)
class TokenOwner:
    """What ``oauth2.0/me`` says of a token: the QQ app it was issued to, and its user there."""

    client_id: str
    openid: str
    unionid: str = ""


@dataclass(frozen=True)
class QQProfile:
    nickname: str
    avatar: str


def parse_graph(path: str, text: str) -> dict[str, Any]:
    """QQ's JSON, bare or as ``callback( {...} );``: the text from the first ``{`` to the last ``}``."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start or len(text) > MAX_ANSWER:
        raise QQUnavailable(f"{path}: not QQ's JSON")
    try:
        answer = json.loads(text[start : end + 1])
    except ValueError as exc:
        raise QQUnavailable(f"{path}: not QQ's JSON") from exc
    if not isinstance(answer, dict):
        raise QQUnavailable(f"{path}: not a JSON object")
    return answer


def _code(value: Any) -> int:
    # QQ writes its codes as numbers, now and then as strings of digits.
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return -1


def _text(answer: dict[str, Any], name: str) -> str:
    value = answer.get(name)
    return value if isinstance(value, str) else ""


class QQConnect(PlatformClient):
    """Calls to ``api_base`` (https://graph.qq.com, or the sandbox's ``/qq``)."""

    def __init__(
        self, api_base: str, http: httpx.AsyncClient | None = None, timeout: float = DEFAULT_TIMEOUT
    ):
        super().__init__(http, timeout)
        self.api_base = api_base.rstrip("/")

    async def _get(self, path: str, params: dict[str, str]) -> dict[str, Any]:
        try:
            response = await self._http.get(f"{self.api_base}/{path}", params=params)
        except httpx.HTTPError as exc:
            raise QQUnavailable(f"{path}: {type(exc).__name__}") from exc
        return parse_graph(path, response.text)

    async def me(self, access_token: str) -> TokenOwner:
        """``oauth2.0/me?unionid=1``: whose token this is (the JSONP default form, read as such)."""
        path = "oauth2.0/me"
        answer = await self._get(path, {"access_token": access_token, "unionid": "1"})
        if "error" in answer:
            raise QQApiError(_code(answer["error"]), _text(answer, "error_description"), path)
        client_id, openid = answer.get("client_id"), _text(answer, "openid")
        client = (
            str(client_id) if isinstance(client_id, str | int) and not isinstance(client_id, bool) else ""
        )
        if not client or not openid:
            raise QQUnavailable(f"{path}: answer without client_id and openid")
        return TokenOwner(client_id=client, openid=openid, unionid=_text(answer, "unionid"))

    async def user_info(self, access_token: str, app_id: str, openid: str) -> QQProfile:
        path = "user/get_user_info"
        params = {"access_token": access_token, "oauth_consumer_key": app_id, "openid": openid}
        answer = await self._get(path, params)
        ret = _code(answer.get("ret", -1))
        if ret != 0:
            raise QQApiError(ret, _text(answer, "msg"), path)
        # figureurl_qq_2 (100 px) may be missing or empty; figureurl_qq_1 (40 px) is always there.
        avatar = _text(answer, "figureurl_qq_2") or _text(answer, "figureurl_qq_1")
        return QQProfile(nickname=_text(answer, "nickname"), avatar=avatar)
