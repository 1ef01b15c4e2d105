"""The Official Account crypto: WeChat's published vectors, the safe-mode layout, and wechatpy agreeing."""

from __future__ import annotations

import base64
import struct

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from wechatpy.crypto import WeChatCrypto

from mallgate.channels import wechat_crypto
from mallgate.channels.wechat_crypto import AppIdMismatch, CryptoError, WXBizMsgCrypt

# §9 V-5: WeChat's WXBizMsgCrypt demo (token spamtest, appid wx2c2769f8efd9abc2).
DEMO_KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
DEMO_ENCRYPT = (
    "hyzAe4OzmOMbd6TvGdIOO6uBmdJoD0Fk53REIHvxYtJlE2B655HuD0m8KUePWB3+LrPXo87wzQ1QLvbeUgmBM4x6F8PGHQHFVAFmOD2L"
    "dJF9FrXpbUAh0B5GIItb52sn896wVsMSHGuPE328HnRGBcrS7C41IzDWyWNlZkyyXwon8T332jisa+h6tEDYsVticbSnyU8dKOIbgU6u"
    "x5VTjg3yt+WGzjlpKn6NPhRjpA912xMezR4kw6KWwMrCVKSVCZciVGCgavjIQ6X8tCOp3yZbGpy0VxpAe+77TszTfRd5RJSVO/HTnifJ"
    "pXgCSUdUue1v6h0EIBYYI1BD1DlD+C0CR8e6OewpusjZ4uBl9FyJvnhvQl+q5rv1ixrcpCumEPo5MJSgM9ehVsNPfUM669WuMyVWQLCz"
    "pu9GhglF2PE="
)
# §9 V-6: a message whose padding is 31 bytes (a 16-byte PKCS#7 unpadder refuses it).
PAD31_KEY = "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C"
PAD31_ENCRYPT = (
    "TYISAfTaVqF97gn22+BQrYOtJcf4GU360iTvjzdLBAp800rTdKFOj+nUhAJKUJ82YA5zbRHPZ/F6P8ok8dYMWhu2zBWwv+xIWlERDlaI"
    "Kp2CKzbSa5FZ2gl1EWrZzn/GDkKEuDIEY7GyjJaVfiduMg8N6oBlxx6xYz0tuyNlVWoAbgDvIxYYJwkN7CRADuD0IPTE7mkY4fGc56fx"
    "Fc2D58vnsIOQ8ys28m81fhHZ4g0UjcJKJXofj0N5QTJxO9RmHVP39+b0KcevUacw4Dmi8c72/S0IqIl/eBgZVG4IVVPgpii/7gojmbFD"
    "HFi9/RTA4nwQJAe9JxNx+76RvnmXvfCW8PigFlvtsJvY31Nv/ZB97ZxIUiJYk2Y48JoH3wZEs/9NKzDHOaOT+SvRFLaIWeD9DUayXXG5"
    "g0vEfugrZPM="
)


def _raw_plain(key: str, encrypt: str) -> bytes:
    """AES-256-CBC without unpadding, by hand: what the layout tests read."""
    aes = wechat_crypto.aes_key(key)
    decryptor = Cipher(algorithms.AES(aes), modes.CBC(aes[:16])).decryptor()
    return decryptor.update(base64.b64decode(encrypt)) + decryptor.finalize()


def test_url_check_and_push_signatures_match_the_published_examples() -> None:
    # V-1 (server URL check) and V-2 (plaintext push): sha1 of the sorted token, timestamp, nonce.
    assert wechat_crypto.signature("AAAAA", "1714036504", "1514711492") == (
        "f464b24fc39322e44b38aa78f5edd27bd1441696"
    )
    assert wechat_crypto.signature("AAAAA", "1714037059", "486452656") == (
        "899cf89e464efb63f54ddac96b0a0a235f53aa78"
    )
    assert wechat_crypto.verify_signature(
        "F464B24FC39322E44B38AA78F5EDD27BD1441696", "AAAAA", "1714036504", "1514711492"
    )
    assert not wechat_crypto.verify_signature(
        "f464b24fc39322e44b38aa78f5edd27bd1441696", "AAAAA", "1714036504", "1514711493"
    )


def test_safe_mode_reply_matches_the_published_example() -> None:
    """V-3r: random 707722b803182950, {"demo_resp":"good luck"}, key 43 x A, appid wxba5fad812f8e6fb9."""
    crypto = WXBizMsgCrypt("AAAAA", "A" * 43, "wxba5fad812f8e6fb9")
    encrypted = crypto.encrypt(b'{"demo_resp":"good luck"}', random16=b"707722b803182950")
    assert encrypted == (
        "ELGduP2YcVatjqIS+eZbp80MNLoAUWvzzyJxgGzxZO/5sAvd070Bs6qrLARC9nVHm48Y4hyRbtzve1L32tmxSQ=="
    )
    assert (
        crypto.msg_signature("1713424427", "415670741", encrypted)
        == "1b9339964ed2e271e7c7b6ff2b0ef902fc94dea1"
    )
    assert crypto.decrypt(encrypted) == b'{"demo_resp":"good luck"}'


