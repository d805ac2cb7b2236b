"""The run-folder lock names its holder, even to a process that lost the race by microseconds."""
from __future__ import annotations

import fcntl
import json
import os
import threading
import time

import pytest

from vitsam.train import runlock


def _take(path) -> int:
    """Hold the lock on ``path`` in this process the way a starting holder does: lock, no name."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def test_loser_waits_for_the_holder_to_write_its_name(tmp_path) -> None:
    holder = _take(tmp_path / runlock.LOCK_FILE)
    try:
        def write_name_later() -> None:
            time.sleep(0.2)
            os.pwrite(holder, json.dumps({"pid": 4242, "host": "h", "since": "t"}).encode(), 0)
        t = threading.Thread(target=write_name_later)
        t.start()
        with pytest.raises(runlock.RunFolderBusy, match=r"\(pid 4242 on h, since t\)"):
            runlock.raise_if_busy(tmp_path)
        t.join()
    finally:
        os.close(holder)


def test_a_holder_that_never_writes_its_name_is_still_reported(tmp_path) -> None:
    holder = _take(tmp_path / runlock.LOCK_FILE)
    try:
        fd = os.open(tmp_path / runlock.LOCK_FILE, os.O_RDONLY)
        t0 = time.monotonic()
        msg = runlock._busy(tmp_path, fd, wait_s=0.1)
        os.close(fd)
        assert time.monotonic() - t0 < 1.0
        assert "did not write its name" in msg and str(tmp_path) in msg
    finally:
        os.close(holder)
    runlock.raise_if_busy(tmp_path)  # released: nothing raised
