"""The command line: serve, sandbox, db upgrade."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import logging.config
import os
import re
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
import uvicorn
from dotenv import dotenv_values
from pydantic import ValidationError
from pydantic_settings import SettingsError

from mallgate.db.migrate import upgrade as migrate_upgrade
from mallgate.db.problems import connection_problem, masked, without
from mallgate.disk import metrics_dir_for_workers, warn_if_low_space
from mallgate.parties import is_loopback, party_states, sandbox_problems, sandbox_wanted
from mallgate.runtime import Runtime
from mallgate.settings import Settings, unknown_settings

app = typer.Typer(add_completion=False, help="mallgate: the third-party gateway of an online mall")
db_app = typer.Typer(help="database")
app.add_typer(db_app, name="db")
notifications_app = typer.Typer(help="stored payment notifications: list, show, replay, prune")
app.add_typer(notifications_app, name="notifications")
outbox_app = typer.Typer(help="the outbox: events and their deliveries (webhook, subscribe messages)")
app.add_typer(outbox_app, name="outbox")
T = TypeVar("T")
log = logging.getLogger("mallgate")


@app.callback()
def _start() -> None:
    # Runs before every command: a misspelled name would otherwise be ignored without a word.
    warn_unknown_variables()


def warn_unknown_variables(env_file: Path = Path(".env")) -> None:
    """One line per `MALLGATE_*` name, in the environment or `.env`, that sets nothing."""
    sources: list[tuple[str, list[str]]] = [("the environment", list(os.environ))]
    if env_file.is_file():
        sources.append((str(env_file), list(dotenv_values(env_file))))
    for where, names in sources:
        for name, closest in unknown_settings(names):
            hint = f": did you mean {closest}?" if closest else ""
            typer.echo(f"mallgate: warning: {name} (in {where}) is not a setting, ignored{hint}", err=True)


def load_settings() -> Settings:
    """Settings, or a message naming the malformed setting and exit code 2."""
    try:
        return Settings()
    except ValidationError as exc:
        for error in exc.errors():
            name = "MALLGATE_" + "__".join(str(p).upper() for p in error["loc"])
            message = error["msg"].removeprefix("Value error, ")
            typer.echo(f"mallgate: setting {name} is invalid: {message}", err=True)
        raise typer.Exit(2) from None
    except SettingsError as exc:
        # A nested group given as one variable (MALLGATE_SMS='{...}') that is not JSON.
        field = re.search(r'field "(\w+)"', str(exc))
        name = "MALLGATE_" + field.group(1).upper() if field else "a MALLGATE_ variable"
        typer.echo(f"mallgate: setting {name} is invalid: {exc.__cause__ or exc}", err=True)
        raise typer.Exit(2) from None


@contextmanager
def database_errors(settings: Settings) -> Iterator[None]:
    """A database that cannot be reached stops the command with one line and exit code 2.

    The line names the setting, the URL with its password masked, what failed and the fix;
    failures that are not about reaching the database still raise.
    """
    url = settings.resolved_database_url
    try:
        yield
    except typer.Exit:
        raise
    except Exception as exc:
        problem = connection_problem(exc, url, timeout=settings.db_timeout_seconds)
        if problem is None:
            raise
        if settings.database_url:
            setting = f"MALLGATE_DATABASE_URL={masked(url)}"
        else:
            setting = f"MALLGATE_VAR_DIR={settings.var_dir} (the SQLite file, no MALLGATE_DATABASE_URL)"
        typer.echo(without(f"mallgate: {setting}: {problem}", url), err=True)
        raise typer.Exit(2) from None


def refuse_to_start(problems: list[str]) -> None:
    """One line per problem on stderr, then exit code 2 (the settings' own exit code)."""
    for problem in problems:
        typer.echo(f"mallgate: refusing to start: {problem}", err=True)
    if problems:
        raise typer.Exit(2)


def log_parties(settings: Settings, *, sandbox: bool) -> None:
    """What each third party is this run, so an operator sees at once what is real."""
    states = list(party_states(settings, sandbox=sandbox))
    log.info("third parties: %s", ", ".join(state.text() for state in states))
    for state in states:
        if state.state == "incomplete":
            log.warning("%s is only partly configured: its routes refuse until it is complete", state.party)
        if state.state == "console":
            log.warning("MALLGATE_SMS__PROVIDER=console: SMS codes go to this log, not to phones")


def log_config() -> dict[str, Any]:
    """The logging set-up of the CLI and, given to uvicorn, of every worker process.

    A worker is a fresh process with no logging configured, which drops every INFO line;
    uvicorn applies its `log_config` in each worker it starts.
    """
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"}
        },
        "root": {"level": "INFO", "handlers": ["stderr"]},
        # httpx logs every URL at INFO; platform URLs can carry tokens (access_token=...) in the query.
        "loggers": {"httpx": {"level": "WARNING"}, "httpcore": {"level": "WARNING"}},
    }


