"""`qrcode` throughput (cached and fresh data) beside the floor route; render speed vs the `qrcode` package.

    python bench/qrcode_bench.py [--seconds 10] [--connections 32] [--workers 2]

Starts mallgate (SQLite, no sandbox, QR rate limit off: the load comes from one
IP), then measures with wrk (or the Python client):
  - GET /floor
  - GET /api/qrcode with the same data every time (served from the render cache)
  - GET /api/qrcode with new data every request (rendered each time)
and, in this same process, the time to render one fresh PNG with mallgate's
renderer and with the `qrcode` package (PIL factory), for the same strings.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from load import Result, free_port, python_load, report, start_mallgate, stop, wrk_load

ROOT = Path(__file__).resolve().parent.parent
DATA = "https://shop.example.com/pages/goods/detail?id=12345&spread_id=678"

# A number per request, unique across wrk's threads (`next_n`, bench/load.py): never a cache hit.
FRESH_LUA = """
request = function()
  return wrk.format("GET", "/api/qrcode?data=https%3A%2F%2Fshop.example.com%2Fg%3Fid%3D" .. next_n()
    .. "%26t%3D" .. RUN)
end
"""


def render_speed(samples: int = 300) -> tuple[float, float]:
    """Milliseconds per fresh PNG: mallgate's renderer, then the qrcode package."""
    import io

    import qrcode

    from mallgate.channels.qr import render_png

    texts = [f"https://shop.example.com/g?id={i}&t={i * 7919}" for i in range(samples)]
    started = time.perf_counter()
    for text in texts:
        render_png(text, scale=6, border=4)
    ours = (time.perf_counter() - started) / samples * 1000
    started = time.perf_counter()
    for text in texts:
        image = qrcode.make(text, box_size=6, border=4)
        image.save(io.BytesIO())
    theirs = (time.perf_counter() - started) / samples * 1000
    return ours, theirs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--python", action="store_true")
    args = parser.parse_args()
    use_wrk = bool(shutil.which("wrk")) and not args.python
    work = Path(tempfile.mkdtemp(prefix="mallgate-qr-"))
    port = free_port()
    proc = start_mallgate(work, port, args.workers, {"MALLGATE_QRCODE__PER_IP_PER_MINUTE": "0"})
    base = f"http://127.0.0.1:{port}"
    try:
        c, s = args.connections, args.seconds
        cached_path = "/api/qrcode?data=" + urllib.parse.quote(DATA, safe="")
        if use_wrk:
            floor = wrk_load(base + "/floor", "", c, s, "GET /floor")
            cached = wrk_load(base + cached_path, "", c, s, "GET qrcode (cached)")
            fresh_lua = FRESH_LUA.replace("RUN", str(time.time_ns()))
            fresh = wrk_load(base, fresh_lua, c, s, "GET qrcode (fresh data)")
        else:
            floor = asyncio.run(python_load(base, lambda _n: ("GET", "/floor", {}, b""), c, s, "GET /floor"))
            cached = asyncio.run(
                python_load(base, lambda _n: ("GET", cached_path, {}, b""), c, s, "GET qrcode (cached)")
            )
            fresh = asyncio.run(
                python_load(
                    base,
                    lambda n: ("GET", f"/api/qrcode?data=fresh-{n}-{time.time_ns()}", {}, b""),
                    c,
                    s,
                    "GET qrcode (fresh data)",
                )
            )
        results: list[Result] = [cached, fresh]
        report(results, floor, "wrk" if use_wrk else "python httpx", c)
    finally:
        stop(proc)
        shutil.rmtree(work, ignore_errors=True)
    ours, theirs = render_speed()
    print(
        f"render one fresh PNG (scale 6, border 4), this process: mallgate {ours:.2f} ms, "
        f"qrcode package {theirs:.2f} ms -> {theirs / ours:.2f}x faster"
    )
    print(
        f"fresh route over HTTP: {fresh.rps:.0f} req/s with {args.workers} workers; the qrcode package alone "
        f"renders {1000 / theirs:.0f}/s per core"
    )


if __name__ == "__main__":
    main()
