"""Measure a route at a fixed concurrency beside the same server's floor route, in one run.

    python bench/load.py --url http://127.0.0.1:8000 --path /healthz [--connections 32] [--seconds 10]

Uses wrk when it is installed (a separate, faster load generator), else a small
async Python client. Prints requests/s, p50 and p99 for /floor and each path, and
the ratio to the floor, so the figures hold on a noisy machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx


@dataclass
class Result:
    label: str
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


Request = tuple[str, str, dict[str, str], bytes]  # method, path, headers, body


async def python_load(
    base: str,
    make_request: Callable[[int], Request],
    connections: int,
    seconds: float,
    label: str,
    expect: str | None = None,
) -> Result:
    latencies: list[float] = []
    errors = 0
    counter = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:

        async def worker() -> None:
            nonlocal errors, counter
            while time.perf_counter() < deadline:
                counter += 1
                method, path, headers, body = make_request(counter)
                started = time.perf_counter()
                try:
                    response = await client.request(method, path, headers=headers, content=body or None)
                    if response.status_code >= 400 or (
                        expect is not None and (response.status_code != 200 or response.text != expect)
                    ):
                        errors += 1
                except httpx.HTTPError:
                    errors += 1
                latencies.append((time.perf_counter() - started) * 1000)

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - began
    return Result(
        label, len(latencies), elapsed, _percentile(latencies, 0.5), _percentile(latencies, 0.99), errors
    )


# Before every script: each wrk thread has its own Lua state, so a plain counter would make
# every thread send the same sequence (half the "new" pushes or codes would be repeats).
# `next_n()` numbers requests 1, 2, 3 ... across all threads, no number sent twice.
_WRK_SETUP = """
local threads = {}
function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end
counter = 0
function next_n()
  counter = counter + 1
  return (counter - 1) * THREADS + tid
end
"""

_WRK_DONE = """
done = function(summary, latency, requests)
  io.write(string.format("MG %d %.3f %.3f %.3f %d\\n", summary.requests, summary.duration / 1e6,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write
      + summary.errors.timeout))
end
"""


# Counts every answer that is not HTTP 200 with exactly the expected body: a refused notice
# ("failure") must never count as throughput.
_WRK_EXPECT = """
function init(args) wrong = 0 end
function response(status, headers, body)
  if not (CHECK) then wrong = wrong + 1 end
end
done = function(summary, latency, requests)
  local bad = 0
  for _, t in ipairs(threads) do bad = bad + t:get("wrong") end
  io.write(string.format("MG %d %.3f %.3f %.3f %d\\n", summary.requests, summary.duration / 1e6,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    bad + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
"""


def wrk_load(
    base: str,
    lua_request: str,
    connections: int,
    seconds: float,
    label: str,
    threads: int = 2,
    expect: str | None = None,
    check: str | None = None,
) -> Result:
    """Run wrk with a Lua `request` function (or none for a plain GET of the path in `base`).

    With `expect`, an answer that is not HTTP 200 with exactly that body counts as an error;
    with `check`, one for which that Lua expression (of `status` and `body`) is false.
    """
    if expect is not None:
        check = f"status == 200 and body == [==[{expect}]==]"
    summary = _WRK_DONE if check is None else _WRK_EXPECT.replace("CHECK", check)
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(_WRK_SETUP.replace("THREADS", str(threads)) + lua_request + summary)
    out = subprocess.run(
        [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{int(seconds)}s",
            "--latency",
            "-s",
            script.name,
            base,
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    Path(script.name).unlink()
    match = re.search(r"^MG (\d+) ([\d.]+) ([\d.]+) ([\d.]+) (\d+)$", out, re.M)
    if not match:
        raise RuntimeError(f"wrk printed no summary:\n{out}")
    n, dur, p50, p99, errors = match.groups()
    return Result(label, int(n), float(dur), float(p50), float(p99), int(errors))


def lua_for(method: str, path: str, headers: dict[str, str], body: bytes) -> str:
    hdrs = ", ".join(f'["{k}"]="{v}"' for k, v in headers.items())
    return (
        f"local body = [==[{body.decode()}]==]\n"
        f'request = function() return wrk.format("{method}", "{path}", {{{hdrs}}}, '
        f"{'body' if body else 'nil'}) end\n"
    )


def measure(
    base: str,
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes,
    connections: int,
    seconds: float,
    use_wrk: bool,
    label: str | None = None,
) -> Result:
    label = label or f"{method} {path}"
    if use_wrk:
        return wrk_load(base, lua_for(method, path, headers, body), connections, seconds, label)
    return asyncio.run(
        python_load(base, lambda _n: (method, path, headers, body), connections, seconds, label)
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_up(url: str, proc: subprocess.Popen[bytes], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited early")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


def start_background(
    argv: list[str], env: dict[str, str], health_url: str, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    """A server in its own process group (so stop() ends its workers too), once it answers."""
    proc = subprocess.Popen(
        argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    wait_up(health_url, proc)
    return proc


def start_mallgate(work: Path, port: int, workers: int, settings: dict[str, str]) -> subprocess.Popen[bytes]:
    """`mallgate serve` from this checkout's .venv, with only the given MALLGATE_ settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLGATE_")}
    env.update({"MALLGATE_VAR_DIR": str(work / "var"), "MALLGATE_SANDBOX": "false", **settings})
    mallgate = str(Path(__file__).resolve().parent.parent / ".venv" / "bin" / "mallgate")
    argv = [mallgate, "serve", "--port", str(port), "--workers", str(workers)]
    return start_background(argv, env, f"http://127.0.0.1:{port}/healthz", cwd=work)


def stop(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass


def report(results: list[Result], floor: Result, tool: str, connections: int) -> None:
    print(f"load tool: {tool}, {connections} connections")
    print(f"{'route':<40} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'vs floor':>9}")
    for r in [floor, *results]:
        ratio = r.rps / floor.rps if floor.rps else float("nan")
        print(f"{r.label:<40} {r.rps:>10.0f} {r.p50_ms:>8.2f} {r.p99_ms:>8.2f} {r.errors:>7} {ratio:>8.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--path", action="append", default=[], help="route to measure (repeatable)")
    parser.add_argument("--method", default="GET")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--python", action="store_true", help="use the Python client even where wrk exists")
    args = parser.parse_args()
    use_wrk = bool(shutil.which("wrk")) and not args.python
    floor = measure(args.url, "GET", "/floor", {}, b"", args.connections, args.seconds, use_wrk, "GET /floor")
    results = [
        measure(args.url, args.method, p, {}, b"", args.connections, args.seconds, use_wrk) for p in args.path
    ]
    report(results, floor, "wrk" if use_wrk else "python httpx", args.connections)


if __name__ == "__main__":
    main()
