"""The sandbox's own key material, generated on first start and kept under ./var/sandbox/.

The sandbox plays the platforms, so it holds *their* private keys (Alipay's,
WeChat Pay's) as well as the merchant keys the service signs its calls with.
None of this is ever a production secret.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import rsa

from mallgate.keys import load_private_key, private_pem, public_pem
from mallgate.private_files import create_private, write_private


def _new_rsa() -> str:
    return private_pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))


@dataclass(frozen=True)
class SandboxKeys:
    alipay_platform_private: str  # signs notifications and responses as Alipay
    alipay_merchant_private: str  # the shop's app key, signs calls to the Alipay stand-in
    wechatpay_platform_private: str  # signs v3 notifications as WeChat Pay
    wechatpay_public_key_id: str
    wechatpay_merchant_private: str
    wechatpay_api_key: str
    wechatpay_api_v3_key: str
    wechat_app_secret: str
    wechat_mp_token: str
    wechat_mp_aes_key: str

    @classmethod
    def generate(cls) -> SandboxKeys:
        alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
        return cls(
            alipay_platform_private=_new_rsa(),
            alipay_merchant_private=_new_rsa(),
            wechatpay_platform_private=_new_rsa(),
            wechatpay_public_key_id="PUB_KEY_ID_" + "".join(secrets.choice("0123456789") for _ in range(32)),
            wechatpay_merchant_private=_new_rsa(),
            wechatpay_api_key=secrets.token_hex(16),
            wechatpay_api_v3_key=secrets.token_hex(16),
            wechat_app_secret=secrets.token_hex(16),
            wechat_mp_token=secrets.token_hex(8),
            wechat_mp_aes_key="".join(secrets.choice(alphabet) for _ in range(43)),
        )

    @classmethod
    def load_or_create(cls, folder: Path) -> SandboxKeys:
        path = folder / "keys.json"
        if path.is_file():
            data = json.loads(path.read_text())
            fresh = asdict(cls.generate()) if set(data) != set(cls.__dataclass_fields__) else {}
            keys = cls(**{**fresh, **{k: v for k, v in data.items() if k in cls.__dataclass_fields__}})
            if fresh:
                keys.save(path)
            return keys
        keys = cls.generate()
        # Workers starting together on a fresh var dir each make keys: one file wins, and every
        # worker uses that one (a worker with keys of its own answered every signed call wrong).
        if not create_private(path, json.dumps(asdict(keys), indent=2).encode()):
            return cls.load_or_create(folder)
        return keys

    def save(self, path: Path) -> None:
        write_private(path, json.dumps(asdict(self), indent=2).encode())

    @property
    def alipay_platform_public(self) -> str:
        return public_pem(load_private_key(self.alipay_platform_private).public_key())

    @property
    def wechatpay_platform_public(self) -> str:
        return public_pem(load_private_key(self.wechatpay_platform_private).public_key())
