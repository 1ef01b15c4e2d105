"""Sign in with Apple for a native APP: the identity token, checked against Apple's published keys.

The identity token is a JWS compact JWT signed RS256 with one of the keys Apple publishes at
``https://appleid.apple.com/auth/keys`` (a JWKS; the token's ``kid`` names the key; Apple
rotates them). Checked here: ``alg`` is RS256 and nothing else (``none`` and HS256, whose
"key" would be the public key itself, are the classic forgeries), the signature, ``iss``
exactly ``https://appleid.apple.com``, ``aud`` our bundle id, ``exp`` in the future and
``iat`` not in the future (60 s of skew each way). ``sub`` is the user, stable for our team.

`AppleKeys` keeps the JWKS in memory; a ``kid`` it does not know makes it fetch the set
again, at most once every `REFETCH_SECONDS`, so a stream of forged kids cannot make us
hammer Apple (or wait on it).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import httpx
import jwt
from jwt.algorithms import RSAAlgorithm

from mallgate.channels.errors import ChannelError

ISSUER: Final = "https://appleid.apple.com"
ALGORITHM: Final = "RS256"
REFETCH_SECONDS: Final = 30.0
LEEWAY_SECONDS: Final = 60
MAX_JWKS: Final = 64 * 1024
MAX_KEYS: Final = 16


class AppleUnavailable(ChannelError):
    """Apple's key set could not be fetched or read."""


class AppleTokenRefused(ChannelError):
    """The identity token is not one Apple issued to us, now; `reason` says which check failed."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = (
            reason  # malformed, algorithm, unknown_kid, signature, issuer, audience, expired, future
        )
        self.message = message


@dataclass(frozen=True)
class AppleIdentity:
    sub: str
    email: str = ""


def _public_keys(text: str) -> dict[str, Any]:
    """The RSA keys of a JWKS by kid; a key that is not an RS256 signing key is left out."""
    if len(text) > MAX_JWKS:
        raise AppleUnavailable("the key set is too large")
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise AppleUnavailable("the key set is not JSON") from exc
    found = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(found, list):
        raise AppleUnavailable("the key set has no keys")
    keys: dict[str, Any] = {}
    for jwk in found[:MAX_KEYS]:
        if not isinstance(jwk, dict) or jwk.get("kty") != "RSA" or jwk.get("alg", ALGORITHM) != ALGORITHM:
            continue
        kid = jwk.get("kid")
        if not isinstance(kid, str) or jwk.get("use", "sig") != "sig":
            continue
        try:
            keys[kid] = RSAAlgorithm.from_jwk(jwk)
        except (jwt.PyJWTError, ValueError, TypeError, KeyError):
            continue
    return keys


class AppleKeys:
    """Apple's JWKS, fetched through the service's HTTP client and kept until a kid is unknown."""

    def __init__(self, http: httpx.AsyncClient, url: str, now: Callable[[], float]) -> None:
        self._http = http
        self._url = url
        self._now = now
        self._keys: dict[str, Any] = {}
        self._fetched_at: float | None = None
        self._lock = asyncio.Lock()
        self.fetches = 0

    async def key(self, kid: str) -> Any:
        if kid in self._keys:
            return self._keys[kid]
        async with self._lock:  # one fetch for every request that waits on the same unknown kid
            if kid not in self._keys and self._may_fetch():
                await self._fetch()
        if kid not in self._keys:
            raise AppleTokenRefused("unknown_kid", f"unknown key id {kid[:64]!r}")
        return self._keys[kid]

    def _may_fetch(self) -> bool:
        if self._fetched_at is None:
            return True
        since = self._now() - self._fetched_at
        return since >= REFETCH_SECONDS or since < 0  # a clock set back must not lock the keys out

    async def _fetch(self) -> None:
        self._fetched_at = self._now()  # a failed fetch counts too: Apple down is not hammered either
        self.fetches += 1
        try:
            response = await self._http.get(self._url)
        except httpx.HTTPError as exc:
            raise AppleUnavailable(f"auth/keys: {type(exc).__name__}") from exc
        if response.status_code != 200:
            raise AppleUnavailable(f"auth/keys: HTTP {response.status_code}")
        self._keys = _public_keys(response.text)


def _header(token: str) -> dict[str, Any]:
    try:
        header = jwt.get_unverified_header(token)
    except (jwt.PyJWTError, ValueError, TypeError) as exc:
        raise AppleTokenRefused("malformed", "not a JWT") from exc
    return header


def _when(claims: dict[str, Any], name: str) -> float:
    value = claims.get(name)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise AppleTokenRefused("malformed", f"{name} is not a number")
    return float(value)


def _check_times(claims: dict[str, Any], now: float) -> None:
    # Checked against the service's clock, not PyJWT's time.time(): one clock for the whole service.
    if _when(claims, "exp") <= now - LEEWAY_SECONDS:
        raise AppleTokenRefused("expired", "the identity token has expired")
    if _when(claims, "iat") > now + LEEWAY_SECONDS:
        raise AppleTokenRefused("future", "the identity token is issued in the future")


async def verify_identity_token(token: str, keys: AppleKeys, bundle_id: str, now: float) -> AppleIdentity:
    """The identity in `token`, or AppleTokenRefused / AppleUnavailable."""
    header = _header(token)
    if header.get("alg") != ALGORITHM:
        raise AppleTokenRefused("algorithm", f"alg {str(header.get('alg'))[:16]!r} is not RS256")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise AppleTokenRefused("malformed", "the header has no kid")
    key = await keys.key(kid)
    options: Any = {
        "verify_exp": False,
        "verify_iat": False,
        "verify_nbf": False,
        "require": ["iss", "aud", "exp", "iat", "sub"],
    }
    try:
        claims = jwt.decode(
            token, key, algorithms=[ALGORITHM], audience=bundle_id, issuer=ISSUER, options=options
        )
    except jwt.InvalidSignatureError as exc:
        raise AppleTokenRefused("signature", "the signature does not verify") from exc
    except jwt.InvalidAudienceError as exc:
        raise AppleTokenRefused("audience", "the token is for another app (aud)") from exc
    except jwt.InvalidIssuerError as exc:
        raise AppleTokenRefused("issuer", "the token is not Apple's (iss)") from exc
    except (jwt.PyJWTError, ValueError, TypeError) as exc:
        raise AppleTokenRefused("malformed", type(exc).__name__) from exc
    _check_times(claims, now)
    sub, email = claims.get("sub"), claims.get("email")
    if not isinstance(sub, str) or not sub or len(sub) > 128:
        raise AppleTokenRefused("malformed", "sub is not a string of 1 to 128 characters")
    return AppleIdentity(sub=sub, email=email if isinstance(email, str) else "")
