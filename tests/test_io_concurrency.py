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

from procs import run_together

N_KEYS = 100
TIMEOUT_S = 60


def _merge_many(path: str, prefix: str, barrier) -> None:
    barrier.wait(TIMEOUT_S)  # both processes start merging together
    for i in range(N_KEYS):
        merge_json(path, {f"{prefix}{i}": i}, "test file")


def _run_together(target, args_per_process) -> None:
    run_together(target, args_per_process, TIMEOUT_S)


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


WRITER = r"""
import sys, time
from vitsam.io import atomic_writer
with atomic_writer(sys.argv[1]) as fh:
    fh.write(b"half of a file")
    fh.flush()
    print("writing", flush=True)
    time.sleep(600)
"""


def test_a_writer_killed_mid_write_leaves_a_temporary_only_until_the_next_cleanup(tmp_path):
    import signal
    import subprocess
    import sys
    from pathlib import Path

    target = tmp_path / "part.npy"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "writing\n"
        (tmp, ) = tmp_path.glob(".part.npy.*.tmp")
        assert vio.remove_stale_temporaries(tmp_path) == [] and tmp.exists()  # still writing
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not target.exists() and tmp.exists()
    # A temporary of the same dead writer that a live process still holds locked (a writer in
    # another process namespace, whose pid means nothing here) is kept; another host's too.
    import fcntl

    held = tmp.with_name(tmp.name.replace(".part.npy.", ".held.npy."))
    held.write_bytes(b"x")
    foreign = tmp_path / f".part.npy.{'0' * 8 if vio._HOST != '0' * 8 else '1' * 8}-{proc.pid}-0123abcd.tmp"
    foreign.write_bytes(b"x")
    fd = os.open(held, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert vio.remove_stale_temporaries(tmp_path) == [tmp]
    finally:
        os.close(fd)
    assert not tmp.exists() and held.exists() and foreign.exists()
    assert vio.remove_stale_temporaries(tmp_path, "other.npy") == [] and held.exists()
    assert vio.remove_stale_temporaries(tmp_path, "held.npy") == [held]
