"""Files made once by whichever process gets there first: the secret key and the sandbox keys."""

from __future__ import annotations

import multiprocessing
import stat
from pathlib import Path

from mallgate.private_files import create_private
from mallgate.sandbox.keys import SandboxKeys


def _create(path: str, data: bytes, start: multiprocessing.synchronize.Barrier) -> bool:
    start.wait()
    return create_private(Path(path), data)


def _sandbox_keys(folder: str, start: multiprocessing.synchronize.Barrier) -> str:
    start.wait()
    return SandboxKeys.load_or_create(Path(folder)).alipay_platform_private


def test_processes_creating_one_file_together_leave_exactly_one(tmp_path: Path) -> None:
    path = tmp_path / "made-once"
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        start = manager.Barrier(6)
        with context.Pool(6) as pool:
            made = pool.starmap(_create, [(str(path), f"writer {n}".encode(), start) for n in range(6)])
    assert made.count(True) == 1
    assert path.read_bytes() == f"writer {made.index(True)}".encode()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not [p for p in tmp_path.iterdir() if p != path]  # no temporary file left behind


def test_workers_starting_on_a_fresh_var_dir_share_one_set_of_sandbox_keys(tmp_path: Path) -> None:
    """Each worker used to keep the keys it generated itself: all but one then signed wrong."""
    folder = tmp_path / "sandbox"
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        start = manager.Barrier(3)
        with context.Pool(3) as pool:
            keys = pool.starmap(_sandbox_keys, [(str(folder), start)] * 3)
    assert len(set(keys)) == 1
    assert SandboxKeys.load_or_create(folder).alipay_platform_private == keys[0]
