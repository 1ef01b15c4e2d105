"""Outbox throughput: events delivered per second to a local receiver, beside the floor route.

    python bench/outbox_bench.py [--events 3000] [--rounds 3] [--workers 2] [--seconds 5]
                                 [--connections 32] [--poll-seconds 1.0] [--python]

Starts ``mallgate serve`` (SQLite, sandbox off) with ``MALLGATE_WEBHOOK__URL`` pointing
at a receiver in this process (a threaded HTTP server that checks every signature with
``verify_webhook`` and counts distinct event ids). Each round, A B C in turn:

- ``GET /floor`` for ``--seconds`` (wrk when installed, else a Python client): the floor;
- the receiver alone, sent signed events by the same load tool at the worker's
  concurrency: its ceiling, to show the outbox figure is not the receiver's;
- ``--events`` outbox events written in one transaction, timed from their commit until
  the receiver has seen every one: events per second, end to end (the worker's poll,
  planning, claims, signed POSTs). The wait for the worker's first pass (at most
  ``--poll-seconds``) is in that figure and is shown beside it, as is the rate from
  the first delivery to the last.

Prints each round and its outbox/floor ratio, then the medians with their spread (min
to max), the receiver's count of signatures refused (0 expected) and of repeats (0
expected: nothing crashes), and the deliveries the worker has not recorded as sent
(0 expected). Only the ratios mean anything on a machine that drifts: the figures move
with its other load.
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
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from load import Result, free_port, measure, start_mallgate, stop
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from mallgate.db.models import OutboxDelivery
from mallgate.db.session import Database
from mallgate.services.outbox import add_event
from mallgate.settings import OutboxSettings
from mallgate.webhooks import SIGNATURE_HEADER, WebhookRejected, signature, verify_webhook

SECRET = "bench-webhook-secret-0123456789"
TOPIC = "bench.event"
# The ceiling's requests carry this event id: counted apart from the outbox's.
PROBE_ID = 0


class Tally:
    """What the receiver saw: distinct event ids per round tag, repeats, refusals, probes."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: set[int] = set()
        self.per_tag: Counter[str] = Counter()
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.repeats = 0
        self.refused = 0
        self.probes = 0

    def add(self, event_id: int, tag: str) -> None:
        at = time.perf_counter()
        with self.lock:
            if event_id == PROBE_ID:
                self.probes += 1
                return
            if event_id in self.seen:
                self.repeats += 1
                return
            self.seen.add(event_id)
            self.per_tag[tag] += 1
            self.first.setdefault(tag, at)
            self.last[tag] = at

    def count(self, tag: str) -> int:
        with self.lock:
            return self.per_tag[tag]


def receiver(tally: Tally) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as a real backend would

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            try:
                verify_webhook(body, self.headers.get(SIGNATURE_HEADER), SECRET)
                document = json.loads(body)
                tally.add(int(document["id"]), str(document["data"].get("order_no", "")).partition("-")[0])
                status = 200
            except (WebhookRejected, ValueError, KeyError, AttributeError):
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


async def write_events(url: str, count: int, tag: str) -> float:
    """Writes the round's events in one transaction; returns when (perf_counter) it committed."""
    db = Database(url)
    now = datetime.now(UTC).replace(tzinfo=None)

    def write(session: Session) -> None:
        conn = session.connection()
        for n in range(count):
            add_event(conn, TOPIC, {"order_no": f"{tag}-{n}", "n": n}, now)

    try:
        await db.run_write(write)
        return time.perf_counter()
    finally:
        await db.dispose()


async def not_sent(url: str) -> int:
    db = Database(url)
    try:
        async with db.read() as session:
            query = select(func.count()).select_from(OutboxDelivery).where(OutboxDelivery.state != "sent")
            return int((await session.execute(query)).scalar_one())
    finally:
        await db.dispose()


def outbox_round(url: str, tally: Tally, count: int, tag: str, timeout: float) -> tuple[float, float, float]:
    """Events/s from the commit to the last arrival, seconds to the first, events/s first to last."""
    committed = asyncio.run(write_events(url, count, tag))
    while tally.count(tag) < count:
        if time.perf_counter() - committed > timeout:
            raise SystemExit(f"only {tally.count(tag)} of {count} events arrived in {timeout:.0f} s")
        time.sleep(0.005)
    first, last = tally.first[tag], tally.last[tag]
    steady = (count - 1) / (last - first) if count > 1 and last > first else float("nan")
    return count / (last - committed), first - committed, steady


def probe(hook: str, connections: int, seconds: float, use_wrk: bool, label: str) -> Result:
    """The receiver alone: signed events (id PROBE_ID) as fast as the load tool sends them."""
    body = json.dumps(
        {"id": PROBE_ID, "topic": TOPIC, "created_at": "", "data": {"order_no": "probe"}},
        separators=(",", ":"),
    ).encode()
    # Signed once: the tolerance (300 s) outlasts the round.
    headers = {
        "Content-Type": "application/json",
        SIGNATURE_HEADER: signature(body, SECRET, int(time.time())),
    }
    return measure(hook, "POST", "/hook", headers, body, connections, seconds, use_wrk, label)


