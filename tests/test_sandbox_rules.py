"""The sandbox can never run in production: when it switches on, what it may change, what it answers.

Each test here reproduces a hole an attacker's review found (issue 7, item 1):
with a real credential set the sandbox took over SMS and payments, handed SMS
codes to anyone at /_sandbox/sms/messages, and POST /_sandbox/pay posted (and
retried) to any URL it was given.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_cli import MALLGATE, _env, _wait_healthy
from test_sandbox_payments import service_payments

from conftest import Server, free_port, other_server
from mallgate.app import create_app
from mallgate.parties import (
    CREDENTIALS,
    PartyState,
    SandboxRefused,
    env_name,
    given_credentials,
    party_state,
    sandbox_problems,
    sandbox_wanted,
)
from mallgate.sandbox.app import MOUNT, service_settings
from mallgate.sandbox.notifier import Notifier, Outgoing, TooManyInFlight
from mallgate.settings import Settings
from support import ADMIN, admin_create_order, admin_create_user, unique_mobile

# A value every credential setting accepts (keys are validated as RSA keys, so those get one).
_KEY_SETTINGS = {"alipay": ("public_key", "private_key"), "wechat_pay": ("public_key", "mch_private_key")}


# A real-looking value of each credential that has a known shape (the settings validate them).
_SHAPED = {
    ("alipay", "app_id"): "2021000123456789",
    ("alipay", "seller_id"): "2088101122136241",
    ("wechat_pay", "app_id"): "wxd930ea5d5a258f4f",
    ("wechat_pay", "mch_id"): "1900000109",
    ("wechat_pay", "api_key"): "a" * 32,
    ("wechat_pay", "api_v3_key"): "k" * 32,
    ("wechat_pay", "public_key_id"): "PUB_KEY_ID_0114232134912410000000000000",
    ("wechat_pay", "mch_serial_no"): "5157F09EFDC096DE15EBE81A47057A7232F1B8E1",
    ("wechat_mp", "app_id"): "wxd930ea5d5a258f4f",
    ("wechat_mp", "aes_key"): "a" * 43,
    ("wechat_mini", "app_id"): "wx1234567890abcdef",
    ("wechat_app", "app_id"): "wx0123456789abcdef",
    ("qq", "app_id"): "101827370",
    ("apple", "bundle_id"): "com.example.mall",
    ("sms", "aliyun.template_code"): "SMS_154950909",
    ("sms", "tencent.sdk_app_id"): "1400006666",
    ("sms", "tencent.template_id"): "449739",
}


def _credential_value(party: str, path: str, rsa_pem: str) -> str:
    if path in _KEY_SETTINGS.get(party, ()):
        return rsa_pem
    return _SHAPED.get((party, path), "set-by-operator")


def _settings(tmp_path: Path, **values: Any) -> Settings:
    return Settings(_env_file=None, var_dir=tmp_path, **values)  # type: ignore[call-arg]


def _nested(path: str, value: str) -> dict[str, Any]:
    head, _, rest = path.partition(".")
    return {head: _nested(rest, value) if rest else value}


@pytest.fixture(scope="module")
def rsa_pems() -> dict[str, str]:
    from cryptography.hazmat.primitives.asymmetric import rsa

    from mallgate.keys import private_pem, public_pem

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return {"private": private_pem(key), "public": public_pem(key.public_key())}


ALL_CREDENTIALS = [(party, path) for party, paths in CREDENTIALS.items() for path in paths]


@pytest.mark.parametrize(("party", "path"), ALL_CREDENTIALS, ids=[f"{p}.{q}" for p, q in ALL_CREDENTIALS])
def test_any_one_credential_turns_the_sandbox_off(
    tmp_path: Path, rsa_pems: dict[str, str], party: str, path: str
) -> None:
    pem = rsa_pems["private"] if "private" in path else rsa_pems["public"]
    settings = _settings(tmp_path, **{party: _nested(path, _credential_value(party, path, pem))})
    assert given_credentials(settings) == [env_name(party, path)]
    assert not sandbox_wanted(settings)
    # Asked for explicitly beside it, the sandbox refuses to start and names the setting.
    explicit = settings.model_copy(update={"sandbox": True})
    problems = sandbox_problems(explicit)
    assert len(problems) == 1 and env_name(party, path) in problems[0]
    with pytest.raises(SandboxRefused):
        service_settings(explicit)


def test_a_real_sms_provider_is_a_credential(tmp_path: Path) -> None:
    settings = _settings(tmp_path, sms={"provider": "aliyun"})
    assert given_credentials(settings) == ["MALLGATE_SMS__PROVIDER"] and not sandbox_wanted(settings)
    assert sandbox_wanted(_settings(tmp_path))  # nothing set: the newcomer's default


def test_the_sandbox_stays_on_loopback_unless_meant(tmp_path: Path) -> None:
    bare = _settings(tmp_path)
    assert sandbox_problems(bare, host="127.0.0.1") == []
    assert sandbox_problems(bare, host="::1") == [] and sandbox_problems(bare, host="localhost") == []
    for host in ("0.0.0.0", "::", "10.1.2.3", "shop.example.com"):  # noqa: S104
        (problem,) = sandbox_problems(bare, host=host)
        assert "loopback" in problem and "MALLGATE_SANDBOX=true" in problem
    assert sandbox_problems(bare.model_copy(update={"sandbox": True}), host="0.0.0.0") == []  # noqa: S104
    # Off on purpose: nothing to refuse.
    assert sandbox_problems(bare.model_copy(update={"sandbox": False}), host="0.0.0.0") == []  # noqa: S104


def test_the_sandbox_never_overwrites_what_the_operator_gave(tmp_path: Path) -> None:
    given = _settings(
        tmp_path,
        sms={"provider": "console"},
        alipay={"gateway_url": "https://alipay.example/gateway.do"},
        wechat={"api_base": "https://wechat.example"},
    )
    assert sandbox_wanted(given)  # none of these is a credential
    filled, url = service_settings(given)
    assert url is not None and filled.sandbox is True
    assert filled.sms.provider == "console"
    assert filled.alipay.gateway_url == "https://alipay.example/gateway.do"
    assert filled.wechat.api_base == "https://wechat.example"
    # What was left unset is the stand-ins'.
    assert filled.alipay.app_id and filled.wechat_pay.api_base.startswith(url)
    assert filled.qq.api_base.startswith(url)


def test_create_app_refuses_the_sandbox_beside_a_credential(tmp_path: Path) -> None:
    settings = _settings(tmp_path, sandbox=True, wechat_mini={"app_id": "wx1234567890abcdef"})
    with pytest.raises(SandboxRefused, match="MALLGATE_WECHAT_MINI__APP_ID"):
        create_app(settings)
    # Nothing was made on the way: no sandbox keys on a production machine.
    assert not (tmp_path / "sandbox").exists()


def test_party_states(tmp_path: Path) -> None:
    bare = _settings(tmp_path, sandbox=False)
    assert party_state(bare, "alipay", sandbox=False) == PartyState("alipay", "not configured", (
        "MALLGATE_ALIPAY__APP_ID", "MALLGATE_ALIPAY__PUBLIC_KEY", "MALLGATE_ALIPAY__PRIVATE_KEY",
    ))  # fmt: skip
    assert party_state(bare, "sms", sandbox=False).state == "not configured"
    assert (
        party_state(_settings(tmp_path, sms={"provider": "console"}), "sms", sandbox=False).state == "console"
    )
    assert party_state(bare, "qq", sandbox=True).state == "sandbox"
    half = _settings(tmp_path, wechat_mp={"app_id": "wxd930ea5d5a258f4f"})
    state = party_state(half, "wechat_mp", sandbox=False)
    assert state.state == "incomplete" and state.missing == ("MALLGATE_WECHAT_MP__APP_SECRET",)
    assert "missing MALLGATE_WECHAT_MP__APP_SECRET" in state.text()
    full = _settings(tmp_path, qq={"app_id": "101827370"})
    assert party_state(full, "qq", sandbox=False).state == "configured"


async def test_with_real_sms_and_mini_program_credentials_nothing_is_a_stand_in(
    server: Server, client: httpx.AsyncClient
) -> None:
    """The review's reproduction: the password-reset code went to the sandbox, readable by anyone."""
    user = await admin_create_user(client, mobile=unique_mobile(), password="secret123")
    real = {
        "sandbox": None,
        "sms": {
            "provider": "aliyun",
            "aliyun": {
                "access_key_id": "LTAI-real",
                "access_key_secret": "real-secret",
                "sign_name": "商城",
                "template_code": "SMS_1",
                # Nobody listens here: a send must fail at the provider, never reach a stand-in.
                "endpoint": f"http://127.0.0.1:{free_port()}/",
            },
        },
        "wechat_mini": {"app_id": "wx1234567890abcdef", "app_secret": "real-mini-secret"},
    }
    async with other_server(server, **real) as http:
        sent = (
            await http.get("/api/send_sms", params={"username": user["mobile"], "type": "repassword"})
        ).json()
        assert sent["status"] == 0 and sent["code"] == "sms.provider_error", sent
        for path in ("/", "/sms/messages", "/pay"):
            assert (await http.get(f"{MOUNT}{path}", params={"mobile": user["mobile"]})).status_code == 404
        order = await admin_create_order(http, amount="49.99")
        paid = await http.post(f"{MOUNT}/pay", json={"channel": "alipay", "order_no": order["order_no"]})
        assert paid.status_code == 404
        status = (await http.get(f"/admin/orders/{order['order_no']}", headers=ADMIN)).json()["data"][
            "status"
        ]
        assert status == "unpaid"


