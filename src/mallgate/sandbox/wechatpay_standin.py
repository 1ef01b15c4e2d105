"""The WeChat Pay stand-in: v2 ``unifiedorder`` / ``orderquery``, v3 ``certificates``, notifications.

Every signature and every ciphertext comes from the channel modules
(:mod:`mallgate.channels.wechat_pay_v2`, :mod:`mallgate.channels.wechat_pay_v3`), the
same functions that verify them in the service.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal
from urllib.parse import quote

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from mallgate.channels.errors import MalformedNotification, NotAuthentic
from mallgate.channels.wechat_pay_v2 import (
    encrypt_refund_req_info,
    parse_xml,
    sign_v2,
    to_xml,
    verify_v2_sign,
)
from mallgate.channels.wechat_pay_v3 import (
    certificates_body,
    sign_v3_headers,
    sign_v3_notification,
    verify_v3_authorization,
)
from mallgate.clock import Clock, default_clock
from mallgate.keys import load_private_key
from mallgate.private_files import write_private
from mallgate.sandbox.app import WECHAT_APP_APP_ID, WECHAT_MINI_APP_ID, WECHAT_MP_APP_ID, WECHATPAY_MCH_ID
from mallgate.sandbox.notifier import Notifier, Outgoing
from mallgate.sandbox.pages import message, render
from mallgate.sandbox.trades import (
    Outcome,
    RefundRefused,
    SandboxError,
    Trade,
    TradeBook,
    digits,
    fen,
    request_refund,
    wechat_transaction_id,
    yuan,
)

if TYPE_CHECKING:
    from mallgate.sandbox.app import SandboxState

WechatVersion = Literal["v2", "v3"]

CERT_FILE: Final = "wechatpay_platform_cert.pem"
APP_IDS: Final = frozenset({WECHAT_MINI_APP_ID, WECHAT_MP_APP_ID, WECHAT_APP_APP_ID})
TRADE_TYPES: Final = frozenset({"JSAPI", "NATIVE", "APP", "MWEB"})
_XML: Final = "text/xml; charset=utf-8"
_BODY_LIMIT: Final = 64 * 1024
_V2_REQUIRED: Final = ("body", "out_trade_no", "total_fee", "spbill_create_ip", "notify_url", "trade_type")
_V3_TRADE_TYPES: Final = {"jsapi": "JSAPI", "app": "APP", "h5": "MWEB", "native": "NATIVE"}


class V3Refusal(Exception):
    """An APIv3 error answer: HTTP status and WeChat's {"code", "message"}."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}")
        self.status, self.code, self.message = status, code, message


# ----------------------------------------------------------------------------------------------
# the platform certificate (certificate mode)


