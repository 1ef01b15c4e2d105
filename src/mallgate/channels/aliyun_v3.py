"""Aliyun OpenAPI signature V3 (ACS3-HMAC-SHA256), the one the current official SDKs send.

`request_headers` signs a request (the client); `verify_request` checks one (the
sandbox stand-in). Both build the same canonical request, and the example of
Aliyun's "V3版本请求体&签名机制" document pins it.

Also here, because both Aliyun signatures (this one and the legacy RPC HMAC-SHA1
of `sms_aliyun`) share them: the RFC 3986 encoding, the timestamp rule, and the
error a refused request raises, with the texts the gateway answers.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from calendar import timegm
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from time import strptime
from urllib.parse import quote

from mallgate.channels.errors import NotAuthentic

ALGORITHM = "ACS3-HMAC-SHA256"
DATE_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
# The gateway refuses a request whose time is 15 minutes off, and a nonce seen within as long.
DATE_TOLERANCE = 15 * 60
# RPC-style APIs (SendSms among them) sign "/" whatever path the request went to.
RPC_PATH = "/"

# Headers the gateway requires signed on every request. The nonce is signed whenever it is
# present (as every x-acs- header is); its absence is refused on its own, see the stand-in.
REQUIRED_SIGNED: tuple[str, ...] = (
    "host",
    "x-acs-action",
    "x-acs-content-sha256",
    "x-acs-date",
    "x-acs-version",
)

# The gateway's texts (its real answers carry them; SDKs parse some of them).
INCOMPLETE = "The request signature does not conform to Aliyun standards."
V3_MISMATCH = "Specified signature does not match our calculation."
EXPIRED = "Specified time stamp or date value is expired."
BAD_DATE = "Specified time stamp or date value is not well formatted."
KEY_NOT_FOUND = "Specified access key is not found."

_AUTHORIZATION = re.compile(
    r"ACS3-HMAC-SHA256 Credential=(?P<key_id>[^,\s]+), ?SignedHeaders=(?P<signed>[a-z0-9\-;]+),"
    r" ?Signature=(?P<signature>[0-9a-f]{64})"
)


class AliyunAuthError(NotAuthentic):
    """A request failed verification; `code` and `message` are what the Aliyun gateway would answer."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Verified:
    """What a verified V3 request was signed with."""

    key_id: str
    nonce: str


def percent_encode(value: str) -> str:
    """RFC 3986 percent-encoding of the UTF-8 bytes: space is %20, `*` is %2A, `~` stays."""
    return quote(value, safe="-_.~")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_query(pairs: Iterable[tuple[str, str]]) -> str:
    """`name=value` pairs, both percent-encoded, sorted (by name, then value), joined by `&`."""
    encoded = sorted((percent_encode(k), percent_encode(v)) for k, v in pairs)
    return "&".join(f"{k}={v}" for k, v in encoded)


def parse_time(value: str) -> float:
    """The epoch seconds of a `yyyy-MM-ddTHH:mm:ssZ` UTC time, or InvalidTimeStamp.Format."""
    try:
        return float(timegm(strptime(value, DATE_FORMAT)))
    except ValueError as exc:
        raise AliyunAuthError("InvalidTimeStamp.Format", BAD_DATE) from exc


def check_fresh(value: str, now: float, tolerance: int = DATE_TOLERANCE) -> None:
    if abs(now - parse_time(value)) > tolerance:
        raise AliyunAuthError("InvalidTimeStamp.Expired", EXPIRED)