async def test_with_the_sandbox_off_an_unconfigured_party_answers_not_configured(
    server: Server, client: httpx.AsyncClient
) -> None:
    async with other_server(server, sandbox=False) as http:
        sent = (
            await http.get("/api/send_sms", params={"username": unique_mobile(), "type": "register"})
        ).json()
        assert (sent["status"], sent["code"]) == (0, "sms.not_configured")
        assert (await http.get(f"{MOUNT}/")).status_code == 404
        # The console provider (codes in the log) is not a fallback either: only when chosen.
    async with other_server(server, sandbox=False, sms={"provider": "console"}) as http:
        sent = (
            await http.get("/api/send_sms", params={"username": unique_mobile(), "type": "register"})
        ).json()
        assert sent["status"] == 1, sent


async def test_sandbox_pay_takes_no_notify_url(server: Server, client: httpx.AsyncClient) -> None:
    order = await admin_create_order(client, amount="1.00")
    call = {"channel": "alipay", "order_no": order["order_no"], "amount": "1.00"}
    answer = await client.post(f"{MOUNT}/pay", json={**call, "notify_url": "http://127.0.0.1:6379/"})
    assert answer.status_code == 400 and answer.json()["code"] == "sandbox.invalid"
    assert "notify_url" in answer.json()["info"]


