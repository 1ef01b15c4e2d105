"""Issue 8, "Start-up and settings": what a newcomer meets in the first hour.

A wrong database URL, a malformed or misspelled setting and a busy port each answer one line
naming what to fix (exit code 2) instead of a traceback or silence; HEAD works where GET does;
every time the API shows is in one zone (MALLGATE_TIME_ZONE, Asia/Shanghai by default); the
test run says which database each block of its output is.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
from sqlalchemy import select
from sqlalchemy.engine import make_url
from test_cli import MALLGATE, _env, _wait_healthy
from test_sandbox_payments import sandbox_pay
from test_sms import PASSWORD, post

from conftest import BACKENDS, Server, free_port, other_server
from mallgate import cli
from mallgate.db.models import Order, PaymentNotification, User
from mallgate.sandbox import app as sandbox_app
from mallgate.sandbox.keys import SandboxKeys
from mallgate.settings import Settings
from support import ADMIN, admin_create_order, admin_create_user, unique_mobile

PASSWORD_IN_URL = "Pw-never-shown-7"
TIME = "%Y-%m-%d %H:%M:%S"


def _run(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MALLGATE, *args],
        env=_env(tmp_path, **env),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# 1. A wrong database URL: one line naming MALLGATE_DATABASE_URL, what failed and the fix.


def _bad_urls() -> list[tuple[str, str, str]]:
    closed = free_port()
    cases = [
        (
            "closed port",
            f"postgresql+asyncpg://postgres:{PASSWORD_IN_URL}@127.0.0.1:{closed}/test",
            f"nothing listens on 127.0.0.1:{closed}",
        ),
        (
            "closed port, mysql",
            f"mysql+asyncmy://root:{PASSWORD_IN_URL}@127.0.0.1:{closed}/test",
            f"nothing listens on 127.0.0.1:{closed}",
        ),
        ("postgres://", f"postgres://postgres:{PASSWORD_IN_URL}@127.0.0.1/test", "use postgresql+asyncpg://"),
        (
            "postgresql://",
            f"postgresql://postgres:{PASSWORD_IN_URL}@127.0.0.1/test",
            "use postgresql+asyncpg://",
        ),
        ("mysql:// without driver", f"mysql://root:{PASSWORD_IN_URL}@127.0.0.1/test", "use mysql+asyncmy://"),
        ("unknown scheme", f"oracle://scott:{PASSWORD_IN_URL}@127.0.0.1/orcl", "unknown database oracle://"),
        (
            "malformed",
            f"postgresql+asyncpg://postgres:{PASSWORD_IN_URL}@127.0.0.1:port/test",
            "not a database URL",
        ),
        ("not a URL", "var/mallgate.db", "not a database URL"),
        ("no database", f"postgresql+asyncpg://postgres:{PASSWORD_IN_URL}@127.0.0.1", "names no database"),
        (
            "unknown host",
            f"postgresql+asyncpg://postgres:{PASSWORD_IN_URL}@no-such-host.invalid/test",
            "host no-such-host.invalid is not known",
        ),
        (
            "sqlite folder",
            "sqlite+aiosqlite:////proc/no-such-folder/mallgate.db",
            "cannot create the SQLite file",
        ),
    ]
    for kind, server in BACKENDS.items():
        if kind != "sqlite":
            name = f"mallgate_missing_{secrets.token_hex(4)}"
            url = make_url(server).set(database=name).render_as_string(hide_password=False)
            cases.append((f"missing database on {kind}", url, f'database "{name}" does not exist'))
    return cases


BAD_URLS = _bad_urls()


def _assert_one_line_about_the_url(result: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = _lines(result.stderr)
    assert len(lines) == 1, result.stderr
    (line,) = lines
    assert "MALLGATE_DATABASE_URL" in line and fragment in line, line
    assert PASSWORD_IN_URL not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("case", "url", "fragment"), BAD_URLS, ids=[c[0] for c in BAD_URLS])
def test_a_wrong_database_url_is_one_line_with_the_fix(
    tmp_path: Path, case: str, url: str, fragment: str
) -> None:
    _assert_one_line_about_the_url(_run(tmp_path, "db", "upgrade", MALLGATE_DATABASE_URL=url), fragment)


@pytest.mark.parametrize(
    "command",
    [
        ["serve", "--no-sandbox"],
        ["notifications", "list"],
        ["notifications", "prune", "--older-than", "9d"],
        ["reconcile"],
    ],
    ids=lambda c: " ".join(c[:2]),
)
@pytest.mark.parametrize("case", ["closed port", "postgres://"])
def test_every_command_tells_the_database_url_so(tmp_path: Path, command: list[str], case: str) -> None:
    _name, url, fragment = next(c for c in BAD_URLS if c[0] == case)
    if command[0] == "serve":
        command = [*command, "--port", str(free_port())]
    _assert_one_line_about_the_url(_run(tmp_path, *command, MALLGATE_DATABASE_URL=url), fragment)


# ---------------------------------------------------------------------------------------------
# 2. Every setting with a known shape is checked at start-up, with the same one-line message.

MALFORMED = [
    ("MALLGATE_WECHAT_PAY__API_KEY", "short-secret"),
    ("MALLGATE_WECHAT_PAY__API_KEY", "a" * 33),
    ("MALLGATE_PUBLIC_URL", "not-a-url"),
    ("MALLGATE_PUBLIC_URL", "pay.example.com"),
    ("MALLGATE_PUBLIC_URL", "ftp://pay.example.com"),
    ("MALLGATE_PUBLIC_URL", "https://pay.example.com/?x=1"),
    ("MALLGATE_PUBLIC_URL", ""),
    ("MALLGATE_ALIPAY__GATEWAY_URL", "openapi.alipay.com/gateway.do"),
    ("MALLGATE_WECHAT_PAY__API_BASE", "https://"),
    ("MALLGATE_WECHAT__API_BASE", "api.weixin.qq.com"),
    ("MALLGATE_QQ__API_BASE", "localhost:8000"),
    ("MALLGATE_APPLE__KEYS_URL", "https://apple id.com/keys"),
    ("MALLGATE_SMS__ALIYUN__ENDPOINT", "dysmsapi.aliyuncs.com"),
    ("MALLGATE_SMS__TENCENT__ENDPOINT", "http://sms.tencentcloudapi.com:port/"),
    ("MALLGATE_WECHAT_PAY__APP_ID", "wx123"),
    ("MALLGATE_WECHAT_MP__APP_ID", "2021000123456789"),
    ("MALLGATE_WECHAT_MINI__APP_ID", "wxd930ea5d5a258f4"),
    ("MALLGATE_WECHAT_APP__APP_ID", "wxd930ea5d5a258f4g"),
    ("MALLGATE_ALIPAY__APP_ID", "wxd930ea5d5a258f4f"),
    ("MALLGATE_ALIPAY__APP_ID", "202100012345678"),
    ("MALLGATE_ALIPAY__SELLER_ID", "12345"),
    ("MALLGATE_WECHAT_PAY__MCH_ID", "mch-1900000109"),
    ("MALLGATE_WECHAT_PAY__API_V3_KEY", "short-secret"),
    ("MALLGATE_WECHAT_MP__AES_KEY", "short-secret"),
    ("MALLGATE_WECHAT_PAY__MCH_SERIAL_NO", "not-a-serial-number"),
    ("MALLGATE_WECHAT_PAY__PUBLIC_KEY_ID", "0114232134912410000000000000"),
    ("MALLGATE_QQ__APP_ID", "app101827370"),
    ("MALLGATE_APPLE__BUNDLE_ID", "my app"),
    ("MALLGATE_APPLE__BUNDLE_ID", "mallgate"),
    ("MALLGATE_SMS__ALIYUN__TEMPLATE_CODE", "154950909"),
    ("MALLGATE_SMS__TENCENT__SDK_APP_ID", "app-1400006666"),
    ("MALLGATE_SMS__TENCENT__TEMPLATE_ID", "T449739"),
    ("MALLGATE_SMS__TENCENT__REGION", "Guangzhou"),
    ("MALLGATE_TIME_ZONE", "Mars/Olympus"),
    ("MALLGATE_TIME_ZONE", "+08:00"),
]


def _load(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: dict[str, str]) -> Settings:
    """cli.load_settings() in this process, with exactly `env` as the MALLGATE_ variables."""
    for name in os.environ:
        if name.upper().startswith("MALLGATE_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)  # no .env of the repository's
    return cli.load_settings()


@pytest.mark.parametrize(("name", "value"), MALFORMED, ids=[f"{n}={v}" for n, v in MALFORMED])
def test_a_malformed_shaped_setting_stops_start_up_naming_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, value: str
) -> None:
    with pytest.raises(typer.Exit) as stopped:
        _load(monkeypatch, tmp_path, {name: value})
    assert stopped.value.exit_code == 2
    (line,) = _lines(capsys.readouterr().err)
    assert line.startswith(f"mallgate: setting {name} is invalid: "), line
    assert "Value error" not in line
    if name.endswith("_KEY"):
        assert value not in line  # the shape is told, never a secret's value


def test_the_cli_says_so_for_the_issue_s_examples(tmp_path: Path) -> None:
    for name, value in [("MALLGATE_WECHAT_PAY__API_KEY", "short"), ("MALLGATE_PUBLIC_URL", "not-a-url")]:
        result = _run(tmp_path, "db", "upgrade", **{name: value})
        assert result.returncode == 2, result.stderr
        (line,) = _lines(result.stderr)
        assert line.startswith(f"mallgate: setting {name} is invalid: "), line
    assert not (tmp_path / "var" / "mallgate.db").exists()  # refused before anything was done


def test_a_group_that_is_not_json_names_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(typer.Exit):
        _load(monkeypatch, tmp_path, {"MALLGATE_SMS": "{provider: aliyun"})
    (line,) = _lines(capsys.readouterr().err)
    assert line.startswith("mallgate: setting MALLGATE_SMS is invalid: "), line


def test_the_default_zone_without_a_time_zone_database(monkeypatch: pytest.MonkeyPatch) -> None:
    from zoneinfo import ZoneInfoNotFoundError

    from mallgate import clock

    def missing(name: str) -> None:
        raise ZoneInfoNotFoundError(name)

    monkeypatch.setattr(clock, "ZoneInfo", missing)
    monkeypatch.setattr(clock, "available_timezones", set)
    zone = clock.zone_named("Asia/Shanghai")  # China: +08:00, no summer time since 1991
    assert clock.show_time(datetime(2021, 5, 21, 7, 0, 0), zone) == "2021-05-21 15:00:00"
    assert clock.show_time(datetime(2021, 5, 21, 7, 0, 0), clock.zone_named("UTC")) == "2021-05-21 07:00:00"
    with pytest.raises(ValueError, match="pip install tzdata"):
        clock.zone_named("Europe/Berlin")


REAL_LOOKING = {
    "MALLGATE_PUBLIC_URL": "https://pay.example.com",
    "MALLGATE_ALIPAY__APP_ID": "2021000123456789",
    "MALLGATE_ALIPAY__SELLER_ID": "2088101122136241",
    "MALLGATE_ALIPAY__GATEWAY_URL": "https://openapi-sandbox.dl.alipaydev.com/gateway.do",
    "MALLGATE_WECHAT_PAY__APP_ID": "wxd930ea5d5a258f4f",
    "MALLGATE_WECHAT_PAY__MCH_ID": "1900009191",
    "MALLGATE_WECHAT_PAY__API_KEY": "192006250b4c09247ec02edce69f6a2d",
    "MALLGATE_WECHAT_PAY__API_V3_KEY": "0123456789abcdefghijABCDEFGHIJ01",
    "MALLGATE_WECHAT_PAY__PUBLIC_KEY_ID": "PUB_KEY_ID_0114232134912410000000000000",
    "MALLGATE_WECHAT_PAY__MCH_SERIAL_NO": "5157F09EFDC096DE15EBE81A47057A7232F1B8E1",
    "MALLGATE_WECHAT_PAY__API_BASE": "https://api.mch.weixin.qq.com",
    "MALLGATE_WECHAT_MP__APP_ID": "wx4f4bc4dec97d474b",
    "MALLGATE_WECHAT_MP__AES_KEY": "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG",
    "MALLGATE_WECHAT_MINI__APP_ID": "wx2421b1c4370ec43b",
    "MALLGATE_WECHAT_APP__APP_ID": "wxba5fad812f8e6fb9",
    "MALLGATE_WECHAT__API_BASE": "https://api.weixin.qq.com",
    "MALLGATE_QQ__APP_ID": "101827370",
    "MALLGATE_QQ__API_BASE": "https://graph.qq.com",
    "MALLGATE_APPLE__BUNDLE_ID": "com.example.mall-app",
    "MALLGATE_APPLE__KEYS_URL": "https://appleid.apple.com/auth/keys",
    "MALLGATE_SMS__ALIYUN__TEMPLATE_CODE": "SMS_154950909",
    "MALLGATE_SMS__ALIYUN__ENDPOINT": "https://dysmsapi.aliyuncs.com/",
    "MALLGATE_SMS__TENCENT__SDK_APP_ID": "1400006666",
    "MALLGATE_SMS__TENCENT__TEMPLATE_ID": "449739",
    "MALLGATE_SMS__TENCENT__REGION": "ap-guangzhou",
    "MALLGATE_SMS__TENCENT__ENDPOINT": "https://sms.tencentcloudapi.com/",
    "MALLGATE_DATABASE_URL": "postgresql+asyncpg://mallgate:secret@db.internal:5432/mallgate",
    "MALLGATE_TIME_ZONE": "Asia/Shanghai",
}


def test_real_looking_values_pass(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    settings = _load(monkeypatch, tmp_path, REAL_LOOKING)
    assert settings.wechat_pay.api_key == REAL_LOOKING["MALLGATE_WECHAT_PAY__API_KEY"]
    also = [
        ("MALLGATE_TIME_ZONE", "UTC"),
        ("MALLGATE_TIME_ZONE", "Europe/Berlin"),
        ("MALLGATE_DATABASE_URL", "mysql+asyncmy://mallgate:secret@db.internal/mallgate"),
        ("MALLGATE_DATABASE_URL", "mariadb+asyncmy://mallgate:secret@db.internal/mallgate"),
        ("MALLGATE_DATABASE_URL", "sqlite+aiosqlite:///var/other.db"),
        ("MALLGATE_PUBLIC_URL", "http://[::1]:8000"),
        ("MALLGATE_PUBLIC_URL", "https://mall.example.com/pay/"),
        ("MALLGATE_WECHAT_PAY__MCH_SERIAL_NO", "1DDE55AD98ED71D6EDD4A4A16996DE7B47773A8C"),
        ("MALLGATE_APPLE__BUNDLE_ID", "com.example.mall.signin"),
    ]
    for name, value in also:
        _load(monkeypatch, tmp_path, {name: value})


def test_the_sandbox_s_own_identities_pass(tmp_path: Path) -> None:
    bare = Settings(_env_file=None, var_dir=tmp_path)  # type: ignore[call-arg]
    filled, _kept = sandbox_app.sandbox_settings(
        bare, "http://127.0.0.1:8000/_sandbox", SandboxKeys.generate()
    )
    again = Settings.model_validate(filled.model_dump())  # every validator runs on the stand-ins' values
    assert again.wechat_pay.public_key_id == filled.wechat_pay.public_key_id
    assert again.apple.bundle_id == sandbox_app.APPLE_BUNDLE_ID and again.qq.app_id == sandbox_app.QQ_APP_ID


# ---------------------------------------------------------------------------------------------
# 3. A misspelled MALLGATE_ variable is warned about with the closest real name.


def test_unknown_variables_are_warned_about_with_the_closest_name(tmp_path: Path) -> None:
    dotenv = "MALLGATE_ALIPAY__APPID=2021000123456789\nMALLGATE_TOKEN_TTL_DAYS=7\nOTHER=x\n"
    (tmp_path / ".env").write_text(dotenv)
    result = _run(
        tmp_path,
        "db",
        "upgrade",
        MALLGATE_ADMIN_TOKN="a-token-of-20-chars!",
        MALLGATE_WECHATPAY__API_KEY="k" * 32,
        MALLGATE_TEST_SOMETHING="the harness's own",
        MALLGATE_BODY_LIMIT="4096",
    )
    assert result.returncode == 0, result.stderr
    warnings = [line for line in _lines(result.stderr) if "warning" in line]
    assert sorted(warnings) == sorted(
        [
            "mallgate: warning: MALLGATE_ADMIN_TOKN (in the environment) is not a setting, ignored: "
            "did you mean MALLGATE_ADMIN_TOKEN?",
            "mallgate: warning: MALLGATE_WECHATPAY__API_KEY (in the environment) is not a setting, ignored: "
            "did you mean MALLGATE_WECHAT_PAY__API_KEY?",
            "mallgate: warning: MALLGATE_ALIPAY__APPID (in .env) is not a setting, ignored: "
            "did you mean MALLGATE_ALIPAY__APP_ID?",
        ]
    ), result.stderr


def test_serve_warns_once(tmp_path: Path) -> None:
    # serve reads its settings twice (before and after it sets MALLGATE_PUBLIC_URL): one warning.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        result = _run(tmp_path, "serve", "--port", str(port), MALLGATE_ADMIN_TOKN="x")
    assert result.returncode == 2 and f"port {port} is in use" in result.stderr
    assert sum("MALLGATE_ADMIN_TOKN" in line for line in _lines(result.stderr)) == 1


# ---------------------------------------------------------------------------------------------
# 4. "listening on" once the socket is bound; a busy port is one line, exit code 2.


def test_a_busy_port_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = _run(tmp_path, "serve", "--port", str(port))
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    (line,) = _lines(output)
    assert f"port {port} is in use" in line, line
    assert "listening" not in output and "Traceback" not in output
    assert not (tmp_path / "var" / "mallgate.db").exists()  # told before the migration


@pytest.mark.parametrize("workers", [1, 2])
def test_listening_is_said_once_the_socket_listens(tmp_path: Path, workers: int) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [*MALLGATE, "serve", "--port", str(port), "--workers", str(workers)],
        env=_env(tmp_path),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        before = []
        for line in proc.stdout:
            if "listening on" in line:
                break
            before.append(line)
        else:
            raise AssertionError(f"no listening line: {before}")
        # Said only now: a connection is taken at once (into the backlog, if no worker is up yet).
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        assert any("Running upgrade" in line for line in before)  # migrated before it was said
        assert _wait_healthy(f"http://127.0.0.1:{port}/healthz", proc).status_code == 200
    finally:
        proc.terminate()
        rest = proc.communicate(timeout=20)[0]
    assert rest.count("listening on") == 0  # said once, by serve, not by each worker


def test_the_sandbox_command_binds_the_same_way(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        result = _run(tmp_path, "sandbox", "--port", str(busy))
    assert result.returncode == 2 and f"port {busy} is in use" in result.stderr, result.stderr
    port = free_port()
    proc = subprocess.Popen(
        [*MALLGATE, "sandbox", "--port", str(port)],
        env=_env(tmp_path),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert _wait_healthy(f"http://127.0.0.1:{port}/_sandbox/", proc).status_code == 200
        assert httpx.head(f"http://127.0.0.1:{port}/_sandbox/", timeout=5).status_code == 200
    finally:
        proc.terminate()
        proc.communicate(timeout=15)


# ---------------------------------------------------------------------------------------------
# 5. HEAD answers like GET, without a body.


async def test_head_answers_like_get_without_a_body(client: httpx.AsyncClient) -> None:
    for path in ("/healthz", "/api/qrcode?data=x"):
        got = await client.get(path)
        head = await client.head(path)
        assert head.status_code == got.status_code == 200, (path, head.status_code)
        assert head.content == b"" and head.headers["content-type"] == got.headers["content-type"]
    assert (await client.head("/api/qrcode?data=x")).headers["content-type"] == "image/png"
    # Where GET is not allowed, neither is HEAD.
    refused = await client.head("/api/wechat/notify")
    assert refused.status_code == 405 and "POST" in refused.headers["allow"]


async def test_head_on_every_get_route(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    documented = [path for path, operations in schema["paths"].items() if "get" in operations]
    # Out of the document: health, metrics and the admin API.
    paths = [*documented, "/healthz", "/metrics", "/admin/notifications", "/docs", "/openapi.json"]
    assert "/api/qrcode" in paths and "/api/user/info" in paths
    for path in paths:
        if "{" in path:
            continue
        got = await client.get(path, headers=ADMIN)
        head = await client.head(path, headers=ADMIN)
        assert head.status_code == got.status_code != 405, path
        assert head.headers["content-type"] == got.headers["content-type"], path


# ---------------------------------------------------------------------------------------------
# 6. Every time the API shows is in MALLGATE_TIME_ZONE (Asia/Shanghai by default).


async def _stored(server: Server, user_id: int, order_no: str) -> tuple[datetime, datetime, datetime]:
    async with server.app.state.runtime.db.read() as session:
        user = await session.get(User, user_id)
        order = (await session.scalars(select(Order).where(Order.order_no == order_no))).one()
        notice = (
            await session.scalars(select(PaymentNotification).where(PaymentNotification.order_no == order_no))
        ).first()
        assert user is not None and user.last_login and order.paid_at and notice is not None
        return user.last_login, order.paid_at, notice.received_at


async def _shown(http: httpx.AsyncClient, user_id: str, order_no: str, token: str) -> dict[str, Any]:
    user = (await http.get(f"/admin/users/{user_id}", headers=ADMIN)).json()["data"]
    info = (await http.get("/api/user/info", headers={"Auth-Token": token})).json()["data"]
    order = (await http.get(f"/admin/orders/{order_no}", headers=ADMIN)).json()["data"]
    notices = (await http.get("/admin/notifications", params={"order_no": order_no}, headers=ADMIN)).json()
    return {
        "last_login": user["last_login"],
        "user/info last_login": info["last_login"],
        "paid_at": order["paid_at"],
        "received_at": notices["data"][0]["received_at"],
    }


async def test_times_are_shown_in_the_configured_zone(client: httpx.AsyncClient, server: Server) -> None:
    mobile = unique_mobile()
    user = await admin_create_user(client, mobile=mobile, password=PASSWORD)
    login = await post(client, "/public/login", username=mobile, password=PASSWORD)
    assert login["status"] == 1, login
    order = await admin_create_order(client, amount="3.21")
    await sandbox_pay(client, channel="alipay", order_no=order["order_no"], amount="3.21")
    last_login, paid_at, received_at = await _stored(server, int(user["id"]), order["order_no"])

    def expected(shift: timedelta) -> dict[str, str]:
        return {
            "last_login": (last_login + shift).strftime(TIME),
            "user/info last_login": (last_login + shift).strftime(TIME),
            "paid_at": (paid_at + shift).strftime(TIME),
            "received_at": (received_at + shift).strftime(TIME),
        }

    token = login["data"]["token"]
    assert login["data"]["last_login"] == expected(timedelta(hours=8))["last_login"]
    assert await _shown(client, user["id"], order["order_no"], token) == expected(timedelta(hours=8))
    async with other_server(server, time_zone="UTC") as utc:
        assert await _shown(utc, user["id"], order["order_no"], token) == expected(timedelta(0))


# ---------------------------------------------------------------------------------------------
# 7. The test run labels the block of each database.

TINY = """
import pytest


