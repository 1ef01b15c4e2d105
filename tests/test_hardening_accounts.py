"""Issue 7, items 3, 5d and 6 (NUL bytes): register, forget and public/login under attack.

- the code is checked before anything else, so a wrong or missing code says nothing about the number;
- attempts are limited per IP and per number, from the same counters as send_sms;
- argon2 runs on worker threads behind a bounded limiter that answers "busy" instead of queueing;
- SMS code hashes are keyed with a server secret kept outside the database;
- control characters in parameters are refused with a clear answer, never a 500.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import stat
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from sqlalchemy import select
from test_sms import PASSWORD, latest_code, new_ip, post, register, send, set_rule, wrong

from conftest import Server, other_server
from mallgate import secret_key
from mallgate.db.models import SmsCode
from mallgate.db.session import Database
from mallgate.services import sms_codes
from mallgate.settings import LoginSettings, Settings
from support import admin_create_user, unique_mobile


async def code_row(server: Server, mobile: str, purpose: str) -> dict[str, Any]:
    db = Database(server.settings.resolved_database_url)
    try:
        async with db.read() as session:
            row = (
                await session.execute(
                    select(SmsCode.__table__).where(SmsCode.mobile == mobile, SmsCode.purpose == purpose)
                )
            ).one()
    finally:
        await db.dispose()
    return dict(row._mapping)


def file_key(server: Server) -> bytes:
    return (server.settings.var_dir / secret_key.FILE_NAME).read_bytes().strip()


# ------------------------------------------------------------------ no oracle without a valid code


async def test_a_wrong_or_missing_code_says_nothing_about_the_number(client: httpx.AsyncClient) -> None:
    never = unique_mobile()
    by_admin = unique_mobile()
    await admin_create_user(client, mobile=by_admin, password=PASSWORD)
    by_sms = unique_mobile()
    await register(client, by_sms)  # leaves a used `register` code behind

    for path in ("/register", "/forget"):
        answers = [
            await post(client, path, username=mobile, code="123456", password=PASSWORD)
            for mobile in (never, by_admin, by_sms)
        ]
        assert answers[0]["status"] == 0 and answers[0]["code"] == "sms.code_missing", answers
        assert answers[1] == answers[0] and answers[2] == answers[0], (path, answers)


async def test_a_wrong_live_code_answers_the_same_for_registered_and_new_numbers(
    client: httpx.AsyncClient, server: Server
) -> None:
    # A `register` code sent while the number was new; meanwhile one of the two numbers got registered.
    new, taken = unique_mobile(), unique_mobile()
    codes = {}
    for mobile in (new, taken):
        assert (await send(client, mobile))["status"] == 1
        codes[mobile] = await latest_code(client, mobile)
    await admin_create_user(client, mobile=taken, password=PASSWORD)
    answers = [
        await post(client, "/register", username=m, code=wrong(codes[m]), password=PASSWORD)
        for m in (new, taken)
    ]
    assert answers[0] == answers[1], answers
    assert answers[0]["code"] == "sms.code_wrong" and answers[0]["attempts_left"] == 4
    # With the right code the number's state is told, and the code is not used up by the refusal.
    right = await post(client, "/register", username=taken, code=codes[taken], password=PASSWORD)
    assert right["code"] == "sms.registered", right
    assert (await post(client, "/register", username=new, code=codes[new], password=PASSWORD))["status"] == 1


async def test_a_used_code_is_told_only_to_whoever_holds_it(client: httpx.AsyncClient) -> None:
    mobile = unique_mobile()
    assert (await send(client, mobile))["status"] == 1
    code = await latest_code(client, mobile)
    assert (await post(client, "/register", username=mobile, code=code, password=PASSWORD))["status"] == 1
    again = await post(client, "/register", username=mobile, code=code, password=PASSWORD)
    assert again["code"] == "sms.code_used", again
    guess = await post(client, "/register", username=mobile, code=wrong(code), password=PASSWORD)
    assert guess["code"] == "sms.code_missing", guess


# ------------------------------------------------------------------ attempt limits


async def test_register_and_forget_attempts_are_limited_per_ip(
    client: httpx.AsyncClient, server: Server
) -> None:
    ip = new_ip()
    hourly = server.settings.sms.check_per_ip_hourly
    for i in range(hourly):
        path = "/register" if i % 2 else "/forget"
        body = await post(client, path, ip=ip, username=unique_mobile(), code="123456", password=PASSWORD)
        assert body["code"] == "sms.code_missing", body
    for path in ("/register", "/forget"):
        over = await post(client, path, ip=ip, username=unique_mobile(), code="123456", password=PASSWORD)
        assert over["status"] == 0 and over["code"] == "sms.check_ip_limit", over
        assert 1 <= over["retry_after"] <= 3600 and "请" in over["info"]
    # Another address is not affected; the limited address is free again after the window.
    other = await post(client, "/forget", username=unique_mobile(), code="123456", password=PASSWORD)
    assert other["code"] == "sms.code_missing"
    server.clock.advance(3601)
    later = await post(client, "/forget", ip=ip, username=unique_mobile(), code="123456", password=PASSWORD)
    assert later["code"] == "sms.code_missing"


async def test_register_and_forget_attempts_are_limited_per_number(
    client: httpx.AsyncClient, server: Server
) -> None:
    mobile = unique_mobile()
    await admin_create_user(client, mobile=mobile, password=PASSWORD)
    limit = server.settings.sms.check_per_number_per_15min
    for i in range(limit):
        path = "/register" if i % 2 else "/forget"
        body = await post(client, path, username=mobile, code="123456", password=PASSWORD)
        assert body["code"] == "sms.code_missing", body
    over = await post(client, "/forget", username=mobile, code="123456", password=PASSWORD)
    assert over["status"] == 0 and over["code"] == "sms.check_number_limit", over
    assert 1 <= over["retry_after"] <= 900
    # Even the right code waits out the window: the limit comes before anything else.
    await set_rule(client, mobile, "exempt")
    assert (await send(client, mobile, "repassword"))["status"] == 1
    held = await post(
        client, "/forget", username=mobile, code=await latest_code(client, mobile), password="x-pass-1"
    )
    assert held["code"] == "sms.check_number_limit", held
    assert (await post(client, "/forget", username=unique_mobile(), code="1", password=PASSWORD))[
        "code"
    ] == "sms.code_missing"  # another number is not affected
    server.clock.advance(901)
    assert (await send(client, mobile, "repassword"))["status"] == 1
    code = await latest_code(client, mobile)
    assert (await post(client, "/forget", username=mobile, code=code, password="new-pass-1"))["status"] == 1


async def test_password_login_is_limited_per_ip(server: Server) -> None:
    async with other_server(server, login=LoginSettings(per_ip_hourly=3)) as http:
        ip = new_ip()
        for _ in range(3):
            body = await post(http, "/public/login", ip=ip, username=unique_mobile(), password=PASSWORD)
            assert body["code"] == "login.failed"
        over = await post(http, "/public/login", ip=ip, username=unique_mobile(), password=PASSWORD)
        assert over["code"] == "login.too_frequent" and over["retry_after"] > 0


# ------------------------------------------------------------------ the hashing limiter


async def test_hashing_is_bounded_and_wrong_codes_never_reach_it(server: Server) -> None:
    """One hash at a time and no queue: concurrent logins beyond it are told `busy`, at once;
    wrong codes are refused before any hashing, so they are never busy."""
    login = LoginSettings(hash_concurrency=1, hash_queue=0)
    async with other_server(server, login=login) as http:
        accounts = [unique_mobile() for _ in range(6)]
        for mobile in accounts:
            await admin_create_user(http, mobile=mobile, password=PASSWORD)
        guessed = [unique_mobile() for _ in range(6)]
        codes = {}
        for mobile in guessed:
            await admin_create_user(http, mobile=mobile, password=PASSWORD)
            assert (await send(http, mobile, "repassword"))["status"] == 1
            codes[mobile] = await latest_code(http, mobile)

        async with httpx.AsyncClient(base_url=str(http.base_url), timeout=30) as burst:
            logins = [post(burst, "/public/login", username=m, password=PASSWORD) for m in accounts]
            guesses = [
                post(burst, "/forget", username=m, code=wrong(codes[m]), password="new-pass-1")
                for m in guessed
            ]
            answers = await asyncio.gather(*logins, *guesses)

        logged, refused = answers[: len(accounts)], answers[len(accounts) :]
        busy = [a for a in logged if a["status"] == 0]
        assert busy and len(busy) < len(logged), logged
        for answer in busy:
            assert answer["code"] == "password.busy" and answer["retry_after"] >= 1, answer
        assert all(a["code"] == "sms.code_wrong" for a in refused), refused
        # "Busy" only asks for a retry: the same login goes through once the hasher is free.
        for mobile, answer in zip(accounts, logged, strict=True):
            if answer["status"] == 0:
                assert (await post(http, "/public/login", username=mobile, password=PASSWORD))["status"] == 1


async def test_a_valid_code_is_used_once_under_concurrency(client: httpx.AsyncClient, server: Server) -> None:
    mobile = unique_mobile()
    await admin_create_user(client, mobile=mobile, password=PASSWORD)
    assert (await send(client, mobile, "repassword"))["status"] == 1
    code = await latest_code(client, mobile)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as burst:
        answers = await asyncio.gather(
            *(post(burst, "/forget", username=mobile, code=code, password=f"new-pass-{i}") for i in range(4))
        )
    done = [i for i, a in enumerate(answers) if a["status"] == 1]
    assert len(done) == 1, answers
    assert {a["code"] for a in answers if a["status"] == 0} <= {"sms.code_used", "password.busy"}, answers
    # The password written is the one of the request that used the code.
    login = await post(client, "/public/login", username=mobile, password=f"new-pass-{done[0]}")
    assert login["status"] == 1, login


# ------------------------------------------------------------------ the server secret


async def test_code_hashes_need_the_server_secret(client: httpx.AsyncClient, server: Server) -> None:
    mobile = unique_mobile()
    assert (await send(client, mobile))["status"] == 1
    code = await latest_code(client, mobile)
    stored = (await code_row(server, mobile, "register"))["code_hash"]
    salt_hex, _, digest = stored.partition("$")
    # A database dump alone no longer gives the code: HMAC keyed with the stored salt does not match.
    salted = hmac.new(bytes.fromhex(salt_hex), code.encode(), hashlib.sha256).hexdigest()
    assert salted != digest
    assert sms_codes.code_matches(file_key(server), stored, code)
    assert not sms_codes.code_matches(b"another key of at least 32 characters", stored, code)


async def test_the_secret_file_is_private_and_reused(client: httpx.AsyncClient, server: Server) -> None:
    path = server.settings.var_dir / secret_key.FILE_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(file_key(server)) >= secret_key.MIN_LENGTH
    before = path.read_bytes()
    # A second server on the same var/ reads the same key: a code sent by one is redeemed on the other.
    mobile = unique_mobile()
    assert (await send(client, mobile))["status"] == 1
    async with other_server(server) as http:
        body = await post(
            http, "/register", username=mobile, code=await latest_code(client, mobile), password=PASSWORD
        )
    assert body["status"] == 1, body
    assert path.read_bytes() == before


async def test_the_secret_key_setting_is_honoured(client: httpx.AsyncClient, server: Server) -> None:
    given = "k" * 24 + "0123456789abcdef"
    mobile = unique_mobile()
    await set_rule(client, mobile, "exempt")
    assert (await send(client, mobile))["status"] == 1
    code = await latest_code(client, mobile)
    async with other_server(server, secret_key=given) as http:
        # A code hashed with another key does not open the door (fails closed, as a wrong code).
        refused = await post(http, "/register", username=mobile, code=code, password=PASSWORD)
        assert refused["code"] == "sms.code_wrong", refused
        other = unique_mobile()
        assert (await send(http, other))["status"] == 1
        fresh = await latest_code(http, other)
        stored = (await code_row(server, other, "register"))["code_hash"]
        assert sms_codes.code_matches(given.encode(), stored, fresh)
        assert not sms_codes.code_matches(file_key(server), stored, fresh)
        assert (await post(http, "/register", username=other, code=fresh, password=PASSWORD))["status"] == 1


def test_a_short_secret_key_is_refused() -> None:
    with pytest.raises(ValidationError, match="secret_key"):
        Settings(_env_file=None, secret_key="too-short")  # type: ignore[call-arg]


def test_workers_starting_together_share_one_key(tmp_path: Path) -> None:
    path = tmp_path / "var" / secret_key.FILE_NAME
    keys: list[bytes] = []
    start = threading.Barrier(8)

    def worker() -> None:
        start.wait()
        keys.append(secret_key.load_or_create(path))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(keys) == 8 and len(set(keys)) == 1 and len(keys[0]) >= secret_key.MIN_LENGTH
    assert path.read_bytes().strip() == keys[0]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(path.parent) == [secret_key.FILE_NAME]  # no temporary file left behind
    assert secret_key.load_or_create(path) == keys[0]


def test_a_damaged_secret_file_stops_start_up(tmp_path: Path) -> None:
    path = tmp_path / secret_key.FILE_NAME
    path.write_text("short")
    with pytest.raises(secret_key.SecretKeyError, match=str(path)):
        secret_key.load_or_create(path)


# ------------------------------------------------------------------ control characters


@pytest.mark.parametrize(
    ("path", "fields"),
    [
        ("/public/login", {"username": "\x00abc", "password": PASSWORD}),
        ("/public/login", {"username": "13800000000", "password": "pass\x00word"}),
        ("/register", {"username": "138\x000000000", "code": "123456", "password": PASSWORD}),
        ("/forget", {"username": unique_mobile(), "code": "12\x1b3456", "password": PASSWORD}),
    ],
)
async def test_control_characters_are_refused(
    client: httpx.AsyncClient, path: str, fields: dict[str, str]
) -> None:
    response = await client.post(f"/api{path}", data=fields, headers={"X-Forwarded-For": new_ip()})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == 0 and body["code"] == "param.invalid", body
    assert "控制字符" in body["info"] and body["field"] in fields