async def test_sandbox_pay_notifies_only_the_service(server: Server, client: httpx.AsyncClient) -> None:
    order = await admin_create_order(client, amount="2.00")
    answer = (
        await client.post(
            f"{MOUNT}/pay", json={"channel": "wechat", "order_no": order["order_no"], "amount": "2.00"}
        )
    ).json()
    assert answer["status"] == 1, answer
    assert answer["data"]["notify_url"] == f"{server.api}/wechat/notify"
    assert {d["url"] for d in answer["data"]["deliveries"]} == {f"{server.api}/wechat/notify"}


async def test_deliveries_in_flight_are_bounded() -> None:
    port = free_port()  # closed: every attempt fails, so every delivery stays in flight retrying
    notifier = Notifier(minute=60.0, max_in_flight=3)
    try:
        build = lambda: Outgoing({}, b"x")  # noqa: E731
        await notifier.deliver("alipay", f"http://127.0.0.1:{port}/", build, duplicates=1)
        with pytest.raises(TooManyInFlight):
            await notifier.deliver("alipay", f"http://127.0.0.1:{port}/", build, duplicates=1)
        assert len(notifier.deliveries) == 2  # the refused call sent nothing
        await notifier.deliver("alipay", f"http://127.0.0.1:{port}/", build)
    finally:
        await notifier.aclose()


