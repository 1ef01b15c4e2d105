"""Official Account safe-mode pushes: over HTTP beside the floor, and in-process beside wechatpy.

    python bench/push_bench.py [--seconds 10] [--rounds 3] [--connections 32] [--workers 2]
                               [--pushes 20000] [--inprocess 2000]

Over HTTP: mallgate (SQLite, an Official Account configured with a token and an
EncodingAESKey, one keyword rule) gets encrypted text pushes, each a new message
(its own MsgId), signed and encrypted as WeChat sends them; each is verified
(signature and msg_signature), decrypted, parsed, deduplicated in the database,
answered from the keyword rule and encrypted back. An answer that is not HTTP 200
with an `<Encrypt>` reply counts as an error. Measured in interleaved rounds
beside `/floor`; the target on 2 workers is at least 0.35 of the floor.

In-process: the per-message cost of the same work without HTTP or the database
(verify, decrypt, parse, build the text reply, encrypt it) with mallgate's
channels and with wechatpy's (WeChatCrypto, parse_message, create_reply), in
interleaved rounds; the target is mallgate's cost at most wechatpy's.
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlencode

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from load import free_port, start_mallgate, stop, wrk_load

from mallgate.channels import wechat_messages
from mallgate.channels.wechat_crypto import WXBizMsgCrypt

APP_ID = "wxd930ea5d5a258f4f"
TOKEN = "benchtoken"
AES_KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
ADMIN = "bench-admin-token-0123456789"
OUR = "gh_bench_account"


def push(crypto: WXBizMsgCrypt, n: int, now: int) -> tuple[str, str]:
    """(path with query, body) of one encrypted text push, as WeChat sends it."""
    inner = (
        f"<xml><ToUserName><![CDATA[{OUR}]]></ToUserName>"
        f"<FromUserName><![CDATA[oBench{n:022d}]]></FromUserName><CreateTime>{now}</CreateTime>"
        f"<MsgType><![CDATA[text]]></MsgType><Content><![CDATA[你好]]></Content>"
        f"<MsgId>{7_000_000_000_000_000 + n}</MsgId></xml>"
    ).encode()
    timestamp, nonce = str(now), secrets.token_hex(5)
    encrypted = crypto.encrypt(inner)
    query = {
        "signature": crypto.signature(timestamp, nonce),
        "timestamp": timestamp,
        "nonce": nonce,
        "openid": f"oBench{n:022d}",
        "encrypt_type": "aes",
        "msg_signature": crypto.msg_signature(timestamp, nonce, encrypted),
    }
    body = f"<xml><ToUserName><![CDATA[{OUR}]]></ToUserName><Encrypt><![CDATA[{encrypted}]]></Encrypt></xml>"
    return "/api/wechat.index/?" + urlencode(query), body


def lua_pushes(pushes: list[tuple[str, str]]) -> str:
    """Each request the next push, across wrk's threads (`next_n`); past the last one, the first
    again: a retry, which the round then reports (more requests than pushes)."""
    items = ",\n".join(f"{{[==[{path}]==], [==[{body}]==]}}" for path, body in pushes)
    return (
        f"pushes = {{\n{items}\n}}\nrequest = function()\n"
        "  local p = pushes[((next_n() - 1) % #pushes) + 1]\n"
        '  return wrk.format("POST", p[1], {["Content-Type"]="text/xml"}, p[2])\nend\n'
    )


def http_rounds(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="mallgate-push-"))
    port = free_port()
    settings = {
        "MALLGATE_ADMIN_TOKEN": ADMIN,
        "MALLGATE_WECHAT_MP__APP_ID": APP_ID,
        "MALLGATE_WECHAT_MP__APP_SECRET": "bench-secret",
        "MALLGATE_WECHAT_MP__TOKEN": TOKEN,
        "MALLGATE_WECHAT_MP__AES_KEY": AES_KEY,
    }
    proc = start_mallgate(work, port, args.workers, settings)
    base = f"http://127.0.0.1:{port}"
    try:
        rule = {
            "kind": "keyword",
            "match": "exact",
            "keyword": "你好",
            "type": "text",
            "text": "您好，欢迎光临",
        }
        answer = httpx.post(
            f"{base}/admin/wechat/replies", json=rule, headers={"Authorization": f"Bearer {ADMIN}"}
        )
        assert answer.json()["status"] == 1, answer.text
        crypto = WXBizMsgCrypt(TOKEN, AES_KEY, APP_ID)
        check = 'status == 200 and string.find(body, "<Encrypt>", 1, true) ~= nil'
        c, s = args.connections, args.seconds
        ratios = []
        for n in range(1, args.rounds + 1):
            # New messages each round (their own MsgIds), made before the round: every request is
            # a new push, never a retry.
            now = int(time.time())
            script = lua_pushes([push(crypto, n * 10_000_000 + k, now) for k in range(args.pushes)])
            floor = wrk_load(base + "/floor", "", c, s, f"[{n}] GET /floor")
            ours = wrk_load(
                base,
                script,
                c,
                s,
                f"[{n}] POST wechat.index (safe mode)",
                check=check,
            )
            for r in (floor, ours):
                print(
                    f"{r.label:<38} {r.rps:>8.0f}/s  p50 {r.p50_ms:6.2f} ms  p99 {r.p99_ms:6.2f} ms  "
                    f"errors {r.errors}"
                )
            if ours.requests > args.pushes:
                sys.exit(f"round {n} sent {ours.requests} pushes but had {args.pushes}: raise --pushes")
            ratios.append(ours.rps / floor.rps if floor.rps else float("nan"))
        print(
            f"push / floor per round: {', '.join(f'{x:.2f}' for x in ratios)}; "
            f"median {statistics.median(ratios):.2f} (target at least 0.35)"
        )
    finally:
        stop(proc)
        shutil.rmtree(work, ignore_errors=True)


def in_process(args: argparse.Namespace) -> None:
    from wechatpy import create_reply, parse_message
    from wechatpy.crypto import WeChatCrypto

    ours = WXBizMsgCrypt(TOKEN, AES_KEY, APP_ID)
    theirs = WeChatCrypto(TOKEN, AES_KEY, APP_ID)
    now = int(time.time())
    samples = []
    for n in range(args.inprocess):
        path, body = push(ours, n, now)
        query = dict(p.split("=", 1) for p in path.split("?", 1)[1].split("&"))
        samples.append((query["msg_signature"], query["timestamp"], query["nonce"], body))

    def mallgate_one(sig: str, ts: str, nonce: str, body: str) -> bytes:
        envelope = wechat_messages.read_xml(body)
        message = wechat_messages.parse(ours.verify_and_decrypt(sig, ts, nonce, envelope["Encrypt"]))
        reply = wechat_messages.reply_xml(message, "text", {"text": "您好，欢迎光临"}, now=now)
        return ours.encrypt_reply(reply.encode(), timestamp=ts, nonce=nonce)

    def wechatpy_one(sig: str, ts: str, nonce: str, body: str) -> str:
        message = parse_message(theirs.decrypt_message(body, sig, ts, nonce))
        reply = create_reply("您好，欢迎光临", message).render()
        return str(theirs.encrypt_message(reply, nonce, ts))

    def timed(work: Callable[[str, str, str, str], object]) -> float:
        started = time.perf_counter()
        for sample in samples:
            work(*sample)
        return (time.perf_counter() - started) / len(samples) * 1e6

    mine, other = [], []
    for n in range(1, args.rounds + 1):
        mine.append(timed(mallgate_one))
        other.append(timed(wechatpy_one))
        print(f"[{n}] per message: mallgate {mine[-1]:.1f} µs, wechatpy {other[-1]:.1f} µs")
    pairs = [m / o for m, o in zip(mine, other, strict=True)]
    print(
        f"mallgate / wechatpy per round: {', '.join(f'{x:.2f}' for x in pairs)}; "
        f"median {statistics.median(pairs):.2f} (target at most 1.00)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--pushes", type=int, default=60000, help="distinct pushes made per round")
    parser.add_argument("--inprocess", type=int, default=2000)
    parser.add_argument("--no-http", action="store_true")
    args = parser.parse_args()
    in_process(args)
    if not args.no_http:
        if not shutil.which("wrk"):
            sys.exit("the HTTP part needs wrk (apt-get install wrk)")
        http_rounds(args)


if __name__ == "__main__":
    main()
