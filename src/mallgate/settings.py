"""Every setting of mallgate, typed, in one place.

Environment variables use the prefix ``MALLGATE_`` and ``__`` for nesting
(``MALLGATE_ALIPAY__APP_ID``); a ``.env`` file in the working directory may hold
them too. A malformed value stops start-up with the setting's name.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

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


class AlipaySettings(BaseModel):
    app_id: str = ""
    public_key: str = Field("", description="Alipay's public key: PEM, bare base64 or a file path")
    private_key: str = Field("", description="the merchant's private key, signs calls to Alipay")
    sign_type: Literal["RSA2", "RSA"] = "RSA2"
    seller_id: str = ""
    gateway_url: str = "https://openapi.alipay.com/gateway.do"

    _pub = field_validator("public_key")(classmethod(lambda cls, v: _check_public_key(v)))
    _priv = field_validator("private_key")(classmethod(lambda cls, v: _check_private_key(v)))

    @property
    def configured(self) -> bool:
        return bool(self.app_id and self.public_key)


class WechatPaySettings(BaseModel):
    app_id: str = ""
    mch_id: str = ""
    api_key: str = Field("", description="APIv2 key (32 characters)")
    api_v3_key: str = Field("", description="APIv3 key (32 bytes)")
    public_key: str = Field("", description="WeChat Pay public key (public-key mode)")
    public_key_id: str = Field("", description="PUB_KEY_ID_... of that key")
    platform_certs: str = Field("", description="certificate mode: PEM bundle or folder of PEM files")
    mch_private_key: str = ""
    mch_serial_no: str = ""
    api_base: str = "https://api.mch.weixin.qq.com"

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


class WechatAppCredentials(BaseModel):
    app_id: str = ""
    app_secret: str = ""


class WechatMpSettings(WechatAppCredentials):
    token: str = ""
    aes_key: str = Field("", description="EncodingAESKey, 43 characters")

    @field_validator("aes_key")
    @classmethod
    def _aes_key_length(cls, value: str) -> str:
        if value and len(value) != 43:
            raise ValueError("EncodingAESKey must be 43 characters")
        return value

    require_state: bool = Field(
        False, description="oauth accepts only a state that oauth/url issued, each once (CSRF guard)"
    )


class WechatSettings(BaseModel):
    api_base: str = "https://api.weixin.qq.com"
    # The OAuth consent page's host (the sandbox plays it at /_sandbox/wechat).
    oauth_base: str = "https://open.weixin.qq.com"


class QQSettings(BaseModel):
    app_id: str = ""
    api_base: str = "https://graph.qq.com"


class AppleSettings(BaseModel):
    bundle_id: str = ""
    keys_url: str = "https://appleid.apple.com/auth/keys"


class AliyunSmsSettings(BaseModel):
    access_key_id: str = ""
    access_key_secret: str = ""
    sign_name: str = ""
    template_code: str = ""
    endpoint: str = "https://dysmsapi.aliyuncs.com/"
    # v3: ACS3-HMAC-SHA256, what the current official SDK signs with; rpc: the legacy HMAC-SHA1.
    signature: Literal["v3", "rpc"] = "v3"


class TencentSmsSettings(BaseModel):
    secret_id: str = ""
    secret_key: str = ""
    sdk_app_id: str = ""
    sign_name: str = ""
    template_id: str = ""
    endpoint: str = "https://sms.tencentcloudapi.com/"
    region: str = "ap-guangzhou"


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
    public_url: str = "http://127.0.0.1:8000"
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
    recharge_max: Decimal = Field(Decimal("50000.00"), gt=0)
    # The disk (mallgate.disk, mallgate.metrics).
    metrics_dir: Path | None = Field(
        None,
        description="where `serve --workers N` keeps the workers' metrics files (PROMETHEUS_MULTIPROC_DIR), "
        "emptied of them at start; unset: a fresh folder under the system's temporary directory each run",
    )
    min_free_mb: int = Field(100, ge=0, description="start-up warns when less is free under var_dir; 0 never")

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
    login: LoginSettings = LoginSettings()
    qrcode: QrcodeSettings = QrcodeSettings()
    notify: NotifySettings = NotifySettings()

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