async def test_a_busy_sandbox_answers_status_0(server: Server, client: httpx.AsyncClient) -> None:
    payments = service_payments(server)
    saved, payments.notifier.max_in_flight = payments.notifier.max_in_flight, 0
    try:
        order = await admin_create_order(client, amount="3.00")
        call = {"channel": "alipay", "order_no": order["order_no"], "amount": "3.00"}
        answer = await client.post(f"{MOUNT}/pay", json=call)
        assert answer.status_code == 429
        assert (answer.json()["status"], answer.json()["code"]) == (0, "sandbox.busy")
    finally:
        payments.notifier.max_in_flight = saved


async def test_sandbox_pages_carry_a_banner(client: httpx.AsyncClient) -> None:
    for path in ("/", "/pay", "/sms"):
        page = await client.get(f"{MOUNT}{path}")
        assert page.status_code == 200 and "SANDBOX" in page.text, path


def _serve_refused(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MALLGATE, "serve", "--port", str(free_port()), *args],
        env=_env(tmp_path, **env),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_serve_refuses_a_public_sandbox(tmp_path: Path) -> None:
    result = _serve_refused(tmp_path, "--host", "0.0.0.0")  # noqa: S104
    assert result.returncode == 2 and "not a loopback address" in result.stderr
    assert not (tmp_path / "var" / "sandbox").exists()


def test_serve_refuses_the_sandbox_beside_credentials(tmp_path: Path) -> None:
    result = _serve_refused(tmp_path, "--sandbox", MALLGATE_QQ__APP_ID="1001")
    assert result.returncode == 2 and "MALLGATE_QQ__APP_ID" in result.stderr


def test_serve_on_a_public_address_needs_the_public_url(tmp_path: Path) -> None:
    result = _serve_refused(tmp_path, "--host", "0.0.0.0", "--no-sandbox")  # noqa: S104
    assert result.returncode == 2 and "MALLGATE_PUBLIC_URL" in result.stderr


def test_the_start_up_lines_say_what_each_party_is(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [*MALLGATE, "serve", "--port", str(port), "--no-sandbox"],
        env=_env(tmp_path, MALLGATE_SMS__PROVIDER="console", MALLGATE_WECHAT_MP__APP_ID="wxd930ea5d5a258f4f"),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert _wait_healthy(f"http://127.0.0.1:{port}/healthz", proc).status_code == 200
    finally:
        proc.terminate()
        out = proc.communicate(timeout=15)[0].decode()
    assert "sandbox off, admin API off" in out
    assert "alipay not configured" in out and "sms console" in out
    assert "wechat_mp incomplete (missing MALLGATE_WECHAT_MP__APP_SECRET)" in out
    assert "SMS codes go to this log" in out


async def test_files_under_var_are_private(tmp_path: Path) -> None:
    """The SQLite database (with its -wal/-shm) and the sandbox's files are mode 0600."""
    import stat

    settings = _settings(tmp_path, sandbox=True, admin_token="a" * 20)
    app = create_app(settings)
    runtime = app.state.runtime
    try:
        await runtime.db.ping()
        async with runtime.db.transaction() as session:
            from sqlalchemy import text

            await session.execute(text("CREATE TABLE IF NOT EXISTS t (x INTEGER)"))
    finally:
        await runtime.close()

    def modes() -> dict[str, str]:
        made = [p for p in tmp_path.rglob("*") if p.is_file()]
        return {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in made}

    found = modes()
    assert "mallgate.db" in found and "sandbox/keys.json" in found and "secret_key" in found, found
    assert all(mode == "0o600" for mode in found.values()), found
