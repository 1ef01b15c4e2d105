"""/docs works with no network, /openapi.json is clean, and docs/API.md keeps up with the code."""

from __future__ import annotations

import ast
import asyncio
import importlib.util
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from fastapi import routing
from starlette.routing import BaseRoute, Mount

from conftest import Server
from mallgate.app import create_app

ROOT = Path(__file__).resolve().parents[1]
API_MD = ROOT / "docs" / "API.md"
SRC = ROOT / "src" / "mallgate"
CHROMIUM_SECONDS = 60

# ------------------------------------------------------------------ /openapi.json


async def test_openapi_has_one_operation_id_per_route_and_method(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    ids = [op["operationId"] for ops in schema["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    # The three routes served for GET and POST shared one id per route before.
    for path in ("/api/send_sms", "/api/user/info", "/api/order/payment"):
        operations = schema["paths"][path]
        assert set(operations) == {"get", "post"}
        assert operations["get"]["operationId"] != operations["post"]["operationId"]


async def test_openapi_leaves_out_the_admin_api_and_the_sandbox(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert "/api/send_sms" in paths
    assert not [p for p in paths if p.startswith(("/admin", "/_sandbox", "/docs"))]


async def test_building_the_document_warns_of_no_duplicate_operation(server: Server) -> None:
    app = create_app(server.settings.model_copy(update={"sandbox": False}))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            app.app.openapi()
    finally:
        await app.state.runtime.close()
    assert [str(w.message) for w in caught if "Operation ID" in str(w.message)] == []


# ------------------------------------------------------------------ /docs and its assets

_URL = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']|url:\s*["']([^"']+)["']""")


def _urls(html: str) -> list[str]:
    return [a or b for a, b in _URL.findall(html)]


async def test_docs_page_loads_only_its_own_assets(client: httpx.AsyncClient) -> None:
    page = await client.get("/docs")
    assert page.status_code == 200
    urls = _urls(page.text)
    assert any(u.endswith("swagger-ui-bundle.js") for u in urls), urls
    assert any(u.endswith("swagger-ui.css") for u in urls), urls
    elsewhere = [u for u in urls if re.match(r"(?:[a-z]+:)?//", u)]
    assert elsewhere == [], "the page would need the network for these"


@pytest.mark.parametrize(
    ("asset", "content_type"),
    [("swagger-ui-bundle.js", "javascript"), ("swagger-ui.css", "text/css"), ("favicon.png", "image/png")],
)
async def test_docs_assets_are_served(client: httpx.AsyncClient, asset: str, content_type: str) -> None:
    page = await client.get("/docs")
    (url,) = [u for u in _urls(page.text) if u.endswith("/" + asset)]
    answer = await client.get(url)
    assert answer.status_code == 200
    assert content_type in answer.headers["content-type"]
    assert len(answer.content) > 1000


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    message = "NO CHROMIUM: /docs was not rendered in a browser (apt-get install chromium)"
    if os.environ.get("MALLGATE_TEST_REQUIRE_ALL") == "1":
        pytest.fail(message)
    pytest.skip(message)


async def _dump_dom(url: str) -> str:
    """The DOM after the page's scripts ran, from a headless Chromium that fetches nothing else."""
    with tempfile.TemporaryDirectory() as profile:
        process = await asyncio.create_subprocess_exec(
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            # Run the page's timers and fetches (openapi.json) before the DOM is dumped.
            "--virtual-time-budget=15000",
            "--dump-dom",
            url,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            # Not subprocess.run: the server under test answers on this same event loop.
            out, _ = await asyncio.wait_for(process.communicate(), CHROMIUM_SECONDS)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
    assert process.returncode == 0
    return out.decode()


async def test_docs_render_in_a_headless_browser(server: Server) -> None:
    dom = await _dump_dom(server.url + "/docs")
    # Swagger UI draws one "opblock" per operation, only once its scripts loaded and ran and it
    # read /openapi.json: the page as served has nothing but an empty <div id="swagger-ui">.
    assert 'data-path="/api/send_sms"' in dom
    assert len(re.findall(r'class="opblock opblock-(?:get|post)', dom)) >= 10
    assert "opblock-get" in dom and "opblock-post" in dom


# ------------------------------------------------------------------ docs/API.md


def _route_paths(routes: list[BaseRoute]) -> Iterator[str]:
    """Every path the app serves; mounts by their prefix. FastAPI 0.165 nests included routers."""
    nested = hasattr(routing, "iter_route_contexts")
    flat: list[Any] = list(routing.iter_route_contexts(routes)) if nested else routes
    for route in flat:
        original = getattr(route, "original_route", route)
        if isinstance(original, Mount):
            yield original.path
        elif getattr(route, "path", None):
            yield str(route.path)


async def test_api_reference_names_every_route(server: Server) -> None:
    text = API_MD.read_text(encoding="utf-8")
    paths = sorted(set(_route_paths(server.app.routes)))
    base = server.settings.base_path
    assert base + "/send_sms" in paths and base + "/pay/notify" in paths and "/_sandbox" in paths
    assert [p for p in paths if p not in text] == []


_CODE = re.compile(r"[a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*)?")
# Where a client-facing code is written: the error classes and envelope helpers, and the limits
# table of sms_codes (whose codes reach ApiError through a variable).
_CODE_CALLS = frozenset({"ApiError", "CodeRejected", "Unauthorized", "fail", "fail_body", "_SendLimit"})


def _called(func: ast.expr) -> str:
    if isinstance(func, ast.Name):
        return func.id
    return func.attr if isinstance(func, ast.Attribute) else ""


def _code_defaults(node: ast.ClassDef) -> Iterator[ast.expr]:
    for item in node.body:
        if isinstance(item, ast.FunctionDef) and item.name == "__init__":
            args = item.args.args[len(item.args.args) - len(item.args.defaults) :]
            yield from (d for a, d in zip(args, item.args.defaults, strict=True) if a.arg == "code")


def _code_nodes(tree: ast.AST) -> Iterator[ast.expr]:
    """The expressions of a module that hold an envelope code, by the ways the source writes one."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _called(node.func) in _CODE_CALLS:
            yield from node.args
            yield from (k.value for k in node.keywords if k.arg == "code")
        elif isinstance(node, ast.ClassDef) and node.name in _CODE_CALLS:
            yield from _code_defaults(node)
        elif isinstance(node, ast.Dict):  # {"info": ..., "status": 0, "code": "db.down"}
            yield from (v for k, v in zip(node.keys, node.values, strict=True) if _is_text(k, "code"))
        elif isinstance(node, ast.Tuple) and len(node.elts) == 2 and all(_is_text(e) for e in node.elts):
            info = node.elts[0]
            if isinstance(info, ast.Constant) and not str(info.value).isascii():
                yield node.elts[1]  # (Chinese info, code), as in envelope._HTTP_INFO
        elif isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id.endswith("ErrorCode") for t in node.targets
        ):
            yield from (n for n in ast.walk(node.value) if isinstance(n, ast.expr))  # Literal[...] codes


def _is_text(node: ast.expr | None, value: str | None = None) -> bool:
    return (
        isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and (value is None or node.value == value)
    )


def codes_in_source() -> set[str]:
    found: set[str] = set()
    for path in SRC.rglob("*.py"):
        for node in _code_nodes(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and _CODE.fullmatch(node.value):
                found.add(node.value)
    return found


def test_api_reference_names_every_error_code() -> None:
    codes = codes_in_source()
    # Each way of writing a code is seen, so the scan cannot silently find nothing.
    assert {"param.missing", "auth.required", "db.down", "not_found", "sms.too_frequent"} <= codes
    assert {"sms.provider_timeout", "sandbox.busy", "body_too_large"} <= codes
    text = API_MD.read_text(encoding="utf-8")
    assert sorted(c for c in codes if f"`{c}`" not in text) == []


def test_docs_stand_alone_in_a_clone() -> None:
    for page in sorted((ROOT / "docs").rglob("*.md")):
        assert "../shared" not in page.read_text(encoding="utf-8"), page


# ------------------------------------------------------------------ the README's offline demo


def _readme_demo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("readme_demo", ROOT / "scripts" / "readme_demo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_readme_demo_is_one_server_and_checked_commands() -> None:
    demo = _readme_demo().parse((ROOT / "README.md").read_text(encoding="utf-8"))
    token = re.search(r"MALLGATE_ADMIN_TOKEN=(\S+)", demo.server)
    assert token is not None and len(token.group(1)) >= 16  # shorter stops start-up
    assert "scripts/serve" in demo.server
    # No second server in the commands: they only talk to the one above.
    assert not [c for c in demo.commands if "scripts/serve" in c.text or "mallgate serve" in c.text]
    assert all(f"Bearer {token.group(1)}" in c.text for c in demo.commands if "/admin/" in c.text)
    assert [c.text for c in demo.commands if not c.expect] == []
    assert any('"status":"paid"' in c.expect for c in demo.commands)
    assert demo.port == 8000


def test_the_demo_parser_joins_continued_lines_and_reads_expectations() -> None:
    module = _readme_demo()
    block = "# a comment\ncurl a \\\n  b   # → x\n\ncurl c\n"
    expected = [module.Command("curl a \\\n  b   # → x", "x"), module.Command("curl c", "")]
    assert module.commands(block) == expected
