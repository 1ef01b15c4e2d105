"""The workers' Prometheus files, made so that a full disk drops metric writes instead of killing.

With `--workers` > 1, prometheus_client keeps each process's metrics in memory-mapped
files (PROMETHEUS_MULTIPROC_DIR, see mallgate.disk). It makes and grows them with
ftruncate, which gives a sparse file: a block is only taken when a page is first
written through the map, and when the disk has none left the kernel answers that
store with SIGBUS, which kills the worker (Python cannot catch it).

`GuardedMmapedDict` allocates every block of the file (posix_fallocate) before the
map can touch it, so a full disk becomes an OSError raised where this module catches
it: the write is dropped, counted, and logged at most once a minute, and the worker
goes on. Only a new series (a label set first seen) or the file's growth needs new
blocks; a series already in the file is rewritten in place. prometheus_client keeps
every value in the process too and writes the whole value each time, so the first
write that fits again stores the right total.

Import this module before any metric gets a value (mallgate.middleware imports it
first): `install()` runs at import.
"""

from __future__ import annotations

import logging
import os
import time

from prometheus_client import Counter, values
from prometheus_client.mmap_dict import MmapedDict

log = logging.getLogger("mallgate.metrics")

# The size a new file starts with (prometheus_client's own start is 64 KiB too); the
# library takes the file's size as its capacity and doubles it from there.
INITIAL_FILE_BYTES = 1 << 16
# An entry is a 4-byte length, the key padded to 8 bytes and two doubles: at most
# len(key) + 28 bytes. Over-estimating only reserves the next doubling a little early.
ENTRY_OVERHEAD = 32
LOG_EVERY_SECONDS = 60.0


class _Drops:
    """The metric writes this process dropped, and when that was last logged."""

    count = 0
    synced = 0
    logged_at = float("-inf")


def dropped_writes() -> int:
    """How many metric writes this process dropped since it started."""
    return _Drops.count


def _drop(exc: OSError) -> None:
    # Runs inside prometheus_client's (non-reentrant) lock: no metric may be touched here.
    _Drops.count += 1
    now = time.monotonic()
    if now - _Drops.logged_at >= LOG_EVERY_SECONDS:
        _Drops.logged_at = now
        log.warning(
            "metrics: %d write(s) dropped in this worker so far, the metrics folder (%s) has no room: %s",
            _Drops.count,
            os.environ.get("PROMETHEUS_MULTIPROC_DIR", "?"),
            exc.strerror or type(exc).__name__,
        )


def reserve(fd: int, size: int) -> None:
    """Takes the disk blocks of the first `size` bytes of `fd`, extending it; OSError when there are none."""
    if hasattr(os, "posix_fallocate"):
        os.posix_fallocate(fd, 0, size)
        return
    # No posix_fallocate (macOS): zeros written are blocks taken. Only past the end: never over data.
    end = os.fstat(fd).st_size
    while end < size:
        end += os.pwrite(fd, bytes(min(size - end, 1 << 16)), end)


def _create(filename: str) -> None:
    """A new file of INITIAL_FILE_BYTES, every block taken; it appears whole (a reader globs `*.db`)."""
    part = f"{filename}.part"
    fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        reserve(fd, INITIAL_FILE_BYTES)
    except OSError:
        os.close(fd)
        os.unlink(part)
        raise
    os.close(fd)
    os.replace(part, filename)


def _prepare(filename: str) -> None:
    """The file made, or, when it is there already (made by someone else), its holes filled."""
    try:
        fd = os.open(filename, os.O_RDWR)
    except FileNotFoundError:
        _create(filename)
        return
    try:
        # An empty one the library would grow to its own start: the same size, allocated.
        reserve(fd, max(os.fstat(fd).st_size, INITIAL_FILE_BYTES))
    finally:
        os.close(fd)


class GuardedMmapedDict(MmapedDict):
    """prometheus_client's MmapedDict whose file never has a block the map could miss.

    A file that cannot be made (the disk full at the worker's start) is tried again at the
    next write; until then reads answer 0 and writes are dropped.
    """

    def __init__(self, filename: str, read_mode: bool = False) -> None:
        self._fname = filename
        self._read_mode = read_mode
        # Nothing open until the file could be made: close() and _opened() look at _f.
        self._f = None  # type: ignore[assignment]
        self._m = None  # type: ignore[assignment]
        self._positions: dict[str, int] = {}
        self._opened()

    def _opened(self) -> bool:
        if self._f is not None:
            return True
        try:
            if not self._read_mode:
                _prepare(self._fname)
            MmapedDict.__init__(self, self._fname, self._read_mode)
        except OSError as exc:
            if self._f is not None:
                self._f.close()
            self._f, self._m = None, None
            _drop(exc)
            return False
        return True

    def _init_value(self, key: str) -> None:
        # The library doubles the file with ftruncate (sparse) when the entry does not fit:
        # the blocks of the doubled file are taken first, so that no store through the map
        # can meet a missing block. An OSError here leaves the library's state untouched.
        needed = self._used + len(key.encode("utf-8")) + ENTRY_OVERHEAD
        capacity: int = self._capacity
        while needed > capacity:
            capacity *= 2
        if capacity > self._capacity:
            reserve(self._f.fileno(), capacity)
        super()._init_value(key)  # type: ignore[no-untyped-call]

    def read_value(self, key: str) -> tuple[float, float]:
        if self._opened():
            try:
                value: tuple[float, float] = super().read_value(key)  # type: ignore[no-untyped-call]
                return value
            except OSError as exc:
                _drop(exc)
        return 0.0, 0.0

    def write_value(self, key: str, value: float, timestamp: float) -> None:
        if self._opened():
            try:
                super().write_value(key, value, timestamp)  # type: ignore[no-untyped-call]
            except OSError as exc:
                _drop(exc)


# What GuardedMmapedDict relies on in prometheus_client (tests/test_full_disk.py checks it
# works with the version pinned in constraints.txt).
_NEEDED = ("_init_value", "read_value", "write_value", "close")


def shape_problems() -> list[str]:
    """What of prometheus_client's internals this module relies on is not there ([] when all is)."""
    problems = [f"MmapedDict.{n} is gone" for n in _NEEDED if not callable(getattr(MmapedDict, n, None))]
    if getattr(values, "MmapedDict", None) not in (MmapedDict, GuardedMmapedDict):
        problems.append("prometheus_client.values no longer makes its files with MmapedDict")
    return problems


def install() -> None:
    """Makes prometheus_client's multi-process values keep their files in GuardedMmapedDict.

    Refuses loudly when the library changed shape and the workers would share files (the
    only case where the files exist): a worker killed by a full disk is worse than one
    that does not start.
    """
    problems = shape_problems()
    if problems:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            raise RuntimeError(
                "mallgate.metrics cannot guard prometheus_client's files against a full disk: "
                + "; ".join(problems)
            )
        return
    values.MmapedDict = GuardedMmapedDict  # type: ignore[attr-defined]


install()

WRITES_DROPPED = Counter(
    "mallgate_metric_writes_dropped_total",
    "Metric writes dropped because the metrics folder had no room; the values are stored once it has",
)


def sync_dropped() -> None:
    """Adds the drops counted since the last call to WRITES_DROPPED; call outside any metric call.

    The drops are counted in a plain integer because they happen inside prometheus_client's
    lock; this carries them over. If this write is dropped too it is counted, and the value
    lands with the next write that fits.
    """
    count = _Drops.count
    if count != _Drops.synced:
        WRITES_DROPPED.inc(count - _Drops.synced)
        _Drops.synced = count
