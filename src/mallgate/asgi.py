"""The ASGI entry point uvicorn workers import: settings from the environment."""

from mallgate.app import create_app

app = create_app()
