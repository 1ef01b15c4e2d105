"""Edges of the hardening (issue 7): who the client is behind proxies, digits that are not ASCII,
deep JSON, logs without secrets, logging in every worker, the admin API out of the public schema.
"""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import ValidationError
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from conftest import Backend, Server, free_port, other_server
from mallgate.app import create_app
from mallgate.channels import qr
from mallgate.db.session import Database
from mallgate.settings import QrcodeSettings, Settings, SmsSettings
from support import ADMIN, admin_create_user, unique, unique_mobile

PASSWORD = "secret-123"
MALLGATE = [sys.executable, "-m", "mallgate.cli"]


async def seen_address(http: httpx.AsyncClient, headers: list[tuple[str, str]]) -> str:
    """The address the service recorded for a password login sent with these headers."""
    mobile = unique_mobile()
    user = await admin_create_user(http, mobile=mobile, password=PASSWORD)
    login = await http.post(
        "/api/public/login", data={"username": mobile, "password": PASSWORD}, headers=headers
    )
    assert login.json()["status"] == 1, login.text
    view = (await http.get(f"/admin/users/{user['id']}", headers=ADMIN)).json()
    address: str = view["data"]["last_ip"]
    return address


def public_ip() -> str:
    return f"8.{secrets.randbelow(256)}.{secrets.randbelow(256)}.{1 + secrets.randbelow(254)}"


async def send_sms(http: httpx.AsyncClient, forwarded_for: str) -> dict[str, Any]:
    response = await http.get(
        "/api/send_sms",
        params={"username": unique_mobile(), "type": "register"},
        headers={"X-Forwarded-For": forwarded_for},
    )
    body: dict[str, Any] = response.json()
    return body


# ------------------------------------------------------------------ X-Forwarded-For


async def test_forwarded_for_from_an_untrusted_peer_is_ignored(server: Server) -> None:
    async with other_server(server, forwarded_allow_ips="10.0.0.0/8") as http:
        assert await seen_address(http, [("X-Forwarded-For", "6.6.6.6")]) == "127.0.0.1"


async def test_behind_a_trusted_proxy_the_rightmost_untrusted_address_is_the_client(server: Server) -> None:
    async with other_server(server, forwarded_allow_ips="127.0.0.1, 10.0.0.0/8") as http:
        # The client wrote 6.6.6.6; our proxy appended the address it saw.
        assert await seen_address(http, [("X-Forwarded-For", "6.6.6.6, 7.7.7.7")]) == "7.7.7.7"
        # Our own proxies along the way are skipped; several headers are one list, in order.
        headers = [("X-Forwarded-For", "6.6.6.6"), ("X-Forwarded-For", "7.7.7.8, 10.1.2.3")]
        assert await seen_address(http, headers) == "7.7.7.8"
        # Garbage stops the walk: the last address we could believe is taken.
        assert await seen_address(http, [("X-Forwarded-For", "7.7.7.9, bogus, 10.1.2.4")]) == "10.1.2.4"
        assert await seen_address(http, [("X-Forwarded-For", "bogus")]) == "127.0.0.1"
        assert await seen_address(http, [("X-Forwarded-For", "2001:db8::7, 10.9.9.9")]) == "2001:db8::7"
        assert await seen_address(http, []) == "127.0.0.1"


async def test_spoofing_the_leftmost_entry_does_not_reset_the_per_ip_sms_cap(server: Server) -> None:
    async with other_server(
        server, forwarded_allow_ips="127.0.0.1", sms=SmsSettings(per_ip_hourly=3)
    ) as http:
        client = public_ip()
        for _ in range(3):
            assert (await send_sms(http, f"{public_ip()}, {client}"))["status"] == 1
        over = await send_sms(http, f"{public_ip()}, {client}")
        assert over["status"] == 0 and over["code"] == "sms.ip_limit", over
        # Another client behind the same proxy has its own count.
        assert (await send_sms(http, f"{client}, {public_ip()}"))["status"] == 1


