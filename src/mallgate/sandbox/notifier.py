"""Delivery of the payment stand-ins' notifications, with the platforms' retry schedules, compressed.

Alipay and WeChat Pay re-send a notification until the merchant answers the one
answer that counts, over about a day. The sandbox keeps the shape of those
schedules but shrinks time by a factor (``minute`` = how many seconds one real
minute lasts), so a demo shows the whole sequence and a test can make it tiny.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import httpx

from mallgate.channels.errors import MalformedNotification
from mallgate.channels.wechat_pay_v2 import parse_xml
from mallgate.clock import Clock, default_clock

log = logging.getLogger("mallgate.sandbox")

Protocol = Literal["alipay", "wechat_v2", "wechat_v3"]
DeliveryState = Literal["sending", "retrying", "delivered", "failed", "cancelled"]

MINUTE: Final = 60.0
# The intervals between deliveries as the platforms document them (first delivery not included).
ALIPAY_RETRY_INTERVALS: Final = tuple(m * MINUTE for m in (4, 10, 10, 60, 120, 360, 900))
WECHAT_RETRY_INTERVALS: Final = (
    15.0, 15.0, 30.0, 3 * MINUTE, 10 * MINUTE, 20 * MINUTE, 30 * MINUTE, 30 * MINUTE, 30 * MINUTE,
    60 * MINUTE, 180 * MINUTE, 180 * MINUTE, 180 * MINUTE, 360 * MINUTE, 360 * MINUTE,
)  # fmt: skip
RETRY_INTERVALS: Final[Mapping[Protocol, tuple[float, ...]]] = {
    "alipay": ALIPAY_RETRY_INTERVALS,
    "wechat_v2": WECHAT_RETRY_INTERVALS,
    "wechat_v3": WECHAT_RETRY_INTERVALS,
}
# One real minute lasts 0.05 s: Alipay's ~24 h schedule takes about 73 s, its first retry 0.2 s.
DEFAULT_MINUTE: Final = 0.05
# The platforms give up on a merchant after a few seconds; waiting longer would hide a slow handler.
DEFAULT_TIMEOUT: Final = httpx.Timeout(5.0, connect=3.0)
_BODY_SHOWN: Final = 500
# Deliveries whose retries are still running, duplicates included: a flood of "pay" calls must not
# turn into an unbounded number of background tasks posting to the service.
MAX_IN_FLIGHT: Final = 100


class TooManyInFlight(Exception):
    """The notifier is already retrying as many deliveries as it may."""


def accepted(protocol: Protocol, status: int, body: bytes) -> bool:
    """Whether the merchant's answer ends the retries, exactly as the platform reads it."""
    if protocol == "alipay":
        # Seven bytes and nothing else: no newline, no HTML, no JSON.
        return status == 200 and body == b"success"
    if protocol == "wechat_v2":
        if status != 200:
            return False
        try:
            return parse_xml(body).get("return_code") == "SUCCESS"
        except MalformedNotification:
            return False
    return 200 <= status < 300


@dataclass(frozen=True)
class Outgoing:
    """One HTTP request as it goes out: built afresh for every attempt (v3 timestamps expire)."""

    headers: dict[str, str]
    body: bytes


@dataclass
class Attempt:
    number: int
    at: float
    status: int | None
    body: str
    ok: bool
    error: str = ""
    elapsed_ms: int = 0

    @property
    def answer(self) -> str:
        """The service's answer in a log line: status and body (repr: no line breaks reach the log)."""
        if self.status is None:
            return self.error or "no answer"
        return f"HTTP {self.status} {self.body[:200]!r}"

    def as_json(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "at": self.at,
            "status": self.status,
            "body": self.body,
            "ok": self.ok,
            "error": self.error,
            "elapsed_ms": self.elapsed_ms,
        }


@dataclass
class Delivery:
    id: int
    protocol: Protocol
    url: str
    order_no: str
    kind: str
    copy: int = 0  # 0 for the notification itself, 1..n for the duplicates sent beside it
    state: DeliveryState = "sending"
    attempts: list[Attempt] = field(default_factory=list)
    next_attempt_at: float | None = None
    first_attempt: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def delivered(self) -> bool:
        return self.state == "delivered"

    @property
    def pending(self) -> bool:
        return self.state in ("sending", "retrying")

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "protocol": self.protocol,
            "url": self.url,
            "order_no": self.order_no,
            "kind": self.kind,
            "copy": self.copy,
            "state": self.state,
            "delivered": self.delivered,
            "next_attempt_at": self.next_attempt_at,
            "attempts": [a.as_json() for a in self.attempts],
        }


