"""Every setting of mallgate, typed, in one place.

Environment variables use the prefix ``MALLGATE_`` and ``__`` for nesting
(``MALLGATE_ALIPAY__APP_ID``); a ``.env`` file in the working directory may hold
them too. A malformed value stops start-up with the setting's name.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable
from datetime import tzinfo
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from mallgate.clock import zone_named
from mallgate.db.problems import url_problem
from mallgate.forwarded import parse_networks
from mallgate.keys import KeyFormatError, load_private_key, load_public_key


def _check_public_key(value: str) -> str:
    if value:
        try:
            load_public_key(value)
        except KeyFormatError as exc:
            raise ValueError(f"not a usable RSA public key: {exc}") from exc
    return value


def _check_private_key(value: str) -> str:
    if value:
        try:
            load_private_key(value)
        except KeyFormatError as exc:
            raise ValueError(f"not a usable RSA private key: {exc}") from exc
    return value


def _shaped(pattern: str, shape: str) -> AfterValidator:
    """Refuses a value that is set but not of `pattern`'s shape; empty stays "unset".

    The message says the shape, never the value: some of these are secrets.
    """
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if value and not compiled.fullmatch(value):
            raise ValueError(shape)
        return value

    return AfterValidator(check)


def _url_check(*, required: bool) -> Callable[[str], str]:
    def check(value: str) -> str:
        if not value and not required:
            return value  # unset: the sandbox fills it, else the party is not configured
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - a port that is not a number raises here
        except ValueError:
            parts = None
        if (
            parts is None
            or parts.scheme not in ("http", "https")
            or not parts.hostname
            or any(c.isspace() for c in value)
        ):
            raise ValueError("must be an http:// or https:// URL with a host, e.g. https://pay.example.com")
        return value

    return check


# Shapes as the platforms issue them (their consoles and API references): a value of another shape
# is a paste error that would otherwise surface as a refused signature or an "invalid appid" much later.
HttpUrl = Annotated[str, AfterValidator(_url_check(required=False))]
WechatAppId = Annotated[
    str, _shaped(r"wx[0-9a-fA-F]{16}", "a WeChat AppID is wx and 16 hex digits, e.g. wxd930ea5d5a258f4f")
]
AlipayAppId = Annotated[str, _shaped(r"[0-9]{16}", "an Alipay APPID is 16 digits, e.g. 2021000123456789")]
AlipayUserId = Annotated[
    str, _shaped(r"2088[0-9]{12}", "an Alipay seller id (PID) is 2088 and 12 digits, e.g. 2088101122136241")
]
MchId = Annotated[str, _shaped(r"[0-9]{1,32}", "a WeChat Pay merchant id is digits, e.g. 1900000109")]
ApiV2Key = Annotated[
    str,
    _shaped(r"[\x21-\x7e]{32}", "the APIv2 key is 32 characters (letters and digits) as set in the console"),
]
SerialNo = Annotated[
    str,
    _shaped(r"[0-9A-Fa-f]{8,40}", "a certificate serial number is 8 to 40 hex digits, as the console shows"),
]
PublicKeyId = Annotated[
    str, _shaped(r"PUB_KEY_ID_[0-9A-Za-z]+", "a WeChat Pay public key id is PUB_KEY_ID_ and digits, as shown")
]
AesKey = Annotated[str, _shaped(r"[0-9A-Za-z]{43}", "EncodingAESKey must be 43 letters and digits")]
QQAppId = Annotated[str, _shaped(r"[0-9]{1,20}", "a QQ Connect APP ID is digits, e.g. 101827370")]
BundleId = Annotated[
    str,
    _shaped(
        r"[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+",
        "an Apple bundle id (or Services ID) is reverse-DNS letters, digits and -, e.g. com.example.mall",
    ),
]
AliyunTemplateCode = Annotated[
    str, _shaped(r"SMS_[0-9A-Za-z_]+", "an Aliyun template code is SMS_ and digits, e.g. SMS_154950909")
]
TencentSdkAppId = Annotated[str, _shaped(r"[0-9]{1,20}", "a Tencent SmsSdkAppId is digits, e.g. 1400006666")]
TencentTemplateId = Annotated[str, _shaped(r"[0-9]{1,20}", "a Tencent template id is digits, e.g. 449739")]
TencentRegion = Annotated[
    str, _shaped(r"[a-z]{2,}(-[a-z0-9]+)+", "a Tencent Cloud region looks like ap-guangzhou")
]


class AlipaySettings(BaseModel):
    app_id: AlipayAppId = ""
    public_key: str = Field("", description="Alipay's public key: PEM, bare base64 or a file path")
    private_key: str = Field("", description="the merchant's private key, signs calls to Alipay")
    sign_type: Literal["RSA2", "RSA"] = "RSA2"
    seller_id: AlipayUserId = ""
    gateway_url: HttpUrl = "https://openapi.alipay.com/gateway.do"

    _pub = field_validator("public_key")(classmethod(lambda cls, v: _check_public_key(v)))
    _priv = field_validator("private_key")(classmethod(lambda cls, v: _check_private_key(v)))

    @property
    def configured(self) -> bool:
        return bool(self.app_id and self.public_key)


class WechatPaySettings(BaseModel):
    app_id: WechatAppId = ""
    mch_id: MchId = ""
    api_key: ApiV2Key = Field("", description="APIv2 key (32 characters)")
    api_v3_key: str = Field("", description="APIv3 key (32 bytes)")
    public_key: str = Field("", description="WeChat Pay public key (public-key mode)")
    public_key_id: PublicKeyId = Field("", description="PUB_KEY_ID_... of that key")
    platform_certs: str = Field("", description="certificate mode: PEM bundle or folder of PEM files")
    mch_private_key: str = ""
    mch_serial_no: SerialNo = ""
    api_base: HttpUrl = "https://api.mch.weixin.qq.com"
    # Which API creates, refunds and closes orders. auto: APIv3 when its credentials are all
    # set (merchant key, serial, APIv3 key, WeChat Pay's key), else v2; merchants who joined
    # since 2024 have APIv3 only, older ones may hold just the v2 key.
    api_version: Literal["auto", "v3", "v2"] = "auto"
    # v2 refunds (secapi) are made over TLS with the merchant's API client certificate: the
    # paths of apiclient_cert.pem and apiclient_key.pem (empty: the key is in the cert file).
    api_client_cert: str = Field("", description="v2 refunds: path of apiclient_cert.pem")
    api_client_key: str = Field("", description="v2 refunds: path of apiclient_key.pem")

    _pub = field_validator("public_key")(classmethod(lambda cls, v: _check_public_key(v)))
    _priv = field_validator("mch_private_key")(classmethod(lambda cls, v: _check_private_key(v)))

    @field_validator("api_v3_key")
    @classmethod
    def _v3_key_length(cls, value: str) -> str:
        if value and len(value.encode()) != 32:
            raise ValueError("the APIv3 key must be 32 bytes")
        return value

    @property
    def configured(self) -> bool:
        return bool(self.mch_id and (self.api_key or self.api_v3_key))

    @property
    def v3_ready(self) -> bool:
        """Everything an APIv3 call and the check of its answer need."""
        return bool(
            self.mch_id
            and self.mch_private_key
            and self.mch_serial_no
            and self.api_v3_key
            and (self.public_key or self.platform_certs)
        )

    @property
    def order_api(self) -> Literal["v3", "v2"]:
        """The API orders are created, refunded and closed with (see api_version)."""
        if self.api_version == "auto":
            return "v3" if self.v3_ready else "v2"
        return self.api_version


# What wx.config asks for when MALLGATE_WECHAT_MP__JS_API_LIST is unset: sharing (the current
# and the older interfaces, which some WeChat versions still need), paying, scanning, images, location.
DEFAULT_JS_API_LIST = (
    "updateAppMessageShareData",
    "updateTimelineShareData",
    "onMenuShareAppMessage",
    "onMenuShareTimeline",
    "chooseWXPay",
    "scanQRCode",
    "chooseImage",
    "previewImage",
    "getLocation",
    "openLocation",
)


def _comma_list(value: object) -> list[str]:
    """A list setting given as a list, or as a comma-separated string (as environment variables are)."""
    if isinstance(value, str):
        return [part for part in value.split(",") if part.strip()]
    if isinstance(value, list | tuple):
        return [str(part) for part in value if str(part).strip()]
    raise ValueError("must be a comma-separated list")


class WechatAppCredentials(BaseModel):
    app_id: WechatAppId = ""
    app_secret: str = ""


class WechatMpSettings(WechatAppCredentials):
    token: str = ""
    aes_key: AesKey = Field("", description="EncodingAESKey, 43 characters")
    safe_mode_only: bool = Field(False, description="wechat.index refuses plaintext (unencrypted) pushes")
    # WeChat waits 5 s for a push's answer; past this the push is answered `success` and its
    # handling finishes in the background.
    reply_deadline_seconds: float = Field(4.0, gt=0, le=4.5)
    require_state: bool = Field(
        False, description="oauth accepts only a state that oauth/url issued, each once (CSRF guard)"
    )
    # share/config signs only pages on these hosts (the OA's "JS接口安全域名"); empty: any host.
    js_domains: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated host names share/config may sign pages of"
    )
    js_api_list: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_JS_API_LIST),
        description="comma-separated JS-SDK interfaces share/config lists in jsApiList",
    )

    @field_validator("js_domains", mode="before")
    @classmethod
    def _js_domains(cls, value: object) -> list[str]:
        hosts = [h.strip().lower().rstrip(".") for h in _comma_list(value)]
        for host in hosts:
            if not re.fullmatch(r"[a-z0-9-]+(\.[a-z0-9-]+)*", host):
                raise ValueError(f"{host!r}: a JS safe domain is a host name only (no scheme, port or path)")
        return hosts

    @field_validator("js_api_list", mode="before")
    @classmethod
    def _js_api_list(cls, value: object) -> list[str]:
        names = [n.strip() for n in _comma_list(value)]
        for name in names:
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", name):
                raise ValueError(f"{name!r} is not a JS-SDK interface name (e.g. updateAppMessageShareData)")
        return names


class WechatSettings(BaseModel):
    api_base: HttpUrl = "https://api.weixin.qq.com"
    # The OAuth consent page's host (the sandbox plays it at /_sandbox/wechat).
    oauth_base: HttpUrl = "https://open.weixin.qq.com"
    # The shared access_token / jsapi_ticket (mallgate.services.wechat_tokens).
    token_refresh_margin_seconds: int = Field(
        300, ge=0, le=1800, description="refresh a token or ticket this long before it expires"
    )
    token_lease_seconds: float = Field(
        15.0, gt=0, le=120, description="how long one worker may hold the refresh before another takes over"
    )
    token_wait_seconds: float = Field(
        5.0, gt=0, le=60, description="how long a worker waits for another's refresh before answering busy"
    )
    token_local_seconds: float = Field(
        60.0, ge=0, le=600, description="how long a worker keeps a token in memory before reading the store"
    )


class QQSettings(BaseModel):
    app_id: QQAppId = ""
    api_base: HttpUrl = "https://graph.qq.com"


class AppleSettings(BaseModel):
    bundle_id: BundleId = ""
    keys_url: HttpUrl = "https://appleid.apple.com/auth/keys"


class AliyunSmsSettings(BaseModel):
    access_key_id: str = ""
    access_key_secret: str = ""
    sign_name: str = ""
    template_code: AliyunTemplateCode = ""
    endpoint: HttpUrl = "https://dysmsapi.aliyuncs.com/"
    # v3: ACS3-HMAC-SHA256, what the current official SDK signs with; rpc: the legacy HMAC-SHA1.
    signature: Literal["v3", "rpc"] = "v3"


class TencentSmsSettings(BaseModel):
    secret_id: str = ""
    secret_key: str = ""
    sdk_app_id: TencentSdkAppId = ""
    sign_name: str = ""
    template_id: TencentTemplateId = ""
    endpoint: HttpUrl = "https://sms.tencentcloudapi.com/"
    region: TencentRegion = "ap-guangzhou"


class SmsSettings(BaseModel):
    # Unset: the sandbox's stand-in when the sandbox is on, else "not configured". `console`
    # (codes in the log) only when chosen, never by default: it would hand codes to log readers.
    provider: Literal["console", "aliyun", "tencent", "sandbox"] | None = None
    aliyun: AliyunSmsSettings = AliyunSmsSettings()
    tencent: TencentSmsSettings = TencentSmsSettings()
    code_ttl_seconds: int = Field(300, ge=30)
    max_checks: int = Field(5, ge=1)
    per_number_interval_seconds: int = Field(60, ge=0)
    per_number_daily: int = Field(10, ge=0)
    per_ip_hourly: int = Field(20, ge=0)
    global_daily: int = Field(10000, ge=0, description="cost breaker across all numbers")
    timeout_seconds: float = Field(5.0, gt=0, le=30)
    # register/forget attempts, counted before the code is even read (one counter for both routes).
    check_per_ip_hourly: int = Field(20, ge=1)
    check_per_number_per_15min: int = Field(10, ge=1)


class LoginSettings(BaseModel):
    """Password login attempts, counted before the password is checked (brute-force brake)."""

    per_account_per_15min: int = Field(10, ge=1)
    per_ip_hourly: int = Field(100, ge=1)
    # argon2 (login, register, forget) runs on worker threads: at most this many at once per
    # process, at most `hash_queue` requests waiting up to `hash_wait_seconds`; beyond, "busy".
    hash_concurrency: int = Field(2, ge=1, le=64)
    hash_queue: int = Field(8, ge=0)
    hash_wait_seconds: float = Field(1.0, ge=0, le=30)


class TemplateSettings(BaseModel):
    delivery_notice: str = ""
    order_complete: str = ""
    order_pay_success: str = ""
    refund_notice: str = ""


# What a subscribe message's data fields may be filled from (mallgate.services.subscribe).
SUBSCRIBE_SOURCES = ("order_no", "subject", "amount", "paid_at", "refunded_amount", "refunded_at")
DEFAULT_SUBSCRIBE_DATA: dict[str, dict[str, str]] = {
    "order_pay_success": {"character_string1": "order_no", "amount2": "amount", "time3": "paid_at"},
    "refund_notice": {"character_string1": "order_no", "amount2": "refunded_amount", "time3": "refunded_at"},
}


class SubscribeSettings(BaseModel):
    """The Mini Program subscribe messages sent from the outbox (order paid, refunded)."""

    data: dict[str, dict[str, str]] = Field(
        default_factory=lambda: {k: dict(v) for k, v in DEFAULT_SUBSCRIBE_DATA.items()},
        description="JSON: template kind -> {template keyword: source}; sources: "
        + ", ".join(SUBSCRIBE_SOURCES),
    )
    page: str = Field(
        "", max_length=128, description="the page a message opens (a query may hold {order_no}); empty: none"
    )
    miniprogram_state: Literal["formal", "trial", "developer"] = "formal"
    lang: Literal["zh_CN", "en_US", "zh_HK", "zh_TW"] = "zh_CN"

    @field_validator("data")
    @classmethod
    def _data(cls, value: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
        for kind, fields in value.items():
            if kind not in ("order_pay_success", "refund_notice"):
                raise ValueError(f"{kind!r}: only order_pay_success and refund_notice are sent")
            for keyword, source in fields.items():
                if not re.fullmatch(r"[a-z_]+[0-9]+", keyword):
                    raise ValueError(f"{keyword!r} is not a template keyword (e.g. thing1, amount2)")
                if source not in SUBSCRIBE_SOURCES:
                    known = ", ".join(SUBSCRIBE_SOURCES)
                    raise ValueError(f"{kind}.{keyword}: source {source!r} is not one of {known}")
        return value


class SpreadSettings(BaseModel):
    """spread/qrcode: which Mini Program pages a code may open, and how it is drawn."""

    pages: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["pages/goods/detail"],
        description="comma-separated Mini Program pages spread/qrcode may make codes for (its `type`)",
    )
    width: int = Field(430, ge=280, le=1280)
    env_version: Literal["release", "trial", "develop"] = "release"
    check_path: bool = Field(True, description="WeChat checks the page exists in the released version")

    @field_validator("pages", mode="before")
    @classmethod
    def _pages(cls, value: object) -> list[str]:
        pages = [p.strip() for p in _comma_list(value)]
        for page in pages:
            # WeChat's rule: no leading slash, no query (the data goes in the scene).
            if not re.fullmatch(r"[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*", page) or len(page) > 128:
                raise ValueError(f"{page!r}: a page is a path like pages/goods/detail (no leading /, query)")
        return pages


class NotifySettings(BaseModel):
    """The payment-notification intake: what forged notices may cost. Per worker process."""

    refused_body_bytes: int = Field(
        4096, ge=256, description="a refused (unverified) notice keeps this much of its body and query"
    )
    refused_per_ip_per_minute: int = Field(
        60, ge=1, description="refused notices stored per source IP a minute; the rest: failure, not stored"
    )
    queue_limit: int = Field(
        2048, ge=1, description="notices waiting for the group commit; beyond it answer failure (busy)"
    )


class QrcodeSettings(BaseModel):
    per_ip_per_minute: int = Field(120, ge=0)
    cache_entries: int = Field(512, ge=0)
    max_size: int = Field(20, ge=1, le=50, description="largest pixels per module")


MIN_WEBHOOK_SECRET = 16


class OutboxSettings(BaseModel):
    """The outbox worker (mallgate.services.outbox_worker): one runner across all workers and machines."""

    enabled: bool = Field(True, description="run the outbox worker in `serve` (one runner at a time)")
    poll_seconds: float = Field(1.0, gt=0, le=60, description="how often the runner looks for due deliveries")
    batch: int = Field(100, ge=1, le=1000, description="deliveries claimed per pass")
    concurrency: int = Field(16, ge=1, le=256, description="deliveries sent at the same time")
    lease_seconds: float = Field(
        30.0, ge=2, description="the runner's lease; a runner that died is taken over after this long"
    )
    claim_seconds: float = Field(
        120.0, ge=5, description="a claimed delivery not recorded within this long is due again"
    )
    backoff_first_seconds: float = Field(5.0, gt=0, description="the wait after a first failed attempt")
    backoff_max_seconds: float = Field(1800.0, gt=0, description="the longest wait between two attempts")
    retry_for_seconds: float = Field(
        86400.0, gt=0, description="a delivery still failing this long after its event is given up (failed)"
    )


class WebhookSettings(BaseModel):
    """Events to the mall's own backend: the mall's URL and secret, not a third party's credential."""

    url: HttpUrl = Field(
        "", description="every outbox event is POSTed here, signed; unset: none (the sandbox: its receiver)"
    )
    secret: str = Field("", description="the HMAC-SHA256 key of Mallgate-Signature; required with url")
    timeout_seconds: float = Field(10.0, gt=0, le=60)

    @model_validator(mode="after")
    def _secret_with_url(self) -> WebhookSettings:
        # An unsigned event could be forged by anyone who finds the URL: refused at start-up.
        if self.url and len(self.secret) < MIN_WEBHOOK_SECRET:
            raise ValueError(f"needs MALLGATE_WEBHOOK__SECRET of at least {MIN_WEBHOOK_SECRET} characters")
        return self


