"""The Sign in with Apple stand-in: its own JWKS at ``/apple/auth/keys``; identity tokens minted on its page.

- ``GET /apple/auth/keys``: ``{"keys": [{"kty":"RSA","kid":…,"use":"sig","alg":"RS256","n":…,"e":"AQAB"}]}``
  as appleid.apple.com publishes them: the current key and the previous one.
- The page ``/apple`` mints an identity token (RS256, signed with the current key, or the
  previous one) for a chosen ``sub`` and email, with ``iss`` and ``aud`` to choose (the bundle
  id by default) so that wrong-audience and wrong-issuer tokens can be made too; and rotates
  the keys: a new current key, the former current one kept published as the previous, the
  one before it dropped. What Apple does: keys overlap, so tokens signed just before a
  rotation still verify.

The keys live in ``apple_keys.json`` under the sandbox folder (private). Test hooks:
``POST /apple/_test/mint`` (JSON in, ``{"identity_token": …}`` out), ``POST /apple/_test/rotate``,
``GET /apple/_test/counts`` (key set fetches, this process).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qsl

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from jwt.algorithms import RSAAlgorithm

from mallgate.keys import load_private_key, private_pem
from mallgate.private_files import write_private
from mallgate.sandbox.pages import render

if TYPE_CHECKING:
    from mallgate.sandbox.app import SandboxState, StandIn

RESOURCE_KEY: Final = "apple"
PREFIX: Final = "/apple"
ISSUER: Final = "https://appleid.apple.com"
TOKEN_LIFETIME: Final = 600  # Apple's identity tokens live minutes
PUBLISHED: Final = 2  # the current key and the previous one


@dataclass(frozen=True)
class SigningKey:
    kid: str
    pem: str
    at: float

    def jwk(self) -> dict[str, Any]:
        public = load_private_key(self.pem).public_key()
        jwk: dict[str, Any] = RSAAlgorithm.to_jwk(public, as_dict=True)
        return {**jwk, "kid": self.kid, "use": "sig", "alg": "RS256"}


def _new_key(now: float) -> SigningKey:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return SigningKey(kid=secrets.token_hex(5).upper(), pem=private_pem(key), at=now)


class AppleKeyRing:
    """The published keys, newest last, in a private JSON file shared by the sandbox's workers."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self.fetches = 0  # GET auth/keys served by this process
        with self._lock:
            if not self.path.exists():
                now = time.time()
                self._save([_new_key(now - 1), _new_key(now)])

    def _save(self, keys: list[SigningKey]) -> None:
        data = [{"kid": k.kid, "pem": k.pem, "at": k.at} for k in keys]
        write_private(self.path, json.dumps({"keys": data}).encode())

    def keys(self) -> list[SigningKey]:
        data = json.loads(self.path.read_text(encoding="utf-8"))
        return [SigningKey(str(k["kid"]), str(k["pem"]), float(k["at"])) for k in data["keys"]]

    def jwks(self) -> dict[str, Any]:
        self.fetches += 1
        return {"keys": [k.jwk() for k in reversed(self.keys())]}

    def rotate(self) -> SigningKey:
        with self._lock:
            key = _new_key(time.time())
            self._save([*self.keys(), key][-PUBLISHED:])
        return key

    def mint(self, form: Mapping[str, str], bundle_id: str, now: float) -> str:
        keys = self.keys()
        key = keys[0] if form.get("key") == "previous" and len(keys) > 1 else keys[-1]
        lifetime = form.get("expires_in", "").strip()
        seconds = int(lifetime) if lifetime.lstrip("-").isdigit() else TOKEN_LIFETIME
        sub = form.get("sub", "").strip()[:128] or "000000.sandbox.0000"
        claims: dict[str, Any] = {
            "iss": form.get("iss", "").strip() or ISSUER,
            "aud": form.get("aud", "").strip() or bundle_id,
            "exp": int(now) + seconds,
            "iat": int(now) - (1 if seconds > 0 else -seconds + 60),
            "sub": sub,
            "auth_time": int(now),
            "nonce_supported": True,
        }
        email = form.get("email", "").strip()
        if email:
            claims.update(
                email=email,
                email_verified="true",
                is_private_email="true" if email.endswith("@privaterelay.appleid.com") else "false",
            )
        return jwt.encode(claims, load_private_key(key.pem), algorithm="RS256", headers={"kid": key.kid})


async def _json_body(request: Request) -> dict[str, str]:
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        body = {}
    return {k: str(v) for k, v in body.items()} if isinstance(body, dict) else {}


class AppleStandIn:
    def __init__(self, ring: AppleKeyRing, bundle_id: str) -> None:
        self.ring = ring
        self.bundle_id = bundle_id
        self.router = APIRouter(prefix=PREFIX)
        self._routes()

    async def aclose(self) -> None:
        return None

    def _page(self, request: Request, token: str = "", claims: dict[str, Any] | None = None) -> Response:
        return render(
            request,
            "apple.html",
            title="Sign in with Apple",
            bundle_id=self.bundle_id,
            keys=list(reversed(self.ring.keys())),
            fetches=self.ring.fetches,
            token=token,
            claims=json.dumps(claims, indent=1, ensure_ascii=False) if claims else "",
        )

    def _routes(self) -> None:
        ring = self.ring

        @self.router.get("/auth/keys")
        async def keys() -> JSONResponse:
            return JSONResponse(await asyncio.to_thread(ring.jwks))

        @self.router.get("")
        async def page(request: Request) -> Response:
            return self._page(request)

        @self.router.post("/mint")
        async def mint_form(request: Request) -> Response:
            form = dict(parse_qsl((await request.body()).decode("utf-8", "replace"), keep_blank_values=True))
            token = await asyncio.to_thread(ring.mint, form, self.bundle_id, time.time())
            return self._page(request, token, jwt.decode(token, options={"verify_signature": False}))

        @self.router.post("/rotate")
        async def rotate_form() -> Response:
            await asyncio.to_thread(ring.rotate)
            return RedirectResponse("../apple", status_code=303)

        @self.router.post("/_test/mint")
        async def mint(request: Request) -> JSONResponse:
            token = await asyncio.to_thread(ring.mint, await _json_body(request), self.bundle_id, time.time())
            return JSONResponse({"identity_token": token})

        @self.router.post("/_test/rotate")
        async def rotate() -> JSONResponse:
            key = await asyncio.to_thread(ring.rotate)
            return JSONResponse({"kid": key.kid, "published": [k.kid for k in ring.keys()]})

        @self.router.get("/_test/counts")
        async def counts() -> JSONResponse:
            return JSONResponse({"auth/keys": ring.fetches})


def apple_standin(state: SandboxState) -> StandIn:
    from mallgate.sandbox.app import APPLE_BUNDLE_ID, StandIn

    standin = AppleStandIn(AppleKeyRing(state.folder / "apple_keys.json"), APPLE_BUNDLE_ID)
    state.resources[RESOURCE_KEY] = standin

    async def context() -> dict[str, Any]:
        keys = await asyncio.to_thread(standin.ring.keys)
        return {
            "kids": [k.kid for k in reversed(keys)],
            "fetches": standin.ring.fetches,
            "bundle_id": APPLE_BUNDLE_ID,
        }

    return StandIn(
        name="Sign in with Apple",
        summary="appleid.apple.com's key set at /apple/auth/keys (two RSA keys, rotatable) "
        "and identity tokens minted here",
        router=standin.router,
        links=[("mint an identity token", "/apple"), ("auth/keys", "/apple/auth/keys")],
        section="sections/apple.html",
        context=context,
        page="/apple",
    )
