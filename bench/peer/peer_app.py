"""The peer: the Alipay notify handler a Python shop usually writes, to measure mallgate beside it.

Flask, python-alipay-sdk's `verify`, SQLite in WAL mode with synchronous=FULL (as
durable as mallgate), served by gunicorn with sync workers. It does what the usual
handler does and no more: verify the signature, ignore statuses that are not a
payment, check the amount, mark the order paid once with a conditional UPDATE.
Not project code: bench/ only.

    PEER_APP_ID=... PEER_PRIV=priv.pem PEER_PUB=pub.pem PEER_DB=peer.db \\
        gunicorn -w 2 -b 127.0.0.1:18080 --chdir bench/peer peer_app:app
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from alipay import AliPay
from flask import Flask, request

DB = os.environ.get("PEER_DB", "peer.db")
PAID = ("TRADE_SUCCESS", "TRADE_FINISHED")

alipay = AliPay(
    appid=os.environ["PEER_APP_ID"],
    app_notify_url=None,
    app_private_key_string=Path(os.environ["PEER_PRIV"]).read_text(),
    alipay_public_key_string=Path(os.environ["PEER_PUB"]).read_text(),
    sign_type="RSA2",
)
app = Flask(__name__)


def connect() -> sqlite3.Connection:
    conn = sqlite3.connect(DB, timeout=30, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")  # durable like mallgate: a 'success' survives a power cut
    return conn


@app.get("/floor")
def floor() -> str:
    return "ok"


@app.route("/api/pay/notify", methods=["POST", "GET"])
def notify() -> str:
    data = request.form.to_dict() or request.args.to_dict()
    signature = data.pop("sign", None)
    data.pop("sign_type", None)
    if not signature or not alipay.verify(data, signature):
        return "failure"
    if data.get("trade_status") not in PAID:
        return "success"
    conn = connect()
    try:
        conn.execute("BEGIN IMMEDIATE")
        row = conn.execute("SELECT amount FROM orders WHERE order_no = ?", (data["out_trade_no"],)).fetchone()
        if row is None or row[0] != data.get("total_amount"):
            conn.execute("ROLLBACK")
            return "failure"
        conn.execute(
            "UPDATE orders SET status = 'paid', trade_no = ? WHERE order_no = ? AND status = 'unpaid'",
            (data["trade_no"], data["out_trade_no"]),
        )
        conn.execute("COMMIT")
    finally:
        conn.close()
    return "success"