def test_the_demo_push_verifies_and_decrypts() -> None:
    crypto = WXBizMsgCrypt("spamtest", DEMO_KEY, "wx2c2769f8efd9abc2")
    message = crypto.verify_and_decrypt(
        "5d197aaffba7e9b25a30732f161a50dee96bd5fa", "1409735669", "1320562132", DEMO_ENCRYPT
    )
    assert b"<Content><![CDATA[abcdteT]]></Content>" in message
    assert b"<MsgId>6054768590064713728</MsgId>" in message
    with pytest.raises(CryptoError, match="msg_signature"):
        crypto.verify_and_decrypt(
            "5d197aaffba7e9b25a30732f161a50dee96bd5fb", "1409735669", "1320562132", DEMO_ENCRYPT
        )
    with pytest.raises(AppIdMismatch):
        WXBizMsgCrypt("spamtest", DEMO_KEY, "wx0000000000000000").decrypt(DEMO_ENCRYPT)


def test_the_layout_random_length_message_appid_and_a_32_byte_pad() -> None:
    plain = _raw_plain(DEMO_KEY, DEMO_ENCRYPT)
    assert len(plain) % 32 == 0
    pad = plain[-1]
    assert 1 <= pad <= 32 and plain[-pad:] == bytes([pad]) * pad
    (length,) = struct.unpack(">I", plain[16:20])
    message = plain[20 : 20 + length]
    assert message.startswith(b"<xml>") and message.endswith(b"</xml>")
    assert plain[20 + length : -pad] == b"wx2c2769f8efd9abc2"
    # V-6: pad 31, beyond what a 16-byte block unpadder takes; ours reads it.
    assert _raw_plain(PAD31_KEY, PAD31_ENCRYPT)[-1] == 31
    crypto = WXBizMsgCrypt("tom00123", PAD31_KEY, "wx17a727aa81c60f43")
    assert crypto.msg_signature("1515926128", "143125540", PAD31_ENCRYPT) == (
        "2a57bca3d93100e42599d453d97ebde9f5a57eca"
    )
    assert "加密消息应答".encode() in crypto.decrypt(PAD31_ENCRYPT)


@pytest.mark.parametrize("size", [0, 1, 11, 12, 43, 44, 75, 76, 1000])
def test_our_layout_around_block_boundaries(size: int) -> None:
    crypto = WXBizMsgCrypt("token", DEMO_KEY, "wx2c2769f8efd9abc2")
    message = b"m" * size
    encrypted = crypto.encrypt(message, random16=b"R" * 16)
    plain = _raw_plain(DEMO_KEY, encrypted)
    body = b"R" * 16 + struct.pack(">I", size) + message + b"wx2c2769f8efd9abc2"
    pad = 32 - len(body) % 32
    assert plain == body + bytes([pad]) * pad  # an aligned body gets a whole block of 32
    assert crypto.decrypt(encrypted) == message


def test_what_is_not_an_encrypt_is_refused() -> None:
    crypto = WXBizMsgCrypt("token", DEMO_KEY, "wx2c2769f8efd9abc2")
    good = crypto.encrypt(b"<xml/>")
    for bad in ("not base64!", base64.b64encode(b"x" * 31).decode(), "", good[:-8] + "AAAAAAA="):
        with pytest.raises(CryptoError):
            crypto.decrypt(bad)


def test_wechatpy_decrypts_ours_and_we_decrypt_wechatpys() -> None:
    token, app_id = "sandboxtoken", "wx2c2769f8efd9abc2"
    ours = WXBizMsgCrypt(token, DEMO_KEY, app_id)
    theirs = WeChatCrypto(token, DEMO_KEY, app_id)
    message = "<xml><Content><![CDATA[你好, wechatpy]]></Content></xml>"
    reply = ours.encrypt_reply(message.encode(), timestamp="1714112445", nonce="415670741").decode()
    assert theirs.decrypt_message(reply, _field(reply, "MsgSignature"), "1714112445", "415670741") == message
    sealed = theirs.encrypt_message(message, "415670741", "1714112445")
    assert (
        ours.verify_and_decrypt(
            _field(sealed, "MsgSignature"), "1714112445", "415670741", _field(sealed, "Encrypt")
        )
        == message.encode()
    )
    # The two sign alike.
    assert _field(sealed, "MsgSignature") == ours.msg_signature(
        "1714112445", "415670741", _field(sealed, "Encrypt")
    )


def _field(xml: str, name: str) -> str:
    return xml.split(f"<{name}><![CDATA[", 1)[1].split("]]>", 1)[0]