# A guessable admin token guards money: refused at start-up rather than accepted.
MIN_ADMIN_TOKEN = 16
# The SMS code hashes are only as strong as this key: a short one is guessed from a dump.
MIN_SECRET_KEY = 32


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="MALLGATE_",
        env_nested_delimiter="__",
        env_file=".env",
        extra="ignore",
    )

    database_url: str = ""
    var_dir: Path = Path("var")
    public_url: Annotated[str, AfterValidator(_url_check(required=True))] = "http://127.0.0.1:8000"
    admin_token: str = ""
    secret_key: str = Field(
        "",
        description="keys the SMS code hashes; unset: generated once into <var_dir>/secret_key. "
        "Set it (the same on every machine) when several machines share the database",
    )
    base_path: str = "/api"
    sandbox: bool | None = Field(
        None,
        description="run the built-in stand-in of every third party (default: only while no credential "
        "of any party is set); see mallgate.parties",
    )
    body_limit: int = Field(1024 * 1024, ge=1024)
    notify_body_limit: int = Field(64 * 1024, ge=1024)
    token_ttl_days: int = Field(30, ge=1)
    forwarded_allow_ips: str = Field(
        "127.0.0.1",
        description="your own reverse proxies, comma-separated IPs or CIDRs (never '*'): X-Forwarded-For "
        "is believed only from them, read from the right (see mallgate.forwarded)",
    )
    db_timeout_seconds: float = Field(2.0, gt=0)
    time_zone: str = Field(
        "Asia/Shanghai",
        description="the zone of every time the API shows (YYYY-MM-DD HH:MM:SS, no marker); stored: UTC",
    )
    recharge_max: Decimal = Field(Decimal("50000.00"), gt=0)
    auto_refund_duplicates: bool = Field(
        True, description="refund a second payment of a paid order (order.paid_twice) automatically"
    )
    # The disk (mallgate.disk, mallgate.metrics).
    metrics_dir: Path | None = Field(
        None,
        description="where `serve --workers N` keeps the workers' metrics files (PROMETHEUS_MULTIPROC_DIR), "
        "emptied of them at start; unset: a fresh folder under the system's temporary directory each run",
    )
    min_free_mb: int = Field(100, ge=0, description="start-up warns when less is free under var_dir; 0 never")
    media_dir: Path | None = Field(
        None, description="public images (spread/qrcode's codes), served at /media/; unset: <var_dir>/media"
    )

    @field_validator("metrics_dir", mode="before")
    @classmethod
    def _metrics_dir_unset_when_empty(cls, value: object) -> object:
        # Path("") is the working directory, whose files start-up would then clean up.
        return None if value == "" else value

    alipay: AlipaySettings = AlipaySettings()
    wechat_pay: WechatPaySettings = WechatPaySettings()
    wechat_mp: WechatMpSettings = WechatMpSettings()
    wechat_mini: WechatAppCredentials = WechatAppCredentials()
    wechat_app: WechatAppCredentials = WechatAppCredentials()
    wechat: WechatSettings = WechatSettings()
    qq: QQSettings = QQSettings()
    apple: AppleSettings = AppleSettings()
    sms: SmsSettings = SmsSettings()
    templates: TemplateSettings = TemplateSettings()
    subscribe: SubscribeSettings = SubscribeSettings()
    spread: SpreadSettings = SpreadSettings()
    login: LoginSettings = LoginSettings()
    qrcode: QrcodeSettings = QrcodeSettings()
    notify: NotifySettings = NotifySettings()
    outbox: OutboxSettings = OutboxSettings()
    webhook: WebhookSettings = WebhookSettings()

    @field_validator("forwarded_allow_ips")
    @classmethod
    def _proxy_networks(cls, value: str) -> str:
        return ",".join(str(network) for network in parse_networks(value))

    @field_validator("admin_token")
    @classmethod
    def _admin_token_length(cls, value: str) -> str:
        if value and len(value) < MIN_ADMIN_TOKEN:
            raise ValueError(f"must be at least {MIN_ADMIN_TOKEN} characters (empty turns the admin API off)")
        return value

    @field_validator("secret_key")
    @classmethod
    def _secret_key_length(cls, value: str) -> str:
        if value and len(value) < MIN_SECRET_KEY:
            raise ValueError(f"must be at least {MIN_SECRET_KEY} characters (empty: generated into var/)")
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        problem = url_problem(value) if value else None
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("public_url")
    @classmethod
    def _public_url_is_a_base(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.query or parts.fragment:
            raise ValueError("must be a base URL without ?query or #fragment, e.g. https://pay.example.com")
        return value

    @field_validator("time_zone")
    @classmethod
    def _time_zone(cls, value: str) -> str:
        zone_named(value)  # raises ValueError naming the problem
        return value

    def wechat_pay_app_id(self, trade_type: str) -> str:
        """The app id a WeChat Pay order of `trade_type` is made under ("" when not configured).

        The payer's openid belongs to one app, so the order must name that app: the Official
        Account for JSAPI, the Mini Program for MINI, the Open Platform app for APP. NATIVE and
        H5 have no payer identity: the merchant's own app id, else the Official Account's (a web
        payment, like the Official Account's pages).
        """
        by_type = {
            "JSAPI": self.wechat_mp.app_id,
            "MINI": self.wechat_mini.app_id,
            "APP": self.wechat_app.app_id,
        }
        if trade_type in by_type:
            return by_type[trade_type]
        return self.wechat_pay.app_id or self.wechat_mp.app_id

    @property
    def wechat_pay_app_ids(self) -> frozenset[str]:
        """Every app id our WeChat Pay orders can carry: notices naming any of them are ours."""
        ids = {self.wechat_pay.app_id, self.wechat_mp.app_id, self.wechat_mini.app_id, self.wechat_app.app_id}
        return frozenset(i for i in ids if i)

    @property
    def zone(self) -> tzinfo:
        """The zone every time the API shows is in (mallgate.clock.show_time)."""
        return zone_named(self.time_zone)

    @field_validator("base_path")
    @classmethod
    def _base_path(cls, value: str) -> str:
        value = "/" + value.strip("/")
        return "" if value == "/" else value

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.var_dir / 'mallgate.db').as_posix()}"


