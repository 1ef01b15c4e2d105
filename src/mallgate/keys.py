"""Loading RSA keys the way the platforms' consoles hand them out.

Alipay gives its public key as one line of bare base64 DER; WeChat Pay gives PEM
files; operators often point at a file. All three are accepted wherever a key
setting exists, so a key can be pasted as it was downloaded.
"""

from __future__ import annotations

import base64
import binascii
import functools
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa


class KeyFormatError(ValueError):
    """The text is neither PEM, bare base64 DER nor a readable key file."""


def _read_material(value: str) -> bytes:
    text = value.strip()
    if not text:
        raise KeyFormatError("empty key")
    if "-----BEGIN" in text:
        return text.encode()
    if len(text) < 4096 and ("/" in text[:1] or text.startswith((".", "~"))):
        path = Path(text).expanduser()
        if path.is_file():
            return path.read_bytes()
        raise KeyFormatError(f"key file not found: {path}")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KeyFormatError("not PEM, base64 DER or a file path") from exc


def load_public_key(value: str) -> rsa.RSAPublicKey:
    """An RSA public key from PEM (key or certificate), base64 DER or a file path."""
    material = _read_material(value)
    loaders = (
        serialization.load_pem_public_key,
        serialization.load_der_public_key,
        lambda data: x509.load_pem_x509_certificate(data).public_key(),
        lambda data: x509.load_der_x509_certificate(data).public_key(),
    )
    for loader in loaders:
        try:
            key = loader(material)
        except (ValueError, TypeError):
            continue
        if isinstance(key, rsa.RSAPublicKey):
            return key
        raise KeyFormatError("not an RSA public key")
    raise KeyFormatError("unreadable public key")


@functools.lru_cache(maxsize=32)
def load_private_key(value: str) -> rsa.RSAPrivateKey:
    """An RSA private key (PKCS#1 or PKCS#8) from PEM, base64 DER or a file path.

    Cached: parsing checks the key, which cost milliseconds on every signed call; the key
    objects are immutable and safe to share between threads.
    """
    material = _read_material(value)
    for loader in (serialization.load_pem_private_key, serialization.load_der_private_key):
        try:
            key = loader(material, None)
        except (ValueError, TypeError):
            continue
        if isinstance(key, rsa.RSAPrivateKey):
            return key
        raise KeyFormatError("not an RSA private key")
    raise KeyFormatError("unreadable private key")


def public_pem(key: rsa.RSAPublicKey) -> str:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def private_pem(key: rsa.RSAPrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
