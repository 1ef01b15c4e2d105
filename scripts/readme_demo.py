"""Runs the README's "Trying every endpoint offline" as written, and checks every answer.

The section holds two ``sh`` blocks: the first starts the server (one command), the second
holds the commands a reader types in another terminal. A command whose last line ends in
``# → TEXT`` must print TEXT. The server runs from the repository, exactly as the block says,
with every MALLGATE_* variable of the caller's environment removed and a throwaway
MALLGATE_VAR_DIR, so the demo never touches ./var; the commands run in a throwaway folder.

Run it through scripts/demo, which bootstraps .venv first. Stdlib only.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SECTION = "Trying every endpoint offline"
EXPECT = "# → "
START_SECONDS = 180  # a first `scripts/serve` on a clean clone installs .venv before it listens
COMMAND_SECONDS = 60
BASH = shutil.which("bash") or "/bin/bash"
STOP_SECONDS = 20


class DemoFailed(Exception):
    pass


@dataclass(frozen=True)
class Command:
    text: str
    expect: str  # "" when the README promises nothing about the output


@dataclass(frozen=True)
class Demo:
    server: str
    commands: list[Command]

    @property
    def port(self) -> int:
        found = re.search(r"localhost:(\d+)", " ".join(c.text for c in self.commands))
        if found is None:
            raise DemoFailed(f"no localhost:PORT in the commands of {SECTION!r}")
        return int(found.group(1))


def section(markdown: str, title: str = SECTION) -> str:
    """The text under the heading `title`, up to the next heading of any level."""
    lines = markdown.splitlines()
    starts = [i for i, line in enumerate(lines) if re.fullmatch(rf"#+\s+{re.escape(title)}\s*", line)]
    if len(starts) != 1:
        raise DemoFailed(f"README.md needs exactly one heading {title!r}, found {len(starts)}")
    body: list[str] = []
    fenced = False
    for line in lines[starts[0] + 1 :]:
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            break
        body.append(line)
    return "\n".join(body)


def sh_blocks(text: str) -> list[str]:
    return [m.group(1) for m in re.finditer(r"^```sh\n(.*?)^```", text, re.DOTALL | re.MULTILINE)]


def commands(block: str) -> list[Command]:
    """Shell commands of a block: continuation lines joined, comment-only lines dropped."""
    found: list[Command] = []
    pending: list[str] = []
    for line in block.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending.append(line)
        if line.endswith("\\"):
            continue
        _, marker, expect = line.partition(EXPECT)
        found.append(Command("\n".join(pending), expect.strip() if marker else ""))
        pending = []
    if pending:
        raise DemoFailed("the last command of the block ends in a line continuation")
    return found


def parse(markdown: str) -> Demo:
    blocks = sh_blocks(section(markdown))
    if len(blocks) != 2:
        raise DemoFailed(f"{SECTION!r} needs two sh blocks (server, commands), found {len(blocks)}")
    server = commands(blocks[0])
    if len(server) != 1:
        raise DemoFailed(f"the server block of {SECTION!r} must hold one command, found {len(server)}")
    return Demo(server[0].text, commands(blocks[1]))


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def wait_healthy(url: str, server: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise DemoFailed(f"the server exited ({server.returncode}) first:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=1) as answer:  # noqa: S310 (our own loopback URL)
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise DemoFailed(f"{url} did not answer 200 within {START_SECONDS} s:\n{log.read_text()}")


def stop(server: subprocess.Popen[bytes]) -> None:
    """Ctrl-C, as a reader stops it; killed if it does not stop in time."""
    if server.poll() is not None:
        return
    os.killpg(server.pid, signal.SIGINT)
    try:
        server.wait(STOP_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        raise DemoFailed(f"the server did not stop within {STOP_SECONDS} s of Ctrl-C") from None


def run_command(command: Command, cwd: Path, env: dict[str, str]) -> None:
    print(f"$ {command.text}", flush=True)
    done = subprocess.run(  # noqa: S603 (the README's own commands, which is the point)
        [BASH, "-c", command.text],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=COMMAND_SECONDS,
        check=False,
    )
    print(done.stdout.rstrip("\n"), flush=True)
    if done.returncode != 0:
        raise DemoFailed(f"exit code {done.returncode}:\n{done.stderr}")
    if command.expect not in done.stdout:
        raise DemoFailed(f"the README says the answer contains {command.expect!r}; it does not")


def clean_environment(var_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLGATE_")}
    env["MALLGATE_VAR_DIR"] = str(var_dir)
    return env


def run(demo: Demo) -> None:
    port = demo.port
    if not port_is_free(port):
        raise DemoFailed(f"port {port} is in use: stop whatever holds it (a scripts/serve?) and run again")
    if (ROOT / ".env").exists():
        print("!! ./.env exists: the server reads it, as the README's command would", file=sys.stderr)
    if shutil.which("curl") is None:
        raise DemoFailed("the README's commands need curl")
    scratch = Path(tempfile.mkdtemp(prefix="mallgate-demo-"))
    env = clean_environment(scratch / "var")
    work = scratch / "work"
    work.mkdir()
    log = scratch / "server.log"
    print(f"$ {demo.server}    (in {ROOT}, MALLGATE_VAR_DIR={env['MALLGATE_VAR_DIR']})", flush=True)
    with log.open("wb") as out:
        server = subprocess.Popen(  # noqa: S603
            [BASH, "-c", demo.server],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: Ctrl-C reaches uvicorn and its workers
        )
    try:
        wait_healthy(f"http://127.0.0.1:{port}/healthz", server, log)
        for command in demo.commands:
            run_command(command, work, env)
        stop(server)
    except BaseException:
        stop_quietly(server)
        print(f"-- server log ({log}):\n{log.read_text()}", file=sys.stderr)
        raise
    shutil.rmtree(scratch, ignore_errors=True)


def stop_quietly(server: subprocess.Popen[bytes]) -> None:
    try:
        stop(server)
    except DemoFailed as exc:
        print(f"!! {exc}", file=sys.stderr)


def main() -> int:
    try:
        demo = parse(README.read_text(encoding="utf-8"))
        run(demo)
    except (DemoFailed, subprocess.TimeoutExpired) as exc:
        print(f"!! README demo FAILED: {exc}", file=sys.stderr)
        return 1
    print(f"== README demo: {len(demo.commands)} commands answered as {SECTION!r} says", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