# Environment variables with the prefix that are not settings: the test harness's own.
NOT_SETTINGS = ("MALLGATE_TEST_",)


def setting_names(model: type[BaseModel] = Settings, prefix: str = "MALLGATE_") -> list[str]:
    """Every environment variable name that sets something, nested groups included."""
    names: list[str] = []
    for name, field in model.model_fields.items():
        env = prefix + name.upper()
        names.append(env)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            names.extend(setting_names(field.annotation, env + "__"))
    return names


def unknown_settings(names: Iterable[str]) -> list[tuple[str, str | None]]:
    """The `MALLGATE_*` names among `names` that set nothing, each with the closest real name.

    Settings are read case-insensitively, so the names are compared in upper case.
    """
    prefix = "MALLGATE_"
    # Compared without the prefix they all share, which would make any two names look alike.
    known = [name.removeprefix(prefix) for name in setting_names()]
    known_set = set(known)
    found: list[tuple[str, str | None]] = []
    for name in names:
        upper = name.upper()
        if not upper.startswith(prefix) or upper.startswith(NOT_SETTINGS):
            continue
        rest = upper.removeprefix(prefix)
        if rest not in known_set:
            closest = difflib.get_close_matches(rest, known, n=1, cutoff=0.6)
            found.append((name, prefix + closest[0] if closest else None))
    return found
