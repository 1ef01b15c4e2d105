"""The payment stand-ins together: Alipay, WeChat Pay, and "pay this order" (a page and a JSON call).

``POST /pay`` plays the payer: it records the payment (or refund, or close) at the
stand-in platform and sends the platform's signed notification to the service,
then answers with what the service said to each delivery; retries go on in the
background on the platform's schedule, compressed (see :mod:`notifier`). The page's
form is answered with a redirect to the page showing the result, so a refresh never
pays again.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mallgate.envelope import fail, ok
from mallgate.sandbox.alipay_standin import AlipayStandIn
from mallgate.sandbox.notifier import Attempt, Delivery, Notifier, TooManyInFlight
from mallgate.sandbox.pages import render
from mallgate.sandbox.trades import Outcome, SandboxError, TradeBook, parse_yuan
from mallgate.sandbox.wechatpay_standin import WechatPayStandIn

if TYPE_CHECKING:
    from mallgate.clock import Clock
    from mallgate.sandbox.app import SandboxState, StandIn

RESOURCE_KEY = "payments"
MAX_DUPLICATES = 20
# Results of the page's form kept for the page they redirect to; older ones are forgotten.
MAX_SHOWN: Final = 200
SECTION_ROWS: Final = 5


class PayRequest(BaseModel):
    """The JSON call's body (the page's form carries the same names)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    channel: Literal["alipay", "wechat"]
    order_no: str = Field(min_length=1, max_length=64)
    # Yuan as a decimal string: a JSON number would already have gone through a float.
    amount: str | None = None
    wechat_version: Literal["v2", "v3"] = "v2"
    duplicates: int = Field(0, ge=0, le=MAX_DUPLICATES)
    # fail_next_refund: the platform refuses the next refund the service asks for, on purpose;
    # silence_next_refund: makes it but sends no notice (WeChat Pay answers PROCESSING).
    kind: Literal["pay", "refund", "close", "fail_next_refund", "silence_next_refund"] = "pay"
    refund_amount: str | None = None
    # false: the platform records the change but its notice never arrives (for trying reconcile).
    notify: bool = True


def _reason(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return f"{where}: {first['msg']}" if where else str(first["msg"])


@dataclass(frozen=True)
class Shown:
    """What one POST of the form did. Its deliveries go on changing (retries): read at each view."""

    outcome: Outcome
    form: dict[str, str]
    max_attempts: int

    @property
    def delivery(self) -> Delivery | None:
        return self.outcome.deliveries[0] if self.outcome.deliveries else None

    @property
    def answer(self) -> Attempt | None:
        """The service's answer to the first delivery: what decides the colour of the result."""
        delivery = self.delivery
        return delivery.attempts[0] if delivery is not None and delivery.attempts else None

    @property
    def tone(self) -> Literal["ok", "bad", ""]:
        answer = self.answer
        if answer is None:
            return ""
        return "ok" if answer.ok else "bad"

    @property
    def copies(self) -> int:
        return len(self.outcome.deliveries)

    @property
    def accepted(self) -> int:
        return sum(1 for d in self.outcome.deliveries if d.delivered)


class Payments:
    """Both payment platforms over one trade record and one notifier."""

    def __init__(self, state: SandboxState, *, notifier: Notifier | None = None, clock: Clock | None = None):
        from mallgate.clock import default_clock

        clock = clock or default_clock
        self.book = TradeBook()
        self.notifier = notifier or Notifier(clock=clock)
        self.alipay = AlipayStandIn(state, self.book, self.notifier, clock)
        self.wechat = WechatPayStandIn(state, self.book, self.notifier, clock)
        self._shown: OrderedDict[str, Shown] = OrderedDict()
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

    def remember(self, outcome: Outcome, form: dict[str, str]) -> str:
        """Keep what a form POST did for the page it redirects to; the key names it in the URL."""
        key = secrets.token_urlsafe(9)
        first = outcome.deliveries[0] if outcome.deliveries else None
        attempts = self.notifier.max_attempts(first.protocol) if first else 0
        self._shown[key] = Shown(outcome, form, attempts)
        while len(self._shown) > MAX_SHOWN:
            self._shown.popitem(last=False)
        return key

    def _page(
        self,
        request: Request,
        *,
        shown: Shown | None = None,
        forgotten: bool = False,
        error: str = "",
        form: dict[str, str] | None = None,
        status_code: int = 200,
    ) -> Response:
        return render(
            request,
            "pay.html",
            title="Pay this order",
            shown=shown,
            forgotten=forgotten,
            error=error,
            form=form if form is not None else (shown.form if shown else {}),
            max_duplicates=MAX_DUPLICATES,
            minute=f"{self.notifier.minute:g}",
            deliveries=self.notifier.deliveries,
            status_code=status_code,
        )

    async def platform_section(self, *protocols: str) -> dict[str, Any]:
        mine = [d for d in self.notifier.deliveries if d.protocol in protocols]
        return {"deliveries": mine[:SECTION_ROWS], "total": len(mine)}

    async def pay_section(self) -> dict[str, Any]:
        return {"max_duplicates": MAX_DUPLICATES}

    def _routes(self) -> APIRouter:
        router = APIRouter()

        @router.get("/pay")
        async def pay_page(request: Request, shown: str = "") -> Response:
            kept = self._shown.get(shown) if shown else None
            return self._page(request, shown=kept, forgotten=bool(shown) and kept is None)

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
            form = {k: str(v) for k, v in data.items()} if isinstance(data, dict) else {}
            try:
                outcome = await self.pay(PayRequest.model_validate(data))
            except ValidationError as exc:
                reason = _reason(exc)
            except SandboxError as exc:
                reason = str(exc)
            except TooManyInFlight as exc:
                if as_json:
                    return fail(str(exc), "sandbox.busy", http_status=429)
                return self._page(request, error=str(exc), form=form, status_code=429)
            else:
                if as_json:
                    return ok(outcome.as_json(), info="sent" if outcome.deliveries else outcome.note or "ok")
                # Redirect after POST: a refresh of the page shows the result, it never pays again.
                return RedirectResponse(f"pay?shown={self.remember(outcome, form)}", status_code=303)
            if as_json:
                return fail(reason, "sandbox.invalid", http_status=400)
            # Nothing happened, so nothing to repeat: the form comes back filled in, with the reason.
            return self._page(request, error=reason, form=form, status_code=400)

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
            "gateway.do: alipay.trade.query, .refund, .close and the alipay.trade.wap.pay cashier; "
            "signed notifications with retries",
            payments.alipay.router,
            [("pay an order", "/pay")],
            section="sections/platform.html",
            context=lambda: payments.platform_section("alipay"),
        ),
        StandIn(
            "WeChat Pay",
            "v2 unifiedorder, orderquery, closeorder, secapi refund, refundquery; v3 transactions "
            "jsapi/app/h5/native, close, refunds, certificates; the MWEB cashier; "
            "v2 XML and v3 JSON notifications with retries",
            payments.wechat.router,
            [("pay an order", "/pay")],
            section="sections/platform.html",
            context=lambda: payments.platform_section("wechat_v2", "wechat_v3"),
        ),
        StandIn(
            "Pay this order",
            "pays, refunds or closes an order at a stand-in and notifies the service "
            "(also POST /pay as JSON)",
            payments.router,
            [("page", "/pay"), ("deliveries (JSON)", "/pay/deliveries")],
            section="sections/pay.html",
            context=payments.pay_section,
            page="/pay",
        ),
    ]
