"""The Mini Program's login calls: ``sns/jscode2session``, ``wxa/business/getuserphonenumber``
and the decryption of ``encryptedData`` with the session_key.

- ``GET sns/jscode2session?appid&secret&js_code&grant_type=authorization_code`` exchanges the
  code of ``wx.login`` (single use, 5 minutes) for openid, session_key and, when the Mini
  Program is bound to an Open Platform account, unionid. Errors: 40029 invalid code,
  40163 code been used, 45011 too frequent (100 a minute per user), 40226 high-risk user, -1 busy.
- ``POST wxa/business/getuserphonenumber?access_token`` JSON ``{"code": ...}`` turns the code of
  the ``getPhoneNumber`` button (another code, single use) into ``phone_info``.
- ``encryptedData`` + ``iv`` (``wx.getUserInfo`` and other open data): AES-128-CBC with
  PKCS#7 under the base64-decoded session_key; the plaintext is JSON whose
  ``watermark.appid`` must be ours (`decrypt_open_data`).

The session_key is a credential: it is never part of an exception's text or a log line.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any, Final

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from mallgate.channels.wechat_api import WechatApi, WechatUnavailable

INVALID_CODE: Final = 40029
CODE_USED: Final = 40163
TOO_FREQUENT: Final = 45011
HIGH_RISK: Final = 40226
BUSY: Final = -1

JSCODE2SESSION: Final = "sns/jscode2session"
PHONE_NUMBER: Final = "wxa/business/getuserphonenumber"
# Open data is a few hundred bytes; far more is not WeChat's.
MAX_ENCRYPTED: Final = 16384


@dataclass(frozen=True)
class MiniSession:
    openid: str
    session_key: str
    unionid: str = ""

    def __repr__(self) -> str:  # a dataclass repr would print the session_key into any log of it
        return f"MiniSession(openid={self.openid!r}, unionid={self.unionid!r})"


@dataclass(frozen=True)
class PhoneInfo:
    phone_number: str  # with the country code for numbers outside the mainland
    pure_phone_number: str  # never with the country code
    country_code: str
    watermark_appid: str


class OpenDataRefused(ValueError):
    """encryptedData that does not decrypt to our JSON; the reason never holds the key."""


def _text(answer: dict[str, Any], name: str) -> str:
    value = answer.get(name)
    return value if isinstance(value, str) else ""


class WechatMini(WechatApi):
    async def code2session(self, app_id: str, secret: str, code: str) -> MiniSession:
        params = {"appid": app_id, "secret": secret, "js_code": code, "grant_type": "authorization_code"}
        answer = await self.get_json(JSCODE2SESSION, params)
        openid, session_key = _text(answer, "openid"), _text(answer, "session_key")
        if not openid or not session_key:
            raise WechatUnavailable(f"{JSCODE2SESSION}: answer without openid and session_key")
        return MiniSession(openid=openid, session_key=session_key, unionid=_text(answer, "unionid"))

    async def phone_number(self, access_token: str, code: str) -> PhoneInfo:
        answer = await self.post_json(PHONE_NUMBER, {"access_token": access_token}, {"code": code})
        info = answer.get("phone_info")
        if not isinstance(info, dict):
            raise WechatUnavailable(f"{PHONE_NUMBER}: answer without phone_info")
        watermark = info.get("watermark")
        country = info.get("countryCode")  # a string in the schema, a number in the sample: both
        return PhoneInfo(
            phone_number=_text(info, "phoneNumber"),
            pure_phone_number=_text(info, "purePhoneNumber"),
            country_code=str(country) if isinstance(country, (str, int)) else "",
            watermark_appid=_text(watermark, "appid") if isinstance(watermark, dict) else "",
        )


def _b64(value: str, what: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise OpenDataRefused(f"{what} is not base64") from None


def decrypt_open_data(
    session_key: str, encrypted_data: str, iv: str, *, app_id: str, now: float, max_age: float
) -> dict[str, Any]:
    """The JSON `encrypted_data` holds, checked: our appid in the watermark, made within `max_age`.

    A key or iv that is not 16 bytes, a padding that does not check out, or a plaintext that
    is not a JSON object all mean the same in practice (data sealed under another
    session_key: the client logged in again meanwhile), and raise `OpenDataRefused`.
    """
    if len(encrypted_data) > MAX_ENCRYPTED:
        raise OpenDataRefused("encryptedData too long")
    key, vector, data = (
        _b64(session_key, "session_key"),
        _b64(iv, "iv"),
        _b64(encrypted_data, "encryptedData"),
    )
    if len(key) != 16 or len(vector) != 16 or not data or len(data) % 16:
        raise OpenDataRefused("key, iv or data of the wrong length")
    decryptor = Cipher(algorithms.AES(key), modes.CBC(vector)).decryptor()
    unpadder = padding.PKCS7(128).unpadder()
    try:
        plain = unpadder.update(decryptor.update(data) + decryptor.finalize()) + unpadder.finalize()
        found = json.loads(plain.decode("utf-8"))
    except ValueError:  # bad padding, not UTF-8, not JSON
        raise OpenDataRefused("does not decrypt to JSON") from None
    if not isinstance(found, dict):
        raise OpenDataRefused("not a JSON object")
    watermark = found.get("watermark")
    if not isinstance(watermark, dict) or watermark.get("appid") != app_id:
        raise OpenDataRefused("watermark of another appid")
    stamp = watermark.get("timestamp")
    if not isinstance(stamp, int) or isinstance(stamp, bool) or not -60 <= now - stamp <= max_age:
        raise OpenDataRefused("watermark timestamp missing or out of range")
    return found


def encrypt_open_data(session_key: str, iv: str, data: dict[str, Any]) -> str:
    """What WeChat sends the client (the sandbox's side of `decrypt_open_data`)."""
    padder = padding.PKCS7(128).padder()
    plain = padder.update(json.dumps(data, ensure_ascii=False).encode()) + padder.finalize()
    encryptor = Cipher(
        algorithms.AES(base64.b64decode(session_key)), modes.CBC(base64.b64decode(iv))
    ).encryptor()
    return base64.b64encode(encryptor.update(plain) + encryptor.finalize()).decode()
