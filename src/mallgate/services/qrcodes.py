"""QR code images: validation, a bounded render cache, ETags and a per-IP limit.

The route is open to anyone, so it must not become a free image service: data
is bounded (1 KiB), the module size is bounded, and each client IP may render
only so many images a minute. The limit lives in process memory, not the
database: a QR code costs no money (unlike an SMS), and a database write per
image would cost more than drawing it. With N workers an IP may get up to N
times the limit; that bound is what the operator should size the setting for.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from dataclasses import dataclass

from mallgate.channels import qr
from mallgate.channels.qr import MAX_DATA_BYTES, CacheKey, QrCache
from mallgate.envelope import ApiError
from mallgate.forwarded import rate_key
from mallgate.params import ascii_int
from mallgate.runtime import Runtime

DEFAULT_SIZE = 6
DEFAULT_MARGIN = 4  # the quiet zone ISO/IEC 18004 asks for
MAX_MARGIN = 16
LEVELS = ("l", "m", "q", "h")


@dataclass(frozen=True)
class QrRequest:
    data: str
    size: int
    margin: int
    level: str

    @property
    def etag(self) -> str:
        digest = hashlib.sha256(f"{self.size}|{self.margin}|{self.level}|{self.data}".encode()).hexdigest()
        return f'"{digest[:32]}"'

    @property
    def cache_key(self) -> CacheKey:
        return (self.data, self.size, self.margin, self.level)


class IpWindow:
    """Fixed one-minute windows per IP, in memory, holding at most `max_ips` addresses."""

    def __init__(self, per_minute: int, max_ips: int = 100_000) -> None:
        self.per_minute = per_minute
        self.max_ips = max_ips
        self._windows: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def hit(self, ip: str, now: float) -> int:
        """0 when allowed, else the seconds to wait."""
        if self.per_minute <= 0:
            return 0
        start, count = self._windows.pop(ip, (now, 0))
        if now - start >= 60:
            start, count = now, 0
        if count >= self.per_minute:
            self._windows[ip] = (start, count)
            return max(1, math.ceil(60 - (now - start)))
        self._windows[ip] = (start, count + 1)
        if len(self._windows) > self.max_ips:
            self._windows.popitem(last=False)
        return 0


@dataclass
class QrService:
    cache: QrCache
    limiter: IpWindow
    max_size: int

    @classmethod
    def of(cls, runtime: Runtime) -> QrService:
        service = runtime.services.get("qrcodes")
        if not isinstance(service, QrService):
            settings = runtime.settings.qrcode
            service = cls(
                QrCache(settings.cache_entries), IpWindow(settings.per_ip_per_minute), settings.max_size
            )
            runtime.services["qrcodes"] = service
        return service

    def parse(self, data: str | None, size: str | None, margin: str | None, level: str | None) -> QrRequest:
        if not data:
            raise ApiError("缺少参数 data", "param.missing", field="data")
        if len(data.encode()) > MAX_DATA_BYTES:
            raise ApiError(f"data 不能超过 {MAX_DATA_BYTES} 字节", "qrcode.data_too_long", field="data")
        return QrRequest(
            data=data,
            size=_bounded(size, "size", DEFAULT_SIZE, 1, self.max_size),
            margin=_bounded(margin, "margin", DEFAULT_MARGIN, 0, MAX_MARGIN),
            level=_level(level),
        )

    def check_rate(self, ip: str) -> None:
        wait = self.limiter.hit(rate_key(ip), time.monotonic())
        if wait:
            raise ApiError(f"请求过于频繁，请 {wait} 秒后再试", "qrcode.too_frequent", retry_after=wait)

    def cached_png(self, request: QrRequest) -> bytes | None:
        return self.cache.get(request.cache_key)

    def render(self, request: QrRequest) -> bytes:
        """Draws and caches the image; 18-36 ms for a short code at size 20, level H: run it on a thread."""
        png = qr.render_png(request.data, scale=request.size, border=request.margin, error=request.level)
        self.cache.put(request.cache_key, png)
        return png


def _bounded(value: str | None, name: str, default: int, low: int, high: int) -> int:
    if value is None or value == "":
        return default
    number = ascii_int(value, max_digits=3)
    if number is None or not low <= number <= high:
        raise ApiError(f"参数 {name} 应为 {low}-{high} 的整数", "param.invalid", field=name)
    return number


def _level(value: str | None) -> str:
    if value is None or value == "":
        return "m"
    if value.lower() not in LEVELS:
        raise ApiError("参数 level 应为 L、M、Q 或 H", "param.invalid", field="level")
    return value.lower()
