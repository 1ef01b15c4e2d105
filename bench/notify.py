"""Alipay notify throughput: mallgate beside the peer (Flask + python-alipay-sdk), interleaved rounds.

    python bench/notify.py [--db sqlite|postgresql] [--orders 300] [--rounds 3] [--seconds 10]
                           [--connections 32] [--workers 2] [--no-peer]

Both servers run at the same time, with the same keys, the same unpaid orders and
the same realistic signed notices (bench/fixture.py: every field Alipay sends, a
Chinese subject, `fund_bill_list`; each order notified again and again, as
during Alipay's retries, so most requests are authentic duplicates). They are
measured in turn, A B A B ..., so a machine that drifts 2-3x in speed within
minutes moves both sides of each pair alike: the figure that counts is the
median of the pairwise ratios, printed with their spread. An answer that is not
HTTP 200 with exactly `success` counts as an error, never as throughput. Beside
each run: the CPU the server's processes used (in cores). mallgate commits
durably (SQLite synchronous=FULL, PostgreSQL synchronous_commit=on), as does
the peer (SQLite WAL, synchronous=FULL).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from fixture import APP_ID, make
from load import Result, free_port, python_load, start_background, start_mallgate, stop, wrk_load

from mallgate.db.servers import create_database, drop_database

ROOT = Path(__file__).resolve().parent.parent
PEER_DIR = ROOT / "bench" / "peer"
PEER_VENV = ROOT / "bench" / ".peer-venv"
ADMIN = "bench-admin-token-0123456789"
SUCCESS = "success"


def peer_python() -> Path:
    python = PEER_VENV / "bin" / "python"
    if not python.exists():
        print("== creating the peer's venv (flask, gunicorn, python-alipay-sdk)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
        packages = ["flask", "gunicorn", "python-alipay-sdk", "cryptography"]
        subprocess.run([str(python), "-m", "pip", "install", "-q", *packages], check=True)
    return python


async def create_orders(base: str, orders: dict[str, str]) -> None:
    limits = httpx.Limits(max_connections=16)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:
        sem = asyncio.Semaphore(16)

        async def one(no: str, amount: str) -> None:
            async with sem:
                r = await client.post(
                    "/admin/orders",
                    json={"order_no": no, "amount": amount},
                    headers={"Authorization": f"Bearer {ADMIN}"},
                )
                assert r.json()["status"] == 1, r.text

        await asyncio.gather(*(one(no, amt) for no, amt in orders.items()))


async def count_paid(base: str, orders: list[str]) -> int:
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        paid = 0
        for no in orders:
            r = await client.get(f"/admin/orders/{no}", headers={"Authorization": f"Bearer {ADMIN}"})
            paid += r.json()["data"]["status"] == "paid"
        return paid


def lua_notices(bodies: list[str]) -> str:
    return (
        "bodies = {\n" + ",\n".join(f"[==[{b}]==]" for b in bodies) + "\n}\nrequest = function()\n"
        '  return wrk.format("POST", "/api/pay/notify", '
        '{["Content-Type"]="application/x-www-form-urlencoded"}, bodies[(next_n() % #bodies) + 1])\nend\n'
    )


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process group's members now alive, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # After the command name: state ppid pgrp ... utime(12) stime(13) (0-based from state)
        if int(fields[2]) == pid:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


@dataclass
class Run:
    result: Result
    cores: float


def measured(pgid: int, work: Callable[[], Result]) -> Run:
    before, started = process_cpu(pgid), time.monotonic()
    result = work()
    return Run(result, (process_cpu(pgid) - before) / (time.monotonic() - started))


def notify_load(
    base: str, bodies: list[str], connections: int, seconds: float, use_wrk: bool, label: str
) -> Result:
    if use_wrk:
        return wrk_load(base, lua_notices(bodies), connections, seconds, label, expect=SUCCESS)
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    return asyncio.run(
        python_load(
            base,
            lambda n: ("POST", "/api/pay/notify", headers, bodies[n % len(bodies)].encode()),
            connections,
            seconds,
            label,
            expect=SUCCESS,
        )
    )


def floor_load(base: str, connections: int, seconds: float, use_wrk: bool, label: str) -> Result:
    if use_wrk:
        return wrk_load(base + "/floor", "", connections, seconds, label)
    return asyncio.run(python_load(base, lambda _n: ("GET", "/floor", {}, b""), connections, seconds, label))


def line(run: Run) -> str:
    r = run.result
    return (
        f"{r.label:<34} {r.rps:>8.0f}/s  p50 {r.p50_ms:>6.2f} ms  p99 {r.p99_ms:>6.2f} ms  "
        f"errors {r.errors:>5}  cpu {run.cores:4.2f} cores"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--pg-url", default="postgresql+asyncpg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--orders", type=int, default=300)
    parser.add_argument(
        "--resends",
        type=int,
        default=0,
        help="notices per order beyond the first, each with a later notify_time (so its own bytes and "
        "signature, as Alipay's own retries); with enough of them every request is a distinct notice",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--python", action="store_true", help="Python load client even where wrk exists")
    args = parser.parse_args()
    use_wrk = bool(shutil.which("wrk")) and not args.python

    work = Path(tempfile.mkdtemp(prefix="mallgate-bench-"))
    fixture = work / "fx"
    make(fixture, args.orders, args.resends)
    bodies: list[str] = json.loads((fixture / "notices.json").read_text())
    orders: dict[str, str] = json.loads((fixture / "orders.json").read_text())
    procs: list[subprocess.Popen[bytes]] = []
    pg_name = ""
    try:
        db_url = f"sqlite+aiosqlite:///{work / 'mallgate.db'}"
        if args.db == "postgresql":
            pg_name = f"mallgate_bench_{secrets.token_hex(3)}"
            db_url = asyncio.run(create_database(args.pg_url, pg_name))
        port = free_port()
        settings = {
            "MALLGATE_DATABASE_URL": db_url,
            "MALLGATE_ADMIN_TOKEN": ADMIN,
            "MALLGATE_ALIPAY__APP_ID": APP_ID,
            "MALLGATE_ALIPAY__PUBLIC_KEY": str(fixture / "pub.pem"),
            "MALLGATE_ALIPAY__PRIVATE_KEY": str(fixture / "priv.pem"),
        }
        ours = start_mallgate(work, port, args.workers, settings)
        procs.append(ours)
        base = f"http://127.0.0.1:{port}"
        asyncio.run(create_orders(base, orders))

        peer: subprocess.Popen[bytes] | None = None
        peer_base = ""
        if not args.no_peer:
            peer_port = free_port()
            peer_env = {
                **os.environ,
                "PEER_APP_ID": APP_ID,
                "PEER_PRIV": str(fixture / "priv.pem"),
                "PEER_PUB": str(fixture / "pub.pem"),
                "PEER_DB": str(fixture / "peer.db"),
            }
            gunicorn = str(peer_python().parent / "gunicorn")
            argv = [
                gunicorn,
                "-w",
                str(args.workers),
                "-b",
                f"127.0.0.1:{peer_port}",
                "--chdir",
                str(PEER_DIR),
            ]
            peer_base = f"http://127.0.0.1:{peer_port}"
            peer = start_background([*argv, "peer_app:app"], peer_env, peer_base + "/floor")
            procs.append(peer)

        c, s = args.connections, args.seconds
        print(
            f"load: {'wrk' if use_wrk else 'python httpx'}, {c} connections, {s:g} s a run, "
            f"{args.workers} workers each, {len(orders)} orders, {len(bodies)} distinct notices, "
            f"{len(bodies[0])}-byte notices, db {args.db}"
        )
        print(line(measured(ours.pid, lambda: floor_load(base, c, s, use_wrk, "mallgate GET /floor"))))
        ratios: list[float] = []
        ours_runs: list[Run] = []
        for round_no in range(1, args.rounds + 1):
            # With resends, each round (both servers) gets notices no earlier round sent.
            sent = bodies[round_no - 1 :: args.rounds] if args.resends else bodies
            label = f"[{round_no}] mallgate notify"
            a = measured(ours.pid, partial(notify_load, base, sent, c, s, use_wrk, label))
            ours_runs.append(a)
            print(line(a))
            if peer is not None:
                label = f"[{round_no}] peer notify"
                b = measured(peer.pid, partial(notify_load, peer_base, sent, c, s, use_wrk, label))
                print(line(b))
                ratios.append(a.result.rps / b.result.rps if b.result.rps else float("nan"))
            if args.resends and a.result.requests > len(sent):
                repeated = a.result.requests - len(sent)
                print(f"    ({repeated} of mallgate's requests this round repeated a notice byte for byte)")
        rates = [r.result.rps for r in ours_runs]
        p99s = [r.result.p99_ms for r in ours_runs]
        print(
            f"mallgate notify/s: median {statistics.median(rates):.0f} "
            f"(min {min(rates):.0f}, max {max(rates):.0f}); "
            f"p99 median {statistics.median(p99s):.1f} ms (max {max(p99s):.1f})"
        )
        if ratios:
            print(
                f"mallgate/peer, pairwise per round: {', '.join(f'{x:.2f}' for x in ratios)}; "
                f"median {statistics.median(ratios):.2f}x (spread {min(ratios):.2f}-{max(ratios):.2f})"
            )
        paid = asyncio.run(count_paid(base, list(orders)[:50]))
        print(f"mallgate: {paid}/50 sampled orders paid after the run")
    finally:
        for proc in procs:
            stop(proc)
        if pg_name:
            asyncio.run(drop_database(args.pg_url, pg_name))
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
