"""The command line: serve, sandbox, db upgrade."""

from __future__ import annotations

import asyncio
import json
import logging
import logging.config
import os
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Annotated, Any, TypeVar

import typer
import uvicorn
from pydantic import ValidationError

from mallgate.db.migrate import upgrade as migrate_upgrade
from mallgate.disk import metrics_dir_for_workers, warn_if_low_space
from mallgate.parties import is_loopback, party_states, sandbox_problems, sandbox_wanted
from mallgate.runtime import Runtime
from mallgate.settings import Settings

app = typer.Typer(add_completion=False, help="mallgate: the third-party gateway of an online mall")
db_app = typer.Typer(help="database")
app.add_typer(db_app, name="db")
notifications_app = typer.Typer(help="stored payment notifications: list, show, replay, prune")
app.add_typer(notifications_app, name="notifications")
T = TypeVar("T")
log = logging.getLogger("mallgate")


def load_settings() -> Settings:
    """Settings, or a message naming the malformed setting and exit code 2."""
    try:
        return Settings()
    except ValidationError as exc:
        for error in exc.errors():
            name = "MALLGATE_" + "__".join(str(p).upper() for p in error["loc"])
            typer.echo(f"mallgate: setting {name} is invalid: {error['msg']}", err=True)
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
    migrate_upgrade(settings.resolved_database_url)
    warn_if_low_space(settings)
    if workers > 1:
        # The workers' metrics files: off the database's disk unless MALLGATE_METRICS_DIR says so.
        metrics_dir_for_workers(settings.metrics_dir)
    db_kind = settings.resolved_database_url.split(":", 1)[0]
    on = sandbox_wanted(settings)
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
    uvicorn.run(
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
    log.info("mallgate sandbox on http://%s:%d%s/ (service %s)", host, port, MOUNT, service_url)
    uvicorn.run(outer, host=host, port=port, log_level="warning")


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
        runtime = _runtime(settings)
        try:
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
        typer.echo(
            f"#{row['id']}  {row['received_at']}  {row['channel']:<6}  {row['method']:<5}  "
            f"{row['order_no'] or '-'}  {'verified' if row['verified'] else 'UNVERIFIED'}  "
            f"{row['outcome'] or '-'}  {row['reason'] or ''}".rstrip()
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
