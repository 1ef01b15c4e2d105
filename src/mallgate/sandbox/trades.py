"""The payment stand-ins' own record of trades, and the money and id formats they share.

The record lives in memory: it is what the platform knows, so ``trade.query`` and
``orderquery`` answer from it, never from the service's database.
"""

from __future__ import annotations

import re
import secrets
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, Final, Literal

from mallgate.sandbox.notifier import Delivery

Channel = Literal["alipay", "wechat"]
TradeStatus = Literal["pending", "paid", "closed"]

# [0-9], not \d: \d also matches other scripts' digits, which Decimal accepts.
_YUAN: Final = re.compile(r"[0-9]{1,10}(\.[0-9]{1,2})?")
CENT: Final = Decimal("0.01")


class SandboxError(ValueError):
    """A request the stand-in refuses; the message is shown to the person or test that sent it."""


def parse_yuan(text: str, name: str = "amount") -> Decimal:
    """A positive amount in yuan with at most two decimals, from its decimal text (never a float)."""
    value = text.strip()
    if not _YUAN.fullmatch(value):
        raise SandboxError(f"{name} must be yuan as a decimal string with at most two decimals, e.g. 9.90")
    amount = Decimal(value).quantize(CENT)
    if amount <= 0:
        raise SandboxError(f"{name} must be positive")
    return amount


def fen(amount: Decimal) -> int:
    """Yuan to fen, exactly: the amount already has at most two decimals."""
    return int((amount * 100).to_integral_exact())


def yuan(amount: Decimal) -> str:
    return f"{amount.quantize(CENT):.2f}"


def digits(n: int) -> str:
    return "".join(secrets.choice("0123456789") for _ in range(n))


def alipay_trade_no(now: datetime) -> str:
    """28 digits, date first, as Alipay's trade numbers are."""
    return now.strftime("%Y%m%d") + digits(20)


def wechat_transaction_id() -> str:
    return "4200" + digits(24)


@dataclass
class Trade:
    channel: Channel
    out_trade_no: str
    amount: Decimal
    subject: str = ""
    status: TradeStatus = "pending"
    trade_no: str = ""  # Alipay trade_no or WeChat transaction_id, given on payment
    buyer_id: str = ""  # Alipay buyer id or WeChat openid
    notify_url: str = ""
    return_url: str = ""
    appid: str = ""
    trade_type: str = ""
    prepay_id: str = ""
    refunded: Decimal = Decimal("0.00")
    refund_count: int = 0
    created_at: datetime | None = None
    paid_at: datetime | None = None
    closed_at: datetime | None = None
    notify_id: str = ""  # Alipay keeps one id per state change across re-sends
    events: list[str] = field(default_factory=list)
    # Refunds the merchant asked for, by its request number: (platform refund id, amount).
    refunds: dict[str, tuple[str, Decimal]] = field(default_factory=dict)
    # Set from the console: the next refund request is refused ("fail"), or made but its notice
    # never sent and the answer left PROCESSING ("silent"), for trying `mallgate reconcile`.
    next_refund: Literal["", "fail", "silent"] = ""
    silent_refunds: set[str] = field(default_factory=set)

    @property
    def fully_refunded(self) -> bool:
        return self.refunded >= self.amount

    def pay(self, amount: Decimal | None, now: datetime) -> bool:
        """Mark paid (True), or find it paid already (False: the caller re-sends, a late duplicate)."""
        if self.status == "closed":
            raise SandboxError(f"{self.out_trade_no} is closed")
        if self.status != "pending":
            return False
        if amount is not None:
            self.amount = amount
        self.status, self.paid_at = "paid", now
        return True

    def take_refund(self, amount: Decimal | None) -> Decimal:
        """Refund `amount` (all that is left when None) and return it."""
        if self.status != "paid":
            raise SandboxError(f"{self.out_trade_no} is not paid, nothing to refund")
        remaining = self.amount - self.refunded
        refund = remaining if amount is None else amount
        if remaining <= 0:
            raise SandboxError(f"{self.out_trade_no} is already fully refunded")
        if refund > remaining:
            raise SandboxError(f"refund {yuan(refund)} exceeds the refundable {yuan(remaining)}")
        self.refunded += refund
        self.refund_count += 1
        return refund


class RefundRefused(SandboxError):
    """A refund the platform turns down on purpose (the console's "fail next refund")."""


def request_refund(trade: Trade, request_no: str, amount: Decimal) -> tuple[str, Decimal, bool]:
    """A merchant's refund request: (refund id, amount, new?). The same request number is
    answered with the same refund, never a second one, as the platforms do."""
    known = trade.refunds.get(request_no)
    if known is not None:
        return known[0], known[1], False
    if trade.next_refund == "fail":
        trade.next_refund = ""
        raise RefundRefused("refused on purpose from the sandbox console")
    refund = trade.take_refund(amount)
    refund_id = "50" + digits(27)
    trade.refunds[request_no] = (refund_id, refund)
    if trade.next_refund == "silent":
        trade.next_refund = ""
        trade.silent_refunds.add(request_no)
    return refund_id, refund, True


class TradeBook:
    """Trades by channel and merchant order number, oldest forgotten first past ``limit``."""

    def __init__(self, limit: int = 10_000) -> None:
        self._limit = limit
        self._trades: OrderedDict[tuple[Channel, str], Trade] = OrderedDict()

    def get(self, channel: Channel, out_trade_no: str) -> Trade | None:
        return self._trades.get((channel, out_trade_no))

    def by_trade_no(self, channel: Channel, trade_no: str) -> Trade | None:
        if not trade_no:
            return None
        return next(
            (t for (c, _), t in self._trades.items() if c == channel and t.trade_no == trade_no), None
        )

    def trades(self, channel: Channel) -> list[Trade]:
        return [t for (c, _), t in self._trades.items() if c == channel]

    def by_prepay_id(self, prepay_id: str) -> Trade | None:
        if not prepay_id:
            return None
        return next((t for t in self._trades.values() if t.prepay_id == prepay_id), None)

    def put(self, trade: Trade) -> Trade:
        key = (trade.channel, trade.out_trade_no)
        self._trades[key] = trade
        self._trades.move_to_end(key)
        while len(self._trades) > self._limit:
            self._trades.popitem(last=False)
        return trade


@dataclass
class Outcome:
    """What one "pay / refund / close" did: the trade as the platform now sees it and the sends."""

    kind: str
    trade: Trade
    notify_url: str
    deliveries: list[Delivery]
    refund_amount: Decimal | None = None
    note: str = ""

    def as_json(self) -> dict[str, Any]:
        trade = self.trade
        return {
            "channel": trade.channel,
            "kind": self.kind,
            "order_no": trade.out_trade_no,
            "amount": yuan(trade.amount),
            "trade_no": trade.trade_no,
            "trade_status": trade.status,
            "refunded": yuan(trade.refunded),
            "refund_amount": yuan(self.refund_amount) if self.refund_amount is not None else None,
            "notify_url": self.notify_url,
            "note": self.note,
            "delivered": any(d.delivered for d in self.deliveries),
            "deliveries": [d.as_json() for d in self.deliveries],
        }
