"""WeChat Pay: the calls mallgate makes, plus the v2 and v3 protocol functions in one namespace.

The wire formats live in :mod:`wechat_pay_v2` (XML, API-key signatures) and
:mod:`wechat_pay_v3` (JSON, RSA signatures, AES-GCM); both are re-exported here so
callers can write ``wechat_pay.verify_v2_payment`` or ``wechat_pay.verify_v3_notification``.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from dataclasses import dataclass, field
from typing import Any, Final, Literal
from urllib.parse import quote

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
    v3_app_params,
    v3_authorization,
    v3_fail,
    v3_jsapi_params,
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
    "RefundAnswer",
    "TradeType",
    "UnknownSerial",
    "UnsupportedEvent",
    "V2OrderQuery",
    "V2SignType",
    "V3KeyStore",
    "V3TradeType",
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
    "v3_app_params",
    "v3_authorization",
    "v3_fail",
    "v3_jsapi_params",
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
# The last part of the v3 order path: /v3/pay/transactions/{jsapi,app,h5,native}.
V3TradeType = Literal["jsapi", "app", "h5", "native"]


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


@dataclass(frozen=True)
class RefundAnswer:
    """What WeChat Pay said of one refund (request or query), verified.

    ``status``: SUCCESS, PROCESSING, or a final failure (CLOSED, ABNORMAL, FAIL); v2 answers
    are mapped onto the same words.
    """

    out_refund_no: str
    refund_id: str
    status: str
    refund_fen: int | None
    raw: dict[str, Any]

    @property
    def failed(self) -> bool:
        return self.status not in ("SUCCESS", "PROCESSING")


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

    async def _post_v2(
        self, path: str, params: dict[str, str], *, app_id: str = "", http: httpx.AsyncClient | None = None
    ) -> dict[str, str]:
        settings = self._settings
        app_id = app_id or settings.app_id
        if not (settings.api_key and settings.mch_id and app_id):
            raise ValueError("v2 calls need app_id, mch_id and api_key")
        request = {
            "appid": app_id,
            "mch_id": settings.mch_id,
            "nonce_str": self._clock.nonce(16),
            **{k: v for k, v in params.items() if v},
        }
        request["sign"] = sign_v2(request, settings.api_key, "MD5")
        try:
            response = await (http or self._http).post(
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
        app_id: str = "",
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
        fields = await self._post_v2("/pay/unifiedorder", params, app_id=app_id)
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

    async def close_order(self, out_trade_no: str) -> None:
        """``pay/closeorder``; raises WechatPayApiError (code ORDERPAID when it was paid)."""
        fields = await self._post_v2("/pay/closeorder", {"out_trade_no": out_trade_no})
        if fields.get("result_code") != "SUCCESS":
            code = fields.get("err_code", "")
            # ORDERCLOSED: closed already, which is what was asked.
            if code != "ORDERCLOSED":
                raise WechatPayApiError(
                    f"closeorder failed: {code} {fields.get('err_code_des', '')}", code=code
                )

    def _client_cert_http(self) -> httpx.AsyncClient | None:
        """The client holding the merchant certificate ``secapi`` calls need (None: the plain one)."""
        settings = self._settings
        if not settings.api_client_cert:
            return None
        context = ssl.create_default_context()
        context.load_cert_chain(settings.api_client_cert, settings.api_client_key or None)
        return httpx.AsyncClient(verify=context, timeout=self._http.timeout)

    async def refund_v2(
        self,
        *,
        out_trade_no: str,
        out_refund_no: str,
        total_fee: int,
        refund_fee: int,
        reason: str,
        notify_url: str,
    ) -> RefundAnswer:
        """``secapi/pay/refund`` (needs the API client certificate at WeChat Pay)."""
        params = {
            "out_trade_no": out_trade_no,
            "out_refund_no": out_refund_no,
            "total_fee": str(total_fee),
            "refund_fee": str(refund_fee),
            "refund_desc": reason,
            "notify_url": notify_url,
        }
        http = self._client_cert_http()
        try:
            fields = await self._post_v2("/secapi/pay/refund", params, http=http)
        finally:
            if http is not None:
                await http.aclose()
        if fields.get("result_code") != "SUCCESS":
            code = fields.get("err_code", "")
            raise WechatPayApiError(f"refund failed: {code} {fields.get('err_code_des', '')}", code=code)
        # Accepted: the outcome comes with the refund notice (or refundquery).
        return RefundAnswer(
            out_refund_no, fields.get("refund_id", ""), "PROCESSING", refund_fee, dict(fields)
        )

    async def refund_query_v2(self, out_refund_no: str) -> RefundAnswer:
        fields = await self._post_v2("/pay/refundquery", {"out_refund_no": out_refund_no})
        if fields.get("result_code") != "SUCCESS":
            code = fields.get("err_code", "")
            if code == "REFUNDNOTEXIST":
                return RefundAnswer(out_refund_no, "", "NOT_EXIST", None, dict(fields))
            raise WechatPayApiError(f"refundquery failed: {code}", code=code)
        status = fields.get("refund_status_0", "")
        fee = fields.get("refund_fee_0", "")
        return RefundAnswer(
            out_refund_no,
            fields.get("refund_id_0", ""),
            # v2's words for a refund that will not happen: CHANGE (abnormal), REFUNDCLOSE.
            "FAIL" if status in ("CHANGE", "REFUNDCLOSE") else status,
            int(fee) if fee.isascii() and fee.isdigit() else None,
            dict(fields),
        )

    # ------------------------------------------------------------------------------------------
    # v3

    async def _get_v3(self, path: str) -> httpx.Response:
        settings = self._settings
        if not (settings.mch_private_key and settings.mch_serial_no and settings.mch_id):
            raise ValueError("v3 calls need mch_id, mch_private_key and mch_serial_no")
        url = httpx.URL(f"{self._base}{path}")
        # RSA signing takes a millisecond or two: off the event loop.
        authorization = await asyncio.to_thread(
            v3_authorization,
            "GET",
            _signed_path(url, self._base),
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

    def _v3_keys(self) -> V3KeyStore:
        if self._keys is None:
            self._keys = V3KeyStore.from_settings(self._settings)
        return self._keys

    async def _call_v3(
        self, method: str, path: str, payload: dict[str, Any] | None = None
    ) -> tuple[int, Any]:
        """Sign, send, verify: the status and the JSON of an answer WeChat Pay signed.

        A 2xx answer is believed only once its Wechatpay-* signature checks out; an error
        answer yields a WechatPayApiError with its code, so nothing is taken from it but
        the refusal.
        """
        settings = self._settings
        if not settings.v3_ready:
            raise ValueError(
                "v3 calls need mch_id, mch_private_key, mch_serial_no, the APIv3 key and a platform key"
            )
        body = (
            b""
            if payload is None
            else json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        )
        url = httpx.URL(f"{self._base}{path}")
        # RSA signing takes a millisecond or two: off the event loop.
        authorization = await asyncio.to_thread(
            v3_authorization,
            method,
            _signed_path(url, self._base),
            body,
            mch_id=settings.mch_id,
            serial_no=settings.mch_serial_no,
            private_key=load_private_key(settings.mch_private_key),
            timestamp=int(self._clock.now()),
            nonce=self._clock.nonce(32),
        )
        headers = {"Authorization": authorization, "Accept": "application/json", "User-Agent": "mallgate"}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        try:
            response = await self._http.request(method, url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise WechatPayApiError(f"WeChat Pay unreachable: {type(exc).__name__}") from exc
        if not 200 <= response.status_code < 300:
            code = _v3_code(response)
            raise WechatPayApiError(
                f"{path} answered HTTP {response.status_code} {code}", code=code or "HTTP"
            )
        await self._verify_answer(response)
        if not response.content:
            return response.status_code, {}
        try:
            return response.status_code, response.json()
        except ValueError:
            raise WechatPayApiError(f"{path} answer is not JSON") from None

    async def _verify_answer(self, response: httpx.Response) -> None:
        keys = self._v3_keys()
        try:
            verify_v3_signature(response.headers, response.content, keys=keys, now=self._clock.now())
        except UnknownSerial:
            if not keys.certificate_mode:
                raise
            # Certificate mode: a rotated platform certificate; fetch them once and check again.
            await self.fetch_certificates()
            verify_v3_signature(response.headers, response.content, keys=keys, now=self._clock.now())

    async def prepay_v3(
        self,
        kind: V3TradeType,
        *,
        app_id: str,
        out_trade_no: str,
        total: int,
        description: str,
        notify_url: str,
        client_ip: str,
        openid: str | None = None,
        wap_url: str = "",
    ) -> dict[str, str]:
        """``POST /v3/pay/transactions/{kind}``: prepay_id (jsapi, app), h5_url or code_url."""
        if total <= 0:
            raise ValueError("total must be a positive number of fen")
        if kind == "jsapi" and not openid:
            raise ValueError("JSAPI payments need the payer's openid")
        payload: dict[str, Any] = {
            "appid": app_id,
            "mchid": self._settings.mch_id,
            "description": description,
            "out_trade_no": out_trade_no,
            "notify_url": notify_url,
            "amount": {"total": total, "currency": "CNY"},
        }
        if kind == "jsapi":
            payload["payer"] = {"openid": openid}
        if kind == "h5":
            payload["scene_info"] = {
                "payer_client_ip": client_ip,
                "h5_info": {"type": "Wap", "app_url": wap_url},
            }
        elif kind == "native":
            payload["scene_info"] = {"payer_client_ip": client_ip}
        _, answer = await self._call_v3("POST", f"/v3/pay/transactions/{kind}", payload)
        wanted = {"jsapi": "prepay_id", "app": "prepay_id", "h5": "h5_url", "native": "code_url"}[kind]
        value = answer.get(wanted) if isinstance(answer, dict) else None
        if not isinstance(value, str) or not value:
            raise WechatPayApiError(f"{kind} answer without {wanted}")
        return {wanted: value}

    async def order_query_v3(self, out_trade_no: str) -> V2OrderQuery:
        """``GET .../out-trade-no/{no}?mchid=``: the same verified answer as v2's orderquery."""
        path = (
            f"/v3/pay/transactions/out-trade-no/{quote(out_trade_no, safe='')}?mchid={self._settings.mch_id}"
        )
        try:
            _, answer = await self._call_v3("GET", path)
        except WechatPayApiError as exc:
            if exc.code != "ORDER_NOT_EXIST":
                raise
            answer = {"trade_state": "NOT_EXIST"}
        if not isinstance(answer, dict):
            raise WechatPayApiError("order query answer is not an object")
        amount = answer.get("amount")
        total = amount.get("total") if isinstance(amount, dict) else None
        if total is not None and (not isinstance(total, int) or isinstance(total, bool) or total < 0):
            raise MalformedNotification("amount.total is not an amount in fen")
        if answer.get("trade_state") == "SUCCESS" and (amount or {}).get("currency", "CNY") != "CNY":
            raise MalformedNotification("unsupported currency")
        return V2OrderQuery(
            out_trade_no=str(answer.get("out_trade_no", out_trade_no)),
            transaction_id=str(answer.get("transaction_id", "")),
            trade_state=str(answer.get("trade_state", "")),
            trade_state_desc=str(answer.get("trade_state_desc", "")),
            total_fee=total,
            time_end=str(answer.get("success_time", "")),
            raw={k: str(v) for k, v in answer.items()},
            _seal=_SEAL,
        )

    async def close_v3(self, out_trade_no: str) -> None:
        """``POST .../out-trade-no/{no}/close``: 204 when closed; WechatPayApiError (ORDERPAID, ...) else."""
        path = f"/v3/pay/transactions/out-trade-no/{quote(out_trade_no, safe='')}/close"
        await self._call_v3("POST", path, {"mchid": self._settings.mch_id})

    async def refund_v3(
        self, *, out_trade_no: str, out_refund_no: str, total: int, refund: int, reason: str, notify_url: str
    ) -> RefundAnswer:
        """``POST /v3/refund/domestic/refunds``."""
        payload = {
            "out_trade_no": out_trade_no,
            "out_refund_no": out_refund_no,
            "notify_url": notify_url,
            "amount": {"refund": refund, "total": total, "currency": "CNY"},
        }
        if reason:
            payload["reason"] = reason
        _, answer = await self._call_v3("POST", "/v3/refund/domestic/refunds", payload)
        return _refund_answer(answer, out_refund_no)

    async def refund_query_v3(self, out_refund_no: str) -> RefundAnswer:
        path = f"/v3/refund/domestic/refunds/{quote(out_refund_no, safe='')}"
        try:
            _, answer = await self._call_v3("GET", path)
        except WechatPayApiError as exc:
            if exc.code == "RESOURCE_NOT_EXISTS":
                return RefundAnswer(out_refund_no, "", "NOT_EXIST", None, {})
            raise
        return _refund_answer(answer, out_refund_no)


