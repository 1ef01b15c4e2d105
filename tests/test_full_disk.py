"""A full disk (issue 14): no process dies, every notice is answered, nothing acknowledged is lost.

The case of the issue is played on a real, small, full filesystem: a tmpfs of 8 MiB
holding the SQLite database and the workers' metrics files of `mallgate serve
--workers 2`. Writing a new metric into prometheus_client's memory-mapped files
there used to kill the worker with SIGBUS, which Python cannot catch.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from conftest import free_port
from mallgate.channels import alipay

MALLGATE = [sys.executable, "-m", "mallgate.cli"]
TMPFS_SIZE = "8m"
NOTICES = 80
APP_ID = "2021000000000001"
ADMIN_TOKEN = "full-disk-admin-token-0123"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


# ----------------------------------------------------------------------------------------------
# a small filesystem, filled


@contextmanager
def small_tmpfs(size: str = TMPFS_SIZE) -> Iterator[Path]:
    """A fresh tmpfs of `size`, unmounted afterwards; skips (saying why) where none can be mounted."""
    if not sys.platform.startswith("linux"):
        pytest.skip("a small full filesystem is a Linux tmpfs here; the fault-injected tests still run")
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root; the fault-injected tests still run")
    mount, umount = shutil.which("mount"), shutil.which("umount")
    if mount is None or umount is None:
        pytest.skip("no mount(8) here to make a small tmpfs; the fault-injected tests still run")
    where = Path(tempfile.mkdtemp(prefix="mallgate-full-disk-"))
    mounted = subprocess.run(
        [mount, "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        where.rmdir()
        reason = mounted.stderr.strip()
        pytest.skip(f"cannot mount a tmpfs here ({reason}); the fault-injected tests still run")
    try:
        yield where
    finally:
        if subprocess.run([umount, str(where)], capture_output=True, check=False).returncode != 0:
            subprocess.run([umount, "-l", str(where)], capture_output=True, check=False)
        where.rmdir()


def fill(where: Path) -> Path:
    """Writes a file into `where` until not one more byte fits; the file, to delete to free the space."""
    filler = where / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        chunk = 1 << 20
        while chunk:
            try:
                os.write(fd, bytes(chunk))
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                chunk //= 2
    finally:
        os.close(fd)
    return filler


# ----------------------------------------------------------------------------------------------
# mallgate serve --workers 2, with Alipay credentials of our own


def children(pid: int) -> set[int]:
    """The processes whose parent is `pid` (uvicorn's workers), from /proc."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.add(int(entry.name))
    return found


def alive(pids: set[int]) -> set[int]:
    return {pid for pid in pids if Path(f"/proc/{pid}").exists()}


def key_pair(folder: Path) -> str:
    """Writes pub.pem and priv.pem (the merchant and "Alipay" share the pair); the private PEM."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (folder / "priv.pem").write_text(private)
    (folder / "pub.pem").write_bytes(public)
    return private


def serve_env(tmp_path: Path, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLGATE_")}
    return {
        **env,
        "MALLGATE_SANDBOX": "false",
        "MALLGATE_ADMIN_TOKEN": ADMIN_TOKEN,
        "MALLGATE_SECRET_KEY": "full-disk-test-secret-key-0123456789abcdef",
        "MALLGATE_ALIPAY__APP_ID": APP_ID,
        "MALLGATE_ALIPAY__PUBLIC_KEY": str(tmp_path / "pub.pem"),
        "MALLGATE_ALIPAY__PRIVATE_KEY": str(tmp_path / "priv.pem"),
        **settings,
    }


def wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {log.read_text()}")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"server did not come up: {log.read_text()}")


@contextmanager
def serving(
    tmp_path: Path, env: dict[str, str], workers: int = 2
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    log = tmp_path / "serve.log"  # not a pipe: a full pipe would stall the server on its warnings
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*MALLGATE, "serve", "--port", str(port), "--workers", str(workers)],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def notice(private_pem: str, index: int, order_no: str, amount: str) -> str:
    fields = {
        "notify_time": "2026-05-20 10:15:09",
        "notify_type": "trade_status_sync",
        "notify_id": f"2026052000222{index:010d}full",
        "app_id": APP_ID,
        "auth_app_id": APP_ID,
        "charset": "utf-8",
        "version": "1.0",
        "trade_no": f"2026052022001{index:015d}",
        "out_trade_no": order_no,
        "trade_status": "TRADE_SUCCESS",
        "total_amount": amount,
        "receipt_amount": amount,
        "buyer_id": "2088102177846880",
        "subject": "磁盘已满测试",
        "gmt_payment": "2026-05-20 10:15:08",
    }
    return urlencode(alipay.sign_notification(fields, private_pem, "RSA2"))


async def send_notices(url: str, bodies: dict[str, str]) -> dict[str, str]:
    """order_no -> the text each notice was answered with; a reset connection fails the test."""
    limit = asyncio.Semaphore(8)
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:

        async def one(order_no: str, body: str) -> tuple[str, str]:
            async with limit:
                response = await http.post("/api/pay/notify", content=body, headers=FORM)
            assert response.status_code == 200, (order_no, response.status_code, response.text)
            return order_no, response.text

        return dict(await asyncio.gather(*(one(no, body) for no, body in bodies.items())))


def order_status(url: str, order_no: str) -> str:
    payload = httpx.get(f"{url}/admin/orders/{order_no}", headers=ADMIN, timeout=10).json()
    assert payload["status"] == 1, payload
    status: str = payload["data"]["status"]
    return status


def health(url: str, times: int = 6) -> list[tuple[int, dict[str, Any]]]:
    """/healthz a few times: the answers of both workers."""
    answers = []
    with httpx.Client(base_url=url, timeout=10) as http:
        for _ in range(times):
            response = http.get("/healthz")
            answers.append((response.status_code, response.json()))
    return answers


def every_route(url: str) -> list[str]:
    """A path of every route the API document lists, path parameters filled in."""
    paths = list(httpx.get(url + "/openapi.json", timeout=10).json()["paths"])
    paths += ["/admin/orders/X1", "/admin/users/1", "/admin/notifications", "/admin/goods", "/docs"]
    return [p.replace("{", "").replace("}", "") for p in paths]


def test_a_full_disk_kills_no_worker_and_loses_no_acknowledged_notice(tmp_path: Path) -> None:
    private_pem = key_pair(tmp_path)
    with small_tmpfs() as disk:
        env = serve_env(
            tmp_path,
            MALLGATE_VAR_DIR=str(disk / "var"),
            # The case of the issue: the metrics files on the full disk too.
            MALLGATE_METRICS_DIR=str(disk / "metrics"),
        )
        with serving(tmp_path, env) as (url, proc):
            amounts = {f"FULL{i:04d}": f"{i % 50 + 1}.{i % 100:02d}" for i in range(NOTICES)}
            with httpx.Client(base_url=url, timeout=10, headers=ADMIN) as http:
                for order_no, amount in amounts.items():
                    created = http.post("/admin/orders", json={"order_no": order_no, "amount": amount})
                    assert created.json()["status"] == 1, created.text
            bodies = {no: notice(private_pem, i, no, amt) for i, (no, amt) in enumerate(amounts.items())}
            routes = every_route(url)
            workers = children(proc.pid)
            assert len(workers) >= 2, workers

            filler = fill(disk)
            assert shutil.disk_usage(disk).free < 4096
            for status, body in health(url):
                assert status == 503 and body["status"] == 0 and body["code"] == "disk.full", body
            # New routes, methods and statuses: new label sets, so new metric entries to write.
            with httpx.Client(base_url=url, timeout=10) as http:
                for path in routes:
                    for method in ("PATCH", "PUT", "DELETE"):
                        assert http.request(method, path).status_code < 500, (method, path)
                assert http.get("/floor").text == "ok"
                assert http.get("/metrics").status_code == 200
            while_full = asyncio.run(send_notices(url, bodies))
            assert set(while_full.values()) <= {"success", "failure"}, while_full
            assert order_status(url, "FULL0000") in ("unpaid", "paid")  # reads keep working
            assert alive(workers) == workers and children(proc.pid) == workers, "a worker died"

            filler.unlink()
            for status, body in health(url):
                assert status == 200 and body["status"] == 1, body
            acknowledged = [no for no, text in while_full.items() if text == "success"]
            assert all(order_status(url, no) == "paid" for no in acknowledged)
            # The platforms' retries, once there is room again.
            again = asyncio.run(send_notices(url, bodies))
            assert set(again.values()) == {"success"}, again
            assert all(order_status(url, no) == "paid" for no in amounts)
            assert alive(workers) == workers and children(proc.pid) == workers, "a worker died"
            assert proc.poll() is None
        log = (tmp_path / "serve.log").read_text()
        assert "Bus error" not in log and "died" not in log.lower(), log
        # 8 MiB is well under the default MALLGATE_MIN_FREE_MB (100).
        assert "free under" in log, log


# ----------------------------------------------------------------------------------------------
# the metrics files: dropped, counted, caught up; never SIGBUS

# Fills the filesystem of PROMETHEUS_MULTIPROC_DIR, writes new series, frees the space, writes
# them again; prints what was dropped and what the files hold. argv[1]: "guarded" or "bare".
PROBE = r"""
import errno, json, os, sys
folder = os.environ["PROMETHEUS_MULTIPROC_DIR"]
guarded = sys.argv[1] == "guarded"
if guarded:
    import mallgate.metrics as guard
from prometheus_client import CollectorRegistry, Counter, Histogram, multiprocess, values
counter = Counter("probe", "a probe", ["n"])
counter.labels("before").inc()
filler = os.path.join(folder, "..", "probe-filler")
fd, chunk = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1 << 20
while chunk:
    try:
        os.write(fd, bytes(chunk))
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
        chunk //= 2
os.close(fd)
histogram = Histogram("probe_seconds", "a file made while the disk is full", ["n"])
for n in range(1500):
    counter.labels(str(n)).inc()
    histogram.labels(str(n % 50)).observe(0.01)
dropped = guard.dropped_writes() if guarded else 0
kind = type(counter.labels("before")._value._file).__name__
os.unlink(filler)
for n in range(1500):
    counter.labels(str(n)).inc()
    histogram.labels(str(n % 50)).observe(0.01)
registry = CollectorRegistry()
multiprocess.MultiProcessCollector(registry, folder)
samples = {
    (s.name, s.labels.get("n")): s.value
    for m in registry.collect() for s in m.samples if s.name in ("probe_total", "probe_seconds_count")
}
print(json.dumps({
    "dropped": dropped, "kind": kind,
    "first": samples[("probe_total", "0")], "last": samples[("probe_total", "1499")],
    "histogram": samples[("probe_seconds_count", "49")],
}))
"""


def probe(disk: Path, name: str, mode: str) -> subprocess.CompletedProcess[str]:
    folder = disk / name
    folder.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder)}
    try:
        return subprocess.run(
            [sys.executable, "-c", PROBE, mode],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        (disk / "probe-filler").unlink(missing_ok=True)


def test_metric_writes_on_a_full_filesystem_are_dropped_counted_and_caught_up_not_a_bus_error() -> None:
    import json
    import signal

    with small_tmpfs() as disk:
        # The installed prometheus_client, unguarded, on a full disk: what killed the workers.
        bare = probe(disk, "bare", "bare")
        assert bare.returncode == -signal.SIGBUS, (bare.returncode, bare.stderr)
        guarded = probe(disk, "guarded", "guarded")
        assert guarded.returncode == 0, guarded.stderr
        result = json.loads(guarded.stdout)
    assert result["kind"] == "GuardedMmapedDict"  # prometheus_client makes its files through the hook
    assert result["dropped"] > 0 and "write(s) dropped" in guarded.stderr
    # Every increment counted: the in-process values were written once there was room again.
    assert result["first"] == result["last"] == 2.0
    assert result["histogram"] == 60.0


def test_the_guard_fits_the_installed_prometheus_client(tmp_path: Path) -> None:
    from prometheus_client import values
    from prometheus_client.mmap_dict import MmapedDict

    from mallgate import metrics

    assert metrics.shape_problems() == []
    assert values.MmapedDict is metrics.GuardedMmapedDict
    # Enough series to double the file twice: every block of it is taken (no hole the
    # map could meet), and prometheus_client reads back what was written.
    path = str(tmp_path / "counter_1.db")
    guarded = metrics.GuardedMmapedDict(path)
    keys = [f'["probe", "probe_total", {{"n": "{n:05d}"}}, "a probe"]' for n in range(3000)]
    for n, key in enumerate(keys):
        guarded.write_value(key, float(n), 0.0)
    guarded.close()
    stat = os.stat(path)
    assert stat.st_size >= 4 * metrics.INITIAL_FILE_BYTES
    assert stat.st_blocks * 512 >= stat.st_size
    read = {key: value for key, value, _ts, _pos in MmapedDict.read_all_values_from_file(path)}
    assert read == {key: float(n) for n, key in enumerate(keys)}
    # A file someone else made sparse, or left empty, has its holes filled when it is opened.
    for size in (2 * metrics.INITIAL_FILE_BYTES, 0):
        other = tmp_path / f"counter_{size}.db"
        with other.open("wb") as made:
            made.truncate(size)
        metrics.GuardedMmapedDict(str(other)).close()
        stat = other.stat()
        assert stat.st_size >= max(size, metrics.INITIAL_FILE_BYTES) and stat.st_blocks * 512 >= stat.st_size


def test_a_metric_write_that_finds_no_room_is_dropped_then_lands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same rule without a full filesystem: the disk's answer injected."""
    from prometheus_client.mmap_dict import MmapedDict

    from mallgate import metrics

    def no_room(_fd: int, _size: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    key = '["probe", "probe_total", {"n": "late"}, "a probe"]'
    path = str(tmp_path / "counter_2.db")
    before = metrics.dropped_writes()
    with monkeypatch.context() as full:
        full.setattr(metrics, "reserve", no_room)
        guarded = metrics.GuardedMmapedDict(path)  # cannot even be made
        assert guarded.read_value(key) == (0.0, 0.0)
        guarded.write_value(key, 1.0, 0.0)
        assert not os.path.exists(path) and not os.path.exists(path + ".part")
    assert metrics.dropped_writes() >= before + 2
    guarded.write_value(key, 2.0, 0.0)  # room again: the latest value lands
    guarded.close()
    assert [(k, v) for k, v, _ts, _pos in MmapedDict.read_all_values_from_file(path)] == [(key, 2.0)]
    # Growth that finds no room: dropped, and the file left as it was.
    guarded = metrics.GuardedMmapedDict(path)
    with monkeypatch.context() as full:
        full.setattr(metrics, "reserve", no_room)
        for n in range(2000):
            guarded.write_value(f'["probe", "probe_total", {{"n": "{n}"}}, "a probe"]', 1.0, 0.0)
    guarded.close()
    assert os.path.getsize(path) == metrics.INITIAL_FILE_BYTES
    assert {k for k, _v, _ts, _pos in MmapedDict.read_all_values_from_file(path)} >= {key}


# ----------------------------------------------------------------------------------------------
# /healthz, the metrics folder, the start-up warning, bounded labels


async def test_healthz_says_when_the_databases_disk_is_full(
    client: httpx.AsyncClient, server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mallgate import disk

    monkeypatch.setattr(disk, "free_bytes", lambda _path: 4096)
    response = await client.get("/healthz")
    if server.backend.name != "sqlite":
        # PostgreSQL's and MySQL's disks are not this machine's to watch: a full one shows as
        # failed writes (notifications answered failure), or the database down.
        assert response.status_code == 200
        return
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == 0 and body["code"] == "disk.full" and body["free_bytes"] == 4096
    assert "SQLite" in body["reason"] and body["info"]
    monkeypatch.undo()
    assert (await client.get("/healthz")).status_code == 200


def test_the_workers_metrics_live_in_a_fresh_temporary_folder_removed_at_exit(tmp_path: Path) -> None:
    key_pair(tmp_path)
    env = serve_env(tmp_path, MALLGATE_VAR_DIR=str(tmp_path / "var"))
    with serving(tmp_path, env) as (url, proc):
        for _ in range(10):
            assert httpx.get(url + "/floor", timeout=5).text == "ok"
        assert 'route="/floor"' in httpx.get(url + "/metrics", timeout=5).text
        folders = set()
        for worker in children(proc.pid):
            environ = Path(f"/proc/{worker}/environ").read_bytes().split(b"\0")
            named = b"PROMETHEUS_MULTIPROC_DIR="
            folders |= {v.removeprefix(named).decode() for v in environ if v.startswith(named)}
        assert len(folders) == 1, folders
        folder = Path(folders.pop())
        assert folder.parent == Path(tempfile.gettempdir()) and folder.name.startswith("mallgate-metrics-")
        assert any(folder.glob("*.db"))
        assert not (tmp_path / "var" / "prometheus").exists()
    assert not folder.exists()


def test_a_named_metrics_folder_loses_only_old_metric_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mallgate.disk import metrics_dir_for_workers
    from mallgate.settings import Settings

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    folder = tmp_path / "shared"
    folder.mkdir()
    for name in ("counter_12.db", "gauge_livesum_3.db", "histogram_7.db.part", "mallgate.db", "notes.txt"):
        (folder / name).write_text("x")
    assert metrics_dir_for_workers(folder) == folder
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["mallgate.db", "notes.txt"]
    # Empty is unset (a fresh temporary folder), not the working directory.
    assert Settings(_env_file=None, metrics_dir="").metrics_dir is None  # type: ignore[call-arg]


def test_start_up_warns_when_the_var_dir_is_low_on_space(tmp_path: Path) -> None:
    from mallgate.disk import low_space
    from mallgate.settings import Settings

    var = tmp_path / "var"
    var.mkdir()
    free_mb = shutil.disk_usage(var).free // (1 << 20)
    low = Settings(_env_file=None, var_dir=var, min_free_mb=free_mb + 10)  # type: ignore[call-arg]
    (line,) = low_space(low)
    assert str(var) in line and "MALLGATE_MIN_FREE_MB" in line
    assert low_space(low.model_copy(update={"min_free_mb": 0})) == []
    assert low_space(low.model_copy(update={"min_free_mb": 1})) == [] or free_mb < 1


async def test_metric_labels_stay_bounded_whatever_the_method(client: httpx.AsyncClient) -> None:
    # Each new method would be a new series, a new entry in every worker's metrics file.
    await client.request("PROPFIND", "/floor")
    body = (await client.get("/metrics")).text
    assert "PROPFIND" not in body
    assert 'mallgate_requests_total{method="other",route="/floor"' in body