class Notifier:
    """Sends notifications, retries them in background tasks, and keeps a bounded log."""

    def __init__(
        self,
        *,
        minute: float = DEFAULT_MINUTE,
        http: httpx.AsyncClient | None = None,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        log_size: int = 200,
        clock: Clock = default_clock,
        max_in_flight: int = MAX_IN_FLIGHT,
    ) -> None:
        if minute < 0:
            raise ValueError("minute must not be negative")
        self.minute = minute
        self.max_in_flight = max_in_flight
        self._clock = clock
        self._owns_http = http is None
        self._http = http or httpx.AsyncClient(timeout=timeout, follow_redirects=False)
        self._log: deque[Delivery] = deque(maxlen=log_size)
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()

    def delay(self, protocol: Protocol, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (0 = the first re-send)."""
        return RETRY_INTERVALS[protocol][retry] / MINUTE * self.minute

    def max_attempts(self, protocol: Protocol) -> int:
        return 1 + len(RETRY_INTERVALS[protocol])

    @property
    def deliveries(self) -> list[Delivery]:
        """Newest first."""
        return list(reversed(self._log))

    def of_order(self, order_no: str, kind: str, protocols: Collection[str]) -> list[Delivery]:
        """The kept deliveries of one order's payment, refund or close, newest first."""
        return [
            d
            for d in self.deliveries
            if d.order_no == order_no and d.kind == kind and d.protocol in protocols
        ]

    async def deliver(
        self,
        protocol: Protocol,
        url: str,
        build: Callable[[], Outgoing],
        *,
        order_no: str = "",
        kind: str = "",
        duplicates: int = 0,
    ) -> list[Delivery]:
        """Send now (plus ``duplicates`` identical copies, all at once, as the platforms sometimes
        do), wait for each first answer, and leave the retries to background tasks.

        Raises TooManyInFlight, sending nothing, when that would pass `max_in_flight`."""
        if len(self._tasks) + duplicates + 1 > self.max_in_flight:
            raise TooManyInFlight(
                f"{len(self._tasks)} notifications are still being delivered (at most {self.max_in_flight})"
            )
        deliveries = [
            Delivery(id=next(self._ids), protocol=protocol, url=url, order_no=order_no, kind=kind, copy=i)
            for i in range(duplicates + 1)
        ]
        for delivery in deliveries:
            self._log.append(delivery)
            task = asyncio.create_task(self._run(delivery, build), name=f"sandbox-notify-{delivery.id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        await asyncio.gather(*(d.first_attempt.wait() for d in deliveries))
        return deliveries

    async def wait_idle(self) -> None:
        """Until every retry has ended (tests; wrap in asyncio.timeout)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def cancel_pending(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def aclose(self) -> None:
        await self.cancel_pending()
        if self._owns_http:
            await self._http.aclose()

    async def _run(self, delivery: Delivery, build: Callable[[], Outgoing]) -> None:
        try:
            for number in range(1, self.max_attempts(delivery.protocol) + 1):
                if number > 1:
                    wait = self.delay(delivery.protocol, number - 2)
                    delivery.state = "retrying"
                    delivery.next_attempt_at = self._clock.now() + wait
                    await asyncio.sleep(wait)
                    delivery.next_attempt_at = None
                attempt = await self._attempt(delivery, number, build)
                delivery.attempts.append(attempt)
                delivery.first_attempt.set()
                if attempt.ok:
                    delivery.state = "delivered"
                    return
                if number == 1:
                    # Once per delivery, not per retry: the page shows every attempt.
                    log.warning(
                        "sandbox: the service did not accept %s notification %d (%s of order %r): %s;"
                        " retrying on the platform's schedule",
                        delivery.protocol,
                        delivery.id,
                        delivery.kind,
                        delivery.order_no,
                        attempt.answer,
                    )
            delivery.state = "failed"
            log.info(
                "sandbox: gave up on %s notification %d (%s of order %r) to %s; last answer: %s",
                delivery.protocol,
                delivery.id,
                delivery.kind,
                delivery.order_no,
                delivery.url,
                delivery.attempts[-1].answer if delivery.attempts else "none",
            )
        except asyncio.CancelledError:
            delivery.state = "cancelled"
            delivery.next_attempt_at = None
            raise
        finally:
            delivery.first_attempt.set()

    async def _attempt(self, delivery: Delivery, number: int, build: Callable[[], Outgoing]) -> Attempt:
        at = self._clock.now()
        started = time.monotonic()
        try:
            outgoing = build()
            response = await self._http.post(delivery.url, content=outgoing.body, headers=outgoing.headers)
        except httpx.HTTPError as exc:
            elapsed = int((time.monotonic() - started) * 1000)
            return Attempt(number, at, None, "", False, error=type(exc).__name__, elapsed_ms=elapsed)
        except Exception as exc:
            # A bug in building the message shows in the log and on the page instead of ending the task.
            log.exception("sandbox: could not build notification %d", delivery.id)
            return Attempt(number, at, None, "", False, error=f"{type(exc).__name__}: {exc}")
        elapsed = int((time.monotonic() - started) * 1000)
        body = response.content
        return Attempt(
            number,
            at,
            response.status_code,
            body[:_BODY_SHOWN].decode("utf-8", "replace"),
            accepted(delivery.protocol, response.status_code, body),
            elapsed_ms=elapsed,
        )
