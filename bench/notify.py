"""Alipay notify throughput: mallgate beside the peer reference (Flask + python-alipay-sdk), same run.

    python bench/notify.py [--db sqlite|postgresql] [--orders 2000] [--seconds 10] [--connections 32]
                           [--workers 2] [--no-peer]

Both servers get the same keys, the same unpaid orders and the same signed
notifications (../shared/peer/make_fixture.py; each order is notified again and
again, so most requests are authentic duplicates, as during Alipay's retries).
Each server's floor route is measured in the same run. mallgate commits
durably: SQLite synchronous=FULL, PostgreSQL synchronous_commit=on.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from load import Result, free_port, python_load, report, start_background, start_mallgate, stop, wrk_load

from mallgate.db.servers import create_database, drop_database

ROOT = Path(__file__).resolve().parent.parent
PEER_DIR = (ROOT.parent / "shared" / "peer").resolve()
PEER_VENV = ROOT / "bench" / ".peer-venv"
APP_ID = "2021000000000000"
ADMIN = "bench-admin-token"


def peer_python() -> Path:
    python = PEER_VENV / "bin" / "python"
    if not python.exists():
        print("== creating the peer's venv (flask, gunicorn, python-alipay-sdk)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
        subprocess.run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "-q",
                "flask",
                "gunicorn",
                "python-alipay-sdk",
                "cryptography",
            ],
            check=True,
        )
    return python


def lua_bodies(lua: Path) -> list[bytes]:
    return [m.encode() for m in re.findall(r"\[\[(.*?)\]\]", lua.read_text(), re.S)]


async def create_orders(base: str, lua: Path) -> None:
    bodies = lua_bodies(lua)
    orders = {}
    for body in bodies:
        fields = dict(p.split("=", 1) for p in body.decode().split("&"))
        orders[fields["out_trade_no"]] = fields["total_amount"]
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


async def count_paid(base: str, lua: Path, sample: int = 50) -> int:
    bodies = lua_bodies(lua)[:sample]
    paid = 0
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        for body in bodies:
            no = dict(p.split("=", 1) for p in body.decode().split("&"))["out_trade_no"]
            r = await client.get(f"/admin/orders/{no}", headers={"Authorization": f"Bearer {ADMIN}"})
            paid += r.json()["data"]["status"] == "paid"
    return paid


def notify_load(base: str, lua: Path, connections: int, seconds: float, use_wrk: bool, label: str) -> Result:
    if use_wrk:
        script = lua.read_text()
        script = script[: script.index("done = function")]  # load.py adds its own summary
        return wrk_load(base, script, connections, seconds, label)
    bodies = lua_bodies(lua)
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    return asyncio.run(
        python_load(
            base,
            lambda n: ("POST", "/api/pay/notify", headers, bodies[n % len(bodies)]),
            connections,
            seconds,
            label,
        )
    )


def floor_load(base: str, path: str, connections: int, seconds: float, use_wrk: bool, label: str) -> Result:
    if use_wrk:
        return wrk_load(base + path, "", connections, seconds, label)
    return asyncio.run(python_load(base, lambda _n: ("GET", path, {}, b""), connections, seconds, label))


def pg_database(server_url: str) -> tuple[str, str]:
    name = f"mallgate_bench_{secrets.token_hex(3)}"
    return name, asyncio.run(create_database(server_url, name))


def pg_drop(server_url: str, name: str) -> None:
    asyncio.run(drop_database(server_url, name))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--pg-url", default="postgresql+asyncpg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--orders", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--python", action="store_true", help="Python load client even where wrk exists")
    args = parser.parse_args()
    use_wrk = bool(shutil.which("wrk")) and not args.python

    work = Path(tempfile.mkdtemp(prefix="mallgate-bench-"))
    fixture = work / "fx"
    subprocess.run(
        [sys.executable, str(PEER_DIR / "make_fixture.py"), str(fixture), str(args.orders)],
        check=True,
        capture_output=True,
    )
    lua = fixture / "notify.lua"
    procs: list[subprocess.Popen[bytes]] = []
    pg_name = ""
    try:
        db_url = f"sqlite+aiosqlite:///{work / 'mallgate.db'}"
        if args.db == "postgresql":
            pg_name, db_url = pg_database(args.pg_url)
        port = free_port()
        settings = {
            "MALLGATE_DATABASE_URL": db_url,
            "MALLGATE_ADMIN_TOKEN": ADMIN,
            "MALLGATE_ALIPAY__APP_ID": APP_ID,
            "MALLGATE_ALIPAY__PUBLIC_KEY": str(fixture / "pub.pem"),
            "MALLGATE_ALIPAY__PRIVATE_KEY": str(fixture / "priv.pem"),
        }
        procs.append(start_mallgate(work, port, args.workers, settings))
        base = f"http://127.0.0.1:{port}"
        asyncio.run(create_orders(base, lua))

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
                "peer_app:app",
            ]
            peer_base = f"http://127.0.0.1:{peer_port}"
            procs.append(start_background(argv, peer_env, peer_base + "/floor"))

        c, s = args.connections, args.seconds
        floor = floor_load(base, "/floor", c, s, use_wrk, f"mallgate GET /floor ({args.db})")
        ours = notify_load(base, lua, c, s, use_wrk, f"mallgate POST pay/notify ({args.db})")
        results = [ours]
        if peer_base:
            peer_floor = floor_load(peer_base, "/floor", c, s, use_wrk, "peer GET /floor")
            peer_notify = notify_load(peer_base, lua, c, s, use_wrk, "peer POST pay/notify (sqlite)")
            results += [peer_floor, peer_notify]
        report(results, floor, "wrk" if use_wrk else "python httpx", c)
        paid = asyncio.run(count_paid(base, lua))
        print(f"mallgate: {paid}/50 sampled orders paid after the run")
        if peer_base:
            print(
                f"mallgate notify / peer notify: {ours.rps / peer_notify.rps:.2f}x; "
                f"p99 {ours.p99_ms:.1f} ms vs {peer_notify.p99_ms:.1f} ms"
            )
    finally:
        for proc in procs:
            stop(proc)
        if pg_name:
            pg_drop(args.pg_url, pg_name)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