async def test_ipv6_clients_are_counted_per_64(server: Server) -> None:
    prefix = f"2001:db8:{secrets.randbelow(65536):x}:{secrets.randbelow(65536):x}"
    async with other_server(
        server, forwarded_allow_ips="127.0.0.1", sms=SmsSettings(per_ip_hourly=2)
    ) as http:
        assert (await send_sms(http, f"{prefix}::1"))["status"] == 1
        assert (await send_sms(http, f"{prefix}:ffff:ffff:ffff:fff0"))["status"] == 1
        assert (await send_sms(http, f"{prefix}:1::2"))["code"] == "sms.ip_limit"
        assert (await send_sms(http, f"2001:db8:1:{secrets.randbelow(65536):x}::1"))["status"] == 1
    qrcode = QrcodeSettings(per_ip_per_minute=1)
    async with other_server(server, forwarded_allow_ips="127.0.0.1", qrcode=qrcode) as http:
        headers = {"X-Forwarded-For": f"{prefix}::1"}
        assert (await http.get("/api/qrcode", params={"data": "a"}, headers=headers)).status_code == 200
        headers = {"X-Forwarded-For": f"{prefix}::2"}
        again = await http.get("/api/qrcode", params={"data": "b"}, headers=headers)
        assert again.json()["code"] == "qrcode.too_frequent"


def test_rate_keys_group_ipv6_by_64_and_keep_ipv4() -> None:
    from mallgate.forwarded import rate_key

    assert rate_key("203.0.113.9") == "203.0.113.9"
    assert rate_key("2001:db8:1:2::1") == rate_key("2001:db8:1:2:ffff:ffff:ffff:ffff") == "2001:db8:1:2::/64"
    assert rate_key("2001:db8:1:3::1") != rate_key("2001:db8:1:2::1")
    assert rate_key("::ffff:203.0.113.9") == "203.0.113.9"


def test_the_proxy_list_takes_ips_and_cidrs_and_refuses_a_star() -> None:
    accepted = Settings(_env_file=None, forwarded_allow_ips="10.0.0.0/8, 127.0.0.1 ,::1")  # type: ignore[call-arg]
    assert accepted.forwarded_allow_ips == "10.0.0.0/8,127.0.0.1/32,::1/128"
    assert Settings(_env_file=None, forwarded_allow_ips="").forwarded_allow_ips == ""  # type: ignore[call-arg]
    for bad in ("*", "10.0.0.0/33", "10.0.0.1/8", "proxy.local", "10.0.0.0/8,,"):
        with pytest.raises(ValidationError, match="forwarded_allow_ips"):
            Settings(_env_file=None, forwarded_allow_ips=bad)  # type: ignore[call-arg]


# ------------------------------------------------------------------ inputs


async def test_digits_that_are_not_ascii_are_refused_not_a_crash(client: httpx.AsyncClient) -> None:
    size = await client.get("/api/qrcode", params={"data": "x", "size": "²"})
    assert size.status_code == 200 and size.json()["code"] == "param.invalid", size.text
    user = await client.get("/admin/users/²", headers=ADMIN)
    assert user.status_code == 200 and user.json()["code"] == "param.invalid", user.text
    # '١' is an Arabic-Indic one: int() would read it, the API document means ASCII digits.
    order = await client.post(
        "/admin/orders", json={"order_no": unique("T"), "amount": "1.00", "user_id": "١"}, headers=ADMIN
    )
    assert order.json()["code"] == "param.invalid", order.text
    register = await client.post(
        "/api/register",
        data={"username": unique_mobile(), "code": "000000", "password": PASSWORD, "spread_id": "²"},
        headers={"X-Forwarded-For": public_ip()},
    )
    assert register.status_code == 200 and register.json()["status"] == 0, register.text


async def test_deeply_nested_json_is_refused_as_invalid(client: httpx.AsyncClient) -> None:
    json_headers = {**ADMIN, "Content-Type": "application/json"}
    for body in (b"[" * 200_000, b'{"a":' * 40 + b"1" + b"}" * 40, b"[" * 1024 * 1024):
        response = await client.post("/admin/goods", content=body, headers=json_headers)
        assert response.status_code == 200, response.text
        assert response.json()["code"] == "body.invalid_json"
    # Up to 32 levels is fine, and brackets inside strings do not count.
    nested = b'"x"'
    for _ in range(31):
        nested = b"[" + nested + b"]"
    name = b'"[[[[{{{{\\"[[[[' + b"[" * 100 + b'"'
    body = b'{"name": ' + name + b', "price": "1.00", "extra": ' + nested + b"}"
    response = await client.post("/admin/goods", content=body, headers=json_headers)
    assert response.json()["status"] == 1, response.text