def _configure_logging() -> None:
    logging.config.dictConfig(log_config())


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply the database migrations."""
    settings = load_settings()
    with database_errors(settings):
        migrate_upgrade(settings.resolved_database_url)
    typer.echo("database is up to date")


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="uvicorn worker processes")] = 1,
    sandbox: Annotated[
        bool | None,
        typer.Option("--sandbox/--no-sandbox", help="run the stand-ins (default: when no credentials)"),
    ] = None,
) -> None:
    """Run the service; migrates the database first."""
    _configure_logging()
    # The workers read their settings from the environment, so what the options decide is put
    # there; the settings are then read again, as the workers will read them.
    if sandbox is not None:
        os.environ["MALLGATE_SANDBOX"] = "true" if sandbox else "false"
    settings = load_settings()
    refuse_to_start(sandbox_problems(settings, host=host))
    if "public_url" not in settings.model_fields_set:  # neither environment nor .env
        if not is_loopback(host) and not sandbox_wanted(settings):
            # The platforms would be handed notify URLs on 127.0.0.1, which they cannot reach.
            refuse_to_start(
                [f"serve --host {host} needs MALLGATE_PUBLIC_URL, the https:// base the platforms call"]
            )
        # Returned links and the sandbox's callbacks must reach this very server.
        shown = host if is_loopback(host) else "127.0.0.1"
        os.environ["MALLGATE_PUBLIC_URL"] = f"http://{shown}:{port}"
        settings = load_settings()
    # Bound before the migration, so that a busy port is told before anything else happens.
    sock = bind_socket(host, port)
    with database_errors(settings):
        migrate_upgrade(settings.resolved_database_url)
    warn_if_low_space(settings)
    if workers > 1:
        # The workers' metrics files: off the database's disk unless MALLGATE_METRICS_DIR says so.
        metrics_dir_for_workers(settings.metrics_dir)
    db_kind = settings.resolved_database_url.split(":", 1)[0]
    on = sandbox_wanted(settings)
    config = uvicorn.Config(
        "mallgate.asgi:app",
        host=host,
        port=port,
        workers=workers,
        # mallgate.forwarded reads X-Forwarded-For itself: uvicorn's reading, with '*', believed
        # the leftmost address, the one the client writes.
        proxy_headers=False,
        log_config=log_config(),
        log_level="warning",
        access_log=False,
    )
    # From here connections wait in the backlog until a worker takes them: the line is true.
    sock.listen(config.backlog)
    log.info(
        "mallgate listening on http://%s:%d (api %s, database %s, sandbox %s, admin API %s, workers %d)",
        host,
        port,
        settings.base_path or "/",
        db_kind,
        "on at " + settings.public_url.rstrip("/") + "/_sandbox/" if on else "off",
        "on" if settings.admin_token else "off",
        workers,
    )
    log_parties(settings, sandbox=on)
    run_uvicorn(config, sock)


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening socket of `serve`, bound here so that a busy port is one line, exit code 2.

    uvicorn binds its own socket (once, before forking its workers) and answers a busy port
    with a logged error after mallgate has already said where it listens. The socket is made
    as uvicorn's `Config.bind_socket` makes it, and handed to uvicorn, workers included.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        refuse_to_start([_bind_problem(exc, host, port)])
    sock.set_inheritable(True)
    return sock


def _bind_problem(exc: OSError, host: str, port: int) -> str:
    if exc.errno == errno.EADDRINUSE:
        return f"port {port} is in use (on {host}): stop what holds it, or choose another with --port"
    if exc.errno == errno.EACCES:
        return f"port {port} needs privileges on this machine: choose one above 1023 with --port"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{host} is not an address of this machine: use --host 127.0.0.1 or 0.0.0.0"
    if isinstance(exc, socket.gaierror):
        return f"--host {host} is not a known name or address"
    return f"cannot listen on {host}:{port}: {exc.strerror or exc}"


def run_uvicorn(config: uvicorn.Config, sock: socket.socket) -> None:
    """What `uvicorn.run` does once it has its socket: one server, or a supervisor of workers."""
    from uvicorn.supervisors import Multiprocess

    server = uvicorn.Server(config)
    try:
        if config.workers > 1:
            Multiprocess(config, sockets=[sock]).run()
        else:
            server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    if config.workers == 1 and not server.started:
        sys.exit(3)  # uvicorn's own exit code when the app failed to start


@app.command("sandbox")
def sandbox_cmd(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8900,
    service_url: Annotated[str, typer.Option(help="the service's API base, for notifications")] = (
        "http://127.0.0.1:8000/api"
    ),
) -> None:
    """Run only the local stand-ins of the third parties, at /_sandbox/."""
    _configure_logging()
    from fastapi import FastAPI
    from starlette.types import Receive, Scope, Send

    from mallgate.app import head_as_get
    from mallgate.sandbox.app import MOUNT, create_sandbox_app

    settings = load_settings()
    if not is_loopback(host) and settings.sandbox is not True:
        refuse_to_start(
            [f"the sandbox would serve on {host}, not a loopback address: MALLGATE_SANDBOX=true to mean it"]
        )
    sandbox = create_sandbox_app(settings.var_dir / "sandbox", service_url=service_url)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await sandbox.state.sandbox.aclose()

    outer = FastAPI(docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    outer.mount(MOUNT, sandbox)
    sock = bind_socket(host, port)

    async def with_head(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "HEAD":
            scope, send = head_as_get(scope, send)
        await outer(scope, receive, send)

    config = uvicorn.Config(with_head, host=host, port=port, log_level="warning")
    sock.listen(config.backlog)
    log.info("mallgate sandbox on http://%s:%d%s/ (service %s)", host, port, MOUNT, service_url)
    run_uvicorn(config, sock)


def _runtime(settings: Settings) -> Runtime:
    """The runtime the service would have: with the sandbox on, the parties are its stand-ins."""
    from mallgate.parties import SandboxRefused
    from mallgate.sandbox.app import service_settings

    try:
        settings, sandbox_url = service_settings(settings)
    except SandboxRefused as exc:
        refuse_to_start(exc.problems)
        raise
    runtime = Runtime.create(settings)
    runtime.sandbox_url = sandbox_url
    return runtime


def _run(work: Callable[[Runtime], Awaitable[T]]) -> T:
    settings = load_settings()

    async def run() -> T:
        with database_errors(settings):
            runtime = _runtime(settings)
        try:
            # Reached first on its own: an error of the work itself is never told as the database's.
            with database_errors(settings):
                await runtime.db.ping()
            return await work(runtime)
        finally:
            await runtime.close()

    return asyncio.run(run())


_DURATION = re.compile(r"(\d+)\s*([smhd]?)")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "": "minutes"}


def parse_duration(text: str) -> timedelta:
    """`90s`, `10m`, `2h`, `1d`; a bare number is minutes."""
    match = _DURATION.fullmatch(text.strip().lower())
    if not match:
        raise typer.BadParameter("use a number with s, m, h or d, e.g. 10m")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


@notifications_app.command("list")
def notifications_list(
    order_no: Annotated[str, typer.Option("--order-no", help="only this order's notices")] = "",
    limit: Annotated[int, typer.Option(min=1, max=10000, help="at most this many, newest first")] = 50,
) -> None:
    """The newest stored payment notifications."""
    from mallgate.services.payment_decoders import stored_notifications

    rows = _run(lambda rt: stored_notifications(rt, order_no=order_no, limit=limit))
    for row in rows:
        repeats = f"  (+{row['repeats']} repeats, last {row['last_repeat_at']})" if row["repeats"] else ""
        typer.echo(
            f"#{row['id']}  {row['received_at']}  {row['channel']:<6}  {row['method']:<5}  "
            f"{row['order_no'] or '-'}  {'verified' if row['verified'] else 'UNVERIFIED'}  "
            f"{row['outcome'] or '-'}  {row['reason'] or ''}".rstrip()
            + repeats
        )
    if not rows:
        typer.echo("no notifications")


@notifications_app.command("show")
def notifications_show(notification_id: Annotated[int, typer.Argument(help="the notice's id")]) -> None:
    """One stored notification with its headers and body."""
    from mallgate.services.payment_decoders import stored_notification

    row = _run(lambda rt: stored_notification(rt, notification_id))
    if row is None:
        typer.echo(f"no notification #{notification_id}", err=True)
        raise typer.Exit(1)
    body: bytes = row.pop("body")
    headers = row.pop("headers")
    for key, value in row.items():
        typer.echo(f"{key}: {'' if value is None else value}")
    typer.echo("headers: " + json.dumps(headers, ensure_ascii=False, sort_keys=True))
    typer.echo(f"body ({len(body)} bytes):")
    typer.echo(body.decode("utf-8", "replace"))


@notifications_app.command("replay")
def notifications_replay(notification_id: Annotated[int, typer.Argument(help="the notice's id")]) -> None:
    """Verify a stored notification again and apply it; safe to run twice."""
    from mallgate.services.payment_decoders import replay

    result = _run(lambda rt: replay(rt, notification_id))
    if result is None:
        typer.echo(f"no notification #{notification_id}", err=True)
        raise typer.Exit(1)
    typer.echo(f"#{notification_id}: {result.outcome}" + (f" ({result.reason})" if result.reason else ""))
    if not result.accepted:
        raise typer.Exit(1)


@notifications_app.command("prune")
def notifications_prune(
    older_than: Annotated[str, typer.Option(help="delete the notices received longer ago than this: 90d")],
    refused_only: Annotated[
        bool, typer.Option("--refused-only", help="only the refused (unverified) ones")
    ] = False,
) -> None:
    """Delete old stored notifications, a thousand rows per transaction."""
    from mallgate.services.notifications import prune

    age = parse_duration(older_than)
    deleted = _run(lambda rt: prune(rt, older_than=age, refused_only=refused_only))
    typer.echo(f"{deleted} notification{'' if deleted == 1 else 's'} deleted")


@outbox_app.command("list")
def outbox_list(
    state: Annotated[str, typer.Option(help="only deliveries in this state: pending, sent or failed")] = "",
    limit: Annotated[int, typer.Option(min=1, max=10000, help="at most this many, newest first")] = 50,
) -> None:
    """The newest deliveries of outbox events, one line per event and sender."""
    from mallgate.services.outbox_worker import list_deliveries

    if state not in ("", "pending", "sent", "failed"):
        raise typer.BadParameter("pending, sent or failed", param_hint="--state")
    rows = _run(lambda rt: list_deliveries(rt, state=state, limit=limit))
    for row in rows:
        when = row["sent_at"] or row["next_attempt_at"] or ""
        attempts = f"{row['attempts']} attempt{'' if row['attempts'] == 1 else 's'}"
        typer.echo(
            f"#{row['event_id']}  {row['topic']:<24}  {row['sender']:<10}  {row['state']:<7}  "
            f"{attempts}  {when}  {row['last_error']}".rstrip()
        )
    if not rows:
        typer.echo("no deliveries")


@outbox_app.command("show")
def outbox_show(event_id: Annotated[int, typer.Argument(help="the event's id")]) -> None:
    """One outbox event: its payload and each sender's delivery."""
    from mallgate.services.outbox_worker import show_event

    event = _run(lambda rt: show_event(rt, event_id))
    if event is None:
        typer.echo(f"no outbox event #{event_id}", err=True)
        raise typer.Exit(1)
    typer.echo(f"#{event['id']}  {event['topic']}  created {event['created_at']}")
    typer.echo("payload: " + json.dumps(event["payload"], ensure_ascii=False, sort_keys=True))
    for row in event["deliveries"]:
        typer.echo(
            f"{row['sender']}: {row['state']}, {row['attempts']} attempts"
            + (f", sent {row['sent_at']}" if row["sent_at"] else "")
            + (f", next {row['next_attempt_at']}" if row["next_attempt_at"] else "")
            + (f", last error: {row['last_error']}" if row["last_error"] else "")
        )
    if not event["deliveries"]:
        typer.echo("no deliveries (yet, or no sender wants it)")


