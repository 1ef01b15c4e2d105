"""The disk: free space where the database writes, and where the workers' metrics files go.

SQLite writes on this machine's disk; when that disk is full, payment notifications
are answered failure (the platforms send them again) and `/healthz` says so. The
workers' metrics files (mallgate.metrics) are kept off that disk by default: a
fresh folder for each run under the system's temporary directory.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import make_url

from mallgate.settings import Settings

log = logging.getLogger("mallgate")

MIB = 1 << 20
# Under this much free space the next SQLite commit (its WAL frames, a checkpoint) may not
# fit: /healthz calls the disk full.
FULL_BELOW_BYTES = 1 * MIB
# What prometheus_client writes into PROMETHEUS_MULTIPROC_DIR (and mallgate.metrics' half-made
# files): only these are removed from a folder the operator named, whatever else it holds.
_METRICS_FILE = re.compile(r"(?:counter|histogram|summary|gauge_[a-z]+)_\d+\.db(?:\.part)?")


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem holding `path`."""
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


@functools.lru_cache(maxsize=8)  # /healthz asks on every call
def sqlite_dir(database_url: str) -> Path | None:
    """The folder of a SQLite database file; None for another database or one in memory."""
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    return Path(url.database).absolute().parent


@dataclass(frozen=True)
class Full:
    free_bytes: int
    reason: str


def database_disk_full(database_url: str) -> Full | None:
    """Whether the SQLite database's disk is full; None when it is not, or not ours to know.

    PostgreSQL's and MySQL's disks are theirs: a full one shows as failed writes there.
    """
    folder = sqlite_dir(database_url)
    if folder is None:
        return None
    try:
        free = free_bytes(folder)
    except OSError:  # the folder is gone: the database check says what there is to say
        return None
    if free >= FULL_BELOW_BYTES:
        return None
    return Full(free, f"{free} bytes free for the SQLite database (under {FULL_BELOW_BYTES // MIB} MiB)")


def low_space(settings: Settings) -> list[str]:
    """A line for each disk of MALLGATE_VAR_DIR (and the SQLite database) below MALLGATE_MIN_FREE_MB."""
    if settings.min_free_mb <= 0:
        return []
    lines: list[str] = []
    devices: set[int] = set()
    folders = [f for f in (settings.var_dir, sqlite_dir(settings.resolved_database_url)) if f is not None]
    for folder in folders:
        try:
            device, free = os.stat(folder).st_dev, free_bytes(folder)
        except OSError:  # not made yet (no SQLite there): nothing to warn about
            continue
        if device in devices:
            continue
        devices.add(device)
        if free < settings.min_free_mb * MIB:
            lines.append(
                f"only {free // MIB} MiB free under {folder.absolute()} (MALLGATE_MIN_FREE_MB="
                f"{settings.min_free_mb}): once it is full, payment notifications are answered failure"
            )
    return lines


def warn_if_low_space(settings: Settings) -> None:
    for line in low_space(settings):
        log.warning("%s", line)


def metrics_dir_for_workers(configured: Path | None) -> Path:
    """The folder the workers share their metrics files in, emptied of an earlier run's; in the environment.

    Unset: a fresh folder for this run under the system's temporary directory, removed when
    `serve` exits. The workers read PROMETHEUS_MULTIPROC_DIR when they import
    prometheus_client, so it is set here, before uvicorn starts them.
    """
    if configured is None:
        folder = Path(tempfile.mkdtemp(prefix="mallgate-metrics-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
    else:
        folder = configured.absolute()
        folder.mkdir(parents=True, exist_ok=True)
        for entry in folder.iterdir():
            if _METRICS_FILE.fullmatch(entry.name):
                entry.unlink(missing_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
    return folder
