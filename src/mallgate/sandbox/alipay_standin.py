"""The Alipay stand-in: ``gateway.do`` (trade.query, the wap cashier) and its notifications.

Requests are checked with the merchant's public key exactly as Alipay checks them,
answers and notifications are signed with the sandbox's "Alipay" key, all through
:mod:`mallgate.channels.alipay`, so the service's code meets the same bytes as in
production.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from mallgate.channels.alipay import parse_form, sign_notification, sign_response, verify_request
from mallgate.channels.errors import MalformedNotification, NotAuthentic
from mallgate.clock import Clock, default_clock
from mallgate.keys import load_private_key
from mallgate.sandbox.app import ALIPAY_APP_ID, ALIPAY_SELLER_ID
from mallgate.sandbox.notifier import Notifier, Outgoing
from mallgate.sandbox.pages import message, render
from mallgate.sandbox.trades import (
    Outcome,
    RefundRefused,
    SandboxError,
    Trade,
    TradeBook,
    alipay_trade_no,
    digits,
    parse_yuan,
    request_refund,
    yuan,
)

if TYPE_CHECKING:
    from mallgate.sandbox.app import SandboxState

SIGN_TYPE: Final = "RSA2"
_JSON: Final = "application/json;charset=utf-8"
_FORM: Final = "application/x-www-form-urlencoded; charset=utf-8"
_METHODS: Final = frozenset(
    {
        "alipay.trade.query",
        "alipay.trade.wap.pay",
        "alipay.trade.refund",
        "alipay.trade.close",
        "alipay.trade.fastpay.refund.query",
    }
)
_BUYER_LOGON_ID: Final = "159****5620"
_BODY_LIMIT: Final = 64 * 1024


class GatewayError(Exception):
    """A refusal before the method runs; Alipay sends these unsigned."""

    def __init__(self, code: str, msg: str, sub_code: str, sub_msg: str) -> None:
        super().__init__(f"{code} {sub_code}")
        self.payload = {"code": code, "msg": msg, "sub_code": sub_code, "sub_msg": sub_msg}


def _biz_content(params: dict[str, str]) -> dict[str, Any]:
    try:
        biz = json.loads(params.get("biz_content") or "{}")
    except ValueError:
        biz = None
    if not isinstance(biz, dict):
        raise GatewayError(
            "40002", "Invalid Arguments", "isv.invalid-parameter", "biz_content 不是 JSON 对象"
        )
    return biz


class AlipayStandIn:
    def __init__(
        self, state: SandboxState, book: TradeBook, notifier: Notifier, clock: Clock = default_clock
    ):
        self._state = state
        self._book = book
        self._notifier = notifier
        self._clock = clock
        self._merchant_public = load_private_key(state.keys.alipay_merchant_private).public_key()
        self._platform_private = load_private_key(state.keys.alipay_platform_private)
        self.router = self._routes()

    @property
    def default_notify_url(self) -> str:
        return f"{self._state.service_url}/pay/notify"

    def _now_text(self) -> str:
        return self._clock.beijing().strftime("%Y-%m-%d %H:%M:%S")

    # ------------------------------------------------------------------------------------------
    # gateway.do

    def _checked_params(self, body: bytes, query: bytes) -> dict[str, str]:
        """The request's parameters once app, method and signature have passed, in Alipay's order."""
        if len(body) > _BODY_LIMIT:
            raise GatewayError("40002", "Invalid Arguments", "isv.invalid-parameter", "请求过大")
        try:
            params = parse_form(body, query)
        except MalformedNotification as exc:
            raise GatewayError("40002", "Invalid Arguments", "isv.invalid-parameter", str(exc)) from None
        if not params.get("app_id"):
            raise GatewayError("40001", "Missing Required Arguments", "isv.missing-app-id", "缺少AppID参数")
        if params["app_id"] != ALIPAY_APP_ID:
            raise GatewayError("40002", "Invalid Arguments", "isv.invalid-app-id", "无效的AppID参数")
        if params.get("method", "") not in _METHODS:
            raise GatewayError("40002", "Invalid Arguments", "isv.invalid-method", "不存在的方法名")
        if not params.get("sign"):
            raise GatewayError("40001", "Missing Required Arguments", "isv.missing-signature", "缺少签名参数")
        try:
            verify_request(params, self._merchant_public, SIGN_TYPE)
        except NotAuthentic:
            raise GatewayError(
                "40002",
                "Invalid Arguments",
                "isv.invalid-signature",
                "验签出错，建议检查签名字符串或签名私钥与应用公钥是否匹配",
            ) from None
        return params

    def _routes(self) -> APIRouter:
        router = APIRouter()

        @router.api_route("/alipay/gateway.do", methods=["GET", "POST"], name="alipay_gateway")
        async def gateway(request: Request) -> Response:
            body = await request.body()
            query: bytes = request.scope.get("query_string", b"")
            method = ""
            try:
                # The method is read early only to name the error's key; nothing else is trusted yet.
                method = parse_form(b"", query).get("method", "") or parse_form(body).get("method", "")
            except MalformedNotification:
                pass
            try:
                params = self._checked_params(body, query)
                if params["method"] == "alipay.trade.wap.pay":
                    return self._cashier(request, params)
                if params["method"] == "alipay.trade.refund":
                    return await self._trade_refund(params)
                if params["method"] == "alipay.trade.close":
                    return self._signed("alipay.trade.close", self._trade_close(params))
                if params["method"] == "alipay.trade.fastpay.refund.query":
                    return self._signed("alipay.trade.fastpay.refund.query", self._refund_query(params))
                return self._trade_query(params)
            except GatewayError as exc:
                if method == "alipay.trade.wap.pay":
                    return message(request, "支付宝 · 错误", rows=exc.payload, status_code=400)
                key = method.replace(".", "_") + "_response" if method in _METHODS else "error_response"
                text = json.dumps({key: exc.payload}, ensure_ascii=False, separators=(",", ":"))
                return Response(text, media_type=_JSON)

        @router.post("/alipay/cashier/pay", name="alipay_cashier_pay")
        async def cashier_pay(request: Request) -> Response:
            form = await request.form()
            order_no = str(form.get("out_trade_no", ""))
            try:
                await self.settle(order_no=order_no, kind="pay")
            except SandboxError as exc:
                return message(request, "支付宝 · 错误", str(exc), status_code=400)
            # Redirect after POST: a refresh of the result would otherwise send the notice again.
            return RedirectResponse(f"done?out_trade_no={quote(order_no, safe='')}", status_code=303)

        @router.get("/alipay/cashier/done", name="alipay_cashier_done")
        async def cashier_done(request: Request, out_trade_no: str = "") -> Response:
            trade = self._book.get("alipay", out_trade_no)
            if trade is None or trade.status != "paid":
                return message(
                    request, "支付宝 · 错误", "交易不存在或未支付 (no such paid trade)", status_code=404
                )
            return render(
                request,
                "cashier_done.html",
                title="支付宝 · 支付成功",
                rows=[
                    ("out_trade_no", trade.out_trade_no),
                    ("trade_no", trade.trade_no),
                    ("total_amount", yuan(trade.amount)),
                ],
                return_link=self.return_link(trade) if trade.return_url else "",
                deliveries=self._notifier.of_order(trade.out_trade_no, "pay", ("alipay",)),
            )

        return router

    def _trade_query(self, params: dict[str, str]) -> Response:
        biz = _biz_content(params)
        trade_no, out_trade_no = str(biz.get("trade_no") or ""), str(biz.get("out_trade_no") or "")
        payload: dict[str, Any]
        if not (trade_no or out_trade_no):
            payload = {
                "code": "40004",
                "msg": "Business Failed",
                "sub_code": "ACQ.INVALID_PARAMETER",
                "sub_msg": "参数无效",
            }
        else:
            # trade_no wins when both are given, as at Alipay.
            trade = (
                self._book.by_trade_no("alipay", trade_no)
                if trade_no
                else self._book.get("alipay", out_trade_no)
            )
            # A cashier opened but never paid creates no trade at Alipay either.
            if trade is None or (trade.status == "pending"):
                payload = {
                    "code": "40004",
                    "msg": "Business Failed",
                    "sub_code": "ACQ.TRADE_NOT_EXIST",
                    "sub_msg": "交易不存在",
                    "buyer_pay_amount": "0.00",
                    "invoice_amount": "0.00",
                    "out_trade_no": out_trade_no,
                    "point_amount": "0.00",
                    "receipt_amount": "0.00",
                }
            else:
                payload = self._query_payload(trade)
        return Response(
            sign_response("alipay.trade.query", payload, self._platform_private, SIGN_TYPE), media_type=_JSON
        )

    def _signed(self, method: str, payload: dict[str, Any]) -> Response:
        return Response(sign_response(method, payload, self._platform_private, SIGN_TYPE), media_type=_JSON)

    @staticmethod
    def _business_failed(sub_code: str, sub_msg: str) -> dict[str, Any]:
        return {"code": "40004", "msg": "Business Failed", "sub_code": sub_code, "sub_msg": sub_msg}

    def _trade_of(self, biz: dict[str, Any]) -> Trade | None:
        trade_no, out_trade_no = str(biz.get("trade_no") or ""), str(biz.get("out_trade_no") or "")
        if trade_no:
            return self._book.by_trade_no("alipay", trade_no)
        return self._book.get("alipay", out_trade_no) if out_trade_no else None

    async def _trade_refund(self, params: dict[str, str]) -> Response:
        method = "alipay.trade.refund"
        biz = _biz_content(params)
        trade = self._trade_of(biz)
        request_no = str(biz.get("out_request_no") or "")
        try:
            amount = parse_yuan(str(biz.get("refund_amount") or ""), "refund_amount")
        except SandboxError:
            return self._signed(
                method, self._business_failed("ACQ.INVALID_PARAMETER", "参数无效: refund_amount")
            )
        if trade is None or trade.status != "paid":
            return self._signed(method, self._business_failed("ACQ.TRADE_NOT_EXIST", "交易不存在"))
        # Without out_request_no Alipay takes the trade number: one refund per trade.
        request_no = request_no or trade.trade_no
        try:
            _, refund, new = request_refund(trade, request_no, amount)
        except RefundRefused:
            return self._signed(
                method, self._business_failed("ACQ.SELLER_BALANCE_NOT_ENOUGH", "卖家余额不足")
            )
        except SandboxError as exc:
            return self._signed(method, self._business_failed("ACQ.REFUND_AMT_NOT_EQUAL_TOTAL", str(exc)))
        now = self._clock.beijing()
        if new and request_no not in trade.silent_refunds:
            trade.notify_id = secrets.token_hex(16)
            await self._notifier.deliver(
                "alipay",
                self.default_notify_url,
                self._builder(self._refund_fields(trade, request_no, now)),
                order_no=trade.out_trade_no,
                kind="refund",
            )
        payload = {
            "code": "10000",
            "msg": "Success",
            "buyer_logon_id": _BUYER_LOGON_ID,
            "buyer_user_id": trade.buyer_id,
            # Y: this call moved money; a repeated out_request_no answers N with the same total.
            "fund_change": "Y" if new else "N",
            "gmt_refund_pay": now.strftime("%Y-%m-%d %H:%M:%S"),
            "out_trade_no": trade.out_trade_no,
            "refund_fee": yuan(trade.refunded),
            "send_back_fee": yuan(refund),
            "trade_no": trade.trade_no,
        }
        return self._signed(method, payload)

    def _trade_close(self, params: dict[str, str]) -> dict[str, Any]:
        trade = self._trade_of(_biz_content(params))
        if trade is None or (trade.status == "pending" and not trade.trade_no):
            # A cashier opened but never paid: Alipay has no trade to close either.
            if trade is not None:
                trade.status, trade.closed_at = "closed", self._clock.beijing()
            return self._business_failed("ACQ.TRADE_NOT_EXIST", "交易不存在")
        if trade.status == "paid":
            return self._business_failed("ACQ.TRADE_STATUS_ERROR", "交易状态不合法")
        trade.status, trade.closed_at = "closed", self._clock.beijing()
        return {
            "code": "10000",
            "msg": "Success",
            "out_trade_no": trade.out_trade_no,
            "trade_no": trade.trade_no,
        }

    def _refund_query(self, params: dict[str, str]) -> dict[str, Any]:
        biz = _biz_content(params)
        trade = self._trade_of(biz)
        request_no = str(biz.get("out_request_no") or "")
        if trade is None or request_no not in trade.refunds:
            # Alipay answers an unknown refund with success and no refund_amount.
            return {"code": "10000", "msg": "Success", "out_request_no": request_no}
        _, amount = trade.refunds[request_no]
        return {
            "code": "10000",
            "msg": "Success",
            "out_request_no": request_no,
            "out_trade_no": trade.out_trade_no,
            "trade_no": trade.trade_no,
            "refund_amount": yuan(amount),
            "total_amount": yuan(trade.amount),
            "refund_status": "REFUND_SUCCESS",
        }

    def _refund_fields(self, trade: Trade, request_no: str, now: Any) -> dict[str, str]:
        fields = self._trade_fields(trade) | self._paid_fields(trade)
        fields |= {
            "out_biz_no": request_no,
            "refund_fee": yuan(trade.refunded),  # cumulative, as Alipay sends it
            "gmt_refund": now.strftime("%Y-%m-%d %H:%M:%S.") + f"{now.microsecond // 1000:03d}",
        }
        if trade.fully_refunded:
            fields |= {"trade_status": "TRADE_CLOSED", "gmt_close": now.strftime("%Y-%m-%d %H:%M:%S")}
        return fields

    def _query_payload(self, trade: Trade) -> dict[str, Any]:
        paid = trade.status == "paid"
        status = "TRADE_SUCCESS" if paid and not trade.fully_refunded else "TRADE_CLOSED"
        amount = yuan(trade.amount) if paid else "0.00"
        payload: dict[str, Any] = {
            "code": "10000",
            "msg": "Success",
            "buyer_logon_id": _BUYER_LOGON_ID,
            "buyer_pay_amount": amount,
            "buyer_user_id": trade.buyer_id,
            "invoice_amount": amount,
            "out_trade_no": trade.out_trade_no,
            "point_amount": "0.00",
            "receipt_amount": amount,
            "total_amount": yuan(trade.amount),
            "trade_no": trade.trade_no,
            "trade_status": status,
        }
        if paid and trade.paid_at is not None:
            payload["send_pay_date"] = trade.paid_at.strftime("%Y-%m-%d %H:%M:%S")
            payload["fund_bill_list"] = [{"amount": yuan(trade.amount), "fund_channel": "ALIPAYACCOUNT"}]
        # Alipay leaves out what it does not know (a closed unpaid trade has no buyer) rather than send "".
        return {k: v for k, v in payload.items() if v != ""}

    def _cashier(self, request: Request, params: dict[str, str]) -> Response:
        biz = _biz_content(params)
        out_trade_no = str(biz.get("out_trade_no") or "")
        try:
            amount = parse_yuan(str(biz.get("total_amount") or ""), "total_amount")
        except SandboxError as exc:
            return message(request, "支付宝 · 错误", str(exc), status_code=400)
        if not out_trade_no:
            return message(request, "支付宝 · 错误", "缺少 out_trade_no", status_code=400)
        trade = self._book.get("alipay", out_trade_no)
        if trade is not None and trade.status != "pending":
            state = "已支付 (already paid)" if trade.status == "paid" else "已关闭 (closed)"
            return message(request, "支付宝 · 收银台", f"订单 {out_trade_no} {state}")
        trade = self._book.put(
            Trade(
                channel="alipay",
                out_trade_no=out_trade_no,
                amount=amount,
                subject=str(biz.get("subject") or ""),
                notify_url=params.get("notify_url", ""),
                return_url=params.get("return_url", ""),
                created_at=self._clock.beijing(),
            )
        )
        return render(
            request,
            "cashier.html",
            title="支付宝 · 收银台 (sandbox cashier)",
            rows=[("商品 subject", trade.subject), ("订单号 out_trade_no", out_trade_no)],
            amount=yuan(amount),
            # Relative to gateway.do, so the form works wherever the sandbox is mounted.
            action="cashier/pay",
            hidden={"out_trade_no": out_trade_no},
            button="确认付款 (pay)",
        )

    def return_link(self, trade: Trade) -> str:
        """The signed GET a browser is sent back with after a wap payment (V1 rule, no trade_status)."""
        params = {
            "charset": "utf-8",
            "out_trade_no": trade.out_trade_no,
            "method": "alipay.trade.wap.pay.return",
            "total_amount": yuan(trade.amount),
            "trade_no": trade.trade_no,
            "auth_app_id": ALIPAY_APP_ID,
            "version": "1.0",
            "app_id": ALIPAY_APP_ID,
            "seller_id": ALIPAY_SELLER_ID,
            "timestamp": self._now_text(),
        }
        signed = sign_notification(params, self._platform_private, SIGN_TYPE)
        separator = "&" if "?" in trade.return_url else "?"
        return trade.return_url + separator + urlencode(signed)

    # ------------------------------------------------------------------------------------------
    # pay, refund, close: record the change and notify

    async def settle(
        self,
        *,
        order_no: str,
        kind: str,
        amount: Decimal | None = None,
        refund_amount: Decimal | None = None,
        duplicates: int = 0,
        notify: bool = True,
    ) -> Outcome:
        if not order_no:
            raise SandboxError("order_no is required")
        trade = self._book.get("alipay", order_no)
        now = self._clock.beijing()
        if trade is None:
            if amount is None:
                raise SandboxError(f"the Alipay stand-in does not know {order_no}: give its amount")
            trade = self._book.put(Trade("alipay", order_no, amount, created_at=now))
        refund = None
        # Each branch changes the trade before any await, so concurrent calls see a consistent record.
        if kind == "pay":
            if trade.pay(amount, now):
                trade.trade_no = alipay_trade_no(now)
                trade.buyer_id = "2088" + digits(12)
                trade.notify_id = secrets.token_hex(16)
            # Paying a paid trade again re-sends its notice unchanged: a late duplicate.
            fields = self._trade_fields(trade) | self._paid_fields(trade)
        elif kind == "refund":
            refund = trade.take_refund(refund_amount)
            trade.notify_id = secrets.token_hex(16)
            fields = self._refund_fields(trade, f"{order_no}R{trade.refund_count}", now)
        elif kind in ("fail_next_refund", "silence_next_refund"):
            trade.next_refund = "fail" if kind == "fail_next_refund" else "silent"
            what = "refused" if kind == "fail_next_refund" else "made without a notice"
            return Outcome(kind, trade, "", [], note=f"the next refund request of this trade will be {what}")
        elif kind == "close":
            if trade.status == "paid":
                raise SandboxError(f"{order_no} is paid: refund it instead")
            if amount is not None and trade.status == "pending":
                trade.amount = amount
            trade.status, trade.closed_at = "closed", now
            if not trade.trade_no:
                trade.trade_no = alipay_trade_no(now)
                trade.notify_id = secrets.token_hex(16)
            fields = self._trade_fields(trade) | {
                "trade_status": "TRADE_CLOSED",
                "gmt_close": (trade.closed_at or now).strftime("%Y-%m-%d %H:%M:%S"),
            }
        else:
            raise SandboxError(f"unknown kind {kind!r}")
        # Always the service's own notify URL, whatever a request named: the sandbox must never
        # become a way to make this machine POST (and retry) to an address of someone's choosing.
        url = self.default_notify_url
        if not notify:
            return Outcome(kind, trade, url, [], refund_amount=refund, note="recorded, not notified")
        deliveries = await self._notifier.deliver(
            "alipay", url, self._builder(fields), order_no=order_no, kind=kind, duplicates=duplicates
        )
        return Outcome(kind, trade, url, deliveries, refund_amount=refund)

    def _trade_fields(self, trade: Trade) -> dict[str, str]:
        created = trade.created_at or self._clock.beijing()
        return {
            "notify_type": "trade_status_sync",
            "notify_id": trade.notify_id or secrets.token_hex(16),
            "app_id": ALIPAY_APP_ID,
            "auth_app_id": ALIPAY_APP_ID,
            "charset": "utf-8",
            "version": "1.0",
            "trade_no": trade.trade_no,
            "out_trade_no": trade.out_trade_no,
            "buyer_id": trade.buyer_id,
            "buyer_logon_id": _BUYER_LOGON_ID if trade.buyer_id else "",
            "seller_id": ALIPAY_SELLER_ID,
            "total_amount": yuan(trade.amount),
            "subject": trade.subject,
            "gmt_create": created.strftime("%Y-%m-%d %H:%M:%S"),
        }

    def _paid_fields(self, trade: Trade) -> dict[str, str]:
        amount = yuan(trade.amount)
        paid_at = trade.paid_at or self._clock.beijing()
        return {
            "trade_status": "TRADE_SUCCESS",
            "receipt_amount": amount,
            "invoice_amount": amount,
            "buyer_pay_amount": amount,
            "point_amount": "0.00",
            "gmt_payment": paid_at.strftime("%Y-%m-%d %H:%M:%S"),
            # camelCase fundChannel in notices (the query API says fund_channel): Alipay's own quirk.
            "fund_bill_list": json.dumps(
                [{"amount": amount, "fundChannel": "ALIPAYACCOUNT"}], separators=(",", ":")
            ),
        }

    def _builder(self, fields: dict[str, str]) -> Callable[[], Outgoing]:
        fixed = {k: v for k, v in fields.items() if v != ""}

        def build() -> Outgoing:
            # notify_time is the time of this delivery, so every re-send is signed afresh.
            signed = sign_notification(
                {**fixed, "notify_time": self._now_text()}, self._platform_private, SIGN_TYPE
            )
            return Outgoing({"Content-Type": _FORM}, urlencode(signed).encode("ascii"))

        return build
