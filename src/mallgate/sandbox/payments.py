"""The payment stand-ins together: Alipay, WeChat Pay, and "pay this order" (a page and a JSON call).

``POST /pay`` plays the payer: it records the payment (or refund, or close) at the
stand-in platform and sends the platform's signed notification to the service,
then answers with what the service said to each delivery; retries go on in the
background on the platform's schedule, compressed (see :mod:`notifier`).
"""

from __future__ import annotations

from html import escape
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mallgate.envelope import fail, ok
from mallgate.sandbox.alipay_standin import AlipayStandIn
from mallgate.sandbox.notifier import Notifier, TooManyInFlight
from mallgate.sandbox.pages import deliveries_table, page
from mallgate.sandbox.trades import Outcome, SandboxError, TradeBook, parse_yuan
from mallgate.sandbox.wechatpay_standin import WechatPayStandIn

if TYPE_CHECKING:
    from mallgate.clock import Clock
    from mallgate.sandbox.app import SandboxState, StandIn

RESOURCE_KEY = "payments"
MAX_DUPLICATES = 20


class PayRequest(BaseModel):
    """The JSON call's body (the page's form carries the same names)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    channel: Literal["alipay", "wechat"]
    order_no: str = Field(min_length=1, max_length=64)
    # Yuan as a decimal string: a JSON number would already have gone through a float.
    amount: str | None = None
    wechat_version: Literal["v2", "v3"] = "v2"
    duplicates: int = Field(0, ge=0, le=MAX_DUPLICATES)
    kind: Literal["pay", "refund", "close"] = "pay"
    refund_amount: str | None = None
    # false: the platform records the change but its notice never arrives (for trying reconcile).
    notify: bool = True


def _reason(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return f"{where}: {first['msg']}" if where else str(first["msg"])


class Payments:
    """Both payment platforms over one trade record and one notifier."""

    def __init__(self, state: SandboxState, *, notifier: Notifier | None = None, clock: Clock | None = None):
        from mallgate.clock import default_clock

        clock = clock or default_clock
        self.book = TradeBook()
        self.notifier = notifier or Notifier(clock=clock)
        self.alipay = AlipayStandIn(state, self.book, self.notifier, clock)
        self.wechat = WechatPayStandIn(state, self.book, self.notifier, clock)
        self.router = self._routes()

    async def aclose(self) -> None:
        await self.notifier.aclose()

    async def pay(self, call: PayRequest) -> Outcome:
        amount = parse_yuan(call.amount) if call.amount else None
        refund = parse_yuan(call.refund_amount, "refund_amount") if call.refund_amount else None
        if call.channel == "alipay":
            return await self.alipay.settle(
                order_no=call.order_no,
                kind=call.kind,
                amount=amount,
                refund_amount=refund,
                duplicates=call.duplicates,
                notify=call.notify,
            )
        return await self.wechat.settle(
            order_no=call.order_no,
            kind=call.kind,
            version=call.wechat_version,
            amount=amount,
            refund_amount=refund,
            duplicates=call.duplicates,
            notify=call.notify,
        )

    def _page(self, result: str = "", form: dict[str, str] | None = None, status_code: int = 200) -> Response:
        values = form or {}

        def field(name: str, default: str = "") -> str:
            return escape(values.get(name, default), quote=True)

        def select(name: str, options: tuple[str, ...]) -> str:
            chosen = values.get(name, options[0])
            return (
                f"<select name={name}>"
                + "".join(f"<option{' selected' if o == chosen else ''}>{o}</option>" for o in options)
                + "</select>"
            )

        return page(
            "Pay this order (sandbox)",
            result + "<form method=post action='pay'>"
            f"<label>channel {select('channel', ('alipay', 'wechat'))}</label>"
            f"<label>order number <input name=order_no required value='{field('order_no')}'></label>"
            f"<label>amount (yuan) <input name=amount placeholder=9.90 value='{field('amount')}'></label>"
            f"<label>kind {select('kind', ('pay', 'refund', 'close'))}</label>"
            f"<label>refund amount (yuan, default: all) <input name=refund_amount "
            f"value='{field('refund_amount')}'></label>"
            f"<label>WeChat Pay version {select('wechat_version', ('v2', 'v3'))}</label>"
            f"<label>duplicates (extra copies sent at once) <input name=duplicates type=number min=0 "
            f"max={MAX_DUPLICATES} value='{field('duplicates', '0')}'></label>"
            "<button>send</button></form>"
            f"<p>Retries follow the platforms' schedules with one real minute lasting "
            f"{self.notifier.minute:g} s. <a href='pay'>refresh</a> · "
            "<a href='pay/deliveries'>deliveries as JSON</a></p>"
            "<h2>Notifications</h2>" + deliveries_table(self.notifier.deliveries),
            status_code=status_code,
        )

    def _routes(self) -> APIRouter:
        router = APIRouter()

        @router.get("/pay")
        async def pay_page() -> Response:
            return self._page()

        @router.post("/pay")
        async def pay(request: Request) -> Response:
            as_json = request.headers.get("content-type", "").startswith("application/json")
            if as_json:
                try:
                    data: Any = await request.json()
                except ValueError:
                    return fail("body is not JSON", "sandbox.invalid", http_status=400)
            else:
                # Empty fields of the page's form mean "not given".
                data = {k: v for k, v in (await request.form()).items() if isinstance(v, str) and v.strip()}
            try:
                outcome = await self.pay(PayRequest.model_validate(data))
            except ValidationError as exc:
                reason = _reason(exc)
            except SandboxError as exc:
                reason = str(exc)
            except TooManyInFlight as exc:
                if as_json:
                    return fail(str(exc), "sandbox.busy", http_status=429)
                return self._page(f"<p class=bad>{escape(str(exc))}</p>", status_code=429)
            else:
                if as_json:
                    return ok(outcome.as_json(), info="sent" if outcome.deliveries else outcome.note or "ok")
                trade = outcome.trade
                summary = (
                    f"<p class={'ok' if any(d.delivered for d in outcome.deliveries) else 'bad'}>"
                    f"{escape(outcome.kind)} {escape(trade.channel)} {escape(trade.out_trade_no)} "
                    f"(trade {escape(trade.trade_no or '-')}): {escape(outcome.note or 'sent')}</p>"
                )
                return self._page(summary, {k: str(v) for k, v in data.items()})
            if as_json:
                return fail(reason, "sandbox.invalid", http_status=400)
            form = {k: str(v) for k, v in data.items()} if isinstance(data, dict) else {}
            return self._page(f"<p class=bad>{escape(reason)}</p>", form, status_code=400)

        @router.get("/pay/deliveries")
        async def deliveries(order_no: str = "") -> JSONResponse:
            shown = [d for d in self.notifier.deliveries if not order_no or d.order_no == order_no]
            return ok([d.as_json() for d in shown])

        return router


def payment_standins(state: SandboxState) -> list[StandIn]:
    from mallgate.sandbox.app import StandIn

    payments = Payments(state)
    state.resources[RESOURCE_KEY] = payments
    return [
        StandIn(
            "Alipay",
            "gateway.do: alipay.trade.query and the alipay.trade.wap.pay cashier; "
            "signed notifications with retries",
            payments.alipay.router,
            [("pay an order", "/pay")],
        ),
        StandIn(
            "WeChat Pay",
            "v2 pay/unifiedorder and pay/orderquery, v3 certificates, the MWEB cashier; "
            "v2 XML and v3 JSON notifications with retries",
            payments.wechat.router,
            [("pay an order", "/pay")],
        ),
        StandIn(
            "Pay this order",
            "pays, refunds or closes an order at a stand-in and notifies the service "
            "(also POST /pay as JSON)",
            payments.router,
            [("page", "/pay"), ("deliveries (JSON)", "/pay/deliveries")],
        ),
    ]
