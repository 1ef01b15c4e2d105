"""The third parties mallgate talks to, which of their settings are credentials, and what each one is now.

One rule decides the sandbox: it plays the platforms only where the operator
has given no credential of any party, so that a stand-in can never answer for a
real shop. A party is then one of

- ``configured``: the operator gave everything it needs;
- ``sandbox``: the built-in stand-in plays it;
- ``not configured``: its routes answer ``<party>.not_configured``, nothing falls back;
- ``incomplete``: some credentials are given, others are missing (its routes refuse too).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final, Literal

from pydantic import BaseModel

from mallgate.settings import Settings

State = Literal["configured", "sandbox", "not configured", "incomplete", "console"]

# Per party: the settings that tie mallgate to a real account at that party, and among them
# those without which it cannot work. Endpoint URLs and tuning are not credentials.
CREDENTIALS: Final[dict[str, tuple[str, ...]]] = {
    "alipay": ("app_id", "public_key", "private_key", "seller_id"),
    "wechat_pay": (
        "app_id",
        "mch_id",
        "api_key",
        "api_v3_key",
        "public_key",
        "public_key_id",
        "platform_certs",
        "mch_private_key",
        "mch_serial_no",
        "api_client_cert",
        "api_client_key",
    ),
    "wechat_mp": ("app_id", "app_secret", "token", "aes_key"),
    "wechat_mini": ("app_id", "app_secret"),
    "wechat_app": ("app_id", "app_secret"),
    "qq": ("app_id",),
    "apple": ("bundle_id",),
    "sms": (
        "aliyun.access_key_id",
        "aliyun.access_key_secret",
        "aliyun.sign_name",
        "aliyun.template_code",
        "tencent.secret_id",
        "tencent.secret_key",
        "tencent.sdk_app_id",
        "tencent.sign_name",
        "tencent.template_id",
    ),
}
REQUIRED: Final[dict[str, tuple[str, ...]]] = {
    "alipay": ("app_id", "public_key", "private_key"),
    "wechat_pay": ("app_id", "mch_id"),
    "wechat_mp": ("app_id", "app_secret"),
    "wechat_mini": ("app_id", "app_secret"),
    "wechat_app": ("app_id", "app_secret"),
    "qq": ("app_id",),
    "apple": ("bundle_id",),
}
SMS_REQUIRED: Final[dict[str, tuple[str, ...]]] = {
    "aliyun": (
        "aliyun.access_key_id",
        "aliyun.access_key_secret",
        "aliyun.sign_name",
        "aliyun.template_code",
    ),
    "tencent": (
        "tencent.secret_id",
        "tencent.secret_key",
        "tencent.sdk_app_id",
        "tencent.sign_name",
        "tencent.template_id",
    ),
}
REAL_SMS_PROVIDERS: Final = ("aliyun", "tencent")
PARTIES: Final = tuple(CREDENTIALS)


def env_name(party: str, path: str) -> str:
    return "MALLGATE_" + "__".join(part.upper() for part in (party, *path.split(".")))


def _value(model: BaseModel, path: str) -> object:
    for part in path.split("."):
        model = getattr(model, part)
    return model


def _given(settings: Settings, party: str, path: str) -> bool:
    value = _value(getattr(settings, party), path)
    return bool(value) if isinstance(value, str) else value is not None


def given_credentials(settings: Settings) -> list[str]:
    """The environment names of every credential the operator set, of any party."""
    found = [
        env_name(party, path)
        for party, paths in CREDENTIALS.items()
        for path in paths
        if _given(settings, party, path)
    ]
    if settings.sms.provider in REAL_SMS_PROVIDERS:
        found.append("MALLGATE_SMS__PROVIDER")
    return found


def _missing(settings: Settings, party: str) -> list[str]:
    if party == "sms":
        needed = SMS_REQUIRED.get(settings.sms.provider or "", ())
    else:
        needed = REQUIRED[party]
    missing = [env_name(party, p) for p in needed if not _given(settings, party, p)]
    if party == "wechat_pay" and not (settings.wechat_pay.api_key or settings.wechat_pay.api_v3_key):
        missing.append("MALLGATE_WECHAT_PAY__API_KEY or __API_V3_KEY")
    return missing


def sandbox_wanted(settings: Settings) -> bool:
    """On when asked for, else only while no credential of any party is set."""
    if settings.sandbox is not None:
        return settings.sandbox
    return not given_credentials(settings)


@dataclass(frozen=True)
class PartyState:
    party: str
    state: State
    missing: tuple[str, ...] = ()

    def text(self) -> str:
        if self.state == "incomplete":
            return f"{self.party} incomplete (missing {', '.join(self.missing)})"
        return f"{self.party} {self.state}"


def party_state(settings: Settings, party: str, *, sandbox: bool) -> PartyState:
    """What the operator's settings make of one party."""
    if party == "sms":
        provider = settings.sms.provider
        if provider == "console":
            return PartyState(party, "console")
        if provider == "sandbox" or (provider is None and sandbox):
            return PartyState(party, "sandbox")
        if provider is None:
            return PartyState(party, "not configured")
    elif sandbox:
        return PartyState(party, "sandbox")
    given = [p for p in CREDENTIALS[party] if _given(settings, party, p)]
    missing = _missing(settings, party)
    if not missing:
        return PartyState(party, "configured")
    return PartyState(party, "incomplete" if given else "not configured", tuple(missing))


def party_states(settings: Settings, *, sandbox: bool) -> Iterator[PartyState]:
    for party in PARTIES:
        yield party_state(settings, party, sandbox=sandbox)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class SandboxRefused(ValueError):
    """The settings would let the sandbox answer where it must not; each line says why."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def sandbox_problems(settings: Settings, *, host: str | None = None) -> list[str]:
    """Why these settings must not start, as lines for the operator; empty when they may.

    `host` is the address `serve` listens on, when known.
    """
    problems: list[str] = []
    sandbox = sandbox_wanted(settings)
    if settings.sandbox and (credentials := given_credentials(settings)):
        problems.append(
            "MALLGATE_SANDBOX=true cannot run beside real credentials; unset MALLGATE_SANDBOX or "
            "remove: " + ", ".join(credentials)
        )
    if sandbox and host is not None and not is_loopback(host) and settings.sandbox is not True:
        problems.append(
            f"the sandbox would serve on {host}, which is not a loopback address: listen on 127.0.0.1, "
            "configure the real parties, or set MALLGATE_SANDBOX=true to expose the stand-ins on purpose"
        )
    if settings.sms.provider == "sandbox" and not sandbox:
        problems.append("MALLGATE_SMS__PROVIDER=sandbox needs the sandbox, which is off")
    return problems
