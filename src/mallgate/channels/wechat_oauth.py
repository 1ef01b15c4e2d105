"""Official Account web OAuth (网页授权): the authorize URL and the ``sns/*`` calls.

1. The user is sent to ``open.weixin.qq.com/connect/oauth2/authorize`` (`authorize_url`);
   WeChat redirects back with ``code`` (single use, 5 minutes) and ``state``.
2. ``sns/oauth2/access_token`` exchanges the code for a per-user web token, the openid, the
   granted scope and, for ``snsapi_userinfo`` on an OA bound to an Open Platform account, the
   unionid (`WechatOAuth.exchange_code`).
3. ``sns/userinfo`` (needs ``snsapi_userinfo``, else 48001) gives nickname, sex and avatar
   (`WechatOAuth.userinfo`); ``sns/auth`` says whether a web token is still good
   (`WechatOAuth.check_token`).

Errors come as `WechatApiError` (40029 invalid code, 40163 code been used, 40003 invalid openid,
42001 expired token, 48001 scope not granted, ...) or `WechatUnavailable`, from the shared
client base in `mallgate.channels.wechat_api`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal
from urllib.parse import quote

from mallgate.channels.wechat_api import WechatApi, WechatUnavailable

Scope = Literal["snsapi_base", "snsapi_userinfo"]
SCOPES: Final[tuple[Scope, ...]] = ("snsapi_base", "snsapi_userinfo")
AUTHORIZE_PATH: Final = "connect/oauth2/authorize"

INVALID_CODE: Final = 40029
CODE_USED: Final = 40163
INVALID_OPENID: Final = 40003
TOKEN_EXPIRED: Final = 42001
UNAUTHORIZED: Final = 48001


def authorize_url(base: str, app_id: str, redirect_uri: str, scope: Scope, state: str) -> str:
    """The consent page's URL, parameters in the order WeChat's document gives them.

    WeChat matches this URL strictly: ``redirect_uri`` fully percent-encoded (its ``:/?&=``
    too), and ``#wechat_redirect`` at the end, without which the page may not open in WeChat.
    """
    return (
        f"{base.rstrip('/')}/{AUTHORIZE_PATH}?appid={quote(app_id, safe='')}"
        f"&redirect_uri={quote(redirect_uri, safe='')}&response_type=code"
        f"&scope={scope}&state={quote(state, safe='')}#wechat_redirect"
    )


@dataclass(frozen=True)
class Grant:
    """What a code is worth: the user's openid in this OA, and what they allowed."""

    openid: str
    access_token: str
    scopes: frozenset[str]
    unionid: str = ""
    # A visitor of a Moments "snapshot page": a virtual account, never a login.
    snapshot_user: bool = False

    @property
    def userinfo_allowed(self) -> bool:
        return "snsapi_userinfo" in self.scopes


@dataclass(frozen=True)
class UserInfo:
    openid: str
    nickname: str
    sex: int  # 1 male, 2 female, 0 unknown (WeChat answers 0 for everyone since late 2021)
    headimgurl: str
    unionid: str = ""


def _text(answer: dict[str, Any], name: str) -> str:
    value = answer.get(name)
    return value if isinstance(value, str) else ""


class WechatOAuth(WechatApi):
    """The ``sns/*`` calls of one Official Account."""

    async def exchange_code(self, app_id: str, secret: str, code: str) -> Grant:
        path = "sns/oauth2/access_token"
        params = {"appid": app_id, "secret": secret, "code": code, "grant_type": "authorization_code"}
        answer = await self.get_json(path, params)
        openid, token = _text(answer, "openid"), _text(answer, "access_token")
        if not openid or not token:
            raise WechatUnavailable(f"{path}: answer without openid and access_token")
        return Grant(
            openid=openid,
            access_token=token,
            # "snsapi_userinfo" or "snsapi_base"; a comma-separated list has been seen too.
            scopes=frozenset(s.strip() for s in _text(answer, "scope").split(",") if s.strip()),
            unionid=_text(answer, "unionid"),
            snapshot_user=answer.get("is_snapshotuser") == 1,
        )

    async def userinfo(self, access_token: str, openid: str) -> UserInfo:
        path = "sns/userinfo"
        answer = await self.get_json(path, {"access_token": access_token, "openid": openid, "lang": "zh_CN"})
        sex = answer.get("sex")
        return UserInfo(
            openid=_text(answer, "openid") or openid,
            nickname=_text(answer, "nickname"),
            sex=sex if isinstance(sex, int) and sex in (0, 1, 2) else 0,
            headimgurl=_text(answer, "headimgurl"),
            unionid=_text(answer, "unionid"),
        )

    async def check_token(self, access_token: str, openid: str) -> None:
        """``sns/auth``: returns when the web token is valid for `openid`, else raises (40003, 42001...)."""
        await self.get_json("sns/auth", {"access_token": access_token, "openid": openid})
