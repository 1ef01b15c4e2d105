"""send_sms and the code checks, end to end: the real app over HTTP, the code read back from the SMS stand-in.

The test server's SMS provider is the sandbox (the Aliyun protocol against the
stand-in mounted in the same server). Every test uses its own numbers and its
own client IP (X-Forwarded-For, trusted from 127.0.0.1 as uvicorn does by
default), so the shared server's counters never mix tests.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from conftest import Server, TestClock, other_server
from mallgate.channels.sms import SANDBOX_ALIYUN
from mallgate.db.models import SmsCode
from mallgate.db.session import Database
from mallgate.sandbox.sms_standin import SANDBOX_TENCENT
from mallgate.settings import SmsSettings
from support import admin_create_user, unique_mobile

PASSWORD = "secret-123"


def new_ip() -> str:
    return f"10.{secrets.randbelow(256)}.{secrets.randbelow(256)}.{1 + secrets.randbelow(254)}"


async def send(
    client: httpx.AsyncClient, mobile: str, purpose: str = "register", ip: str | None = None
) -> dict[str, Any]:
    response = await client.get(
        "/api/send_sms",
        params={"username": mobile, "type": purpose},
        headers={"X-Forwarded-For": ip or new_ip()},
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def messages(client: httpx.AsyncClient, mobile: str) -> list[dict[str, Any]]:
    response = await client.get("/_sandbox/sms/messages", params={"mobile": mobile})
    found: list[dict[str, Any]] = response.json()["messages"]
    return found


async def latest_code(client: httpx.AsyncClient, mobile: str) -> str:
    found = await messages(client, mobile)
    assert found, f"no SMS reached {mobile}"
    code: str = found[0]["code"]
    assert code in found[0]["text"]
    return code


async def set_rule(client: httpx.AsyncClient, mobile: str, rule: str) -> None:
    response = await client.post("/_sandbox/sms/rules", json={"mobile": mobile, "rule": rule})
    assert response.status_code == 200, response.text


async def post(client: httpx.AsyncClient, path: str, ip: str | None = None, **params: Any) -> dict[str, Any]:
    response = await client.post(f"/api{path}", data=params, headers={"X-Forwarded-For": ip or new_ip()})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def register(
    client: httpx.AsyncClient, mobile: str | None = None, password: str = PASSWORD, **extra: Any
) -> dict[str, Any]:
    """A new user through send_sms + register; its profile."""
    mobile = mobile or unique_mobile()
    sent = await send(client, mobile)
    assert sent["status"] == 1, sent
    body = await post(
        client,
        "/register",
        username=mobile,
        code=await latest_code(client, mobile),
        password=password,
        **extra,
    )
    assert body["status"] == 1, body
    profile: dict[str, Any] = body["data"]
    return profile


def wrong(code: str) -> str:
    return f"{(int(code) + 1) % 10**6:06d}"


@asynccontextmanager
async def burst_client(server: Server) -> AsyncIterator[httpx.AsyncClient]:
    """A client of its own for a burst, so that the shared client's pool does not fill with connections
    that sit idle until uvicorn's keep-alive timeout closes them just as one is reused."""
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        yield http


def assert_limited(body: dict[str, Any], code: str, at_most: int) -> None:
    assert body["status"] == 0, body
    assert body["code"] == code, body
    assert 1 <= body["retry_after"] <= at_most, body
    assert re.search(r"请 \d+ (秒|分钟)后再试", body["info"]), body


# ------------------------------------------------------------------ sending


async def test_send_delivers_a_fresh_six_digit_code_and_never_returns_it(client: httpx.AsyncClient) -> None:
    mobile = unique_mobile()
    response = await client.post(
        "/api/send_sms",
        data={"username": f"+86 {mobile}", "type": "register"},
        headers={"X-Forwarded-For": new_ip()},
    )
    body = response.json()
    assert body == {"info": "验证码已发送", "status": 1}
    code = await latest_code(client, mobile)
    assert re.fullmatch(r"\d{6}", code)
    assert code not in response.text


async def test_parameters_are_checked(client: httpx.AsyncClient) -> None:
    assert (await send(client, "12345", "register"))["code"] == "mobile.invalid"
    assert (await send(client, unique_mobile(), "login"))["code"] == "sms.bad_type"
    missing = (await client.get("/api/send_sms", params={"type": "register"})).json()
    assert missing["status"] == 0 and missing["code"] == "param.missing"