@outbox_app.command("retry")
def outbox_retry(event_id: Annotated[int, typer.Argument(help="the event's id")]) -> None:
    """Send an event's failed deliveries again (the running service's worker does, at once)."""
    from mallgate.services.outbox_worker import retry_event, show_event

    async def work(rt: Runtime) -> int | None:
        if await show_event(rt, event_id) is None:
            return None
        return await retry_event(rt, event_id)

    count = _run(work)
    if count is None:
        typer.echo(f"no outbox event #{event_id}", err=True)
        raise typer.Exit(1)
    typer.echo(f"#{event_id}: {count} failed deliver{'y' if count == 1 else 'ies'} due again")


@app.command()
def reconcile(
    older_than: Annotated[str, typer.Option(help="ask about unpaid orders older than this")] = "10m",
    max_age: Annotated[str, typer.Option(help="and younger than this")] = "2d",
    limit: Annotated[int, typer.Option(min=1, max=100000, help="at most this many orders")] = 500,
) -> None:
    """Ask Alipay / WeChat Pay about unpaid orders and apply what they report."""
    from mallgate.services import reconcile as service

    young, old = parse_duration(older_than), parse_duration(max_age)
    outcomes = _run(lambda rt: service.reconcile(rt, older_than=young, max_age=old, limit=limit))
    for outcome in outcomes:
        typer.echo(outcome.line())
    typer.echo(f"{len({o.order_no for o in outcomes})} orders checked")
    if any(o.error for o in outcomes):
        raise typer.Exit(1)


def main() -> None:
    sys.exit(app())


if __name__ == "__main__":
    main()
