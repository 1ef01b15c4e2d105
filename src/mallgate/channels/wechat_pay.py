"""WeChat Pay: the calls mallgate makes, plus the v2 and v3 protocol functions in one namespace.

The wire formats live in :mod:`wechat_pay_v2` (XML, API-key signatures) and
:mod:`wechat_pay_v3` (JSON, RSA signatures, AES-GCM); both are re-exported here so
callers can write ``wechat_pay.verify_v2_payment`` or ``wechat_pay.verify_v3_notification``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final, Literal

import httpx
from cryptography.hazmat.primitives import serialization

from mallgate.channels.errors import ChannelError, NotAuthentic
from mallgate.channels.http import PlatformClient
from mallgate.channels.wechat_pay_v2 import (
    ForeignNotification,
    MalformedNotification,
    V2SignType,
    WechatV2Payment,
    WechatV2Refund,
    app_params,
    decrypt_refund_req_info,
    encrypt_refund_req_info,
    jsapi_params,
    parse_xml,
    sign_v2,
    to_xml,
    v2_fail,
    v2_success,
    verify_v2_payment,
    verify_v2_refund,
    verify_v2_sign,
)
from mallgate.channels.wechat_pay_v3 import (
    SIGNATURE_TYPE,
    UnknownSerial,
    UnsupportedEvent,
    V3KeyStore,
    WechatV3Event,
    WechatV3Payment,
    WechatV3Refund,
    aead_decrypt,
    aead_encrypt,
    certificates_body,
    decrypt_certificates,
    parse_v3_notification,
    sign_v3,
    sign_v3_headers,
    sign_v3_notification,
    v3_authorization,
    v3_fail,
    v3_message,
    v3_success,
    verify_v3_authorization,
    verify_v3_notification,
    verify_v3_signature,
)
from mallgate.clock import Clock, default_clock
from mallgate.keys import load_private_key
from mallgate.settings import WechatPaySettings

__all__ = [
    "SIGNATURE_TYPE",
    "ForeignNotification",
    "MalformedNotification",
    "NotAuthentic",
    "PrepayResult",
    "TradeType",
    "UnknownSerial",
    "UnsupportedEvent",
    "V2OrderQuery",
    "V2SignType",
    "V3KeyStore",
    "WechatPayApiError",
    "WechatPayClient",
    "WechatV2Payment",
    "WechatV2Refund",
    "WechatV3Event",
    "WechatV3Payment",
    "WechatV3Refund",
    "aead_decrypt",
    "aead_encrypt",
    "app_params",
    "certificates_body",
    "decrypt_certificates",
    "decrypt_refund_req_info",
    "encrypt_refund_req_info",
    "jsapi_params",
    "parse_v3_notification",
    "parse_xml",
    "sign_v2",
    "sign_v3",
    "sign_v3_headers",
    "sign_v3_notification",
    "to_xml",
    "v2_fail",
    "v2_success",
    "v3_authorization",
    "v3_fail",
    "v3_message",
    "v3_success",
    "verify_v2_payment",
    "verify_v2_refund",
    "verify_v2_sign",
    "verify_v3_authorization",
    "verify_v3_notification",
    "verify_v3_signature",
]

TradeType = Literal["JSAPI", "APP", "MWEB", "NATIVE"]


class WechatPayApiError(ChannelError):
    """A call answered FAIL (or could not be made); ``code`` is err_code / the v3 code."""

    def __init__(self, message: str, *, code: str = "") -> None:
        super().__init__(message)
        self.code = code


_SEAL: Final = object()


@dataclass(frozen=True)
class V2OrderQuery:
    """A verified ``pay/orderquery`` answer; ``trade_state`` is ``NOT_EXIST`` for ORDERNOTEXIST."""

    out_trade_no: str
    transaction_id: str
    trade_state: str
    trade_state_desc: str
    total_fee: int | None
    time_end: str
    raw: dict[str, str]
    _seal: object = field(default=None, repr=False, compare=False, kw_only=True)

    def __post_init__(self) -> None:
        if self._seal is not _SEAL:
            raise TypeError("V2OrderQuery is only obtained from WechatPayClient.order_query")

    @property
    def paid(self) -> bool:
        return self.trade_state == "SUCCESS"


@dataclass(frozen=True)
class PrepayResult:
    prepay_id: str
    trade_type: str
    code_url: str
    mweb_url: str
    raw: dict[str, str]


class WechatPayClient(PlatformClient):
    """Calls to WeChat Pay: v2 XML signed with the API key, v3 signed with the merchant key.

    Every answer is verified before it is read: v2 by its ``sign``, v3 by its
    ``Wechatpay-*`` headers.
    """

    def __init__(
        self,
        settings: WechatPaySettings,
        *,
        http: httpx.AsyncClient | None = None,
        clock: Clock = default_clock,
        keys: V3KeyStore | None = None,
        timeout: float = 10.0,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._keys = keys
        super().__init__(http, timeout)
        self._base = settings.api_base.rstrip("/")

    @property
    def keys(self) -> V3KeyStore | None:
        return self._keys

    # ------------------------------------------------------------------------------------------
    # v2

    async def _post_v2(self, path: str, params: dict[str, str]) -> dict[str, str]:
        settings = self._settings
        if not (settings.api_key and settings.mch_id and settings.app_id):
            raise ValueError("v2 calls need app_id, mch_id and api_key")
        request = {
            "appid": settings.app_id,
            "mch_id": settings.mch_id,
            "nonce_str": self._clock.nonce(16),
            **{k: v for k, v in params.items() if v},
        }
        request["sign"] = sign_v2(request, settings.api_key, "MD5")
        try:
            response = await self._http.post(
                f"{self._base}{path}", content=to_xml(request), headers={"Content-Type": "text/xml"}
            )
        except httpx.HTTPError as exc:
            raise WechatPayApiError(f"WeChat Pay unreachable: {type(exc).__name__}") from exc
        if response.status_code != 200:
            raise WechatPayApiError(f"WeChat Pay answered HTTP {response.status_code}")
        fields = parse_xml(response.content)
        if fields.get("return_code") != "SUCCESS":
            raise WechatPayApiError(f"{path} FAIL: {fields.get('return_msg', '')[:200]}", code="FAIL")
        # We asked with MD5; the answer is signed the way the request was.
        verify_v2_sign(fields, settings.api_key, "MD5")
        if fields.get("mch_id") != settings.mch_id:
            raise WechatPayApiError(f"{path} answered for another merchant")
        return fields

    async def order_query(self, out_trade_no: str) -> V2OrderQuery:
        fields = await self._post_v2("/pay/orderquery", {"out_trade_no": out_trade_no})
        if fields.get("result_code") != "SUCCESS":
            code = fields.get("err_code", "")
            if code != "ORDERNOTEXIST":
                raise WechatPayApiError(
                    f"orderquery failed: {code} {fields.get('err_code_des', '')}", code=code
                )
            state = "NOT_EXIST"
        else:
            state = fields.get("trade_state", "")
        total = fields.get("total_fee", "")
        if total and not (total.isascii() and total.isdigit()):
            raise MalformedNotification("total_fee is not an amount in fen")
        return V2OrderQuery(
            out_trade_no=fields.get("out_trade_no", out_trade_no),
            transaction_id=fields.get("transaction_id", ""),
            trade_state=state,
            trade_state_desc=fields.get("trade_state_desc", ""),
            total_fee=int(total) if total else None,
            time_end=fields.get("time_end", ""),
            raw=fields,
            _seal=_SEAL,
        )

    async def unified_order(
        self,
        *,
        out_trade_no: str,
        total_fee: int,
        body: str,
        trade_type: TradeType,
        notify_url: str,
        client_ip: str,
        openid: str | None = None,
        scene_info: str | None = None,
        attach: str | None = None,
        time_expire: str | None = None,
    ) -> PrepayResult:
        if total_fee <= 0:
            raise ValueError("total_fee must be a positive number of fen")
        if trade_type == "JSAPI" and not openid:
            raise ValueError("JSAPI payments need the payer's openid")
        params = {
            "body": body,
            "out_trade_no": out_trade_no,
            "total_fee": str(total_fee),
            "spbill_create_ip": client_ip,
            "notify_url": notify_url,
            "trade_type": trade_type,
            "openid": openid or "",
            "scene_info": scene_info or "",
            "attach": attach or "",
            "time_expire": time_expire or "",
            # NATIVE requires a product id; the order number is as good as any.
            "product_id": out_trade_no if trade_type == "NATIVE" else "",
        }
        fields = await self._post_v2("/pay/unifiedorder", params)
        if fields.get("result_code") != "SUCCESS":
            code = fields.get("err_code", "")
            raise WechatPayApiError(
                f"unifiedorder failed: {code} {fields.get('err_code_des', '')}", code=code
            )
        if not fields.get("prepay_id"):
            raise WechatPayApiError("unifiedorder answer without prepay_id")
        return PrepayResult(
            prepay_id=fields["prepay_id"],
            trade_type=fields.get("trade_type", trade_type),
            code_url=fields.get("code_url", ""),
            mweb_url=fields.get("mweb_url", ""),
            raw=fields,
        )

    # ------------------------------------------------------------------------------------------
    # v3

    async def _get_v3(self, path: str) -> httpx.Response:
        settings = self._settings
        if not (settings.mch_private_key and settings.mch_serial_no and settings.mch_id):
            raise ValueError("v3 calls need mch_id, mch_private_key and mch_serial_no")
        url = httpx.URL(f"{self._base}{path}")
        authorization = v3_authorization(
            "GET",
            url.raw_path.decode("ascii"),
            b"",
            mch_id=settings.mch_id,
            serial_no=settings.mch_serial_no,
            private_key=load_private_key(settings.mch_private_key),
            timestamp=int(self._clock.now()),
            nonce=self._clock.nonce(16),
        )
        headers = {"Authorization": authorization, "Accept": "application/json", "User-Agent": "mallgate"}
        try:
            response = await self._http.get(url, headers=headers)
        except httpx.HTTPError as exc:
            raise WechatPayApiError(f"WeChat Pay unreachable: {type(exc).__name__}") from exc
        if response.status_code != 200:
            raise WechatPayApiError(f"{path} answered HTTP {response.status_code}", code=_v3_code(response))
        return response

    async def fetch_certificates(self) -> list[tuple[str, str]]:
        """Download the platform certificates: ``[(serial, PEM)]``, also added to the key store.

        The answer is signed by one of the certificates it carries, so (as the official
        SDKs do on bootstrap) it is checked against them together with the keys we hold;
        the encryption under our APIv3 key is what ties them to our merchant account.
        """
        if not self._settings.api_v3_key:
            raise ValueError("downloading certificates needs the APIv3 key")
        response = await self._get_v3("/v3/certificates")
        try:
            payload = response.json()
        except ValueError:
            raise WechatPayApiError("certificates answer is not JSON") from None
        if not isinstance(payload, dict):
            raise WechatPayApiError("certificates answer is not an object")
        certs = decrypt_certificates(payload, self._settings.api_v3_key)
        if not certs:
            raise WechatPayApiError("certificates answer without certificates")
        candidates = self._keys.copy() if self._keys is not None else V3KeyStore()
        candidates.add_certificates(certs)
        verify_v3_signature(response.headers, response.content, keys=candidates, now=self._clock.now())
        if self._keys is not None:
            self._keys.add_certificates(certs)
        return [
            (format(c.serial_number, "X"), c.public_bytes(serialization.Encoding.PEM).decode("ascii"))
            for c in certs
        ]


def _v3_code(response: httpx.Response) -> str:
    try:
        data: Any = response.json()
    except ValueError:
        return ""
    return str(data.get("code", "")) if isinstance(data, dict) else ""