async def test_codes_are_stored_hashed_never_in_clear(client: httpx.AsyncClient, server: Server) -> None:
    mobiles = [unique_mobile() for _ in range(3)]
    for mobile in mobiles:
        assert (await send(client, mobile))["status"] == 1
    codes = {m: await latest_code(client, m) for m in mobiles}
    db = Database(server.settings.resolved_database_url)
    try:
        async with db.read() as session:
            rows = [dict(row._mapping) for row in await session.execute(select(SmsCode.__table__))]
    finally:
        await db.dispose()
    mine = {row["mobile"]: row for row in rows if row["mobile"] in codes}
    assert set(mine) == set(mobiles)
    for row in rows:  # the whole table: no column of any row holds a code
        assert not {str(value) for value in row.values()} & set(codes.values()), row
    for mobile, row in mine.items():
        assert codes[mobile] not in row["code_hash"]
        assert hashlib.sha256(codes[mobile].encode()).hexdigest() not in row["code_hash"]
    # Each row has its own salt, so equal codes would not give equal hashes.
    assert len({row["code_hash"].split("$")[0] for row in mine.values()}) == len(mine)


async def test_one_code_per_number_per_interval(client: httpx.AsyncClient, server: Server) -> None:
    mobile, ip = unique_mobile(), new_ip()
    await set_rule(client, mobile, "exempt")  # the stand-in's own 60 s flow control runs on real time
    assert (await send(client, mobile, ip=ip))["status"] == 1
    again = await send(client, mobile, ip=new_ip())
    assert_limited(again, "sms.too_frequent", 60)
    assert again["info"].startswith("发送过于频繁")
    server.clock.advance(61)
    assert (await send(client, mobile, ip=ip))["status"] == 1
    assert len(await messages(client, mobile)) == 2


async def test_per_number_daily_cap(client: httpx.AsyncClient, server: Server) -> None:
    mobile, ip = unique_mobile(), new_ip()
    await set_rule(client, mobile, "exempt")
    daily = server.settings.sms.per_number_daily
    for _ in range(daily):
        assert (await send(client, mobile, ip=ip))["status"] == 1
        server.clock.advance(61)
    over = await send(client, mobile, ip=new_ip())
    assert_limited(over, "sms.number_daily_limit", 86400)
    assert over["retry_after"] > 86400 - daily * 61 - 5
    assert len(await messages(client, mobile)) == daily
    server.clock.advance(over["retry_after"] + 1)
    assert (await send(client, mobile, ip=ip))["status"] == 1


async def test_per_ip_hourly_cap_is_separate_from_the_numbers(
    client: httpx.AsyncClient, server: Server
) -> None:
    ip = new_ip()
    hourly = server.settings.sms.per_ip_hourly
    mobiles = [unique_mobile() for _ in range(hourly + 1)]
    # Many numbers from one IP within a minute: no number's interval is touched by another's send.
    for mobile in mobiles[:hourly]:
        assert (await send(client, mobile, ip=ip))["status"] == 1
    over = await send(client, mobiles[hourly], ip=ip)
    assert_limited(over, "sms.ip_limit", 3600)
    assert await messages(client, mobiles[hourly]) == []
    # The refused request left the number's counters alone; the IP's count is not the number's.
    assert (await send(client, mobiles[hourly], ip=new_ip()))["status"] == 1
    assert (await send(client, mobiles[0], ip=new_ip()))["code"] == "sms.too_frequent"
    server.clock.advance(3601)
    assert (await send(client, unique_mobile(), ip=ip))["status"] == 1


async def test_twenty_concurrent_requests_send_one_sms(client: httpx.AsyncClient, server: Server) -> None:
    mobile = unique_mobile()
    async with burst_client(server) as burst:
        answers = await asyncio.gather(*(send(burst, mobile, ip=new_ip()) for _ in range(20)))
    assert sorted(a["status"] for a in answers) == [0] * 19 + [1]
    for answer in answers:
        if answer["status"] == 0:
            assert_limited(answer, "sms.too_frequent", 60)
    assert len(await messages(client, mobile)) == 1


async def test_global_daily_cap(server: Server) -> None:
    # A day ahead of every other test: the shared "all numbers" window starts fresh for this server.
    clock = TestClock()
    clock.advance(30 * 86400)
    async with other_server(server, clock, sms=SmsSettings(global_daily=3)) as http:
        for _ in range(3):
            assert (await send(http, unique_mobile()))["status"] == 1
        over = await send(http, unique_mobile())
        assert_limited(over, "sms.global_limit", 86400)
        clock.advance(86401)
        assert (await send(http, unique_mobile()))["status"] == 1


