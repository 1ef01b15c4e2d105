"""WeChat Pay API v3: RSA-signed JSON with AES-GCM encrypted resources.

Verify and sign side by side: ``verify_v3_notification`` is the one production entry
point for notifications (signature, freshness, key, decryption, merchant, all at
once); ``sign_v3_*`` produce the same messages for the sandbox and the tests.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mallgate.channels.errors import ChannelError, ForeignNotification, MalformedNotification, NotAuthentic
from mallgate.channels.wechat_pay_v2 import AppIds, app_id_matches
from mallgate.clock import BEIJING
from mallgate.keys import load_private_key, load_public_key
from mallgate.settings import WechatPaySettings

__all__ = [
    "SIGNATURE_TYPE",
    "UnknownSerial",
    "UnsupportedEvent",
    "V3KeyStore",
    "WechatV3Event",
    "WechatV3Payment",
    "WechatV3Refund",
    "aead_decrypt",
    "aead_encrypt",
    "certificates_body",
    "decrypt_certificates",
    "parse_v3_notification",
    "sign_v3",
    "sign_v3_headers",
    "sign_v3_notification",
    "v3_app_params",
    "v3_authorization",
    "v3_fail",
    "v3_jsapi_params",
    "v3_message",
    "v3_success",
    "verify_v3_authorization",
    "verify_v3_notification",
    "verify_v3_signature",
]

SIGNATURE_TYPE: Final = "WECHATPAY2-SHA256-RSA2048"
# WeChat sends deliberately wrong signatures with this prefix to see whether we check at all.
_PROBE_PREFIX: Final = "WECHATPAY/SIGNTEST"
_ALGORITHM: Final = "AEAD_AES_256_GCM"

PublicKeyLike = rsa.RSAPublicKey | str
PrivateKeyLike = rsa.RSAPrivateKey | str


class UnknownSerial(NotAuthentic):
    """Signed with a key we do not hold; in certificate mode, refresh and try once more."""

    def __init__(self, serial: str) -> None:
        super().__init__(f"unknown Wechatpay-Serial {serial[:64]!r}")
        self.serial = serial


class UnsupportedEvent(ChannelError):
    """Authentic and decrypted, but neither a payment nor a refund event."""

    def __init__(self, event: WechatV3Event) -> None:
        super().__init__(f"unsupported event_type {event.event_type!r}")
        self.event = event


_SEAL: Final = object()


def _check_seal(seal: object, name: str) -> None:
    if seal is not _SEAL:
        raise TypeError(f"{name} is only obtained from verify_v3_notification")


@dataclass(frozen=True)
class WechatV3Event:
    """A decrypted v3 notification. Its envelope is trusted only after the RSA check."""

    id: str
    create_time: str
    event_type: str
    resource_type: str
    summary: str
    original_type: str
    resource: dict[str, Any]


@dataclass(frozen=True)
class WechatV3Payment:
    event_id: str
    event_type: str
    out_trade_no: str
    transaction_id: str
    trade_state: str
    total: int
    payer_total: int | None
    currency: str
    appid: str
    mchid: str
    success_time: str
    payer_openid: str
    raw: dict[str, Any]
    _seal: object = field(default=None, repr=False, compare=False, kw_only=True)

    def __post_init__(self) -> None:
        _check_seal(self._seal, "WechatV3Payment")

    @property
    def result_ok(self) -> bool:
        return self.trade_state == "SUCCESS"


@dataclass(frozen=True)
class WechatV3Refund:
    event_id: str
    event_type: str
    out_trade_no: str
    transaction_id: str
    out_refund_no: str
    refund_id: str
    refund_status: str
    refund: int
    total: int
    payer_refund: int | None
    success_time: str
    mchid: str
    raw: dict[str, Any]
    _seal: object = field(default=None, repr=False, compare=False, kw_only=True)

    def __post_init__(self) -> None:
        _check_seal(self._seal, "WechatV3Refund")

    @property
    def succeeded(self) -> bool:
        return self.refund_status == "SUCCESS"


# ----------------------------------------------------------------------------------------------
# keys


def _normal_serial(serial: str) -> str:
    # Certificate serials are hex numbers: case and leading zeros carry no meaning.
    return serial.strip().upper().lstrip("0") or "0"


def _rsa_key_of(cert: x509.Certificate) -> rsa.RSAPublicKey:
    key = cert.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("WeChat Pay certificate without an RSA key")
    return key


class V3KeyStore:
    """WeChat Pay's verification keys: a public key with its ``PUB_KEY_ID_...`` and/or
    platform certificates by serial (during a migration both kinds sign callbacks)."""

    def __init__(
        self,
        *,
        public_key_id: str = "",
        public_key: PublicKeyLike | None = None,
        certificates: str | Path | Iterable[x509.Certificate] | None = None,
    ) -> None:
        if bool(public_key_id) != bool(public_key):
            raise ValueError("the WeChat Pay public key and its PUB_KEY_ID go together")
        self._public_key_id = public_key_id
        self._public_key = load_public_key(public_key) if isinstance(public_key, str) else public_key
        self._certificates: dict[str, x509.Certificate] = {}
        if certificates:
            self.add_certificates(certificates)

    @classmethod
    def from_settings(cls, settings: WechatPaySettings) -> V3KeyStore:
        return cls(
            public_key_id=settings.public_key_id,
            public_key=settings.public_key or None,
            certificates=settings.platform_certs or None,
        )

    def add_certificates(self, source: str | Path | Iterable[x509.Certificate]) -> list[str]:
        """Add certificates from a PEM bundle text, a PEM file or folder, or loaded objects.

        Returns the serials added (uppercase hex).
        """
        if isinstance(source, Path) or (isinstance(source, str) and "-----BEGIN" not in source):
            certs = _certificates_from_path(Path(str(source).strip()).expanduser())
        elif isinstance(source, str):
            certs = x509.load_pem_x509_certificates(source.encode())
        else:
            certs = list(source)
        added = []
        for cert in certs:
            _rsa_key_of(cert)
            serial = format(cert.serial_number, "X")
            self._certificates[_normal_serial(serial)] = cert
            added.append(serial)
        return added

    def get(self, serial: str) -> rsa.RSAPublicKey | None:
        if self._public_key is not None and serial == self._public_key_id:
            return self._public_key
        if serial.startswith("PUB_KEY_ID_"):
            return None
        cert = self._certificates.get(_normal_serial(serial))
        return _rsa_key_of(cert) if cert is not None else None

    def copy(self) -> V3KeyStore:
        clone = V3KeyStore(public_key_id=self._public_key_id, public_key=self._public_key)
        clone._certificates = dict(self._certificates)
        return clone

    @property
    def serials(self) -> list[str]:
        ids = [self._public_key_id] if self._public_key is not None else []
        return ids + [format(c.serial_number, "X") for c in self._certificates.values()]

    @property
    def certificate_mode(self) -> bool:
        return bool(self._certificates)


def _certificates_from_path(path: Path) -> list[x509.Certificate]:
    files = sorted(p for p in path.iterdir() if p.suffix in (".pem", ".crt")) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"no certificates found at {path}")
    certs: list[x509.Certificate] = []
    for file in files:
        certs.extend(x509.load_pem_x509_certificates(file.read_bytes()))
    return certs


# ----------------------------------------------------------------------------------------------
# signatures


def v3_message(*parts: str | bytes) -> bytes:
    """Each part on its own line, each line ending in ``\\n`` (so an empty body is just ``\\n``)."""
    return b"".join((p.encode() if isinstance(p, str) else p) + b"\n" for p in parts)


def sign_v3(message_parts: Sequence[str | bytes], private_key: PrivateKeyLike) -> str:
    key = load_private_key(private_key) if isinstance(private_key, str) else private_key
    signature = key.sign(v3_message(*message_parts), padding.PKCS1v15(), hashes.SHA256())
    return base64.b64encode(signature).decode("ascii")


def _verify_rsa(key: rsa.RSAPublicKey, signature_b64: str, message: bytes) -> None:
    try:
        signature = base64.b64decode(signature_b64, validate=True)
    except (binascii.Error, ValueError):
        raise NotAuthentic("signature is not base64") from None
    try:
        key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        raise NotAuthentic("bad signature") from None


def _fresh_timestamp(value: str, now: float, tolerance: float) -> None:
    if not value.isascii() or not value.isdigit() or len(value) > 12:
        raise NotAuthentic("malformed timestamp")
    if abs(now - int(value)) >= tolerance:
        raise NotAuthentic("timestamp outside the accepted window")


def verify_v3_signature(
    headers: Mapping[str, str],
    body: bytes,
    *,
    keys: V3KeyStore,
    now: float,
    tolerance: float = 300,
) -> None:
    """Check the ``Wechatpay-*`` headers over the raw body (notifications and responses alike)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    timestamp = lowered.get("wechatpay-timestamp", "")
    nonce = lowered.get("wechatpay-nonce", "")
    signature = lowered.get("wechatpay-signature", "")
    serial = lowered.get("wechatpay-serial", "")
    if not (timestamp and nonce and signature and serial):
        raise NotAuthentic("missing Wechatpay-* signature headers")
    if signature.startswith(_PROBE_PREFIX):
        raise NotAuthentic("WeChat Pay signature probe")
    kind = lowered.get("wechatpay-signature-type", SIGNATURE_TYPE)
    if kind != SIGNATURE_TYPE:
        raise NotAuthentic(f"unsupported signature type {kind[:40]!r}")
    if "\n" in nonce:
        raise NotAuthentic("malformed nonce")
    _fresh_timestamp(timestamp, now, tolerance)
    key = keys.get(serial)
    if key is None:
        raise UnknownSerial(serial)
    _verify_rsa(key, signature, v3_message(timestamp, nonce, body))


