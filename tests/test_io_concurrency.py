"""Shared-file writes: merge_json from concurrent processes keeps every key, and atomic writes
create files with the mode open() would give them (0o666 less the umask).

This module imports only vitsam.io, so the spawned processes start in a fraction of a second.
"""
import json
import multiprocessing as mp
import os
import stat

import pytest

from vitsam import io as vio
from vitsam.io import atomic_write_bytes, atomic_write_json, merge_json

N_KEYS = 100
TIMEOUT_S = 60


def _merge_many(path: str, prefix: str, barrier) -> None:
    barrier.wait(TIMEOUT_S)  # both processes start merging together
    for i in range(N_KEYS):
        merge_json(path, {f"{prefix}{i}": i}, "test file")


def _run_together(target, args_per_process) -> None:
    ctx = mp.get_context("spawn")  # no fork: nothing of the test process is shared but the files
    barrier = ctx.Barrier(len(args_per_process))
    procs = [ctx.Process(target=target, args=(*args, barrier)) for args in args_per_process]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT_S)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0] * len(procs)


def test_merge_json_from_two_processes_keeps_every_key(tmp_path):
    path = tmp_path / "eval.json"
    merge_json(path, {"before": True})
    _run_together(_merge_many, [(str(path), "a"), (str(path), "b")])
    data = json.loads(path.read_text())
    expected = {"before": True, **{f"{p}{i}": i for p in "ab" for i in range(N_KEYS)}}
    assert data == expected
    # Only the file and its lock remain: no temporary file left behind by either writer.
    assert sorted(p.name for p in tmp_path.iterdir()) == [".eval.json.lock", "eval.json"]


def _hold_lock(path: str, barrier) -> None:
    with vio.locked(path):
        barrier.wait(TIMEOUT_S)  # the test process now tries to lock ...
        barrier.wait(TIMEOUT_S)  # ... and has seen that it cannot


def test_locked_excludes_another_process(tmp_path):
    import fcntl

    path = tmp_path / "f.json"
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    proc = ctx.Process(target=_hold_lock, args=(str(path), barrier))
    proc.start()
    try:
        barrier.wait(TIMEOUT_S)
        fd = os.open(tmp_path / ".f.json.lock", os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        barrier.wait(TIMEOUT_S)
    finally:
        proc.join(TIMEOUT_S)
    assert proc.exitcode == 0
    with vio.locked(path):  # free again once the other process let go
        pass


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_writes_honour_the_umask(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        atomic_write_json(tmp_path / "b.json", {"x": 1})
        merge_json(tmp_path / "c.json", {"x": 1})
    finally:
        os.umask(old)
    for name in ("a.bin", "b.json", "c.json"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == mode, name