async def test_register_and_repassword_need_the_right_kind_of_number(client: httpx.AsyncClient) -> None:
    registered = unique_mobile()
    await admin_create_user(client, mobile=registered, password=PASSWORD)
    refused = await send(client, registered, "register")
    assert refused == {"info": "该手机号已注册", "status": 0, "code": "sms.registered", "field": "username"}
    assert (await send(client, unique_mobile(), "repassword"))["code"] == "sms.unregistered"
    assert (await send(client, registered, "repassword"))["status"] == 1
    assert len(await messages(client, registered)) == 1


async def test_refusals_count_against_the_ip(client: httpx.AsyncClient, server: Server) -> None:
    # "Is this number registered?" must not be an unlimited oracle.
    ip = new_ip()
    for _ in range(server.settings.sms.per_ip_hourly):
        assert (await send(client, unique_mobile(), "repassword", ip=ip))["code"] == "sms.unregistered"
    assert (await send(client, unique_mobile(), "register", ip=ip))["code"] == "sms.ip_limit"


# ------------------------------------------------------------------ provider failures


async def test_bad_number_at_the_provider_does_not_use_the_slot(client: httpx.AsyncClient) -> None:
    illegal = "1999" + f"{secrets.randbelow(10**7):07d}"
    body = await send(client, illegal)
    assert body == {"info": "该手机号无法接收短信，请检查号码", "status": 0, "code": "sms.bad_number"}

    mobile, ip = unique_mobile(), new_ip()
    await set_rule(client, mobile, "fail")
    assert (await send(client, mobile, ip=ip))["code"] == "sms.bad_number"
    await set_rule(client, mobile, "")
    assert (await send(client, mobile, ip=ip))["status"] == 1  # at once: the failure gave its count back
    assert len(await messages(client, mobile)) == 1


async def test_provider_flow_control_is_too_frequent_and_gives_the_count_back(server: Server) -> None:
    sms = SmsSettings(per_number_interval_seconds=0, per_number_daily=2)
    async with other_server(server, sms=sms) as http:
        mobile = unique_mobile()
        assert (await send(http, mobile))["status"] == 1
        limited = await send(http, mobile)
        assert limited == {"info": "发送过于频繁，请稍后再试", "status": 0, "code": "sms.provider_limited"}
        await set_rule(http, mobile, "exempt")
        assert (await send(http, mobile))[
            "status"
        ] == 1  # the second of two per day: the refusal was not counted
        assert (await send(http, mobile))["code"] == "sms.number_daily_limit"