async def test_fresh_qr_codes_render_off_the_event_loop(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[threading.Thread] = []
    render = qr.render_png

    def recording(*args: Any, **kwargs: Any) -> bytes:
        threads.append(threading.current_thread())
        return render(*args, **kwargs)

    monkeypatch.setattr(qr, "render_png", recording)
    data = unique("fresh")  # a few bytes: short codes used to be drawn on the loop
    for _ in range(2):
        response = await client.get("/api/qrcode", params={"data": data, "size": "20", "level": "H"})
        assert response.status_code == 200
    assert len(threads) == 1, "the second request is served from the cache"
    assert threads[0] is not threading.main_thread()


# ------------------------------------------------------------------ logs


async def test_database_errors_carry_no_parameter_values(backend: Backend) -> None:
    secret = "13812345678-" + secrets.token_hex(4)
    statement = text("SELECT id FROM no_such_table WHERE mobile = :mobile")
    db = Database(backend.url)
    try:
        with pytest.raises(DBAPIError) as raised:
            async with db.transaction() as session:
                await session.execute(statement, {"mobile": secret})
        assert secret not in str(raised.value)
        with pytest.raises(DBAPIError) as raised:
            await db.run_write(lambda s: s.execute(statement, {"mobile": secret}))
        assert secret not in str(raised.value)
    finally:
        await db.dispose()


async def test_unexpected_errors_are_logged_without_their_message(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "13812345678"
    app = create_app(server.settings, clock=server.clock)
    fastapi_app: FastAPI = app.app

    async def boom() -> None:
        try:
            raise KeyError(f"code hash for {secret}")
        except KeyError as exc:
            raise RuntimeError(f"INSERT ... [parameters: ({secret!r},)]") from exc

    fastapi_app.add_api_route("/boom", boom)
    transport = httpx.ASGITransport(app=app)  # raises what the app lets escape, as uvicorn would log it
    with caplog.at_level(logging.ERROR):
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            response = await http.get("/boom")
    assert response.status_code == 500
    assert response.json() == {"info": "服务器繁忙，请稍后再试", "status": 0, "code": "server_error"}
    # What a handler would write: the message and, if given, the exception's traceback with its text.
    logged = "\n".join(logging.Formatter().format(record) for record in caplog.records)
    assert "RuntimeError" in logged and "KeyError" in logged and "/boom" in logged
    assert "in boom" in logged  # where it happened
    assert secret not in logged
    await app.state.runtime.close()


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLGATE_")}
    return {**env, "MALLGATE_VAR_DIR": str(tmp_path / "var"), **extra}


def test_every_worker_logs_at_info(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [*MALLGATE, "serve", "--port", str(port), "--workers", "2", "--no-sandbox"],
        env=_env(tmp_path, MALLGATE_SMS__PROVIDER="console"),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else b""
            assert time.monotonic() < deadline, "server did not come up"
            try:
                httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        sent = httpx.get(
            f"http://127.0.0.1:{port}/api/send_sms",
            params={"username": unique_mobile(), "type": "register"},
            timeout=10,
        )
        assert sent.json()["status"] == 1, sent.text
    finally:
        proc.terminate()
        out = proc.communicate(timeout=15)[0].decode()
    # The console provider's line is written by the worker that answered.
    assert " INFO mallgate.sms SMS code for " in out, out


# ------------------------------------------------------------------ admin


async def test_admin_routes_are_absent_from_the_public_schema(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    assert "/api/qrcode" in schema["paths"]
    assert [p for p in schema["paths"] if p.startswith("/admin")] == []
    docs = await client.get("/docs")
    assert docs.status_code == 200


def test_short_admin_tokens_are_refused() -> None:
    with pytest.raises(ValidationError, match="admin_token"):
        Settings(_env_file=None, admin_token="short")  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="admin_token"):
        Settings(_env_file=None, admin_token="x" * 15)  # type: ignore[call-arg]
    assert Settings(_env_file=None, admin_token="").admin_token == ""  # type: ignore[call-arg]
    assert Settings(_env_file=None, admin_token="x" * 16).admin_token == "x" * 16  # type: ignore[call-arg]


async def test_a_wrong_method_is_405_with_allow(client: httpx.AsyncClient) -> None:
    answer = await client.put("/api/order/payment")
    assert answer.status_code == 405 and answer.json()["code"] == "method_not_allowed"
    assert set(answer.headers["allow"].replace(" ", "").split(",")) == {"GET", "POST"}
