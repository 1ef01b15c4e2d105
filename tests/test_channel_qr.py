"""QR rendering: what we draw must scan back to the text, and the fast path must equal segno's."""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import pytest
import segno
import zxingcpp
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from mallgate.channels.qr import MAX_DATA_BYTES, QrCache, QrDataTooLong, make_matrix, render_png

CHINESE = "欢迎光临商城！扫码查看商品详情：精品茶叶礼盒装"
ASCII_1024 = "".join(chr(0x21 + i % 94) for i in range(1024))
CHINESE_1024 = "商" * 341 + "x"  # 341 * 3 + 1 bytes


def scan(png: bytes) -> zxingcpp.Barcode:
    image = Image.open(io.BytesIO(png))
    image.load()
    results = zxingcpp.read_barcodes(image)
    assert len(results) == 1, "expected exactly one barcode in the image"
    assert results[0].format == zxingcpp.BarcodeFormat.QRCode
    return results[0]


def decode(png: bytes) -> str:
    text: str = scan(png).text
    return text


@pytest.mark.parametrize(
    "data",
    [
        "hello",
        "https://mall.example.com/pages/goods/detail?id=12345&spread_id=678",
        "0123456789",
        CHINESE,
        "café ¥100",
        ASCII_1024,
        CHINESE_1024,
    ],
    ids=["ascii", "url", "numeric", "chinese", "latin1", "ascii-1024", "chinese-1024"],
)
def test_png_scans_back(data: str) -> None:
    assert len(data.encode()) <= MAX_DATA_BYTES
    png = render_png(data, scale=4, border=4)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert decode(png) == data


@pytest.mark.parametrize("error", ["l", "m", "q", "h", "H"])
def test_error_levels_scan(error: str) -> None:
    assert decode(render_png("https://mall.example.com/", scale=3, border=2, error=error)) == (
        "https://mall.example.com/"
    )


def test_unknown_error_level() -> None:
    with pytest.raises(ValueError, match="error level"):
        render_png("x", scale=2, border=2, error="x")


def test_size_follows_scale_and_border() -> None:
    width = len(make_matrix("hello"))
    for scale, border in [(1, 0), (3, 4), (10, 1), (7, 0)]:
        with Image.open(io.BytesIO(render_png("hello", scale=scale, border=border))) as image:
            assert image.size == ((width + 2 * border) * scale,) * 2


def test_pixels_equal_segno_png() -> None:
    """Our PNG writer draws exactly what segno's own writer draws."""
    data = "https://mall.example.com/pages/goods/detail?id=1"
    ours = Image.open(io.BytesIO(render_png(data, scale=5, border=3))).convert("L")
    reference = io.BytesIO()
    segno.make(data, error="m", micro=False).save(reference, kind="png", scale=5, border=3)
    theirs = Image.open(reference).convert("L")
    assert ours.size == theirs.size
    assert ours.tobytes() == theirs.tobytes()


def test_png_chunks_are_valid() -> None:
    png = render_png("crc", scale=2, border=1)
    offset = 8
    kinds = []
    while offset < len(png):
        (length,) = struct.unpack(">I", png[offset : offset + 4])
        kind_and_body = png[offset + 4 : offset + 8 + length]
        (crc,) = struct.unpack(">I", png[offset + 8 + length : offset + 12 + length])
        assert zlib.crc32(kind_and_body) == crc
        kinds.append(kind_and_body[:4])
        offset += 12 + length
    assert kinds == [b"IHDR", b"IDAT", b"IEND"]


qr_text = st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=200)


@settings(max_examples=150, deadline=None)
@given(data=qr_text, error=st.sampled_from("lmqh"))
def test_matrix_equals_segno_with_its_own_mask_choice(data: str, error: str) -> None:
    """The fast mask selection picks segno's mask, so the symbol is segno's, module for module."""
    kwargs: dict[str, Any] = {} if data.isascii() else {"mode": "byte", "encoding": "utf-8"}
    reference = segno.make(data, error=error, micro=False, **kwargs)
    assert make_matrix(data, error) == tuple(reference.matrix)  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None)
@given(data=qr_text)
def test_any_text_scans_back(data: str) -> None:
    # Raw bytes, because zxing shows control characters as "<US>" in `text`;
    # the bytes are the UTF-8 of the text because that is what we encode.
    assert scan(render_png(data, scale=3, border=4)).bytes == data.encode("utf-8")


def test_more_than_1024_bytes_is_refused() -> None:
    with pytest.raises(QrDataTooLong):
        render_png("a" * 1025, scale=2, border=2)
    with pytest.raises(QrDataTooLong):
        render_png("商" * 342, scale=2, border=2)  # 1026 bytes in 342 characters
    with pytest.raises(ValueError):  # QrDataTooLong is a ValueError for callers that only know that
        render_png("a" * 2000, scale=2, border=2)


def test_bad_scale_or_border() -> None:
    with pytest.raises(ValueError):
        render_png("x", scale=0, border=2)
    with pytest.raises(ValueError):
        render_png("x", scale=2, border=-1)


def test_cache_hits_and_lru_eviction() -> None:
    cache = QrCache(max_entries=2)
    a = cache.render("a", scale=2, border=1)
    assert cache.render("a", scale=2, border=1) is a
    assert (cache.hits, cache.misses) == (1, 1)
    cache.render("b", scale=2, border=1)
    cache.render("a", scale=2, border=1)  # "a" is now the most recent
    cache.render("c", scale=2, border=1)  # evicts "b", the least recent
    assert ("a", 2, 1, "m") in cache
    assert ("c", 2, 1, "m") in cache
    assert ("b", 2, 1, "m") not in cache
    assert len(cache) == 2


def test_cache_key_includes_every_parameter() -> None:
    cache = QrCache(max_entries=10)
    pngs = {
        cache.render("a", scale=2, border=1),
        cache.render("a", scale=3, border=1),
        cache.render("a", scale=2, border=2),
    }
    assert len(pngs) == 3
    # segno raises the level when it fits the same version, so "a" looks the
    # same at m and h; the key must still tell them apart.
    cache.render("a", scale=2, border=1, error="h")
    assert len(cache) == 4
    assert cache.render("a", scale=2, border=1, error="H") == cache.render("a", scale=2, border=1, error="h")
    assert len(cache) == 4


def test_cache_of_size_zero_stores_nothing() -> None:
    cache = QrCache(max_entries=0)
    assert decode(cache.render("z", scale=3, border=4)) == "z"
    assert len(cache) == 0
