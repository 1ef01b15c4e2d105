"""`qrcode`: decodes back to its data, ETag/304, bounds, rate limit, never fetches."""

from __future__ import annotations

import asyncio
import io

import httpx
import zxingcpp
from PIL import Image

from conftest import Server, other_server
from mallgate.settings import QrcodeSettings


def decode(png: bytes) -> str:
    results = zxingcpp.read_barcodes(Image.open(io.BytesIO(png)))
    assert len(results) == 1, results
    text: str = results[0].text
    return text


async def test_png_decodes_back_to_the_data(client: httpx.AsyncClient) -> None:
    for data in ("https://shop.example.com/goods/42?spread_id=7", "你好，商城", "x" * 1024):
        response = await client.get("/api/qrcode", params={"data": data})
        assert response.status_code == 200
        assert response.headers["content-type"] == "image/png"
        assert decode(response.content) == data


async def test_size_and_margin_change_the_image(client: httpx.AsyncClient) -> None:
    small = await client.get("/api/qrcode", params={"data": "abc", "size": "2", "margin": "0"})
    large = await client.get("/api/qrcode", params={"data": "abc", "size": "10", "margin": "4"})
    w_small = Image.open(io.BytesIO(small.content)).size[0]
    w_large = Image.open(io.BytesIO(large.content)).size[0]
    assert w_small == 21 * 2  # version 1: 21 modules, no margin
    assert w_large == (21 + 8) * 10
    assert decode(large.content) == "abc"
    assert small.headers["etag"] != large.headers["etag"]


async def test_etag_and_304(client: httpx.AsyncClient) -> None:
    first = await client.get("/api/qrcode", params={"data": "etag-test"})
    etag = first.headers["etag"]
    assert "max-age" in first.headers["cache-control"]
    again = await client.get("/api/qrcode", params={"data": "etag-test"}, headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""
    other = await client.get("/api/qrcode", params={"data": "etag-test2"}, headers={"If-None-Match": etag})
    assert other.status_code == 200


async def test_bounds_and_bad_input(client: httpx.AsyncClient) -> None:
    cases = [
        ({"data": "x" * 1025}, "qrcode.data_too_long"),
        ({"data": "中" * 342}, "qrcode.data_too_long"),  # 1026 bytes in UTF-8
        ({}, "param.missing"),
        ({"data": "a", "size": "0"}, "param.invalid"),
        ({"data": "a", "size": "21"}, "param.invalid"),
        ({"data": "a", "size": "abc"}, "param.invalid"),
        ({"data": "a", "margin": "-1"}, "param.invalid"),
        ({"data": "a", "level": "z"}, "param.invalid"),
    ]
    for params, code in cases:
        response = await client.get("/api/qrcode", params=params)
        assert response.status_code == 200
        assert response.json()["status"] == 0 and response.json()["code"] == code, params


async def test_rate_limited_per_ip(server: Server) -> None:
    async with other_server(server, qrcode=QrcodeSettings(per_ip_per_minute=5)) as http:
        answers = [await http.get("/api/qrcode", params={"data": f"n{i}"}) for i in range(7)]
    assert [a.status_code for a in answers[:5]] == [200] * 5
    refused = answers[5].json()
    assert refused["status"] == 0 and refused["code"] == "qrcode.too_frequent" and refused["retry_after"] >= 1


async def test_never_fetches_the_url_it_encodes(client: httpx.AsyncClient) -> None:
    touched: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        touched.append(await reader.read(100))
        writer.close()

    listener = await asyncio.start_server(record, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        url = f"http://127.0.0.1:{port}/secret"
        response = await client.get("/api/qrcode", params={"data": url})
        assert decode(response.content) == url
        await asyncio.sleep(0.2)
        assert touched == []
    finally:
        listener.close()