def spread(values: Sequence[float], digits: int = 0) -> str:
    return (
        f"median {statistics.median(values):.{digits}f} "
        f"(spread {min(values):.{digits}f} to {max(values):.{digits}f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=3000, help="outbox events per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="uvicorn worker processes (one runner)")
    parser.add_argument("--seconds", type=float, default=5, help="length of each floor and receiver run")
    parser.add_argument("--connections", type=int, default=32, help="connections of the floor's load")
    parser.add_argument(
        "--poll-seconds",
        type=float,
        default=OutboxSettings().poll_seconds,
        help="MALLGATE_OUTBOX__POLL_SECONDS (default: the shipped one)",
    )
    parser.add_argument("--timeout", type=float, default=300, help="longest wait for one round's events")
    parser.add_argument("--python", action="store_true", help="the Python load client even where wrk exists")
    args = parser.parse_args()
    use_wrk = bool(shutil.which("wrk")) and not args.python
    concurrency = OutboxSettings().concurrency
    tally = Tally()
    hook = receiver(tally)
    hook_base = f"http://127.0.0.1:{hook.server_address[1]}"
    work = Path(tempfile.mkdtemp(prefix="mallgate-outbox-"))
    (work / "var").mkdir()
    url = f"sqlite+aiosqlite:///{(work / 'var' / 'mallgate.db').as_posix()}"
    settings = {
        "MALLGATE_DATABASE_URL": url,
        "MALLGATE_WEBHOOK__URL": f"{hook_base}/hook",
        "MALLGATE_WEBHOOK__SECRET": SECRET,
        "MALLGATE_OUTBOX__POLL_SECONDS": str(args.poll_seconds),
    }
    mallgate = str(Path(__file__).resolve().parent.parent / ".venv" / "bin" / "mallgate")
    env = {"MALLGATE_VAR_DIR": str(work / "var"), **settings}
    subprocess.run([mallgate, "db", "upgrade"], env={**_plain_env(), **env}, check=True, cwd=work)
    port = free_port()
    proc = start_mallgate(work, port, args.workers, settings)
    base = f"http://127.0.0.1:{port}"
    floors: list[Result] = []
    ceilings: list[Result] = []
    rounds: list[tuple[float, float, float]] = []
    try:
        for n in range(1, args.rounds + 1):
            floors.append(
                measure(base, "GET", "/floor", {}, b"", args.connections, args.seconds, use_wrk, f"floor {n}")
            )
            ceilings.append(probe(hook_base, concurrency, args.seconds, use_wrk, f"receiver {n}"))
            rounds.append(outbox_round(url, tally, args.events, f"R{n}", args.timeout))
        deadline = time.perf_counter() + args.timeout
        unrecorded = asyncio.run(not_sent(url))
        while unrecorded and time.perf_counter() < deadline:  # each pass records after its sends
            time.sleep(0.1)
            unrecorded = asyncio.run(not_sent(url))
    finally:
        stop(proc)
        hook.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    ratios = [rate / floor.rps for (rate, _, _), floor in zip(rounds, floors, strict=True)]
    print(
        f"load tool: {'wrk' if use_wrk else 'python'}; {args.workers} workers (one runner), "
        f"outbox concurrency {concurrency}, poll {args.poll_seconds:g} s, {args.events} events a round"
    )
    for n, (floor, ceiling, (rate, pickup, steady), ratio) in enumerate(
        zip(floors, ceilings, rounds, ratios, strict=True), start=1
    ):
        print(
            f"round {n}: GET /floor {floor.rps:7.0f} req/s (p99 {floor.p99_ms:6.1f} ms); "
            f"receiver alone {ceiling.rps:6.0f} req/s; "
            f"outbox {rate:6.0f} events/s delivered (first after {pickup * 1000:4.0f} ms, "
            f"{steady:6.0f}/s first to last); outbox/floor {ratio:.3f}"
        )
    print(
        f"outbox events/s delivered: {spread([r[0] for r in rounds])}; "
        f"outbox/floor: {spread(ratios, 3)}; floor req/s: {spread([f.rps for f in floors])}; "
        f"receiver alone req/s: {spread([c.rps for c in ceilings])}"
    )
    print(
        f"signatures refused: {tally.refused}, repeats: {tally.repeats}, "
        f"receiver probe errors: {sum(c.errors for c in ceilings)}, "
        f"deliveries not recorded sent: {unrecorded}"
    )


def _plain_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MALLGATE_")}


if __name__ == "__main__":
    main()
