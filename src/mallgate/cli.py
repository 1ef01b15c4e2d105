"""The command line: serve, sandbox, db upgrade."""

from __future__ import annotations

import logging
import os
import shutil
import sys
from typing import Annotated

import typer
import uvicorn
from pydantic import ValidationError

from mallgate.db.migrate import upgrade as migrate_upgrade
from mallgate.settings import Settings

app = typer.Typer(add_completion=False, help="mallgate: the third-party gateway of an online mall")
db_app = typer.Typer(help="database")
app.add_typer(db_app, name="db")
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


def _configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")


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
    settings = load_settings()
    env_public = os.environ.get("MALLGATE_PUBLIC_URL")
    if not env_public:
        # Returned links and the sandbox's callbacks must reach this very server.
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host  # noqa: S104
        os.environ["MALLGATE_PUBLIC_URL"] = f"http://{shown}:{port}"
    if sandbox is not None:
        os.environ["MALLGATE_SANDBOX"] = "true" if sandbox else "false"
    settings = load_settings()
    migrate_upgrade(settings.resolved_database_url)
    if workers > 1:
        metrics_dir = settings.var_dir / "prometheus"
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir(parents=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir.resolve())
    db_kind = settings.resolved_database_url.split(":", 1)[0]
    log.info(
        "mallgate listening on http://%s:%d (api %s, database %s, sandbox %s, workers %d)",
        host,
        port,
        settings.base_path or "/",
        db_kind,
        "on at " + settings.public_url.rstrip("/") + "/_sandbox/" if settings.sandbox_enabled else "off",
        workers,
    )
    uvicorn.run(
        "mallgate.asgi:app",
        host=host,
        port=port,
        workers=workers,
        proxy_headers=True,
        forwarded_allow_ips=settings.forwarded_allow_ips,
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
    outer = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    outer.mount(MOUNT, create_sandbox_app(settings.var_dir / "sandbox", service_url=service_url))
    log.info("mallgate sandbox on http://%s:%d%s/ (service %s)", host, port, MOUNT, service_url)
    uvicorn.run(outer, host=host, port=port, log_level="warning")


def main() -> None:
    sys.exit(app())


if __name__ == "__main__":
    main()
