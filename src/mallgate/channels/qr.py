"""QR codes as PNG: segno encodes, this module picks the mask and writes the PNG.

segno is correct but spends ~85 % of an encode scoring the eight data masks in
pure Python, and its PNG writer walks every pixel row; together that is slower
than the `qrcode` package. So: segno encodes once with mask 0, we score all
eight masks at once on big integers (the same ISO/IEC 18004 §7.8.3 penalty
rules segno uses, so the chosen mask is the one segno would choose), let segno
encode again with that mask when it is not 0 (so format and version
information stay segno's), and serialise the matrix with a small PNG writer
that builds each module row once and repeats it with the PNG "Up" filter.
"""

from __future__ import annotations

import re
import struct
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import segno
from segno import encoder as _segno_encoder

# segno's encoder helpers are untyped; they are the building blocks segno's own
# make() uses, and the tests pin our result to make()'s module for module.
segno_encoder: Any = _segno_encoder

MAX_DATA_BYTES = 1024
ErrorLevel = Literal["l", "m", "q", "h"]
_ERROR_LEVELS = frozenset(("l", "m", "q", "h"))

# zlib level 6 compresses the repeated scanlines within a few percent of level 9
# at a fraction of the time.
_COMPRESS_LEVEL = 6
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_RUN_OF_FIVE = re.compile(r"0{5,}|1{5,}")
_FINDER_LIKE = "1011101"
_LIGHT_4 = "0000"


class QrDataTooLong(ValueError):
    """The text is longer than we agree to encode (1024 UTF-8 bytes)."""


@dataclass(frozen=True)
class _Layout:
    """Everything about a symbol size that does not depend on the data.

    Rows are packed row-major into one int, column 0 of row 0 in the highest bit;
    `*_t` are the same for the transposed matrix (columns as rows).
    """

    width: int
    region: int
    region_t: int
    fixed: int
    fixed_t: int
    deltas: tuple[int, ...]
    deltas_t: tuple[int, ...]
    n2_valid: int


_TO_BITS = bytes.maketrans(b"\x00\x01", b"01")
_FROM_BITS = bytes.maketrans(b"01", b"\x00\x01")


def _pack(rows: list[list[int]] | list[bytearray] | tuple[bytearray, ...]) -> int:
    return int(b"".join(bytes(row) for row in rows).translate(_TO_BITS), 2)


def _unpack(bits: int, width: int) -> list[bytearray]:
    flat = format(bits, f"0{width * width}b").encode("ascii").translate(_FROM_BITS)
    return [bytearray(flat[i : i + width]) for i in range(0, width * width, width)]


@lru_cache(maxsize=64)
def _layout(width: int) -> _Layout:
    # Built exactly as segno builds its matrix before masking, so that the
    # non-data modules (finder, timing, alignment, and the still-light format
    # and version areas) score the same as in segno's own evaluation.
    base = segno_encoder.make_matrix(width, width)
    segno_encoder.add_finder_patterns(base, width, width)
    segno_encoder.add_alignment_patterns(base, width, width)
    is_region = [[v > 1 for v in row] for row in base]
    is_region[-8][8] = False  # the dark module, which segno never masks
    fixed_rows = [[0 if is_region[i][j] else base[i][j] for j in range(width)] for i in range(width)]
    region_rows = [[int(v) for v in row] for row in is_region]
    masks = segno_encoder.get_data_mask_functions(False)
    mask_rows = [
        [[int(is_region[i][j] and fn(i, j)) for j in range(width)] for i in range(width)] for fn in masks
    ]

    def transpose(rows: list[list[Any]]) -> list[list[Any]]:
        return [list(col) for col in zip(*rows, strict=True)]

    packed_masks = [_pack(m) for m in mask_rows]
    packed_masks_t = [_pack(transpose(m)) for m in mask_rows]
    total = width * width
    n2_valid = 0
    for p in range(total):
        # Bit p is compared with p+1 (the module to its left) and p+width (the
        # one above); neither may wrap across a row or leave the symbol.
        if p % width != width - 1 and p < total - width:
            n2_valid |= 1 << p
    return _Layout(
        width=width,
        region=_pack(region_rows),
        region_t=_pack(transpose(region_rows)),
        fixed=_pack(fixed_rows),
        fixed_t=_pack(transpose(fixed_rows)),
        deltas=tuple(packed_masks[0] ^ m for m in packed_masks),
        deltas_t=tuple(packed_masks_t[0] ^ m for m in packed_masks_t),
        n2_valid=n2_valid,
    )


def _split(bits: int, width: int) -> list[str]:
    text = format(bits, f"0{width * width}b")
    return [text[i : i + width] for i in range(0, width * width, width)]


def _n1_n3(lines: list[str]) -> int:
    score = 0
    for run in _RUN_OF_FIVE.findall("|".join(lines)):
        score += len(run) - 2
    # Beyond the symbol edge counts as light (the quiet zone), as in segno.
    padded = _LIGHT_4 + (_LIGHT_4 + "|" + _LIGHT_4).join(lines) + _LIGHT_4
    idx = padded.find(_FINDER_LIKE)
    while idx != -1:
        if padded[idx - 4 : idx] == _LIGHT_4 or padded[idx + 7 : idx + 11] == _LIGHT_4:
            score += 40
            idx = padded.find(_FINDER_LIKE, idx + 7)
        else:
            idx = padded.find(_FINDER_LIKE, idx + 4)
    return score