def platform_certificate(
    folder: Path, key: rsa.RSAPrivateKey, now: datetime | None = None
) -> x509.Certificate:
    """The sandbox's self-signed WeChat Pay platform certificate for ``key``, kept in ``folder``.

    Made again when missing, made for another key, or within a day of expiry, so a
    regenerated keys.json never leaves a stale certificate behind.
    """
    now = now or datetime.now(UTC)
    path = folder / CERT_FILE
    if path.is_file():
        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
        except ValueError:
            cert = None
        if (
            cert is not None
            and cert.public_key() == key.public_key()
            and cert.not_valid_after_utc > now + timedelta(days=1)
        ):
            return cert
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "CN"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mallgate sandbox (not Tenpay)"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Tenpay.com"),
            x509.NameAttribute(NameOID.COMMON_NAME, "Tenpay.com sign"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=5 * 365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    write_private(path, cert.public_bytes(serialization.Encoding.PEM))
    return cert


def _signed_url(request: Request) -> str:
    """What the merchant signed: the path from WeChat Pay's root (``/v3/...``) and the query,
    as the request arrived; the sandbox's own mount in front of it is not WeChat Pay's."""
    raw_path: bytes = request.scope.get("raw_path") or request.url.path.encode()
    start = raw_path.find(b"/v3/")
    path = raw_path[start:] if start >= 0 else raw_path
    query: bytes = request.scope.get("query_string", b"")
    return path.decode("latin-1") + ("?" + query.decode("latin-1") if query else "")


def _v2_fail(message: str) -> Response:
    # Transport-level refusals carry no signature, as WeChat's own do.
    return Response(to_xml({"return_code": "FAIL", "return_msg": message}), media_type=_XML)


class WechatPayStandIn:
    def __init__(
        self, state: SandboxState, book: TradeBook, notifier: Notifier, clock: Clock = default_clock
    ):
        self._state = state
        self._book = book
        self._notifier = notifier
        self._clock = clock
        keys = state.keys
        self._api_key = keys.wechatpay_api_key
        self._api_v3_key = keys.wechatpay_api_v3_key
        self._public_key_id = keys.wechatpay_public_key_id
        self._merchant_public = load_private_key(keys.wechatpay_merchant_private).public_key()
        self._platform_private = load_private_key(keys.wechatpay_platform_private)
        self.certificate = platform_certificate(state.folder, self._platform_private)
        self.router = self._routes()

    @property
    def default_notify_url(self) -> str:
        return f"{self._state.service_url}/wechat/notify"

    @property
    def certificate_serial(self) -> str:
        return format(self.certificate.serial_number, "X")

    # ------------------------------------------------------------------------------------------
    # v2

    async def _v2_request(self, request: Request) -> dict[str, str]:
        body = await request.body()
        if len(body) > _BODY_LIMIT:
            raise SandboxError("请求过大")
        try:
            fields = parse_xml(body)
        except MalformedNotification:
            raise SandboxError("XML格式错误") from None
        try:
            verify_v2_sign(fields, self._api_key)
        except NotAuthentic:
            raise SandboxError("签名错误") from None
        if fields.get("mch_id") != WECHATPAY_MCH_ID:
            raise SandboxError("商户号mch_id与appid不匹配")
        if fields.get("appid") not in APP_IDS:
            raise SandboxError("appid不存在")
        return fields

    def _v2_answer(self, request_fields: Mapping[str, str], payload: Mapping[str, str]) -> Response:
        answer = {
            "return_code": "SUCCESS",
            "return_msg": "OK",
            "appid": request_fields.get("appid", ""),
            "mch_id": WECHATPAY_MCH_ID,
            "nonce_str": secrets.token_hex(8),
            **{k: v for k, v in payload.items() if v != ""},
        }
        # Answers are signed the way the request was.
        answer["sign"] = sign_v2(answer, self._api_key, request_fields.get("sign_type") or "MD5")
        return Response(to_xml(answer), media_type=_XML)

    @staticmethod
    def _result_fail(code: str, description: str) -> dict[str, str]:
        return {"result_code": "FAIL", "err_code": code, "err_code_des": description}

    def _unified_order(self, fields: dict[str, str], cashier_url: str) -> dict[str, str]:
        missing = [name for name in _V2_REQUIRED if not fields.get(name)]
        if missing:
            raise SandboxError(f"缺少参数{missing[0]}")
        total = fields["total_fee"]
        if not (total.isascii() and total.isdigit()) or int(total) <= 0 or len(total) > 10:
            raise SandboxError("total_fee参数格式错误")
        trade_type = fields["trade_type"]
        if trade_type not in TRADE_TYPES:
            raise SandboxError("trade_type参数格式错误")
        if trade_type == "JSAPI" and not fields.get("openid"):
            return self._result_fail("PARAM_ERROR", "JSAPI支付必须传openid")
        out_trade_no = fields["out_trade_no"]
        amount = Decimal(int(total)) / 100
        trade = self._book.get("wechat", out_trade_no)
        if trade is not None:
            if trade.status == "paid":
                return self._result_fail("ORDERPAID", "该订单已支付")
            if trade.status == "closed":
                return self._result_fail("ORDERCLOSED", "该订单已关闭")
            if fen(trade.amount) != int(total):
                return self._result_fail("INVALID_REQUEST", "201 商户订单号重复")
        if trade is None or trade.trade_type != trade_type or not trade.prepay_id:
            trade = self._book.put(
                Trade(
                    channel="wechat",
                    out_trade_no=out_trade_no,
                    amount=amount,
                    subject=fields["body"],
                    notify_url=fields["notify_url"],
                    appid=fields["appid"],
                    trade_type=trade_type,
                    prepay_id="wx" + self._clock.beijing().strftime("%d%H%M%S") + secrets.token_hex(13),
                    buyer_id=fields.get("openid", ""),
                    created_at=self._clock.beijing(),
                )
            )
        payload = {"result_code": "SUCCESS", "trade_type": trade_type, "prepay_id": trade.prepay_id}
        if trade_type == "NATIVE":
            payload["code_url"] = f"weixin://wxpay/bizpayurl?pr={trade.prepay_id[-7:]}"
        if trade_type == "MWEB":
            payload["mweb_url"] = f"{cashier_url}?prepay_id={trade.prepay_id}"
        return payload

    def _order_query(self, fields: dict[str, str]) -> dict[str, str]:
        transaction_id, out_trade_no = fields.get("transaction_id", ""), fields.get("out_trade_no", "")
        if not (transaction_id or out_trade_no):
            raise SandboxError("缺少参数out_trade_no")
        # transaction_id wins when both are given, as at WeChat.
        trade = (
            self._book.by_trade_no("wechat", transaction_id)
            if transaction_id
            else self._book.get("wechat", out_trade_no)
        )
        if trade is None:
            return self._result_fail("ORDERNOTEXIST", "订单不存在")
        if trade.status == "pending":
            state, description = "NOTPAY", "订单未支付"
        elif trade.status == "closed":
            state, description = "CLOSED", "订单已关闭"
        elif trade.refunded > 0:
            state, description = "REFUND", "订单发生过退款"
        else:
            state, description = "SUCCESS", "支付成功"
        payload = {
            "result_code": "SUCCESS",
            "out_trade_no": trade.out_trade_no,
            "trade_state": state,
            "trade_state_desc": description,
            "total_fee": str(fen(trade.amount)),
            "fee_type": "CNY",
        }
        if trade.status == "paid":
            payload |= {
                "openid": self._openid(trade),
                "is_subscribe": "N",
                "trade_type": trade.trade_type or "JSAPI",
                "bank_type": "OTHERS",
                "cash_fee": str(fen(trade.amount)),
                "transaction_id": trade.trade_no,
                "time_end": self._time_end(trade),
            }
        return payload

    async def _refund_v2_call(self, fields: dict[str, str]) -> dict[str, str]:
        names = ("out_trade_no", "out_refund_no", "total_fee", "refund_fee")
        missing = [n for n in names if not fields.get(n)]
        if missing:
            raise SandboxError(f"缺少参数{missing[0]}")
        if not all(fields[n].isascii() and fields[n].isdigit() for n in ("total_fee", "refund_fee")):
            raise SandboxError("total_fee 或 refund_fee 参数格式错误")
        try:
            trade, refund_id, amount = await self.refund(
                out_trade_no=fields["out_trade_no"],
                out_refund_no=fields["out_refund_no"],
                refund_fen=int(fields["refund_fee"]),
                total_fen=int(fields["total_fee"]),
                version="v2",
            )
        except V3Refusal as exc:
            code = {"NOT_ENOUGH": "NOTENOUGH", "RESOURCE_NOT_EXISTS": "ORDERNOTEXIST"}.get(
                exc.code, "INVALID_REQUEST"
            )
            return self._result_fail(code, exc.message)
        return {
            "result_code": "SUCCESS",
            "transaction_id": trade.trade_no,
            "out_trade_no": trade.out_trade_no,
            "out_refund_no": fields["out_refund_no"],
            "refund_id": refund_id,
            "refund_fee": str(fen(amount)),
            "total_fee": str(fen(trade.amount)),
            "cash_fee": str(fen(trade.amount)),
        }

    def _refund_query_v2(self, fields: dict[str, str]) -> dict[str, str]:
        out_refund_no = fields.get("out_refund_no", "")
        trade = self._refund_lookup(out_refund_no) if out_refund_no else None
        if trade is None:
            return self._result_fail("REFUNDNOTEXIST", "退款订单查询失败")
        refund_id, amount = trade.refunds[out_refund_no]
        return {
            "result_code": "SUCCESS",
            "transaction_id": trade.trade_no,
            "out_trade_no": trade.out_trade_no,
            "total_fee": str(fen(trade.amount)),
            "refund_count": "1",
            "out_refund_no_0": out_refund_no,
            "refund_id_0": refund_id,
            "refund_fee_0": str(fen(amount)),
            "refund_status_0": "SUCCESS",
        }

    # ------------------------------------------------------------------------------------------
    # v3

    def _certificates(self, request: Request) -> Response:
        url = _signed_url(request)
        try:
            fields = verify_v3_authorization(
                request.headers.get("authorization", ""),
                "GET",
                url,
                b"",
                public_key=self._merchant_public,
                now=self._clock.now(),
            )
        except NotAuthentic as exc:
            return JSONResponse({"code": "SIGN_ERROR", "message": f"签名错误: {exc}"}, status_code=401)
        if fields["mchid"] != WECHATPAY_MCH_ID:
            return JSONResponse({"code": "SIGN_ERROR", "message": "商户号与签名不匹配"}, status_code=401)
        body = certificates_body([self.certificate], self._api_v3_key)
        headers = sign_v3_headers(
            body,
            private_key=self._platform_private,
            serial=self.certificate_serial,
            timestamp=int(self._clock.now()),
            nonce=secrets.token_hex(16),
        )
        headers["Request-ID"] = secrets.token_hex(16)
        return Response(body, headers=headers, media_type="application/json")

    async def _v3_request(self, request: Request) -> bytes:
        """The body of a v3 call once its Authorization (merchant key and serial) has checked out."""
        body = await request.body()
        if len(body) > _BODY_LIMIT:
            raise V3Refusal(400, "PARAM_ERROR", "请求过大")
        url = _signed_url(request)
        try:
            fields = verify_v3_authorization(
                request.headers.get("authorization", ""),
                request.method,
                url,
                body,
                public_key=self._merchant_public,
                now=self._clock.now(),
            )
        except NotAuthentic as exc:
            raise V3Refusal(401, "SIGN_ERROR", f"签名错误: {exc}") from None
        if fields["mchid"] != WECHATPAY_MCH_ID:
            raise V3Refusal(401, "SIGN_ERROR", "商户号与签名不匹配")
        return body

    @staticmethod
    def _v3_json(body: bytes) -> dict[str, Any]:
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            data = None
        if not isinstance(data, dict):
            raise V3Refusal(400, "PARAM_ERROR", "请求体不是 JSON 对象")
        return data

    def _v3_answer(self, status: int, payload: Mapping[str, Any] | None) -> Response:
        """An answer signed with the platform key, as WeChat Pay signs every answer."""
        body = (
            b""
            if payload is None
            else json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        )
        headers = sign_v3_headers(
            body,
            private_key=self._platform_private,
            serial=self._public_key_id,
            timestamp=int(self._clock.now()),
            nonce=secrets.token_hex(16),
        )
        headers["Request-ID"] = secrets.token_hex(16)
        if payload is None:
            return Response(status_code=status, headers=headers)
        return Response(body, status_code=status, headers=headers, media_type="application/json")

    def _v3_refusal(self, exc: V3Refusal) -> Response:
        return self._v3_answer(exc.status, {"code": exc.code, "message": exc.message})

    def _prepay_v3(self, kind: str, data: dict[str, Any], cashier_url: str) -> dict[str, str]:
        for name in ("appid", "mchid", "description", "out_trade_no", "notify_url"):
            if not isinstance(data.get(name), str) or not data[name]:
                raise V3Refusal(400, "PARAM_ERROR", f"缺少参数 {name}")
        if data["mchid"] != WECHATPAY_MCH_ID:
            raise V3Refusal(400, "PARAM_ERROR", "商户号 mchid 与请求签名不一致")
        if data["appid"] not in APP_IDS:
            raise V3Refusal(400, "APPID_MCHID_NOT_MATCH", "appid 和 mch_id 不匹配")
        amount = data.get("amount")
        total = amount.get("total") if isinstance(amount, dict) else None
        if not isinstance(total, int) or isinstance(total, bool) or total <= 0:
            raise V3Refusal(400, "PARAM_ERROR", "amount.total 应为正整数（分）")
        payer = data.get("payer")
        openid = payer.get("openid", "") if isinstance(payer, dict) else ""
        if kind == "jsapi" and not openid:
            raise V3Refusal(400, "PARAM_ERROR", "JSAPI 支付必须传 payer.openid")
        scene = data.get("scene_info")
        if kind in ("h5", "native") and not (isinstance(scene, dict) and scene.get("payer_client_ip")):
            raise V3Refusal(400, "PARAM_ERROR", "缺少参数 scene_info.payer_client_ip")
        trade_type = _V3_TRADE_TYPES[kind]
        out_trade_no = data["out_trade_no"]
        trade = self._book.get("wechat", out_trade_no)
        if trade is not None:
            if trade.status == "paid":
                raise V3Refusal(400, "ORDERPAID", "该订单已支付")
            if trade.status == "closed":
                raise V3Refusal(400, "ORDER_CLOSED", "订单已关闭")
            if fen(trade.amount) != total:
                raise V3Refusal(400, "OUT_TRADE_NO_USED", "商户订单号重复")
        if trade is None or trade.trade_type != trade_type or not trade.prepay_id:
            trade = self._book.put(
                Trade(
                    channel="wechat",
                    out_trade_no=out_trade_no,
                    amount=Decimal(total) / 100,
                    subject=data["description"],
                    notify_url=data["notify_url"],
                    appid=data["appid"],
                    trade_type=trade_type,
                    prepay_id="wx" + self._clock.beijing().strftime("%d%H%M%S") + secrets.token_hex(13),
                    buyer_id=openid,
                    created_at=self._clock.beijing(),
                )
            )
        if kind == "native":
            return {"code_url": f"weixin://wxpay/bizpayurl?pr={trade.prepay_id[-7:]}"}
        if kind == "h5":
            return {"h5_url": f"{cashier_url}?prepay_id={trade.prepay_id}"}
        return {"prepay_id": trade.prepay_id}

    def _order_query_v3(self, out_trade_no: str) -> dict[str, Any]:
        trade = self._book.get("wechat", out_trade_no)
        if trade is None:
            raise V3Refusal(404, "ORDER_NOT_EXIST", "订单不存在")
        state = {"pending": "NOTPAY", "closed": "CLOSED"}.get(trade.status, "SUCCESS")
        if trade.status == "paid" and trade.refunded > 0:
            state = "REFUND"
        answer: dict[str, Any] = {
            "appid": trade.appid or WECHAT_MINI_APP_ID,
            "mchid": WECHATPAY_MCH_ID,
            "out_trade_no": trade.out_trade_no,
            "trade_state": state,
            "trade_state_desc": {"NOTPAY": "订单未支付", "CLOSED": "订单已关闭"}.get(state, "支付成功"),
            "amount": {"total": fen(trade.amount), "currency": "CNY"},
        }
        if trade.status == "paid":
            answer |= {
                "transaction_id": trade.trade_no,
                "trade_type": trade.trade_type or "JSAPI",
                "bank_type": "OTHERS",
                "success_time": (trade.paid_at or self._clock.beijing()).isoformat(timespec="seconds"),
                "payer": {"openid": self._openid(trade)},
            }
            answer["amount"] |= {"payer_total": fen(trade.amount), "payer_currency": "CNY"}
        return answer

    def close(self, out_trade_no: str) -> None:
        """Close a trade as WeChat Pay does: a paid one cannot be; an unknown one has nothing to close."""
        trade = self._book.get("wechat", out_trade_no)
        if trade is None:
            raise V3Refusal(404, "ORDER_NOT_EXIST", "订单不存在")
        if trade.status == "paid":
            raise V3Refusal(400, "ORDERPAID", "订单已支付")
        trade.status, trade.closed_at = "closed", self._clock.beijing()

    async def refund(
        self,
        *,
        out_trade_no: str,
        out_refund_no: str,
        refund_fen: int,
        total_fen: int,
        version: WechatVersion,
    ) -> tuple[Trade, str, Decimal]:
        """A refund the merchant asked for: recorded, then its notice sent (before the answer,
        which a real platform may also do; the service must cope with either order)."""
        trade = self._book.get("wechat", out_trade_no)
        if trade is None or trade.status != "paid":
            raise V3Refusal(404, "RESOURCE_NOT_EXISTS", "订单不存在或未支付")
        if total_fen != fen(trade.amount):
            raise V3Refusal(400, "PARAM_ERROR", "订单金额 total 与原订单不一致")
        if refund_fen <= 0:
            raise V3Refusal(400, "PARAM_ERROR", "退款金额应为正整数（分）")
        try:
            refund_id, amount, new = request_refund(trade, out_refund_no, Decimal(refund_fen) / 100)
        except RefundRefused:
            raise V3Refusal(403, "NOT_ENOUGH", "基本账户余额不足，请充值后重新发起") from None
        except SandboxError as exc:
            raise V3Refusal(400, "INVALID_REQUEST", str(exc)) from None
        if new and out_refund_no not in trade.silent_refunds:
            build = (
                self._refund_v2(trade, amount, out_refund_no, refund_id)
                if version == "v2"
                else self._refund_v3(trade, amount, out_refund_no, refund_id)
            )
            await self._notifier.deliver(
                "wechat_v2" if version == "v2" else "wechat_v3",
                self.default_notify_url,
                build,
                order_no=out_trade_no,
                kind="refund",
            )
        return trade, refund_id, amount

    def _refund_json(self, trade: Trade, out_refund_no: str) -> dict[str, Any]:
        refund_id, amount = trade.refunds[out_refund_no]
        return {
            "refund_id": refund_id,
            "out_refund_no": out_refund_no,
            "transaction_id": trade.trade_no,
            "out_trade_no": trade.out_trade_no,
            "channel": "ORIGINAL",
            "user_received_account": "支付用户零钱",
            "create_time": self._clock.beijing().isoformat(timespec="seconds"),
            # The sandbox refunds at once and has sent its notice; a silenced one stays PROCESSING
            # until it is queried (GET .../refunds/{out_refund_no}).
            "status": "PROCESSING" if out_refund_no in trade.silent_refunds else "SUCCESS",
            "amount": {
                "total": fen(trade.amount),
                "refund": fen(amount),
                "payer_total": fen(trade.amount),
                "payer_refund": fen(amount),
                "currency": "CNY",
            },
        }

    def _refund_lookup(self, out_refund_no: str) -> Trade | None:
        return next(
            (t for t in self._book.trades("wechat") if out_refund_no in t.refunds),
            None,
        )

    async def _refund_v3_call(self, data: dict[str, Any]) -> dict[str, Any]:
        out_trade_no, out_refund_no = data.get("out_trade_no"), data.get("out_refund_no")
        amount = data.get("amount")
        if not (
            isinstance(out_trade_no, str)
            and out_trade_no
            and isinstance(out_refund_no, str)
            and out_refund_no
        ):
            raise V3Refusal(400, "PARAM_ERROR", "缺少参数 out_trade_no 或 out_refund_no")
        if not isinstance(amount, dict):
            raise V3Refusal(400, "PARAM_ERROR", "缺少参数 amount")
        refund, total = amount.get("refund"), amount.get("total")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (refund, total)):
            raise V3Refusal(400, "PARAM_ERROR", "amount.refund 与 amount.total 应为整数（分）")
        assert isinstance(refund, int) and isinstance(total, int)
        trade, _, _ = await self.refund(
            out_trade_no=out_trade_no,
            out_refund_no=out_refund_no,
            refund_fen=refund,
            total_fen=total,
            version="v3",
        )
        return self._refund_json(trade, out_refund_no)

    # ------------------------------------------------------------------------------------------
    # routes

    def _routes(self) -> APIRouter:
        router = APIRouter()

        @router.post("/wechatpay/pay/unifiedorder")
        async def unifiedorder(request: Request) -> Response:
            try:
                fields = await self._v2_request(request)
                cashier = str(request.url_for("wechatpay_cashier"))
                return self._v2_answer(fields, self._unified_order(fields, cashier))
            except SandboxError as exc:
                return _v2_fail(str(exc))

        @router.post("/wechatpay/pay/orderquery")
        async def orderquery(request: Request) -> Response:
            try:
                fields = await self._v2_request(request)
                return self._v2_answer(fields, self._order_query(fields))
            except SandboxError as exc:
                return _v2_fail(str(exc))

        @router.post("/wechatpay/pay/closeorder")
        async def closeorder(request: Request) -> Response:
            try:
                fields = await self._v2_request(request)
                try:
                    self.close(fields.get("out_trade_no", ""))
                    payload = {"result_code": "SUCCESS"}
                except V3Refusal as exc:
                    payload = self._result_fail(
                        "ORDERPAID" if exc.code == "ORDERPAID" else "ORDERNOTEXIST", exc.message
                    )
                return self._v2_answer(fields, payload)
            except SandboxError as exc:
                return _v2_fail(str(exc))

        @router.post("/wechatpay/secapi/pay/refund")
        async def refund_v2(request: Request) -> Response:
            try:
                fields = await self._v2_request(request)
                return self._v2_answer(fields, await self._refund_v2_call(fields))
            except SandboxError as exc:
                return _v2_fail(str(exc))

        @router.post("/wechatpay/pay/refundquery")
        async def refundquery(request: Request) -> Response:
            try:
                fields = await self._v2_request(request)
                return self._v2_answer(fields, self._refund_query_v2(fields))
            except SandboxError as exc:
                return _v2_fail(str(exc))

        @router.post("/wechatpay/v3/pay/transactions/{kind}")
        async def prepay_v3(request: Request, kind: str) -> Response:
            try:
                if kind not in _V3_TRADE_TYPES:
                    raise V3Refusal(404, "NOT_FOUND", "未知的下单接口")
                data = self._v3_json(await self._v3_request(request))
                cashier = str(request.url_for("wechatpay_cashier"))
                return self._v3_answer(200, self._prepay_v3(kind, data, cashier))
            except V3Refusal as exc:
                return self._v3_refusal(exc)

        @router.get("/wechatpay/v3/pay/transactions/out-trade-no/{out_trade_no}")
        async def query_v3(request: Request, out_trade_no: str, mchid: str = "") -> Response:
            try:
                await self._v3_request(request)
                if mchid != WECHATPAY_MCH_ID:
                    raise V3Refusal(400, "PARAM_ERROR", "mchid 必填且须与签名一致")
                return self._v3_answer(200, self._order_query_v3(out_trade_no))
            except V3Refusal as exc:
                return self._v3_refusal(exc)

        @router.post("/wechatpay/v3/pay/transactions/out-trade-no/{out_trade_no}/close")
        async def close_v3(request: Request, out_trade_no: str) -> Response:
            try:
                data = self._v3_json(await self._v3_request(request))
                if data.get("mchid") != WECHATPAY_MCH_ID:
                    raise V3Refusal(400, "PARAM_ERROR", "mchid 必填且须与签名一致")
                self.close(out_trade_no)
                return self._v3_answer(204, None)
            except V3Refusal as exc:
                return self._v3_refusal(exc)

        @router.post("/wechatpay/v3/refund/domestic/refunds")
        async def refund_v3(request: Request) -> Response:
            try:
                data = self._v3_json(await self._v3_request(request))
                return self._v3_answer(200, await self._refund_v3_call(data))
            except V3Refusal as exc:
                return self._v3_refusal(exc)

        @router.get("/wechatpay/v3/refund/domestic/refunds/{out_refund_no}")
        async def refund_query_v3(request: Request, out_refund_no: str) -> Response:
            try:
                await self._v3_request(request)
                trade = self._refund_lookup(out_refund_no)
                if trade is None:
                    raise V3Refusal(404, "RESOURCE_NOT_EXISTS", "退款单不存在")
                trade.silent_refunds.discard(out_refund_no)  # asked about: done, as it always was
                return self._v3_answer(200, self._refund_json(trade, out_refund_no))
            except V3Refusal as exc:
                return self._v3_refusal(exc)

        @router.get("/wechatpay/v3/certificates")
        async def certificates(request: Request) -> Response:
            return self._certificates(request)

        @router.get("/wechatpay/cashier", name="wechatpay_cashier")
        async def cashier(request: Request, prepay_id: str = "") -> Response:
            trade = self._book.by_prepay_id(prepay_id)
            if trade is None:
                return message(request, "微信支付 · 错误", "prepay_id 不存在或已过期", status_code=404)
            if trade.status != "pending":
                return message(request, "微信支付", f"订单 {trade.out_trade_no}: {trade.status}")
            return render(
                request,
                "cashier.html",
                title="微信支付 · 收银台 (sandbox cashier)",
                rows=[("商品 body", trade.subject), ("商户订单号 out_trade_no", trade.out_trade_no)],
                amount=yuan(trade.amount),
                action="cashier/pay",
                hidden={"prepay_id": prepay_id},
                button="立即支付 (pay)",
            )

        @router.post("/wechatpay/cashier/pay")
        async def cashier_pay(request: Request) -> Response:
            form = await request.form()
            prepay_id = str(form.get("prepay_id", ""))
            trade = self._book.by_prepay_id(prepay_id)
            if trade is None:
                return message(request, "微信支付 · 错误", "prepay_id 不存在或已过期", status_code=404)
            try:
                await self.settle(order_no=trade.out_trade_no, kind="pay", version="v2")
            except SandboxError as exc:
                return message(request, "微信支付 · 错误", str(exc), status_code=400)
            # Redirect after POST: a refresh of the result would otherwise send the notice again.
            return RedirectResponse(f"done?prepay_id={quote(prepay_id, safe='')}", status_code=303)

        @router.get("/wechatpay/cashier/done")
        async def cashier_done(request: Request, prepay_id: str = "") -> Response:
            trade = self._book.by_prepay_id(prepay_id)
            if trade is None or trade.status != "paid":
                return message(
                    request, "微信支付 · 错误", "订单不存在或未支付 (no such paid order)", status_code=404
                )
            return render(
                request,
                "cashier_done.html",
                title="微信支付 · 支付成功",
                rows=[
                    ("out_trade_no", trade.out_trade_no),
                    ("transaction_id", trade.trade_no),
                    ("total_fee", str(fen(trade.amount))),
                ],
                return_link="",
                deliveries=self._notifier.of_order(trade.out_trade_no, "pay", ("wechat_v2", "wechat_v3")),
            )

        return router

    # ------------------------------------------------------------------------------------------
    # pay, refund, close: record the change and notify

    def _openid(self, trade: Trade) -> str:
        if not trade.buyer_id:
            trade.buyer_id = "o" + secrets.token_urlsafe(21)[:27]
        return trade.buyer_id

    def _time_end(self, trade: Trade) -> str:
        return (trade.paid_at or self._clock.beijing()).strftime("%Y%m%d%H%M%S")

    async def settle(
        self,
        *,
        order_no: str,
        kind: str,
        version: WechatVersion = "v2",
        amount: Decimal | None = None,
        refund_amount: Decimal | None = None,
        duplicates: int = 0,
        notify: bool = True,
    ) -> Outcome:
        if not order_no:
            raise SandboxError("order_no is required")
        if version not in ("v2", "v3"):
            raise SandboxError("wechat_version must be v2 or v3")
        trade = self._book.get("wechat", order_no)
        now = self._clock.beijing()
        if trade is None:
            if amount is None:
                raise SandboxError(f"the WeChat Pay stand-in does not know {order_no}: give its amount")
            trade = self._book.put(
                Trade(
                    "wechat", order_no, amount, appid=WECHAT_MINI_APP_ID, trade_type="JSAPI", created_at=now
                )
            )
        refund = None
        # Each branch changes the trade before any await, so concurrent calls see a consistent record.
        if kind == "pay":
            if trade.pay(amount, now):
                trade.trade_no = wechat_transaction_id()
            build = self._payment_v2(trade) if version == "v2" else self._payment_v3(trade)
        elif kind == "refund":
            refund = trade.take_refund(refund_amount)
            ids = self._refund_ids(trade)
            build = (
                self._refund_v2(trade, refund, *ids)
                if version == "v2"
                else self._refund_v3(trade, refund, *ids)
            )
        elif kind in ("fail_next_refund", "silence_next_refund"):
            trade.next_refund = "fail" if kind == "fail_next_refund" else "silent"
            what = "refused" if kind == "fail_next_refund" else "made without a notice"
            return Outcome(kind, trade, "", [], note=f"the next refund request of this trade will be {what}")
        elif kind == "close":
            if trade.status == "paid":
                raise SandboxError(f"{order_no} is paid: refund it instead")
            trade.status, trade.closed_at = "closed", now
            # WeChat Pay notifies only successful payments and refunds; a close is seen by querying.
            return Outcome(kind, trade, "", [], note="WeChat Pay sends no notification for a closed order")
        else:
            raise SandboxError(f"unknown kind {kind!r}")
        # Always the service's own notify URL, whatever a request named: the sandbox must never
        # become a way to make this machine POST (and retry) to an address of someone's choosing.
        url = self.default_notify_url
        if not notify:
            return Outcome(kind, trade, url, [], refund_amount=refund, note="recorded, not notified")
        deliveries = await self._notifier.deliver(
            "wechat_v2" if version == "v2" else "wechat_v3",
            url,
            build,
            order_no=order_no,
            kind=kind,
            duplicates=duplicates,
        )
        return Outcome(kind, trade, url, deliveries, refund_amount=refund)

    def _payment_v2(self, trade: Trade) -> Callable[[], Outgoing]:
        total = str(fen(trade.amount))
        fields = {
            "appid": trade.appid or WECHAT_MINI_APP_ID,
            "bank_type": "OTHERS",
            "cash_fee": total,
            "fee_type": "CNY",
            "is_subscribe": "N",
            "mch_id": WECHATPAY_MCH_ID,
            "openid": self._openid(trade),
            "out_trade_no": trade.out_trade_no,
            "result_code": "SUCCESS",
            "return_code": "SUCCESS",
            "time_end": self._time_end(trade),
            "total_fee": total,
            "trade_type": trade.trade_type or "JSAPI",
            "transaction_id": trade.trade_no,
        }

        def build() -> Outgoing:
            message = {**fields, "nonce_str": secrets.token_hex(16)}
            message["sign"] = sign_v2(message, self._api_key, "MD5")
            return Outgoing({"Content-Type": _XML}, to_xml(message))

        return build

    def _refund_ids(self, trade: Trade) -> tuple[str, str]:
        return f"{trade.out_trade_no}R{trade.refund_count}", "50" + digits(27)

    def _refund_v2(
        self, trade: Trade, refund: Decimal, out_refund_no: str, refund_id: str
    ) -> Callable[[], Outgoing]:
        inner = {
            "out_refund_no": out_refund_no,
            "out_trade_no": trade.out_trade_no,
            "refund_account": "REFUND_SOURCE_RECHARGE_FUNDS",
            "refund_fee": str(fen(refund)),  # this refund alone, unlike Alipay's cumulative refund_fee
            "refund_id": refund_id,
            "refund_recv_accout": "支付用户的零钱",  # sic: WeChat's spelling
            "refund_request_source": "API",
            "refund_status": "SUCCESS",
            "settlement_refund_fee": str(fen(refund)),
            "settlement_total_fee": str(fen(trade.amount)),
            "success_time": self._clock.beijing().strftime("%Y-%m-%d %H:%M:%S"),
            "total_fee": str(fen(trade.amount)),
            "transaction_id": trade.trade_no,
        }
        req_info = encrypt_refund_req_info(inner, self._api_key)
        appid = trade.appid or WECHAT_MINI_APP_ID

        def build() -> Outgoing:
            outer = {
                "return_code": "SUCCESS",
                "appid": appid,
                "mch_id": WECHATPAY_MCH_ID,
                "nonce_str": secrets.token_hex(16),
                "req_info": req_info,
            }
            return Outgoing({"Content-Type": _XML}, to_xml(outer))

        return build

    def _v3_builder(self, event_type: str, resource: dict[str, Any], summary: str) -> Callable[[], Outgoing]:
        # One event id for every copy and re-send: it is what merchants deduplicate on.
        event_id = f"EV-{self._clock.beijing():%Y%m%d%H%M%S}{digits(7)}"

        def build() -> Outgoing:
            # Signed at each attempt: the receiver refuses timestamps older than five minutes.
            headers, body = sign_v3_notification(
                event_type,
                resource,
                private_key=self._platform_private,
                serial=self._public_key_id,
                api_v3_key=self._api_v3_key,
                now=self._clock.now(),
                nonce=secrets.token_hex(16),
                event_id=event_id,
                summary=summary,
            )
            return Outgoing(headers, body)

        return build

    def _payment_v3(self, trade: Trade) -> Callable[[], Outgoing]:
        total = fen(trade.amount)
        resource = {
            "mchid": WECHATPAY_MCH_ID,
            "appid": trade.appid or WECHAT_MINI_APP_ID,
            "out_trade_no": trade.out_trade_no,
            "transaction_id": trade.trade_no,
            "trade_type": trade.trade_type or "JSAPI",
            "trade_state": "SUCCESS",
            "trade_state_desc": "支付成功",
            "bank_type": "OTHERS",
            "attach": "",
            "success_time": (trade.paid_at or self._clock.beijing()).isoformat(timespec="seconds"),
            "payer": {"openid": self._openid(trade)},
            "amount": {"total": total, "payer_total": total, "currency": "CNY", "payer_currency": "CNY"},
        }
        return self._v3_builder("TRANSACTION.SUCCESS", resource, "支付成功")

    def _refund_v3(
        self, trade: Trade, refund: Decimal, out_refund_no: str, refund_id: str
    ) -> Callable[[], Outgoing]:
        resource = {
            "mchid": WECHATPAY_MCH_ID,
            "out_trade_no": trade.out_trade_no,
            "transaction_id": trade.trade_no,
            "out_refund_no": out_refund_no,
            "refund_id": refund_id,
            "refund_status": "SUCCESS",
            "success_time": self._clock.beijing().isoformat(timespec="seconds"),
            "user_received_account": "支付用户零钱",
            "amount": {
                "total": fen(trade.amount),
                "refund": fen(refund),
                "payer_total": fen(trade.amount),
                "payer_refund": fen(refund),
            },
        }
        return self._v3_builder("REFUND.SUCCESS", resource, "退款成功")