@contextmanager
def black_hole() -> Iterator[str]:
    """A local port that accepts connections (the kernel's backlog does) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/"


async def test_provider_timeout_answers_in_time_and_keeps_the_slot(server: Server) -> None:
    with black_hole() as url:
        aliyun = SANDBOX_ALIYUN.model_copy(update={"endpoint": url})
        sms = SmsSettings(provider="aliyun", aliyun=aliyun, timeout_seconds=1)
        async with other_server(server, sandbox=False, sms=sms) as http:
            mobile = unique_mobile()
            started = time.monotonic()
            body = await send(http, mobile)
            assert time.monotonic() - started < sms.timeout_seconds + 1
            assert body["status"] == 0 and body["code"] == "sms.provider_timeout", body
            assert "超时" in body["info"]
            # The provider may still deliver: no second code to the number within its interval.
            assert (await send(http, mobile))["code"] == "sms.too_frequent"


@pytest.mark.parametrize("provider", ["aliyun", "tencent"])
async def test_real_providers_against_the_stand_ins(
    server: Server, client: httpx.AsyncClient, provider: str
) -> None:
    base = f"{server.url}/_sandbox"
    if provider == "aliyun":
        sms = SmsSettings(
            provider="aliyun", aliyun=SANDBOX_ALIYUN.model_copy(update={"endpoint": f"{base}/aliyun-sms/"})
        )
    else:
        sms = SmsSettings(
            provider="tencent",
            tencent=SANDBOX_TENCENT.model_copy(update={"endpoint": f"{base}/tencent-sms/"}),
        )
    async with other_server(server, sandbox=False, sms=sms) as http:
        mobile = unique_mobile()
        assert (await send(http, mobile))["status"] == 1
        sent = await messages(client, mobile)
        assert [m["provider"] for m in sent] == [provider]
        profile = (await post(http, "/register", username=mobile, code=sent[0]["code"], password=PASSWORD))[
            "data"
        ]
        assert profile["mobile"] == mobile


# ------------------------------------------------------------------ checking codes


async def _repassword_code(client: httpx.AsyncClient) -> tuple[str, str]:
    mobile = unique_mobile()
    await admin_create_user(client, mobile=mobile, password=PASSWORD)
    assert (await send(client, mobile, "repassword"))["status"] == 1
    return mobile, await latest_code(client, mobile)


async def test_wrong_code_is_refused_and_counted(client: httpx.AsyncClient) -> None:
    mobile, code = await _repassword_code(client)
    body = await post(client, "/forget", username=mobile, code=wrong(code), password="new-pass-1")
    assert body["status"] == 0 and body["code"] == "sms.code_wrong" and body["attempts_left"] == 4, body
    assert (await post(client, "/forget", username=mobile, code=code, password="new-pass-1"))["status"] == 1


async def test_sixth_check_fails_even_with_the_right_code(client: httpx.AsyncClient) -> None:
    mobile, code = await _repassword_code(client)
    for left in (4, 3, 2, 1, 0):
        body = await post(client, "/forget", username=mobile, code=wrong(code), password="new-pass-1")
        assert (body["code"], body["attempts_left"]) == ("sms.code_wrong", left)
    body = await post(client, "/forget", username=mobile, code=code, password="new-pass-1")
    assert body == {
        "info": "验证码错误次数过多，请重新获取",
        "status": 0,
        "code": "sms.code_locked",
        "field": "code",
    }


async def test_concurrent_guesses_cannot_exceed_the_attempts(
    client: httpx.AsyncClient, server: Server
) -> None:
    mobile, code = await _repassword_code(client)
    # As many as the number's attempt limit lets through (sms.check_per_number_per_15min).
    async with burst_client(server) as burst:
        guesses = await asyncio.gather(
            *(
                post(burst, "/forget", username=mobile, code=wrong(code), password="new-pass-1")
                for _ in range(server.settings.sms.check_per_number_per_15min)
            )
        )
    assert sorted(g["code"] for g in guesses) == ["sms.code_locked"] * 5 + ["sms.code_wrong"] * 5


async def test_expired_code(client: httpx.AsyncClient, server: Server) -> None:
    mobile, code = await _repassword_code(client)
    server.clock.advance(301)
    body = await post(client, "/forget", username=mobile, code=code, password="new-pass-1")
    assert body["code"] == "sms.code_expired" and body["info"] == "验证码已过期，请重新获取"


async def test_code_is_single_use(client: httpx.AsyncClient) -> None:
    mobile, code = await _repassword_code(client)
    assert (await post(client, "/forget", username=mobile, code=code, password="new-pass-1"))["status"] == 1
    again = await post(client, "/forget", username=mobile, code=code, password="new-pass-2")
    assert again["code"] == "sms.code_used" and again["info"] == "验证码已使用，请重新获取"


async def test_a_new_code_replaces_the_old(client: httpx.AsyncClient, server: Server) -> None:
    mobile, old = await _repassword_code(client)
    await set_rule(client, mobile, "exempt")
    server.clock.advance(61)
    assert (await send(client, mobile, "repassword"))["status"] == 1
    new = await latest_code(client, mobile)
    if new != old:
        assert (await post(client, "/forget", username=mobile, code=old, password="new-pass-1"))["code"] == (
            "sms.code_wrong"
        )
    assert (await post(client, "/forget", username=mobile, code=new, password="new-pass-1"))["status"] == 1


async def test_no_code_sent(client: httpx.AsyncClient) -> None:
    body = await post(client, "/register", username=unique_mobile(), code="123456", password=PASSWORD)
    assert body["code"] == "sms.code_missing"


async def test_codes_are_bound_to_their_purpose(client: httpx.AsyncClient) -> None:
    mobile = unique_mobile()
    await set_rule(client, mobile, "exempt")
    assert (await send(client, mobile, "register"))["status"] == 1
    code = await latest_code(client, mobile)
    await admin_create_user(client, mobile=mobile, password=PASSWORD)  # registered meanwhile
    body = await post(client, "/forget", username=mobile, code=code, password="new-pass-1")
    assert body["code"] == "sms.code_missing"  # a register code does not reset a password
