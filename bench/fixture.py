"""The benchmark's fixture: keys, unpaid orders, and realistic signed Alipay payment notices.

    python bench/fixture.py OUT_DIR [ORDERS] [RESENDS]

Writes `priv.pem` / `pub.pem` (one RSA-2048 pair: the merchant and "Alipay" share it, as
both servers only verify), `peer.db` (the peer's orders), `orders.json` (order number ->
amount, loaded into mallgate through the admin API) and `notices.json` (one urlencoded
body per order). Each notice carries the fields Alipay sends with a paid trade
(about 1 KiB: a Chinese subject and body, `fund_bill_list` JSON, buyer and seller ids,
every amount), signed RSA2 over all of them as Alipay signs.
"""

from __future__ import annotations

import base64
import json
import sqlite3
import sys
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import urlencode

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

APP_ID = "2021000000000000"
SELLER_ID = "2088000000000000"
SUBJECTS = ("新鲜水果礼盒 5 斤装", "无线蓝牙耳机 降噪版", "纯棉短袖 T 恤（白色 L 码）", "会员余额充值")


def notice(index: int, order_no: str, amount: str, when: datetime, resend: int = 0) -> dict[str, str]:
    """The notice of order `index`; `resend` > 0 is Alipay sending it again later (a later
    notify_time, so another signature: the same notice, not the same bytes)."""
    paid = when + timedelta(seconds=7)
    return {
        "gmt_create": when.strftime("%Y-%m-%d %H:%M:%S"),
        "charset": "utf-8",
        "seller_email": "shop@example.com",
        "subject": SUBJECTS[index % len(SUBJECTS)],
        "body": "订单号 " + order_no + "，感谢您的购买",
        "buyer_id": f"2088{102000000000 + index:012d}",
        "invoice_amount": amount,
        "notify_id": f"2026112800222{index:010d}0b{index % 97:02d}a1b2c3d4e5f6",
        "fund_bill_list": json.dumps([{"amount": amount, "fundChannel": "ALIPAYACCOUNT"}]),
        "notify_type": "trade_status_sync",
        "trade_status": "TRADE_SUCCESS",
        "receipt_amount": amount,
        "buyer_pay_amount": amount,
        "app_id": APP_ID,
        "notify_time": (paid + timedelta(seconds=1, minutes=4 * resend)).strftime("%Y-%m-%d %H:%M:%S"),
        "point_amount": "0.00",
        "total_amount": amount,
        "seller_id": SELLER_ID,
        "trade_no": f"2026112822001{index:015d}",
        "auth_app_id": APP_ID,
        "buyer_logon_id": f"159****{index % 10000:04d}",
        "gmt_payment": paid.strftime("%Y-%m-%d %H:%M:%S"),
        "out_trade_no": order_no,
        "version": "1.0",
    }


def sign(fields: dict[str, str], key: rsa.RSAPrivateKey) -> str:
    """Alipay's rule: every field but sign and sign_type, sorted, `k=v&...`, RSA-SHA256, base64."""
    text = "&".join(f"{k}={fields[k]}" for k in sorted(fields) if k not in ("sign", "sign_type"))
    return base64.b64encode(key.sign(text.encode(), padding.PKCS1v15(), hashes.SHA256())).decode()


def make(out: Path, orders: int, resends: int = 0) -> None:
    """`resends` > 0: after each order's notice, that many resends of it, each its own bytes."""
    out.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (out / "priv.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    (out / "pub.pem").write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    (out / "peer.db").unlink(missing_ok=True)
    db = sqlite3.connect(out / "peer.db")
    db.execute("CREATE TABLE orders (order_no TEXT PRIMARY KEY, amount TEXT, status TEXT, trade_no TEXT)")
    amounts: dict[str, str] = {}
    bodies: list[str] = []
    start = datetime(2026, 11, 28, 12, 0, 0)
    for index in range(orders):
        order_no = f"B{index:010d}"
        amount = f"{(index % 500) + 1}.{index % 100:02d}"
        amounts[order_no] = amount
        db.execute("INSERT INTO orders VALUES (?, ?, 'unpaid', NULL)", (order_no, amount))
        for resend in range(resends + 1):
            fields = notice(index, order_no, amount, start + timedelta(seconds=index), resend)
            fields["sign"] = sign(fields, key)
            fields["sign_type"] = "RSA2"
            bodies.append(urlencode(fields))
    db.commit()
    db.close()
    (out / "orders.json").write_text(json.dumps(amounts))
    (out / "notices.json").write_text(json.dumps(bodies, ensure_ascii=False))


if __name__ == "__main__":
    numbers = [int(arg) for arg in sys.argv[2:4]]
    make(Path(sys.argv[1]), *numbers)