def _penalty(rows: int, cols: int, layout: _Layout) -> int:
    width = layout.width
    score = _n1_n3(_split(rows, width)) + _n1_n3(_split(cols, width))
    below = rows >> width
    same_2x2 = ~(rows ^ below) & ~(rows ^ (rows >> 1)) & ~(below ^ (below >> 1)) & layout.n2_valid
    score += 3 * same_2x2.bit_count()
    percent = float(rows.bit_count()) / (width * width)
    score += 10 * int(abs(percent * 100 - 50) / 5)
    return score


def _best_mask(masked0: tuple[bytearray, ...]) -> tuple[int, int]:
    """The mask segno's own evaluation would pick, given the symbol made with mask 0.

    Returns (mask, difference to apply to the packed mask-0 symbol).
    """
    width = len(masked0)
    layout = _layout(width)
    data = _pack(masked0) & layout.region
    data_t = _pack([bytearray(col) for col in zip(*masked0, strict=True)]) & layout.region_t
    best, best_score = 0, -1
    for k in range(8):
        score = _penalty(
            layout.fixed | (data ^ layout.deltas[k]), layout.fixed_t | (data_t ^ layout.deltas_t[k]), layout
        )
        if best_score < 0 or score < best_score:
            best, best_score = k, score
    return best, layout.deltas[best]


def make_matrix(data: str, error: ErrorLevel = "m") -> tuple[bytearray, ...]:
    """The module matrix (1 = dark), without quiet zone; the same as segno.make(...).matrix."""
    if error not in _ERROR_LEVELS:
        raise ValueError(f"error level must be one of l, m, q, h, not {error!r}")
    if len(data.encode("utf-8")) > MAX_DATA_BYTES:
        raise QrDataTooLong(f"QR data is limited to {MAX_DATA_BYTES} UTF-8 bytes")
    # Phone scanners (WeChat first) read byte mode as UTF-8; segno would pick
    # ISO-8859-1 or Kanji for some non-ASCII text, which they then garble.
    kwargs: dict[str, Any] = {} if data.isascii() else {"mode": "byte", "encoding": "utf-8"}
    qr = segno.make(data, error=error, micro=False, mask=0, **kwargs)
    masked0: tuple[bytearray, ...] = qr.matrix
    mask, delta = _best_mask(masked0)
    if mask == 0:
        return masked0
    # Switching masks flips the data modules by mask0 ^ mask; only the format
    # information (which names the mask) must be written again.
    width = len(masked0)
    rows = _unpack(_pack(masked0) ^ delta, width)
    segno_encoder.add_format_info(rows, qr.version, segno_encoder.normalize_errorlevel(qr.error), mask)
    return tuple(rows)


def _chunk(kind: bytes, body: bytes) -> bytes:
    head = kind + body
    return struct.pack(">I", len(body)) + head + struct.pack(">I", zlib.crc32(head))


def matrix_to_png(matrix: tuple[bytearray, ...], *, scale: int, border: int) -> bytes:
    """1-bit greyscale PNG; each module row is packed once and repeated by the Up filter."""
    if scale < 1 or border < 0:
        raise ValueError("scale must be >= 1 and border >= 0")
    size = (len(matrix) + 2 * border) * scale
    row_bytes = (size + 7) // 8
    pad = "0" * (row_bytes * 8 - size)
    dark, light = "0" * scale, "1" * scale  # greyscale 1-bit: 0 is black
    edge = light * border
    repeat = (b"\x02" + bytes(row_bytes)) * (scale - 1)
    quiet = (b"\x00" + b"\xff" * row_bytes + repeat) * border
    lines = [quiet]
    for row in matrix:
        bits = edge + "".join([dark if m else light for m in row]) + edge + pad
        lines.append(b"\x00" + int(bits, 2).to_bytes(row_bytes, "big"))
        lines.append(repeat)
    lines.append(quiet)
    header = struct.pack(">IIBBBBB", size, size, 1, 0, 0, 0, 0)
    return (
        _PNG_SIGNATURE
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(b"".join(lines), _COMPRESS_LEVEL))
        + _chunk(b"IEND", b"")
    )


def render_png(data: str, *, scale: int, border: int, error: str = "m") -> bytes:
    """A QR code (never Micro QR) of `data` as PNG bytes."""
    level = error.lower()
    if level not in _ERROR_LEVELS:
        raise ValueError(f"error level must be one of l, m, q, h, not {error!r}")
    return matrix_to_png(make_matrix(data, level), scale=scale, border=border)  # type: ignore[arg-type]


CacheKey = tuple[str, int, int, str]


class QrCache:
    """Bounded LRU of rendered PNGs.

    The lock makes it safe from worker threads too (e.g. when rendering is sent
    to a thread pool); the critical sections never await, so one event loop
    needs nothing more.
    """

    def __init__(self, max_entries: int) -> None:
        if max_entries < 0:
            raise ValueError("max_entries must be >= 0")
        self.max_entries = max_entries
        self._items: OrderedDict[CacheKey, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def get(self, key: CacheKey) -> bytes | None:
        with self._lock:
            png = self._items.get(key)
            if png is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return png

    def put(self, key: CacheKey, png: bytes) -> None:
        if self.max_entries == 0:
            return
        with self._lock:
            self._items[key] = png
            self._items.move_to_end(key)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)

    def render(self, data: str, *, scale: int, border: int, error: str = "m") -> bytes:
        """The cached PNG, rendering it on a miss."""
        key: CacheKey = (data, scale, border, error.lower())
        png = self.get(key)
        if png is None:
            png = render_png(data, scale=scale, border=border, error=error)
            self.put(key, png)
        return png