def header_values(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Lower-cased names; a header sent more than once is its trimmed values, sorted, joined by `,`."""
    values: dict[str, list[str]] = {}
    for name, value in pairs:
        values.setdefault(name.lower(), []).append(value.strip())
    return {name: ",".join(sorted(found)) for name, found in values.items()}


def must_sign(name: str) -> bool:
    """host, content-type and every x-acs- header present have to be signed."""
    lowered = name.lower()
    return lowered in ("host", "content-type") or lowered.startswith("x-acs-")


def canonical_request(
    method: str,
    query: str,
    headers: Mapping[str, str],
    signed: Sequence[str],
    payload_hash: str,
    path: str = RPC_PATH,
) -> str:
    """Method, path, canonical query, `name:value` lines of the signed headers, their names, body hash."""
    lowered = {k.lower(): v for k, v in headers.items()}
    lines = "".join(f"{name}:{lowered[name].strip()}\n" for name in signed)
    return "\n".join([method.upper(), path, query, lines, ";".join(signed), payload_hash])


def string_to_sign(canonical: str) -> str:
    return f"{ALGORITHM}\n{sha256_hex(canonical.encode())}"


def signature(secret: str, to_sign: str) -> str:
    """Lower-case hex HMAC-SHA256 keyed with the bare secret (the RPC scheme appends `&`; V3 does not)."""
    return hmac.new(secret.encode(), to_sign.encode(), hashlib.sha256).hexdigest()


def authorization(
    key_id: str,
    secret: str,
    *,
    method: str,
    query: str,
    headers: Mapping[str, str],
    payload_hash: str,
    path: str = RPC_PATH,
) -> str:
    signed = sorted({name.lower() for name in headers if must_sign(name)})
    to_sign = string_to_sign(canonical_request(method, query, headers, signed, payload_hash, path))
    return (
        f"{ALGORITHM} Credential={key_id},SignedHeaders={';'.join(signed)},"
        f"Signature={signature(secret, to_sign)}"
    )


def request_headers(
    key_id: str,
    secret: str,
    *,
    host: str,
    action: str,
    version: str,
    query: str,
    payload: bytes,
    now: datetime,
    nonce: str,
    method: str = "POST",
) -> dict[str, str]:
    """The signed headers of a request; `query` is the canonical query, sent as it is after `?`.

    `host` must be the Host header the request really carries (port included), since it is signed.
    """
    payload_hash = sha256_hex(payload)
    headers = {
        "host": host,
        "x-acs-action": action,
        "x-acs-version": version,
        "x-acs-date": now.strftime(DATE_FORMAT),
        "x-acs-signature-nonce": nonce,
        "x-acs-content-sha256": payload_hash,
    }
    headers["Authorization"] = authorization(
        key_id, secret, method=method, query=query, headers=headers, payload_hash=payload_hash
    )
    return headers


def is_v3(headers: Mapping[str, str]) -> bool:
    """Whether a request carries a V3 Authorization (an RPC one carries its Signature as a parameter)."""
    return headers.get("authorization", "").lstrip().startswith(f"{ALGORITHM} ")


def _signed_names(headers: Mapping[str, str], listed: str) -> list[str]:
    names = listed.split(";")
    if names != sorted(set(names)):
        raise AliyunAuthError("IncompleteSignature", INCOMPLETE)
    wanted = set(REQUIRED_SIGNED) | {name for name in headers if must_sign(name)}
    if not wanted <= set(names) or not set(names) <= set(headers):
        raise AliyunAuthError("IncompleteSignature", INCOMPLETE)
    return names


def verify_request(
    method: str,
    query: Iterable[tuple[str, str]],
    headers: Mapping[str, str],
    body: bytes,
    secret_for: Callable[[str], str | None],
    now: float,
    *,
    path: str = RPC_PATH,
    tolerance: int = DATE_TOLERANCE,
) -> Verified:
    """Raise AliyunAuthError unless the request is V3-signed by a known key within `tolerance` s.

    `headers` are lower-cased (see `header_values`). The body is hashed here: a request whose
    x-acs-content-sha256 is not its body's hash does not verify.
    """
    match = _AUTHORIZATION.fullmatch(headers.get("authorization", "").strip())
    if match is None:
        raise AliyunAuthError("IncompleteSignature", INCOMPLETE)
    signed = _signed_names(headers, match["signed"])
    secret = secret_for(match["key_id"])
    if secret is None:
        raise AliyunAuthError("InvalidAccessKeyId.NotFound", KEY_NOT_FOUND)
    check_fresh(headers["x-acs-date"], now, tolerance)
    canonical = canonical_request(method, canonical_query(query), headers, signed, sha256_hex(body), path)
    to_sign = string_to_sign(canonical)
    if not hmac.compare_digest(signature(secret, to_sign), match["signature"]):
        # The gateway echoes what it signed, so a client can compare it with its own.
        raise AliyunAuthError(
            "SignatureDoesNotMatch",
            f"{V3_MISMATCH} server StringToSign is [{to_sign}] server CanonicalRequest is [{canonical}]",
        )
    return Verified(key_id=match["key_id"], nonce=headers.get("x-acs-signature-nonce", ""))
