"""The server secret: what keys the SMS code hashes, kept out of the database.

`MALLGATE_SECRET_KEY` when set (required, and the same everywhere, when several
machines share one database). Otherwise one key is generated on first start into
`<var_dir>/secret_key`, readable by its owner only, and read from there afterwards.
Workers that start together may all try to create it; exactly one file wins and
every worker reads that one: the key is written to a private temporary file and
then hard-linked into place, which fails if the name exists, so no worker ever
reads a half-written key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
import stat
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mallgate.private_files import create_private
from mallgate.settings import MIN_SECRET_KEY, Settings

log = logging.getLogger("mallgate")

FILE_NAME: Final = "secret_key"
MIN_LENGTH: Final = MIN_SECRET_KEY


class SecretKeyError(RuntimeError):
    """The key file exists but cannot be used; start-up stops rather than make a new key."""


def resolve(settings: Settings) -> bytes:
    """The secret of these settings: the configured key, else the one in var/."""
    if settings.secret_key:
        return settings.secret_key.encode()
    return load_or_create(settings.var_dir / FILE_NAME)


def load_or_create(path: Path) -> bytes:
    """The key in `path`, created with mode 0600 if there is none yet."""
    try:
        return _read(path)
    except FileNotFoundError:
        pass
    if create_private(path, (secrets.token_urlsafe(48) + "\n").encode()):
        log.info("generated a new secret key in %s", path)
    # else another worker got there first: its key is the one
    return _read(path)


def _read(path: Path) -> bytes:
    # A key that changes silently would turn every live code into a wrong one; a damaged file
    # is the operator's to look at, so it stops start-up instead of being replaced.
    key = path.read_bytes().strip()
    if len(key) < MIN_LENGTH:
        raise SecretKeyError(
            f"{path} holds no usable key (at least {MIN_LENGTH} characters); "
            "restore it, or delete it to generate a new one (live SMS codes then stop working)"
        )
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("%s is readable by others (mode %o); chmod 600 it", path, mode)
    return key


# --- the Mini Program session_key, sealed at rest ---

_SESSION_KEY_PURPOSE: Final = b"mallgate session_key v1"
_NONCE_BYTES: Final = 12


def _session_key_cipher(secret: bytes) -> AESGCM:
    # A key of its own, derived for this purpose only: the SMS hash key is never an AES key too.
    return AESGCM(hmac.new(secret, _SESSION_KEY_PURPOSE, hashlib.sha256).digest())


def seal_session_key(secret: bytes, session_key: str, bound_to: str) -> str:
    """`session_key` encrypted (AES-256-GCM) for the database; `bound_to` (the identity) is authenticated
    with it, so a sealed value copied onto another identity does not open there."""
    nonce = os.urandom(_NONCE_BYTES)
    sealed = _session_key_cipher(secret).encrypt(nonce, session_key.encode(), bound_to.encode())
    return base64.b64encode(nonce + sealed).decode()


def open_session_key(secret: bytes, sealed: str, bound_to: str) -> str | None:
    """The session_key `seal_session_key` sealed, or None when it cannot be opened (another secret)."""
    try:
        raw = base64.b64decode(sealed, validate=True)
        plain = _session_key_cipher(secret).decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], bound_to.encode())
        return plain.decode()
    except (ValueError, InvalidTag):
        return None
