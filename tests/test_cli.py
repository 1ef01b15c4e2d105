"""The command line as a newcomer uses it: serve on SQLite with the sandbox, db upgrade, bad settings."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from conftest import free_port

MALLGATE = [sys.executable, "-m", "mallgate.cli"]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLGATE_")}
    return {**env, "MALLGATE_VAR_DIR": str(tmp_path / "var"), **extra}


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], seconds: float = 30) -> httpx.Response:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stdout.read() if proc.stdout else b''!r}")
        try:
            return httpx.get(url, timeout=2)
        except httpx.HTTPError:
            time.sleep(0.2)
    raise AssertionError("server did not come up")


def test_serve_defaults_to_sqlite_and_the_sandbox(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [*MALLGATE, "serve", "--port", str(port)],
        env=_env(tmp_path),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        health = _wait_healthy(f"http://127.0.0.1:{port}/healthz", proc)
        assert health.status_code == 200 and health.json()["data"]["database"] == "sqlite"
        assert (tmp_path / "var" / "mallgate.db").is_file()
        assert (tmp_path / "var" / "sandbox" / "keys.json").is_file()
        page = httpx.get(f"http://127.0.0.1:{port}/_sandbox/", timeout=5)
        assert page.status_code == 200 and "mallgate sandbox" in page.text
    finally:
        proc.terminate()
        out = proc.communicate(timeout=15)[0].decode()
    assert f"listening on http://127.0.0.1:{port}" in out and "sandbox on" in out


def test_serve_with_two_workers_answers(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [*MALLGATE, "serve", "--port", str(port), "--workers", "2", "--no-sandbox"],
        env=_env(tmp_path),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert _wait_healthy(f"http://127.0.0.1:{port}/healthz", proc).status_code == 200
        for _ in range(20):
            httpx.get(f"http://127.0.0.1:{port}/floor", timeout=5)
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert 'route="/floor"' in metrics
        assert httpx.get(f"http://127.0.0.1:{port}/_sandbox/", timeout=5).status_code == 404
    finally:
        proc.terminate()
        proc.communicate(timeout=15)


def test_a_malformed_setting_stops_start_up_naming_it(tmp_path: Path) -> None:
    result = subprocess.run(
        [*MALLGATE, "db", "upgrade"],
        env=_env(tmp_path, MALLGATE_ALIPAY__PUBLIC_KEY="not-a-key!"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "MALLGATE_ALIPAY__PUBLIC_KEY" in result.stderr
    result = subprocess.run(
        [*MALLGATE, "db", "upgrade"],
        env=_env(tmp_path, MALLGATE_SMS__PER_IP_HOURLY="many"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "MALLGATE_SMS__PER_IP_HOURLY" in result.stderr


def test_db_upgrade_creates_the_database(tmp_path: Path) -> None:
    result = subprocess.run(
        [*MALLGATE, "db", "upgrade"],
        env=_env(tmp_path),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "var" / "mallgate.db").stat().st_size > 0


def test_keys_load_from_pem_base64_and_file(tmp_path: Path) -> None:
    import base64

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from mallgate.keys import KeyFormatError, load_private_key, load_public_key

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pub = key.public_key()
    pem = pub.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    der = pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "pub.pem").write_text(pem)
    for form in (pem, base64.b64encode(der).decode(), str(tmp_path / "pub.pem")):
        assert load_public_key(form).public_numbers() == pub.public_numbers()
    pkcs1 = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    assert load_private_key(base64.b64encode(pkcs1).decode()).private_numbers() == key.private_numbers()
    for bad in ("", "!!!", str(tmp_path / "missing.pem"), base64.b64encode(b"junk").decode()):
        try:
            load_public_key(bad)
        except KeyFormatError:
            continue
        raise AssertionError(f"accepted {bad!r}")
