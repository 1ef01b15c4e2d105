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
        return value

    def integer(self, name: str, *, required: bool = True, minimum: int = 1) -> int | None:
        value = self.get(name)
        if value is None or value == "":
            if required:
                raise ApiError(f"缺少参数 {name}", "param.missing", field=name)
            return None
        if isinstance(value, bool) or not re.fullmatch(r"-?\d{1,18}", str(value).strip()):
            raise ApiError(f"参数 {name} 应为整数", "param.invalid", field=name)
        number = int(str(value).strip())
        if number < minimum:
            raise ApiError(f"参数 {name} 超出范围", "param.invalid", field=name)
        return number


def parse_amount(value: Any, name: str = "amount") -> Decimal:
    """Yuan with at most two decimals, positive; floats from JSON are refused, being inexact."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ApiError(f'参数 {name} 应为金额字符串，如 "9.90"', "param.invalid", field=name)
    text = str(value).strip()
    if not re.fullmatch(r"\d{1,10}(\.\d{1,2})?", text):
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
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
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
