"""register, forget and public/login, end to end through the real app with codes from the SMS stand-in."""

from __future__ import annotations

import re

import httpx
from test_sms import PASSWORD, latest_code, post, register, send, set_rule

from conftest import Server
from support import PROFILE_KEYS, admin_create_user, admin_get_user, unique_mobile


async def user_info(client: httpx.AsyncClient, token: str) -> httpx.Response:
    return await client.get("/api/user/info", headers={"Auth-Token": token})


async def test_register_answers_the_profile_with_a_working_token(client: httpx.AsyncClient) -> None:
    mobile = unique_mobile()
    profile = await register(client, mobile)
    assert set(profile) == PROFILE_KEYS
    assert all(isinstance(v, str) for v in profile.values())
    assert profile["mobile"] == profile["username"] == mobile
    assert profile["amount"] == "0.00"
    assert re.fullmatch(r"[0-9a-f]{40}", profile["token"])
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}", profile["last_login"])
    info = await user_info(client, profile["token"])
    assert info.status_code == 200 and info.json()["data"]["id"] == profile["id"]


async def test_register_twice_is_refused(client: httpx.AsyncClient) -> None:
    mobile = unique_mobile()
    assert (await send(client, mobile))["status"] == 1
    code = await latest_code(client, mobile)
    assert (await post(client, "/register", username=mobile, code=code, password=PASSWORD))["status"] == 1
    # The code is spent: the number's state is not told again (see test_hardening_accounts).
    again = await post(client, "/register", username=mobile, code=code, password=PASSWORD)
    assert (
        again["status"] == 0
        and again["code"] == "sms.code_used"
        and again["info"] == "验证码已使用，请重新获取"
    )


async def test_register_refused_for_a_number_registered_meanwhile(client: httpx.AsyncClient) -> None:
    mobile = unique_mobile()
    assert (await send(client, mobile))["status"] == 1
    code = await latest_code(client, mobile)
    await admin_create_user(client, mobile=mobile)
    body = await post(client, "/register", username=mobile, code=code, password=PASSWORD)
    assert body["code"] == "sms.registered"


async def test_a_bad_password_does_not_use_up_the_code(client: httpx.AsyncClient) -> None:
    mobile = unique_mobile()
    assert (await send(client, mobile))["status"] == 1
    code = await latest_code(client, mobile)
    short = await post(client, "/register", username=mobile, code=code, password="123")
    assert short["status"] == 0 and short["code"] == "password.invalid"
    assert (await post(client, "/register", username=mobile, code=code, password=PASSWORD))["status"] == 1


async def test_forget_needs_a_code_before_anything(client: httpx.AsyncClient) -> None:
    # send_sms gives `repassword` codes to registered numbers only; without one, forget says just that.
    body = await post(client, "/forget", username=unique_mobile(), code="123456", password=PASSWORD)
    assert body["status"] == 0 and body["code"] == "sms.code_missing"


async def test_register_login_forget_revokes_old_tokens(client: httpx.AsyncClient, server: Server) -> None:
    mobile = unique_mobile()
    await set_rule(client, mobile, "exempt")
    first = await register(client, mobile)
    login = await post(client, "/public/login", username=mobile, password=PASSWORD)
    assert login["status"] == 1 and set(login["data"]) == PROFILE_KEYS
    second = login["data"]["token"]
    assert second != first["token"]
    assert (await user_info(client, second)).status_code == 200

    server.clock.advance(61)  # one code per number per minute, whatever its purpose
    assert (await send(client, mobile, "repassword"))["status"] == 1
    reset = await post(
        client, "/forget", username=mobile, code=await latest_code(client, mobile), password="brand-new-9"
    )
    assert reset["status"] == 1 and "data" not in reset

    for old in (first["token"], second):
        answer = await user_info(client, old)
        assert answer.status_code == 401 and answer.json()["status"] == 0
    stale = await post(client, "/public/login", username=mobile, password=PASSWORD)
    assert stale["status"] == 0 and stale["info"] == "账号或密码错误"
    fresh = await post(client, "/public/login", username=mobile, password="brand-new-9")
    assert fresh["status"] == 1
    assert (await user_info(client, fresh["data"]["token"])).status_code == 200


async def test_login_does_not_tell_unknown_accounts_from_wrong_passwords(client: httpx.AsyncClient) -> None:
    mobile = unique_mobile()
    await admin_create_user(client, mobile=mobile, password=PASSWORD)
    without_password = unique_mobile()
    await admin_create_user(client, mobile=without_password)
    answers = [
        await post(client, "/public/login", username=mobile, password="not-the-password"),
        await post(client, "/public/login", username=unique_mobile(), password=PASSWORD),
        await post(client, "/public/login", username=without_password, password=PASSWORD),
        await post(client, "/public/login", username="nobody", password=PASSWORD),
    ]
    assert all(a == {"info": "账号或密码错误", "status": 0, "code": "login.failed"} for a in answers), answers
    ok = await post(client, "/public/login", username=f"+86{mobile}", password=PASSWORD)
    assert ok["status"] == 1 and ok["data"]["mobile"] == mobile


async def test_spread_id_recorded_on_first_creation_only_and_only_for_a_real_user(
    client: httpx.AsyncClient, server: Server
) -> None:
    referrer = await admin_create_user(client, mobile=unique_mobile())
    other = await admin_create_user(client, mobile=unique_mobile())

    referred = await register(client, spread_id=referrer["id"])
    assert (await admin_get_user(client, referred["id"]))["spread_id"] == referrer["id"]

    stranger = await register(client, spread_id="999999999")
    assert (await admin_get_user(client, stranger["id"]))["spread_id"] == ""
    for junk in ("0", "undefined", ""):
        assert (await admin_get_user(client, (await register(client, spread_id=junk))["id"]))[
            "spread_id"
        ] == ""

    # Later requests naming another referrer change nothing.
    mobile = referred["mobile"]
    again = await post(
        client, "/register", username=mobile, code="000000", password=PASSWORD, spread_id=other["id"]
    )
    assert again["status"] == 0
    await post(client, "/public/login", username=mobile, password=PASSWORD, spread_id=other["id"])
    await set_rule(client, mobile, "exempt")
    server.clock.advance(61)
    assert (await send(client, mobile, "repassword"))["status"] == 1
    code = await latest_code(client, mobile)
    await post(client, "/forget", username=mobile, code=code, password=PASSWORD, spread_id=other["id"])
    assert (await admin_get_user(client, referred["id"]))["spread_id"] == referrer["id"]


async def test_password_guessing_is_braked_per_account(client: httpx.AsyncClient) -> None:
    mobile = unique_mobile()
    await register(client, mobile)
    answers = [
        await post(client, "/public/login", username=mobile, password=f"wrong{i:03d}") for i in range(10)
    ]
    assert all(a["code"] == "login.failed" for a in answers)
    # The eleventh attempt within 15 minutes is refused before the password is even checked.
    braked = await post(client, "/public/login", username=mobile, password=PASSWORD)
    assert braked["status"] == 0 and braked["code"] == "login.too_frequent" and braked["retry_after"] > 0
    # Another account is not affected.
    other = unique_mobile()
    await register(client, other)
    assert (await post(client, "/public/login", username=other, password=PASSWORD))["status"] == 1