def sign_v3_headers(
    body: bytes, *, private_key: PrivateKeyLike, serial: str, timestamp: int, nonce: str
) -> dict[str, str]:
    """The ``Wechatpay-*`` headers WeChat puts on a notification or an answer (sandbox, tests)."""
    return {
        "Wechatpay-Timestamp": str(timestamp),
        "Wechatpay-Nonce": nonce,
        "Wechatpay-Signature": sign_v3([str(timestamp), nonce, body], private_key),
        "Wechatpay-Serial": serial,
        "Wechatpay-Signature-Type": SIGNATURE_TYPE,
    }


def v3_authorization(
    method: str,
    url: str,
    body: bytes | str,
    *,
    mch_id: str,
    serial_no: str,
    private_key: PrivateKeyLike,
    timestamp: int,
    nonce: str,
) -> str:
    """``Authorization`` for a call to WeChat Pay; ``url`` is the path with its query."""
    signature = sign_v3([method.upper(), url, str(timestamp), nonce, body], private_key)
    return (
        f'{SIGNATURE_TYPE} mchid="{mch_id}",nonce_str="{nonce}",signature="{signature}",'
        f'timestamp="{timestamp}",serial_no="{serial_no}"'
    )


def verify_v3_authorization(
    header: str,
    method: str,
    url: str,
    body: bytes | str,
    *,
    public_key: PublicKeyLike,
    now: float,
    tolerance: float = 300,
) -> dict[str, str]:
    """The sandbox's side of :func:`v3_authorization`; returns the header's fields."""
    scheme, _, rest = header.partition(" ")
    if scheme != SIGNATURE_TYPE:
        raise NotAuthentic("unsupported authorization scheme")
    fields: dict[str, str] = {}
    for item in rest.split(","):
        name, _, value = item.strip().partition("=")
        fields[name] = value.strip('"')
    if not all(fields.get(k) for k in ("mchid", "nonce_str", "signature", "timestamp", "serial_no")):
        raise NotAuthentic("incomplete authorization")
    _fresh_timestamp(fields["timestamp"], now, tolerance)
    key = load_public_key(public_key) if isinstance(public_key, str) else public_key
    message = v3_message(method.upper(), url, fields["timestamp"], fields["nonce_str"], body)
    _verify_rsa(key, fields["signature"], message)
    return fields


