"""`share/config` with a warm jsapi_ticket beside the floor route, in the same run.

    python bench/share_bench.py [--seconds 10] [--connections 32] [--workers 2] [--rounds 3] [--python]

Starts mallgate (SQLite, the sandbox on: its WeChat stand-in issues the token and the
ticket), asks once for a config so the ticket is in the shared store and in each
worker's memory, then measures, in interleaved rounds, ``GET /floor`` and ``GET
/api/share/config?url=...`` (a new page URL per request with wrk's counter, so
nothing is cached but the ticket). Prints each round and the median ratio of
share/config to the floor; the target on 2 workers is at least 0.60. At the end, the
stand-in's counts show how many token and ticket fetches the whole run made.
The figures move with the machine's other load: read the ratio, not the req/s.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from load import Result, free_port, python_load, report, start_mallgate, stop, wrk_load

WECHAT_MP_APP_ID = "wx00000000000000a1"  # the sandbox's Official Account
PAGE = "https%3A%2F%2Fshop.example.com%2Fgoods%2Fdetail%3Fid%3D"

SHARE_LUA = f"""
request = function()
  return wrk.format("GET", "/api/share/config?url={PAGE}" .. next_n())
end
"""


def one_round(base: str, c: int, s: float, use_wrk: bool, n: int) -> tuple[Result, Result]:
    if use_wrk:
        floor = wrk_load(base + "/floor", "", c, s, f"GET /floor (round {n})")
        share = wrk_load(base, SHARE_LUA, c, s, f"GET share/config (round {n})")
    else:
        floor = asyncio.run(
            python_load(base, lambda _i: ("GET", "/floor", {}, b""), c, s, f"GET /floor ({n})")
        )
        share = asyncio.run(
            python_load(
                base,
                lambda i: ("GET", f"/api/share/config?url={PAGE}{i}", {}, b""),
                c,
                s,
                f"GET share/config ({n})",
            )
        )
    return floor, share


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--python", action="store_true", help="the Python load client even when wrk is there")
    args = parser.parse_args()
    use_wrk = bool(shutil.which("wrk")) and not args.python
    work = Path(tempfile.mkdtemp(prefix="mallgate-share-"))
    port = free_port()
    proc = start_mallgate(work, port, args.workers, {"MALLGATE_SANDBOX": "true"})
    base = f"http://127.0.0.1:{port}"
    try:
        # Warm: the first answer fetches the token and the ticket; each worker then reads them once.
        for i in range(4 * args.workers):
            answer = httpx.get(f"{base}/api/share/config", params={"url": f"https://shop.example.com/w/{i}"})
            body = answer.json()
            if body.get("status") != 1:
                raise SystemExit(f"share/config did not answer a config: {body}")
        floors: list[Result] = []
        shares: list[Result] = []
        for n in range(1, args.rounds + 1):
            floor, share = one_round(base, args.connections, args.seconds, use_wrk, n)
            floors.append(floor)
            shares.append(share)
        counts = httpx.get(f"{base}/_sandbox/wechat/_test/counts", params={"appid": WECHAT_MP_APP_ID}).json()
    finally:
        stop(proc)
        shutil.rmtree(work, ignore_errors=True)
    tool = "wrk" if use_wrk else "python httpx"
    for floor, share in zip(floors, shares, strict=True):
        report([share], floor, tool, args.connections)
    ratios = [s.rps / f.rps for f, s in zip(floors, shares, strict=True) if f.rps]
    median = statistics.median(ratios)
    spread = f"{min(ratios):.2f}..{max(ratios):.2f}"
    verdict = "meets" if median >= 0.60 else "misses"
    print(
        f"share/config / floor, median of {len(ratios)} rounds: {median:.2f} (spread {spread}); "
        f"target >= 0.60 on 2 workers: {verdict} ({args.workers} workers here)"
    )
    print(f"upstream fetches during the whole run (stand-in's counts): {counts}")


if __name__ == "__main__":
    main()
