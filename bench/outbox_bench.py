"""Outbox throughput: events delivered per second to a local receiver, beside the floor route.

    python bench/outbox_bench.py [--events 3000] [--rounds 3] [--workers 2] [--seconds 5] [--connections 32]

Starts ``mallgate serve`` (SQLite, sandbox off) with ``MALLGATE_WEBHOOK__URL`` pointing
at a receiver in this process (a threaded HTTP server that checks every signature with
``verify_webhook`` and counts distinct event ids). Each round measures ``GET /floor``
for ``--seconds``, then writes ``--events`` outbox events in one transaction and times
until the receiver has seen every one of them: events per second, end to end (the
worker's planning, claims, signed POSTs and records). Prints each round, the median,
and the receiver's count of signatures refused (0) and of repeats (at least once: 0
expected here, nothing crashes). The figures move with the machine's other load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from load import Result, free_port, python_load, start_mallgate, stop
from sqlalchemy.orm import Session

from mallgate.db.session import Database
from mallgate.services.outbox import add_event
from mallgate.webhooks import SIGNATURE_HEADER, WebhookRejected, verify_webhook

SECRET = "bench-webhook-secret-0123456789"


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: set[int] = set()
        self.repeats = 0
        self.refused = 0

    def add(self, event_id: int) -> None:
        with self.lock:
            if event_id in self.seen:
                self.repeats += 1
            self.seen.add(event_id)


def receiver(tally: Tally) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as a real backend would

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            try:
                verify_webhook(body, self.headers.get(SIGNATURE_HEADER), SECRET)
                tally.add(int(json.loads(body)["id"]))
                status = 200
            except (WebhookRejected, ValueError, KeyError):
                with tally.lock:
                    tally.refused += 1
                status = 401
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


async def write_events(url: str, count: int, tag: str) -> None:
    db = Database(url)
    now = datetime.now(UTC).replace(tzinfo=None)

    def write(session: Session) -> None:
        conn = session.connection()
        for n in range(count):
            add_event(conn, "bench.event", {"order_no": f"{tag}-{n}", "n": n}, now)

    try:
        await db.run_write(write)
    finally:
        await db.dispose()


def delivered_per_second(url: str, tally: Tally, count: int, tag: str, timeout: float) -> float:
    before = len(tally.seen)
    started = time.perf_counter()
    asyncio.run(write_events(url, count, tag))
    while len(tally.seen) - before < count:
        if time.perf_counter() - started > timeout:
            raise SystemExit(f"only {len(tally.seen) - before} of {count} events arrived in {timeout:.0f} s")
        time.sleep(0.01)
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()
    tally = Tally()
    hook = receiver(tally)
    work = Path(tempfile.mkdtemp(prefix="mallgate-outbox-"))
    (work / "var").mkdir()
    url = f"sqlite+aiosqlite:///{(work / 'var' / 'mallgate.db').as_posix()}"
    settings = {
        "MALLGATE_DATABASE_URL": url,
        "MALLGATE_WEBHOOK__URL": f"http://127.0.0.1:{hook.server_address[1]}/hook",
        "MALLGATE_WEBHOOK__SECRET": SECRET,
    }
    mallgate = str(Path(__file__).resolve().parent.parent / ".venv" / "bin" / "mallgate")
    env = {"MALLGATE_VAR_DIR": str(work / "var"), **settings}
    subprocess.run([mallgate, "db", "upgrade"], env={**_plain_env(), **env}, check=True, cwd=work)
    port = free_port()
    proc = start_mallgate(work, port, args.workers, settings)
    base = f"http://127.0.0.1:{port}"
    floors: list[Result] = []
    rates: list[float] = []
    try:
        for n in range(1, args.rounds + 1):
            load = python_load(
                base, lambda _i: ("GET", "/floor", {}, b""), args.connections, args.seconds, f"floor {n}"
            )
            floors.append(asyncio.run(load))
            rates.append(delivered_per_second(url, tally, args.events, f"R{n}", args.timeout))
    finally:
        stop(proc)
        hook.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    for n, (floor, rate) in enumerate(zip(floors, rates, strict=True), start=1):
        print(
            f"round {n}: GET /floor {floor.rps:8.0f} req/s (p99 {floor.p99_ms:.1f} ms);"
            f"  outbox {rate:7.0f} events/s delivered ({args.events} events)"
        )
    print(
        f"outbox, median of {len(rates)} rounds: {statistics.median(rates):.0f} events/s delivered, "
        f"floor {statistics.median(f.rps for f in floors):.0f} req/s, {args.workers} workers (one runner); "
        f"signatures refused: {tally.refused}, repeats: {tally.repeats}"
    )


def _plain_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MALLGATE_")}


if __name__ == "__main__":
    main()
