"""Alipay OpenAPI ("gateway.do") protocol: notifications, signed calls, payment start.

Verify and sign live side by side: production uses ``verify_*``, the sandbox and
the tests use ``sign_*``, so the pair cannot drift apart unnoticed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Any, Final, Literal
from urllib.parse import unquote_to_bytes, urlencode

import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from mallgate.channels.errors import ChannelError, ForeignNotification, MalformedNotification, NotAuthentic
from mallgate.channels.http import PlatformClient
from mallgate.clock import Clock, default_clock
from mallgate.keys import KeyFormatError, load_private_key, load_public_key
from mallgate.settings import AlipaySettings

__all__ = [
    "FAILURE_BODY",
    "SUCCESS_BODY",
    "AlipayApiError",
    "AlipayClient",
    "AlipayNotification",
    "ForeignNotification",
    "MalformedNotification",
    "SignType",
    "TradeQueryResult",
    "app_order_string",
    "canonical_string",
    "failure",
    "parse_form",
    "sign_notification",
    "sign_params",
    "sign_request",
    "sign_response",
    "success",
    "verify_notification",
    "verify_request",
    "verify_response",
    "wap_pay_url",
]

SignType = Literal["RSA2", "RSA"]
PublicKeyLike = rsa.RSAPublicKey | str
PrivateKeyLike = rsa.RSAPrivateKey | str

# Alipay reads exactly these seven bytes; anything else means "send again".
SUCCESS_BODY: Final = "success"
FAILURE_BODY: Final = "failure"

PAID_STATUSES: Final = frozenset({"TRADE_SUCCESS", "TRADE_FINISHED"})

_HASHES: Final[Mapping[str, type[hashes.HashAlgorithm]]] = {"RSA2": hashes.SHA256, "RSA": hashes.SHA1}
# GBK is a superset of GB2312 and round-trips its bytes exactly, so one codec serves both labels.
_CHARSETS: Final[Mapping[str, str]] = {"utf-8": "utf-8", "utf8": "utf-8", "gbk": "gbk", "gb2312": "gbk"}
# [0-9], not \d: \d also matches fullwidth and other scripts' digits, which Decimal/int accept.
_AMOUNT = re.compile(r"[0-9]{1,12}(\.[0-9]{1,2})?")


def success() -> str:
    return SUCCESS_BODY


def failure() -> str:
    return FAILURE_BODY


class AlipayApiError(ChannelError):
    """A gateway call answered with an error code (or could not be made)."""

    def __init__(self, message: str, *, code: str = "", sub_code: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.sub_code = sub_code


# Only this module can produce verified objects: the seal is checked on construction.
_SEAL: Final = object()


def _check_seal(seal: object, name: str) -> None:
    if seal is not _SEAL:
        raise TypeError(f"{name} is only obtained from the function that verifies it")


@dataclass(frozen=True)
class AlipayNotification:
    out_trade_no: str
    trade_no: str
    trade_status: str
    total_amount: Decimal | None
    refund_fee: Decimal | None
    gmt_refund: str
    gmt_payment: str
    notify_id: str
    app_id: str
    seller_id: str
    buyer_id: str
    is_refund: bool
    raw: dict[str, str]
    _seal: object = field(default=None, repr=False, compare=False, kw_only=True)

    def __post_init__(self) -> None:
        _check_seal(self._seal, "AlipayNotification")

    @property
    def is_paid(self) -> bool:
        return self.trade_status in PAID_STATUSES and not self.is_refund


@dataclass(frozen=True)
class TradeQueryResult:
    code: str
    trade_status: str
    out_trade_no: str
    trade_no: str
    total_amount: Decimal | None
    sub_code: str
    raw: dict[str, Any]
    _seal: object = field(default=None, repr=False, compare=False, kw_only=True)

    def __post_init__(self) -> None:
        _check_seal(self._seal, "TradeQueryResult")


@dataclass(frozen=True)
class RefundResult:
    """A verified ``alipay.trade.refund`` answer; ``refund_total`` is cumulative over the trade."""

    trade_no: str
    refund_total: Decimal
    fund_change: bool
    raw: dict[str, Any]


# ----------------------------------------------------------------------------------------------
# keys


@lru_cache(maxsize=16)
def _cached_public(text: str) -> rsa.RSAPublicKey:
    return load_public_key(text)


@lru_cache(maxsize=16)
def _cached_private(text: str) -> rsa.RSAPrivateKey:
    return load_private_key(text)


def _public(key: PublicKeyLike) -> rsa.RSAPublicKey:
    # Parsing a PEM costs far more than checking a signature, hence the cache.
    return _cached_public(key) if isinstance(key, str) else key


def _private(key: PrivateKeyLike) -> rsa.RSAPrivateKey:
    return _cached_private(key) if isinstance(key, str) else key


def _hash_for(sign_type: str) -> hashes.HashAlgorithm:
    try:
        return _HASHES[sign_type]()
    except KeyError:
        raise ValueError(f"unsupported Alipay sign_type {sign_type!r}") from None


def _codec(charset: str) -> str:
    try:
        return _CHARSETS[charset.strip().lower() or "utf-8"]
    except KeyError:
        raise MalformedNotification(f"unsupported charset {charset[:20]!r}") from None


# ----------------------------------------------------------------------------------------------
# the signed text


def canonical_string(params: Mapping[str, str], *, drop_sign_type: bool = True) -> str:
    """The text Alipay signs: sorted ``k=v`` pairs, raw values, empty values left out.

    Notifications use rule V1 (``sign_type`` left out too); requests keep ``sign_type``.
    """
    excluded = {"sign", "sign_type"} if drop_sign_type else {"sign"}
    pairs = sorted((k, v) for k, v in params.items() if k not in excluded and v != "")
    return "&".join(f"{k}={v}" for k, v in pairs)


def _sign_bytes(data: bytes, private_key: PrivateKeyLike, sign_type: str) -> str:
    signature = _private(private_key).sign(data, padding.PKCS1v15(), _hash_for(sign_type))
    return base64.b64encode(signature).decode("ascii")


def _verify_bytes(data: bytes, signature_b64: str, public_key: PublicKeyLike, sign_type: str) -> None:
    if not signature_b64:
        raise NotAuthentic("missing sign")
    try:
        signature = base64.b64decode(signature_b64, validate=True)
    except (binascii.Error, ValueError):
        raise NotAuthentic("sign is not base64") from None
    try:
        _public(public_key).verify(signature, data, padding.PKCS1v15(), _hash_for(sign_type))
    except InvalidSignature:
        raise NotAuthentic("bad signature") from None


def _encoded(text: str, params: Mapping[str, str]) -> bytes:
    try:
        return text.encode(_codec(params.get("charset", "")))
    except UnicodeEncodeError:
        # Text that the declared charset cannot carry was never signed in that charset.
        raise NotAuthentic("text not representable in the declared charset") from None


def sign_params(
    params: Mapping[str, str],
    private_key: PrivateKeyLike,
    sign_type: SignType = "RSA2",
    *,
    drop_sign_type: bool = True,
) -> str:
    """Base64 signature over the canonical string, encoded in the ``charset`` field."""
    text = canonical_string(params, drop_sign_type=drop_sign_type)
    return _sign_bytes(_encoded(text, params), private_key, sign_type)


def sign_notification(
    params: Mapping[str, str], private_key: PrivateKeyLike, sign_type: SignType = "RSA2"
) -> dict[str, str]:
    """A notification as Alipay sends it (sandbox, tests): ``params`` plus ``sign`` and ``sign_type``."""
    out = {k: v for k, v in params.items() if k not in ("sign", "sign_type")}
    out["sign"] = sign_params(out, private_key, sign_type)
    out["sign_type"] = sign_type
    return out


def sign_request(
    params: Mapping[str, str], private_key: PrivateKeyLike, sign_type: SignType = "RSA2"
) -> dict[str, str]:
    """Request parameters with ``sign_type`` set and ``sign`` added; ``sign_type`` is itself signed."""
    out = {k: v for k, v in params.items() if k != "sign"}
    out["sign_type"] = sign_type
    out["sign"] = sign_params(out, private_key, sign_type, drop_sign_type=False)
    return out


def verify_request(
    params: Mapping[str, str], public_key: PublicKeyLike, sign_type: SignType = "RSA2"
) -> None:
    """The sandbox's side of :func:`sign_request`: checks a merchant's call."""
    if params.get("sign_type", sign_type) != sign_type:
        raise NotAuthentic("sign_type differs from the configured one")
    text = canonical_string(params, drop_sign_type=False)
    _verify_bytes(_encoded(text, params), params.get("sign", ""), public_key, sign_type)


# ----------------------------------------------------------------------------------------------
# notifications


def _unquote(part: bytes) -> bytes:
    part = part.replace(b"+", b" ")
    # Most keys and many values hold no escape: unquote_to_bytes is Python, and costs.
    return unquote_to_bytes(part) if b"%" in part else part


def _form_pairs(raw: bytes) -> list[tuple[bytes, bytes]]:
    pairs: list[tuple[bytes, bytes]] = []
    for piece in raw.split(b"&"):
        if not piece:
            continue
        key, _, value = piece.partition(b"=")
        pairs.append((_unquote(key), _unquote(value)))
    return pairs


def _query_bytes(query: str | bytes | None) -> bytes:
    if query is None:
        return b""
    if isinstance(query, bytes):
        return query
    try:
        # ASGI servers hand the raw query string over as latin-1 text; this restores its bytes.
        return query.encode("latin-1")
    except UnicodeEncodeError:
        return query.encode("utf-8")


def parse_form(body: bytes, query: str | bytes | None = None) -> dict[str, str]:
    """Form-decode a notification once, in the charset its own ``charset`` field names.

    Percent-escapes become bytes first; the bytes become text only once the charset is
    known, which is what lets a GBK notification verify. A repeated key is refused:
    a parser that kept the first or the last copy could be made to check one value
    and act on another.

    ``query`` is the raw query string of a GET notification: best the ASGI
    ``scope["query_string"]`` bytes; text is taken as latin-1-decoded bytes.
    """
    pairs = _form_pairs(_query_bytes(query)) + _form_pairs(body)
    seen: set[bytes] = set()
    charset = ""
    for key, value in pairs:
        if key in seen:
            raise MalformedNotification(f"repeated key {key[:40]!r}")
        seen.add(key)
        if key == b"charset":
            charset = value.decode("ascii", "replace")
    codec = _codec(charset)
    try:
        return {key.decode(codec): value.decode(codec) for key, value in pairs}
    except UnicodeDecodeError:
        raise MalformedNotification(f"bytes that are not {codec}") from None


def _amount(params: Mapping[str, str], name: str) -> Decimal | None:
    value = params.get(name, "")
    if value == "":
        return None
    if not _AMOUNT.fullmatch(value):
        raise MalformedNotification(f"{name} is not an amount")
    try:
        return Decimal(value)
    except InvalidOperation:  # pragma: no cover - the pattern already guarantees a number
        raise MalformedNotification(f"{name} is not an amount") from None


def verify_notification(
    params: Mapping[str, str],
    *,
    public_key: PublicKeyLike,
    sign_type: SignType,
    app_id: str,
    seller_id: str = "",
) -> AlipayNotification:
    """Check an asynchronous notification and return what it says.

    The hash comes from our configuration, never from the message: a notification
    naming another ``sign_type`` is refused, so nobody can downgrade RSA2 to SHA-1.
    The signature is checked before anything else is read. ``seller_id`` is compared
    when configured and present in the notice (refund notices of some products lack it;
    ``app_id`` is always there and always compared).
    """
    if not app_id:
        raise ValueError("app_id must be configured to accept Alipay notifications")
    signature = params.get("sign", "")
    if not signature:
        raise NotAuthentic("missing sign")
    claimed = params.get("sign_type", "")
    if claimed and claimed != sign_type:
        raise NotAuthentic(f"sign_type {claimed[:10]!r} differs from the configured {sign_type}")
    _verify_bytes(_encoded(canonical_string(params), params), signature, public_key, sign_type)

    if params.get("app_id", "") != app_id:
        raise ForeignNotification("notification for another app_id")
    notified_seller = params.get("seller_id", "")
    if seller_id and notified_seller and notified_seller != seller_id:
        raise ForeignNotification("notification for another seller_id")

    refund_fee = _amount(params, "refund_fee")
    gmt_refund = params.get("gmt_refund", "")
    return AlipayNotification(
        out_trade_no=params.get("out_trade_no", ""),
        trade_no=params.get("trade_no", ""),
        trade_status=params.get("trade_status", ""),
        total_amount=_amount(params, "total_amount"),
        refund_fee=refund_fee,
        gmt_refund=gmt_refund,
        gmt_payment=params.get("gmt_payment", ""),
        notify_id=params.get("notify_id", ""),
        app_id=params["app_id"],
        seller_id=notified_seller,
        buyer_id=params.get("buyer_id", ""),
        is_refund=refund_fee is not None or bool(gmt_refund),
        raw=dict(params),
        _seal=_SEAL,
    )


# ----------------------------------------------------------------------------------------------
# synchronous responses


def _top_level_spans(text: str) -> dict[str, tuple[int, int]]:
    """Where each top-level value starts and ends in the JSON text, as received."""
    decoder = json.JSONDecoder()
    ws = re.compile(r"[ \t\n\r]*")

    def skip(i: int) -> int:
        match = ws.match(text, i)
        return match.end() if match else i

    spans: dict[str, tuple[int, int]] = {}
    i = skip(0)
    if text[i : i + 1] != "{":
        raise ValueError("not a JSON object")
    i = skip(i + 1)
    if text[i : i + 1] == "}":
        return spans
    while True:
        if text[i : i + 1] != '"':
            raise ValueError("expected a key")
        key, i = json.decoder.scanstring(text, i + 1)  # type: ignore[attr-defined]
        i = skip(i)
        if text[i : i + 1] != ":":
            raise ValueError("expected ':'")
        start = skip(i + 1)
        _, end = decoder.raw_decode(text, start)
        if key in spans:
            # Two copies of a key would let the checked copy differ from the used one.
            raise ValueError(f"repeated key {key!r}")
        spans[key] = (start, end)
        i = skip(end)
        if text[i : i + 1] == ",":
            i = skip(i + 1)
            continue
        if text[i : i + 1] == "}" and not text[i + 1 :].strip():
            return spans
        raise ValueError("trailing data")


def _response_key(method: str) -> str:
    return method.replace(".", "_") + "_response"


def verify_response(text: str, method: str, public_key: PublicKeyLike, sign_type: SignType) -> dict[str, Any]:
    """Check the signature of a gateway answer and return its ``<method>_response`` object.

    The signed bytes are the value's text exactly as received: re-serialising parsed
    JSON would change spacing, escapes and number formats and break the signature.
    """
    try:
        spans = _top_level_spans(text)
        document = json.loads(text)
    except (ValueError, IndexError) as exc:
        raise ChannelError(f"unreadable Alipay response: {exc}") from None
    key = _response_key(method)
    if key not in spans:
        key = "error_response" if "error_response" in spans else key
    if key not in spans:
        raise ChannelError(f"Alipay response without {key}")
    sign = document.get("sign")
    if not isinstance(sign, str) or not sign:
        raise NotAuthentic("response without sign")
    start, end = spans[key]
    _verify_bytes(text[start:end].encode("utf-8"), sign, public_key, sign_type)
    payload = document[key]
    if not isinstance(payload, dict):
        raise ChannelError(f"{key} is not an object")
    return payload


def sign_response(
    method: str, payload: Mapping[str, Any], private_key: PrivateKeyLike, sign_type: SignType = "RSA2"
) -> str:
    """A gateway answer as Alipay writes it (sandbox, tests)."""
    inner = json.dumps(dict(payload), ensure_ascii=False, separators=(",", ":"))
    signature = _sign_bytes(inner.encode("utf-8"), private_key, sign_type)
    return f'{{"{_response_key(method)}":{inner},"sign":{json.dumps(signature)}}}'


# ----------------------------------------------------------------------------------------------
# requests


def _yuan(amount: Decimal) -> str:
    if not amount.is_finite() or amount <= 0 or amount != amount.quantize(Decimal("0.01")):
        raise ValueError(f"amount must be positive with at most two decimals: {amount}")
    return f"{amount:.2f}"


def _common_params(settings: AlipaySettings, method: str, clock: Clock) -> dict[str, str]:
    return {
        "app_id": settings.app_id,
        "method": method,
        "format": "JSON",
        "charset": "utf-8",
        "sign_type": settings.sign_type,
        "timestamp": clock.beijing().strftime("%Y-%m-%d %H:%M:%S"),
        "version": "1.0",
    }


def _biz(content: Mapping[str, Any]) -> str:
    return json.dumps(
        {k: v for k, v in content.items() if v is not None}, ensure_ascii=False, separators=(",", ":")
    )


def _pay_params(
    settings: AlipaySettings,
    method: str,
    product_code: str,
    *,
    notify_url: str,
    out_trade_no: str,
    total_amount: Decimal,
    subject: str,
    clock: Clock,
    extra: Mapping[str, str | None],
    biz_extra: Mapping[str, Any],
) -> dict[str, str]:
    params = _common_params(settings, method, clock)
    params["notify_url"] = notify_url
    params.update({k: v for k, v in extra.items() if v})
    params["biz_content"] = _biz(
        {
            "out_trade_no": out_trade_no,
            "total_amount": _yuan(total_amount),
            "subject": subject,
            "product_code": product_code,
            **biz_extra,
        }
    )
    return sign_request(params, settings.private_key, settings.sign_type)


def app_order_string(
    settings: AlipaySettings,
    *,
    notify_url: str,
    out_trade_no: str,
    total_amount: Decimal,
    subject: str,
    clock: Clock = default_clock,
    body: str | None = None,
    timeout_express: str | None = None,
    passback_params: str | None = None,
) -> str:
    """The signed order string the APP hands to the Alipay SDK (``alipay.trade.app.pay``)."""
    params = _pay_params(
        settings,
        "alipay.trade.app.pay",
        "QUICK_MSECURITY_PAY",
        notify_url=notify_url,
        out_trade_no=out_trade_no,
        total_amount=total_amount,
        subject=subject,
        clock=clock,
        extra={},
        biz_extra={"body": body, "timeout_express": timeout_express, "passback_params": passback_params},
    )
    return urlencode(sorted(params.items()))


def wap_pay_url(
    settings: AlipaySettings,
    *,
    notify_url: str,
    out_trade_no: str,
    total_amount: Decimal,
    subject: str,
    clock: Clock = default_clock,
    return_url: str | None = None,
    quit_url: str | None = None,
    body: str | None = None,
    timeout_express: str | None = None,
    passback_params: str | None = None,
) -> str:
    """Gateway URL with a signed query that opens the mobile cashier (``alipay.trade.wap.pay``)."""
    params = _pay_params(
        settings,
        "alipay.trade.wap.pay",
        "QUICK_WAP_WAY",
        notify_url=notify_url,
        out_trade_no=out_trade_no,
        total_amount=total_amount,
        subject=subject,
        clock=clock,
        extra={"return_url": return_url},
        biz_extra={
            "quit_url": quit_url,
            "body": body,
            "timeout_express": timeout_express,
            "passback_params": passback_params,
        },
    )
    return f"{settings.gateway_url}?{urlencode(sorted(params.items()))}"


class AlipayClient(PlatformClient):
    """The calls mallgate makes to the gateway: signed with our key, answers checked with Alipay's."""

    def __init__(
        self,
        settings: AlipaySettings,
        *,
        http: httpx.AsyncClient | None = None,
        clock: Clock = default_clock,
        timeout: float = 10.0,
    ) -> None:
        if not settings.private_key or not settings.public_key:
            raise ValueError("Alipay calls need both the merchant private key and Alipay's public key")
        try:
            self._private_key = load_private_key(settings.private_key)
            self._public_key = load_public_key(settings.public_key)
        except KeyFormatError as exc:
            raise ValueError(str(exc)) from exc
        self._settings = settings
        self._clock = clock
        super().__init__(http, timeout)

    async def call(self, method: str, biz_content: Mapping[str, Any]) -> dict[str, Any]:
        """Sign, post, verify; the verified ``<method>_response`` object."""
        params = _common_params(self._settings, method, self._clock)
        params["biz_content"] = _biz(biz_content)
        # RSA signing costs about a millisecond: off the event loop, as for payment start.
        signed = await asyncio.to_thread(sign_request, params, self._private_key, self._settings.sign_type)
        try:
            response = await self._http.post(
                self._settings.gateway_url,
                data=signed,
                headers={"Content-Type": "application/x-www-form-urlencoded;charset=utf-8"},
            )
        except httpx.HTTPError as exc:
            raise AlipayApiError(f"Alipay unreachable: {type(exc).__name__}") from exc
        if response.status_code != 200:
            raise AlipayApiError(f"Alipay answered HTTP {response.status_code}")
        try:
            text = response.content.decode("utf-8")
        except UnicodeDecodeError:
            raise AlipayApiError("Alipay answer is not UTF-8") from None
        try:
            return verify_response(text, method, self._public_key, self._settings.sign_type)
        except NotAuthentic:
            unsigned = _unsigned_error(text, method)
            if unsigned is not None:
                # Gateway-level errors come unsigned; they carry no state to trust, only a code.
                raise unsigned from None
            raise

    async def trade_query(self, out_trade_no: str) -> TradeQueryResult:
        payload = await self.call("alipay.trade.query", {"out_trade_no": out_trade_no})
        code = str(payload.get("code", ""))
        sub_code = str(payload.get("sub_code", ""))
        if code == "10000":
            status = str(payload.get("trade_status", ""))
        elif code == "40004" and sub_code == "ACQ.TRADE_NOT_EXIST":
            status = "NOT_EXIST"
        else:
            raise AlipayApiError(
                f"alipay.trade.query failed: {code} {sub_code} {payload.get('sub_msg', '')}".strip(),
                code=code,
                sub_code=sub_code,
            )
        amount = payload.get("total_amount")
        return TradeQueryResult(
            code=code,
            trade_status=status,
            out_trade_no=str(payload.get("out_trade_no", out_trade_no)),
            trade_no=str(payload.get("trade_no", "")),
            total_amount=_amount({"total_amount": str(amount)}, "total_amount")
            if amount is not None
            else None,
            sub_code=sub_code,
            raw=payload,
            _seal=_SEAL,
        )

    async def trade_refund(
        self, *, trade_no: str, out_trade_no: str, refund_amount: Decimal, out_request_no: str, reason: str
    ) -> RefundResult:
        """``alipay.trade.refund``: synchronous; ``refund_fee`` is the trade's refunded total after it.

        The same out_request_no is one refund at Alipay however often it is sent.
        """
        payload = await self.call(
            "alipay.trade.refund",
            {
                "trade_no": trade_no or None,
                "out_trade_no": None if trade_no else out_trade_no,
                "refund_amount": _yuan(refund_amount),
                "out_request_no": out_request_no,
                "refund_reason": reason or None,
            },
        )
        self._business_ok("alipay.trade.refund", payload)
        total = _amount({"refund_fee": str(payload.get("refund_fee", ""))}, "refund_fee")
        if total is None:
            raise AlipayApiError("alipay.trade.refund answer without refund_fee")
        return RefundResult(
            str(payload.get("trade_no", trade_no)), total, payload.get("fund_change") == "Y", payload
        )

    async def trade_close(self, out_trade_no: str) -> str:
        """``alipay.trade.close``: "closed", or "not_exist" when Alipay holds no trade for it.

        Raises AlipayApiError otherwise (ACQ.TRADE_STATUS_ERROR: paid, cannot be closed).
        """
        payload = await self.call("alipay.trade.close", {"out_trade_no": out_trade_no})
        if str(payload.get("code")) == "40004" and payload.get("sub_code") == "ACQ.TRADE_NOT_EXIST":
            return "not_exist"
        self._business_ok("alipay.trade.close", payload)
        return "closed"

    @staticmethod
    def _business_ok(method: str, payload: Mapping[str, Any]) -> None:
        code = str(payload.get("code", ""))
        if code != "10000":
            sub_code = str(payload.get("sub_code", ""))
            raise AlipayApiError(
                f"{method} failed: {code} {sub_code} {payload.get('sub_msg', '')}".strip(),
                code=code,
                sub_code=sub_code,
            )


def _unsigned_error(text: str, method: str) -> AlipayApiError | None:
    try:
        document = json.loads(text)
    except ValueError:
        return None
    if not isinstance(document, dict) or document.get("sign"):
        return None
    payload = document.get(_response_key(method)) or document.get("error_response")
    if not isinstance(payload, dict) or str(payload.get("code", "")) in ("", "10000"):
        return None
    code, sub_code = str(payload.get("code", "")), str(payload.get("sub_code", ""))
    return AlipayApiError(f"Alipay error {code} {sub_code}".strip(), code=code, sub_code=sub_code)
