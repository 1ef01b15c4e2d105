"""The Official Account's message crypto (WeChat's WXBizMsgCrypt scheme), each check beside its signer.

- ``signature``: sha1 over the sorted token, timestamp and nonce (URL check, every push);
- ``msg_signature``: the same over token, timestamp, nonce and the ``Encrypt`` text (safe mode);
- ``Encrypt``: base64 of AES-256-CBC (key = base64(EncodingAESKey + "="), IV = its first 16
  bytes) over ``random(16) | len(msg) as big-endian uint32 | msg | appid``, PKCS#7-padded to
  blocks of **32** bytes (pad 1..32), which a standard 16-byte unpadder refuses for pads 17..32.

Signatures are compared in constant time. What is refused raises `CryptoError` with a short
reason for the log; the push route answers it as a refusal, never as `success`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import struct
from dataclasses import dataclass, field
from typing import Final

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

BLOCK: Final = 32
RANDOM_BYTES: Final = 16
_LENGTH: Final = struct.Struct(">I")


class CryptoError(ValueError):
    """A push that does not decrypt or does not belong to this app."""


class AppIdMismatch(CryptoError):
    """It decrypts, but for another app: WeChat writes the AppID of the app it is meant for."""


# ---------------------------------------------------------------------------------------------
# signatures


def sign(token: str, *parts: str) -> str:
    """sha1 of the token and `parts`, sorted as strings and joined: `signature` and `msg_signature`."""
    return hashlib.sha1("".join(sorted((token, *parts))).encode("utf-8")).hexdigest()  # noqa: S324


def verify(given: str, token: str, *parts: str) -> bool:
    return hmac.compare_digest(given.lower().encode("ascii", "replace"), sign(token, *parts).encode())


def signature(token: str, timestamp: str, nonce: str) -> str:
    return sign(token, timestamp, nonce)


def verify_signature(given: str, token: str, timestamp: str, nonce: str) -> bool:
    return verify(given, token, timestamp, nonce)


def msg_signature(token: str, timestamp: str, nonce: str, encrypt: str) -> str:
    return sign(token, timestamp, nonce, encrypt)


def verify_msg_signature(given: str, token: str, timestamp: str, nonce: str, encrypt: str) -> bool:
    return verify(given, token, timestamp, nonce, encrypt)


# ---------------------------------------------------------------------------------------------
# PKCS#7 with 32-byte blocks


def pad(data: bytes) -> bytes:
    count = BLOCK - len(data) % BLOCK  # 1..32: aligned input gets a whole block of 32
    return data + bytes((count,)) * count


def unpad(data: bytes) -> bytes:
    count = data[-1] if data else 0
    if not 1 <= count <= BLOCK or len(data) < count or data[-count:] != bytes((count,)) * count:
        raise CryptoError("bad padding")
    return data[:-count]


def aes_key(encoding_aes_key: str) -> bytes:
    """The 32-byte AES key of a 43-character EncodingAESKey."""
    try:
        key = base64.b64decode(encoding_aes_key + "=", validate=True)
    except (binascii.Error, ValueError):
        raise CryptoError("EncodingAESKey is not base64") from None
    if len(key) != 32:
        raise CryptoError("EncodingAESKey must be 43 characters")
    return key


# ---------------------------------------------------------------------------------------------
# the message layout


@dataclass(frozen=True)
class WXBizMsgCrypt:
    """One Official Account's crypto: token, EncodingAESKey and AppID."""

    token: str
    encoding_aes_key: str
    app_id: str
    key: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", aes_key(self.encoding_aes_key))

    def _cipher(self) -> Cipher[modes.CBC]:
        return Cipher(algorithms.AES(self.key), modes.CBC(self.key[:16]))

    # ---- signatures ----------------------------------------------------------------------

    def signature(self, timestamp: str, nonce: str) -> str:
        return signature(self.token, timestamp, nonce)

    def verify_signature(self, given: str, timestamp: str, nonce: str) -> bool:
        return verify_signature(given, self.token, timestamp, nonce)

    def msg_signature(self, timestamp: str, nonce: str, encrypt: str) -> str:
        return msg_signature(self.token, timestamp, nonce, encrypt)

    def verify_msg_signature(self, given: str, timestamp: str, nonce: str, encrypt: str) -> bool:
        return verify_msg_signature(given, self.token, timestamp, nonce, encrypt)

    # ---- Encrypt -------------------------------------------------------------------------

    def encrypt(self, message: bytes, *, random16: bytes | None = None) -> str:
        """The `Encrypt` text of `message`; `random16` pins the random prefix (tests, vectors)."""
        prefix = os.urandom(RANDOM_BYTES) if random16 is None else random16
        if len(prefix) != RANDOM_BYTES:
            raise ValueError("the random prefix is 16 bytes")
        plain = pad(prefix + _LENGTH.pack(len(message)) + message + self.app_id.encode("utf-8"))
        encryptor = self._cipher().encryptor()
        return base64.b64encode(encryptor.update(plain) + encryptor.finalize()).decode("ascii")

    def decrypt(self, encrypt: str) -> bytes:
        """The message inside `encrypt`, after checking its layout and that its AppID is ours."""
        message, app_id = self.open(encrypt)
        if not hmac.compare_digest(app_id, self.app_id.encode("utf-8")):
            raise AppIdMismatch("appid mismatch")
        return message

    def open(self, encrypt: str) -> tuple[bytes, bytes]:
        """(message, appid tail) of `encrypt`, the appid not yet compared."""
        try:
            raw = base64.b64decode(encrypt, validate=True)
        except (binascii.Error, ValueError):
            raise CryptoError("Encrypt is not base64") from None
        if not raw or len(raw) % BLOCK:
            raise CryptoError("Encrypt is not a whole number of 32-byte blocks")
        decryptor = self._cipher().decryptor()
        plain = unpad(decryptor.update(raw) + decryptor.finalize())
        if len(plain) < RANDOM_BYTES + _LENGTH.size:
            raise CryptoError("too short")
        (length,) = _LENGTH.unpack_from(plain, RANDOM_BYTES)
        start = RANDOM_BYTES + _LENGTH.size
        if start + length > len(plain):
            raise CryptoError("message length beyond the data")
        return plain[start : start + length], plain[start + length :]

    # ---- the reply envelope --------------------------------------------------------------

    def encrypt_reply(
        self, message: bytes, *, timestamp: str, nonce: str, random16: bytes | None = None
    ) -> bytes:
        """The encrypted reply XML: Encrypt, MsgSignature, TimeStamp and Nonce (as WeChat's samples)."""
        encrypted = self.encrypt(message, random16=random16)
        signed = self.msg_signature(timestamp, nonce, encrypted)
        return (
            f"<xml>\n<Encrypt><![CDATA[{encrypted}]]></Encrypt>\n"
            f"<MsgSignature><![CDATA[{signed}]]></MsgSignature>\n"
            f"<TimeStamp>{timestamp}</TimeStamp>\n"
            f"<Nonce><![CDATA[{nonce}]]></Nonce>\n</xml>"
        ).encode()

    def verify_and_decrypt(self, given: str, timestamp: str, nonce: str, encrypt: str) -> bytes:
        """An encrypted push's message: msg_signature first, then the layout and the AppID."""
        if not self.verify_msg_signature(given, timestamp, nonce, encrypt):
            raise CryptoError("msg_signature mismatch")
        return self.decrypt(encrypt)