def _refund_answer(answer: Any, out_refund_no: str) -> RefundAnswer:
    if not isinstance(answer, dict) or answer.get("out_refund_no") != out_refund_no:
        raise WechatPayApiError("refund answer names another refund")
    amount = answer.get("amount")
    refund = amount.get("refund") if isinstance(amount, dict) else None
    return RefundAnswer(
        out_refund_no,
        str(answer.get("refund_id", "")),
        str(answer.get("status", "")),
        refund if isinstance(refund, int) and not isinstance(refund, bool) else None,
        answer,
    )


def _signed_path(url: httpx.URL, base: str) -> str:
    """The URL as WeChat Pay signs it: path and query from its API root (``/v3/...``).

    ``api_base`` may carry a path of its own (a forward proxy, the sandbox's mount); that part
    never reaches WeChat Pay, so it is not signed, as the official SDKs sign only ``/v3/...``.
    """
    prefix = httpx.URL(base).raw_path.rstrip(b"/")
    raw = url.raw_path
    return (raw[len(prefix) :] if prefix and raw.startswith(prefix) else raw).decode("ascii")


def _v3_code(response: httpx.Response) -> str:
    try:
        data: Any = response.json()
    except ValueError:
        return ""
    return str(data.get("code", "")) if isinstance(data, dict) else ""