# ----------------------------------------------------------------------------------------------
# AEAD


def _bytes(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else value


def aead_decrypt(
    api_v3_key: str | bytes, nonce: str | bytes, associated_data: str | bytes, ciphertext_b64: str
) -> bytes:
    """AES-GCM open; the key size follows the key (production keys are 32 bytes)."""
    try:
        data = base64.b64decode(ciphertext_b64, validate=True)
    except (binascii.Error, ValueError):
        raise NotAuthentic("ciphertext is not base64") from None
    try:
        return AESGCM(_bytes(api_v3_key)).decrypt(_bytes(nonce), data, _bytes(associated_data) or None)
    except InvalidTag:
        raise NotAuthentic("resource does not decrypt under our APIv3 key") from None
    except ValueError as exc:
        raise NotAuthentic(f"unusable AEAD parameters: {exc}") from None


def aead_encrypt(
    api_v3_key: str | bytes, nonce: str | bytes, associated_data: str | bytes, plaintext: bytes
) -> str:
    sealed = AESGCM(_bytes(api_v3_key)).encrypt(_bytes(nonce), plaintext, _bytes(associated_data) or None)
    return base64.b64encode(sealed).decode("ascii")


# ----------------------------------------------------------------------------------------------
# notifications


def _str(obj: Mapping[str, Any], name: str) -> str:
    value = obj.get(name, "")
    if not isinstance(value, str):
        raise MalformedNotification(f"{name} is not a string")
    return value


def parse_v3_notification(body: bytes, api_v3_key: str | bytes) -> WechatV3Event:
    """Decrypt a notification's resource. Does not check the RSA signature: use
    :func:`verify_v3_notification` for anything that can change an order."""
    try:
        envelope = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise MalformedNotification("notification body is not JSON") from None
    if not isinstance(envelope, dict) or not isinstance(envelope.get("resource"), dict):
        raise MalformedNotification("notification without a resource object")
    resource: dict[str, Any] = envelope["resource"]
    algorithm = _str(resource, "algorithm")
    if algorithm != _ALGORITHM:
        raise MalformedNotification(f"unsupported algorithm {algorithm[:40]!r}")
    plain = aead_decrypt(
        api_v3_key, _str(resource, "nonce"), _str(resource, "associated_data"), _str(resource, "ciphertext")
    )
    try:
        decrypted = json.loads(plain)
    except (ValueError, UnicodeDecodeError):
        raise MalformedNotification("decrypted resource is not JSON") from None
    if not isinstance(decrypted, dict):
        raise MalformedNotification("decrypted resource is not an object")
    return WechatV3Event(
        id=_str(envelope, "id"),
        create_time=_str(envelope, "create_time"),
        event_type=_str(envelope, "event_type"),
        resource_type=_str(envelope, "resource_type"),
        summary=_str(envelope, "summary"),
        original_type=_str(resource, "original_type"),
        resource=decrypted,
    )


def _fen(obj: Mapping[str, Any], name: str) -> int:
    value = obj.get(name)
    # bool is an int subclass; a JSON true is no amount.
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise MalformedNotification(f"amount.{name} is not an amount in fen")
    return value


def _fen_optional(obj: Mapping[str, Any], name: str) -> int | None:
    return None if obj.get(name) is None else _fen(obj, name)


def _amount(resource: Mapping[str, Any]) -> Mapping[str, Any]:
    amount = resource.get("amount")
    if not isinstance(amount, dict):
        raise MalformedNotification("resource without an amount object")
    return amount


def _payment(event: WechatV3Event, app_id: AppIds, mch_id: str) -> WechatV3Payment:
    res = event.resource
    if _str(res, "mchid") != mch_id:
        raise ForeignNotification("notification for another mchid")
    if not app_id_matches(_str(res, "appid"), app_id):
        raise ForeignNotification("notification for another appid")
    amount = _amount(res)
    payer = res.get("payer")
    return WechatV3Payment(
        event_id=event.id,
        event_type=event.event_type,
        out_trade_no=_str(res, "out_trade_no"),
        transaction_id=_str(res, "transaction_id"),
        trade_state=_str(res, "trade_state"),
        total=_fen(amount, "total"),
        payer_total=_fen_optional(amount, "payer_total"),
        currency=_str(amount, "currency"),
        appid=_str(res, "appid"),
        mchid=_str(res, "mchid"),
        success_time=_str(res, "success_time"),
        payer_openid=_str(payer, "openid") if isinstance(payer, dict) else "",
        raw=res,
        _seal=_SEAL,
    )


def _refund(event: WechatV3Event, mch_id: str) -> WechatV3Refund:
    res = event.resource
    # Refund resources carry no appid; the merchant id is all there is to compare.
    if _str(res, "mchid") != mch_id:
        raise ForeignNotification("notification for another mchid")
    amount = _amount(res)
    return WechatV3Refund(
        event_id=event.id,
        event_type=event.event_type,
        out_trade_no=_str(res, "out_trade_no"),
        transaction_id=_str(res, "transaction_id"),
        out_refund_no=_str(res, "out_refund_no"),
        refund_id=_str(res, "refund_id"),
        refund_status=_str(res, "refund_status"),
        refund=_fen(amount, "refund"),
        total=_fen(amount, "total"),
        payer_refund=_fen_optional(amount, "payer_refund"),
        success_time=_str(res, "success_time"),
        mchid=_str(res, "mchid"),
        raw=res,
        _seal=_SEAL,
    )


def verify_v3_notification(
    headers: Mapping[str, str],
    body: bytes,
    *,
    keys: V3KeyStore,
    api_v3_key: str | bytes,
    app_id: AppIds,
    mch_id: str,
    now: float,
    tolerance: float = 300,
) -> WechatV3Payment | WechatV3Refund:
    """Verify, decrypt and read a v3 notification; the only way to get a payment or refund.

    Raises NotAuthentic (UnknownSerial when the key is missing), ForeignNotification,
    MalformedNotification, or UnsupportedEvent (authentic but of another kind, which
    carries the decrypted event so the caller may acknowledge it).
    """
    if not mch_id:
        raise ValueError("mch_id must be configured to accept v3 notifications")
    verify_v3_signature(headers, body, keys=keys, now=now, tolerance=tolerance)
    event = parse_v3_notification(body, api_v3_key)
    kind = event.event_type.partition(".")[0]
    if kind == "TRANSACTION" and event.original_type in ("transaction", ""):
        return _payment(event, app_id, mch_id)
    if kind == "REFUND" and event.original_type in ("refund", ""):
        return _refund(event, mch_id)
    raise UnsupportedEvent(event)


def sign_v3_notification(
    event_type: str,
    resource_plain: Mapping[str, Any],
    *,
    private_key: PrivateKeyLike,
    serial: str,
    api_v3_key: str | bytes,
    now: float,
    nonce: str,
    aead_nonce: str | None = None,
    event_id: str | None = None,
    summary: str = "",
) -> tuple[dict[str, str], bytes]:
    """A v3 notification as WeChat sends it: headers and raw body (sandbox, tests)."""
    original_type = event_type.partition(".")[0].lower()
    gcm_nonce = aead_nonce or secrets.token_hex(6)
    plain = json.dumps(dict(resource_plain), ensure_ascii=False, separators=(",", ":")).encode()
    envelope = {
        "id": event_id or f"EV-{int(now)}-{nonce[:12]}",
        "create_time": datetime.fromtimestamp(now, BEIJING).isoformat(timespec="seconds"),
        "resource_type": "encrypt-resource",
        "event_type": event_type,
        "summary": summary,
        "resource": {
            "original_type": original_type,
            "algorithm": _ALGORITHM,
            "ciphertext": aead_encrypt(api_v3_key, gcm_nonce, original_type, plain),
            "associated_data": original_type,
            "nonce": gcm_nonce,
        },
    }
    body = json.dumps(envelope, ensure_ascii=False, separators=(",", ":")).encode()
    headers = sign_v3_headers(body, private_key=private_key, serial=serial, timestamp=int(now), nonce=nonce)
    headers["Content-Type"] = "application/json"
    return headers, body


# ----------------------------------------------------------------------------------------------
# platform certificates (certificate mode)


def decrypt_certificates(payload: Mapping[str, Any], api_v3_key: str | bytes) -> list[x509.Certificate]:
    """The certificates of a ``/v3/certificates`` answer, each checked against its stated serial."""
    data = payload.get("data")
    if not isinstance(data, list):
        raise ChannelError("certificates answer without data")
    certs = []
    for item in data:
        if not isinstance(item, dict) or not isinstance(item.get("encrypt_certificate"), dict):
            raise ChannelError("malformed certificate entry")
        enc = item["encrypt_certificate"]
        pem = aead_decrypt(
            api_v3_key, _str(enc, "nonce"), _str(enc, "associated_data"), _str(enc, "ciphertext")
        )
        try:
            cert = x509.load_pem_x509_certificate(pem)
        except ValueError:
            raise ChannelError("undecodable platform certificate") from None
        if _normal_serial(format(cert.serial_number, "X")) != _normal_serial(_str(item, "serial_no")):
            raise NotAuthentic("certificate serial differs from serial_no")
        _rsa_key_of(cert)
        certs.append(cert)
    return certs


def certificates_body(
    certs: Sequence[x509.Certificate], api_v3_key: str | bytes, *, aead_nonce: str | None = None
) -> bytes:
    """A ``/v3/certificates`` answer body (sandbox, tests)."""
    data = []
    for cert in certs:
        gcm_nonce = aead_nonce or secrets.token_hex(6)
        pem = cert.public_bytes(serialization.Encoding.PEM)
        data.append(
            {
                "serial_no": format(cert.serial_number, "X"),
                "effective_time": cert.not_valid_before_utc.astimezone(BEIJING).isoformat(),
                "expire_time": cert.not_valid_after_utc.astimezone(BEIJING).isoformat(),
                "encrypt_certificate": {
                    "algorithm": _ALGORITHM,
                    "nonce": gcm_nonce,
                    "associated_data": "certificate",
                    "ciphertext": aead_encrypt(api_v3_key, gcm_nonce, "certificate", pem),
                },
            }
        )
    return json.dumps({"data": data}, separators=(",", ":")).encode()


# ----------------------------------------------------------------------------------------------
# answers


def v3_success() -> tuple[int, bytes]:
    return 204, b""


def v3_fail(message: str, status: int = 500) -> tuple[int, bytes]:
    """A refusal WeChat will retry; a 200 with FAIL would be read as success."""
    if not 400 <= status <= 599:
        raise ValueError("a v3 failure answer needs a 4xx or 5xx status")
    return status, json.dumps({"code": "FAIL", "message": message}, ensure_ascii=False).encode()


# ----------------------------------------------------------------------------------------------
# what the clients need to open the cashier (v3: RSA with the merchant key)


def v3_jsapi_params(
    app_id: str, prepay_id: str, private_key: PrivateKeyLike, *, timestamp: int, nonce: str
) -> dict[str, str]:
    """``WeixinJSBridge`` / ``wx.requestPayment`` parameters for a v3 prepay id.

    paySign is RSA-SHA256 over ``appId\ntimeStamp\nonceStr\npackage\n`` (WeChat's JSAPI rule).
    """
    params = {
        "appId": app_id,
        "timeStamp": str(timestamp),
        "nonceStr": nonce,
        "package": f"prepay_id={prepay_id}",
        "signType": "RSA",
    }
    params["paySign"] = sign_v3(
        [params["appId"], params["timeStamp"], params["nonceStr"], params["package"]], private_key
    )
    return params


def v3_app_params(
    app_id: str, mch_id: str, prepay_id: str, private_key: PrivateKeyLike, *, timestamp: int, nonce: str
) -> dict[str, str]:
    """``PayReq`` fields for the APP SDK; sign is RSA over ``appid\ntimestamp\nnoncestr\nprepayid\n``."""
    params = {
        "appid": app_id,
        "partnerid": mch_id,
        "prepayid": prepay_id,
        "package": "Sign=WXPay",
        "noncestr": nonce,
        "timestamp": str(timestamp),
    }
    params["sign"] = sign_v3([app_id, params["timestamp"], nonce, prepay_id], private_key)
    return params