@pytest.fixture(scope="session")
def backend(request):  # instead of the harness's: no database is made
    return request.param


def test_on_a_database(backend):
    assert backend


def test_without_one():
    pass
"""


@pytest.mark.parametrize("quiet", [False, True], ids=["default", "-q"])
def test_each_database_s_block_is_labelled(tmp_path: Path, quiet: bool) -> None:
    here = Path(__file__).parent
    for name in ("conftest.py", "support.py"):
        shutil.copy(here / name, tmp_path / name)
    (tmp_path / "test_tiny.py").write_text(TINY)
    (tmp_path / "test_other.py").write_text(TINY)
    env = {**os.environ, "MALLGATE_TEST_DATABASES": "sqlite,postgresql,mysql"}
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-o",
        "asyncio_mode=auto",
        "-W",
        "ignore",
    ]
    result = subprocess.run(
        [*command, "-q" if quiet else "-ra"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    headers = [line for line in result.stdout.splitlines() if "database:" in line]
    # The tests that need no database come after those that do, under a header of their own.
    names = ("sqlite", "postgresql", "mysql", "none")
    assert headers == [f"---------- database: {name} ----------" for name in names]
    lines = result.stdout.splitlines()
    blocks = [lines.index(h) for h in headers]
    # Under each header, its database's own progress: both files (default) or their dots (-q).
    for start, end in zip(blocks, [*blocks[1:], len(lines)], strict=True):
        block = "\n".join(lines[start + 1 : end]).split("=====")[0]
        if quiet:
            assert block.strip().startswith(".."), block
        else:
            assert [line.split()[:2] for line in block.strip().splitlines()] == [
                ["test_other.py", "."],
                ["test_tiny.py", "."],
            ], block
