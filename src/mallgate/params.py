"""Parameters from the query string, an urlencoded form or a JSON body, whichever the client sent.

Also the typed readers every route uses, so that a bad id or amount gets the
same clear `info` everywhere.
"""

from __future__ import annotations

import json
import re
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import parse_qsl

from fastapi import Request

from mallgate.envelope import ApiError

_FORM = "application/x-www-form-urlencoded"
# json.loads recurses once per level (200,000 `[` is a RecursionError), and nothing a client
# sends needs more than a few levels.
MAX_JSON_DEPTH = 32
_JSON_ESCAPE = re.compile(rb"\\.", re.DOTALL)
_JSON_STRING = re.compile(rb'"[^"]*"')
_ONE_BRACKET = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))


def ascii_int(text: str, max_digits: int = 18) -> int | None:
    """`text` as a number if it is 1 to `max_digits` ASCII digits, else None.

    `str.isdigit()` and `\\d` take any Unicode digit: `int()` then fails on some ('²', a 500)
    and reads others ('١'). The API document's numbers are ASCII.
    """
    if 0 < len(text) <= max_digits and text.isascii() and text.isdigit():
        return int(text)
    return None


def json_too_deep(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the JSON's arrays and objects nest deeper than `limit` (or never pair up).

    At C speed, as a 1 MiB body may be all brackets: strings are cut out, the brackets kept,
    and the innermost pairs removed, at most `limit` rounds.
    """
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    unquoted = _JSON_STRING.sub(b"", _JSON_ESCAPE.sub(b"", body))
    brackets = unquoted.translate(_ONE_BRACKET, _NOT_BRACKETS)
    for _ in range(limit):
        inner_removed = brackets.replace(b"[]", b"")
        if not inner_removed:
            return False
        if len(inner_removed) == len(brackets):
            return True  # nothing pairs up any more
        brackets = inner_removed
    return True


class Params(dict[str, Any]):
    """Merged request parameters; body values win over query values."""

    def text(self, name: str, *, required: bool = True, max_length: int = 255, default: str = "") -> str:
        value = self.get(name)
        if value is None or value == "":
            if required:
                raise ApiError(f"缺少参数 {name}", "param.missing", field=name)
            return default
        if not isinstance(value, str | int):
            raise ApiError(f"参数 {name} 应为字符串", "param.invalid", field=name)
        value = str(value).strip()
        if len(value) > max_length:
            raise ApiError(f"参数 {name} 过长", "param.too_long", field=name)
        # No field of the API holds control characters, and NUL breaks PostgreSQL (a 500).
        if any(ord(char) < 0x20 or char == "\x7f" for char in value):
            raise ApiError(f"参数 {name} 含有控制字符", "param.invalid", field=name)
        return value

    def integer(self, name: str, *, required: bool = True, minimum: int = 1) -> int | None:
        value = self.get(name)
        if value is None or value == "":
            if required:
                raise ApiError(f"缺少参数 {name}", "param.missing", field=name)
            return None
        text = str(value).strip()
        number = None if isinstance(value, bool) else ascii_int(text.removeprefix("-"))
        if number is None:
            raise ApiError(f"参数 {name} 应为整数", "param.invalid", field=name)
        if text.startswith("-"):
            number = -number
        if number < minimum:
            raise ApiError(f"参数 {name} 超出范围", "param.invalid", field=name)
        return number


def parse_amount(value: Any, name: str = "amount") -> Decimal:
    """Yuan with at most two decimals, positive; floats from JSON are refused, being inexact."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ApiError(f'参数 {name} 应为金额字符串，如 "9.90"', "param.invalid", field=name)
    text = str(value).strip()
    if not re.fullmatch(r"[0-9]{1,10}(\.[0-9]{1,2})?", text):
        raise ApiError(f"参数 {name} 应为最多两位小数的正数金额", "param.invalid", field=name)
    try:
        amount = Decimal(text).quantize(Decimal("0.01"))
    except InvalidOperation as exc:
        raise ApiError(f"参数 {name} 不是金额", "param.invalid", field=name) from exc
    if amount <= 0:
        raise ApiError(f"参数 {name} 必须大于 0", "param.invalid", field=name)
    return amount


async def read_params(request: Request) -> Params:
    """The merged parameters of a request (a FastAPI dependency)."""
    params = Params(request.query_params)
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return params
    body = await request.body()
    if not body:
        return params
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json" or (not ctype and body.lstrip()[:1] in (b"{", b"[")):
        if json_too_deep(body):
            raise ApiError(f"JSON 请求体嵌套不能超过 {MAX_JSON_DEPTH} 层", "body.invalid_json")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            # RecursionError: a UTF-16 body can hide its brackets from the byte scan above.
            raise ApiError("请求体不是合法的 JSON", "body.invalid_json") from exc
        if not isinstance(data, dict):
            raise ApiError("JSON 请求体应为对象", "body.invalid_json")
        params.update(data)
    elif ctype == _FORM or not ctype:
        try:
            params.update(parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False))
        except UnicodeDecodeError as exc:
            raise ApiError("表单不是 UTF-8 编码", "body.invalid_form") from exc
    elif ctype == "multipart/form-data":
        form = await request.form()
        params.update({k: v for k, v in form.items() if isinstance(v, str)})
    else:
        raise ApiError(f"不支持的内容类型 {ctype}", "body.unsupported_type", http_status=415)
    return params
