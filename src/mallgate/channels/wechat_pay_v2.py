"""WeChat Pay API v2: XML messages signed with the merchant's API key (MD5 or HMAC-SHA256).

Verify and sign side by side: notifications are checked by ``verify_v2_*`` and
produced for the sandbox and the tests by ``sign_v2`` / ``encrypt_refund_req_info``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal
from xml.etree.ElementTree import ParseError

import defusedxml
import defusedxml.ElementTree as SafeET
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from mallgate.channels.errors import ForeignNotification, MalformedNotification, NotAuthentic
from mallgate.clock import Clock, default_clock

__all__ = [
    "ForeignNotification",
    "MalformedNotification",
    "V2SignType",
    "WechatV2Payment",
    "WechatV2Refund",
    "app_id_matches",
    "app_params",
    "decrypt_refund_req_info",
    "encrypt_refund_req_info",
    "jsapi_params",
    "parse_xml",
    "sign_v2",
    "to_xml",
    "v2_fail",
    "v2_success",
    "verify_v2_payment",
    "verify_v2_refund",
    "verify_v2_sign",
]

V2SignType = Literal["MD5", "HMAC-SHA256"]

_XML_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
# [0-9], not \d: \d also matches fullwidth and other scripts' digits, which Decimal/int accept.
_FEN = re.compile(r"[0-9]{1,15}")


_SEAL: Final = object()


def _check_seal(seal: object, name: str) -> None:
    if seal is not _SEAL:
        raise TypeError(f"{name} is only obtained from the function that verifies it")


@dataclass(frozen=True)
class WechatV2Payment:
    """A v2 payment result; ``total_fee`` is None only when ``result_ok`` is False."""

    out_trade_no: str
    transaction_id: str
    total_fee: int | None
    cash_fee: int | None
    time_end: str
    result_ok: bool
    err_code: str
    err_code_des: str
    appid: str
    mch_id: str
    openid: str
    trade_type: str
    raw: dict[str, str]
    _seal: object = field(default=None, repr=False, compare=False, kw_only=True)

    def __post_init__(self) -> None:
        _check_seal(self._seal, "WechatV2Payment")


@dataclass(frozen=True)
class WechatV2Refund:
    out_trade_no: str
    transaction_id: str
    out_refund_no: str
    refund_id: str
    refund_fee: int
    total_fee: int
    settlement_refund_fee: int | None
    settlement_total_fee: int | None
    refund_status: str
    success_time: str
    appid: str
    mch_id: str
    raw: dict[str, str]
    _seal: object = field(default=None, repr=False, compare=False, kw_only=True)

    def __post_init__(self) -> None:
        _check_seal(self._seal, "WechatV2Refund")

    @property
    def succeeded(self) -> bool:
        return self.refund_status == "SUCCESS"


# ----------------------------------------------------------------------------------------------
# signature


def sign_v2(params: Mapping[str, str], api_key: str, sign_type: str = "MD5") -> str:
    """Uppercase hex signature: non-empty fields but ``sign``, sorted, then ``&key=API_KEY``."""
    text = "&".join(f"{k}={v}" for k, v in sorted(params.items()) if k != "sign" and v != "")
    data = f"{text}&key={api_key}".encode()
    if sign_type == "MD5":
        # MD5 is what the v2 protocol defines; the secret key is what makes it a signature.
        return hashlib.md5(data).hexdigest().upper()  # noqa: S324
    if sign_type == "HMAC-SHA256":
        return hmac.new(api_key.encode(), data, hashlib.sha256).hexdigest().upper()
    raise ValueError(f"unsupported WeChat Pay v2 sign_type {sign_type!r}")


def verify_v2_sign(params: Mapping[str, str], api_key: str, sign_type: str | None = None) -> None:
    """Check ``sign``; the type is ``sign_type`` if given, else the message's ``sign_type`` field.

    Without either, the length of ``sign`` decides (32 hex digits MD5, 64 HMAC-SHA256):
    WeChat signs a payment notification the way the order was placed but often leaves
    ``sign_type`` out (WxJava #1585, WXPay-SDK-Java #1), so "absent means MD5", as the
    docs say, fails every notification of an HMAC-SHA256 merchant. Both types are keyed
    with our own secret, so letting the message choose opens no downgrade.
    """
    given = params.get("sign", "")
    if not given:
        raise NotAuthentic("missing sign")
    chosen = sign_type or params.get("sign_type") or ("HMAC-SHA256" if len(given) == 64 else "MD5")
    if chosen not in ("MD5", "HMAC-SHA256"):
        raise NotAuthentic(f"unsupported sign_type {chosen[:20]!r}")
    # Bytes: compare_digest refuses str with non-ASCII characters (a TypeError, not a refusal).
    if not hmac.compare_digest(sign_v2(params, api_key, chosen).encode(), given.upper().encode()):
        raise NotAuthentic("bad signature")


# ----------------------------------------------------------------------------------------------
# XML


def parse_xml(body: bytes | str, *, root: str = "xml") -> dict[str, str]:
    """A flat ``<xml><k>v</k>...</xml>`` document as a dict, parsed without DTDs or entities.

    A DOCTYPE is refused before anything is expanded or fetched, which stops both
    billion-laughs and external-entity file reads. Nested elements and repeated names
    are refused: WeChat never sends them, and each would let what is signed differ
    from what is read. The caller limits the size.
    """
    try:
        element = SafeET.fromstring(body, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except (defusedxml.DefusedXmlException, ParseError, ValueError) as exc:
        raise MalformedNotification(f"unacceptable XML: {type(exc).__name__}") from None
    if element.tag != root:
        raise MalformedNotification(f"root element is not <{root}>")
    fields: dict[str, str] = {}
    for child in element:
        if len(child):
            raise MalformedNotification(f"nested element in <{child.tag}>")
        if child.tag in fields:
            raise MalformedNotification(f"repeated element <{child.tag}>")
        fields[child.tag] = child.text or ""
    return fields


def _cdata(value: str) -> str:
    # "]]>" cannot appear inside one CDATA section, so it is split across two.
    return "<![CDATA[" + value.replace("]]>", "]]]]><![CDATA[>") + "]]>"


def to_xml(params: Mapping[str, str], *, root: str = "xml") -> bytes:
    """``<xml><k><![CDATA[v]]></k>...</xml>`` in UTF-8, the shape WeChat sends and expects."""
    parts = [f"<{root}>"]
    for key, value in params.items():
        if not _XML_NAME.fullmatch(key):
            raise ValueError(f"not an XML element name: {key!r}")
        parts.append(f"<{key}>{_cdata(value)}</{key}>")
    parts.append(f"</{root}>")
    return "".join(parts).encode("utf-8")


def v2_success() -> bytes:
    return to_xml({"return_code": "SUCCESS", "return_msg": "OK"})


def v2_fail(message: str) -> bytes:
    return to_xml({"return_code": "FAIL", "return_msg": message})


# ----------------------------------------------------------------------------------------------
# notifications


def _fen(fields: Mapping[str, str], name: str, *, required: bool) -> int | None:
    value = fields.get(name, "")
    if value == "":
        if required:
            raise MalformedNotification(f"missing {name}")
        return None
    if not _FEN.fullmatch(value):
        raise MalformedNotification(f"{name} is not an amount in fen")
    return int(value)


def _fen_required(fields: Mapping[str, str], name: str) -> int:
    value = _fen(fields, name, required=True)
    if value is None:  # pragma: no cover - required=True already raised
        raise MalformedNotification(f"missing {name}")
    return value


AppIds = str | Collection[str]


def app_id_matches(given: str, app_id: AppIds) -> bool:
    """One merchant id serves several apps (Official Account, Mini Program, APP): any of ours."""
    return given == app_id if isinstance(app_id, str) else given in app_id


def _check_merchant(fields: Mapping[str, str], app_id: AppIds, mch_id: str) -> None:
    if fields.get("mch_id", "") != mch_id:
        raise ForeignNotification("notification for another mch_id")
    if not app_id_matches(fields.get("appid", ""), app_id):
        raise ForeignNotification("notification for another appid")


def verify_v2_payment(body: bytes, *, api_key: str, app_id: AppIds, mch_id: str) -> WechatV2Payment:
    """Check a v2 payment notification and return what it says.

    Order matters: the signature is checked before any field is believed, the merchant
    before the result is read.
    """
    if not (api_key and mch_id):
        raise ValueError("api_key and mch_id must be configured to accept v2 notifications")
    fields = parse_xml(body)
    if fields.get("return_code") != "SUCCESS":
        # A transport-level FAIL carries no signature, hence nothing we could believe.
        raise NotAuthentic("return_code is not SUCCESS")
    verify_v2_sign(fields, api_key)
    _check_merchant(fields, app_id, mch_id)
    result_ok = fields.get("result_code") == "SUCCESS"
    return WechatV2Payment(
        out_trade_no=fields.get("out_trade_no", ""),
        transaction_id=fields.get("transaction_id", ""),
        total_fee=_fen(fields, "total_fee", required=result_ok),
        cash_fee=_fen(fields, "cash_fee", required=False),
        time_end=fields.get("time_end", ""),
        result_ok=result_ok,
        err_code=fields.get("err_code", ""),
        err_code_des=fields.get("err_code_des", ""),
        appid=fields.get("appid", ""),
        mch_id=fields.get("mch_id", ""),
        openid=fields.get("openid", ""),
        trade_type=fields.get("trade_type", ""),
        raw=fields,
        _seal=_SEAL,
    )


def _refund_cipher(api_key: str) -> Cipher[modes.ECB]:
    key = hashlib.md5(api_key.encode()).hexdigest().encode("ascii")  # noqa: S324 - fixed by the protocol
    # ECB is what WeChat uses for req_info; we can only read it, not choose it.
    return Cipher(algorithms.AES(key), modes.ECB())  # noqa: S305


def decrypt_refund_req_info(req_info_b64: str, api_key: str) -> dict[str, str]:
    """Decrypt a refund notification's ``req_info`` (AES-256-ECB, key = md5 hex of the API key).

    Refund notifications carry no signature; a payload that decrypts to well-formed
    XML under our key is the only proof of origin, so every failure is NotAuthentic.
    """
    try:
        data = base64.b64decode(req_info_b64, validate=True)
    except (binascii.Error, ValueError):
        raise NotAuthentic("req_info is not base64") from None
    if not data or len(data) % 16:
        raise NotAuthentic("req_info is not whole AES blocks")
    decryptor = _refund_cipher(api_key).decryptor()
    padded = decryptor.update(data) + decryptor.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    try:
        plain = unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        raise NotAuthentic("req_info does not decrypt under our key") from None
    try:
        return parse_xml(plain, root="root")
    except MalformedNotification:
        raise NotAuthentic("req_info does not decrypt to the expected XML") from None


def encrypt_refund_req_info(fields: Mapping[str, str], api_key: str) -> str:
    """The sandbox's side of :func:`decrypt_refund_req_info`."""
    padder = padding.PKCS7(128).padder()
    padded = padder.update(to_xml(fields, root="root")) + padder.finalize()
    encryptor = _refund_cipher(api_key).encryptor()
    return base64.b64encode(encryptor.update(padded) + encryptor.finalize()).decode("ascii")


def verify_v2_refund(body: bytes, *, api_key: str, app_id: AppIds, mch_id: str) -> WechatV2Refund:
    """Check a v2 refund notification by decrypting ``req_info`` and return what it says."""
    if not (api_key and mch_id):
        raise ValueError("api_key and mch_id must be configured to accept v2 notifications")
    outer = parse_xml(body)
    if outer.get("return_code") != "SUCCESS":
        raise NotAuthentic("return_code is not SUCCESS")
    req_info = outer.get("req_info", "")
    if not req_info:
        raise NotAuthentic("missing req_info")
    inner = decrypt_refund_req_info(req_info, api_key)
    # The outer ids are unsigned; they are compared only once decryption has shown the
    # message was made with our key, to catch a notice routed to the wrong merchant config.
    _check_merchant(outer, app_id, mch_id)
    return WechatV2Refund(
        out_trade_no=inner.get("out_trade_no", ""),
        transaction_id=inner.get("transaction_id", ""),
        out_refund_no=inner.get("out_refund_no", ""),
        refund_id=inner.get("refund_id", ""),
        refund_fee=_fen_required(inner, "refund_fee"),
        total_fee=_fen_required(inner, "total_fee"),
        settlement_refund_fee=_fen(inner, "settlement_refund_fee", required=False),
        settlement_total_fee=_fen(inner, "settlement_total_fee", required=False),
        refund_status=inner.get("refund_status", ""),
        success_time=inner.get("success_time", ""),
        appid=outer.get("appid", ""),
        mch_id=outer.get("mch_id", ""),
        raw=inner,
        _seal=_SEAL,
    )


# ----------------------------------------------------------------------------------------------
# what the clients need to open the cashier


def jsapi_params(
    app_id: str,
    prepay_id: str,
    api_key: str,
    clock: Clock = default_clock,
    sign_type: V2SignType = "MD5",
) -> dict[str, str]:
    """``wx.requestPayment`` / ``WeixinJSBridge`` parameters for a v2 prepay id."""
    params = {
        "appId": app_id,
        "timeStamp": str(int(clock.now())),
        "nonceStr": clock.nonce(16),
        "package": f"prepay_id={prepay_id}",
        "signType": sign_type,
    }
    params["paySign"] = sign_v2(params, api_key, sign_type)
    return params


def app_params(
    app_id: str, mch_id: str, prepay_id: str, api_key: str, clock: Clock = default_clock
) -> dict[str, str]:
    """``PayReq`` fields for the APP SDK; the APP scheme is always MD5-signed in v2."""
    params = {
        "appid": app_id,
        "partnerid": mch_id,
        "prepayid": prepay_id,
        "package": "Sign=WXPay",
        "noncestr": clock.nonce(16),
        "timestamp": str(int(clock.now())),
    }
    params["sign"] = sign_v2(params, api_key, "MD5")
    return params
