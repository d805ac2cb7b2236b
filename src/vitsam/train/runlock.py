"""One training process per run folder.

``hold(run_dir)`` takes an exclusive, non-blocking ``flock`` on ``<run_dir>/.vitsam-train.lock``
for as long as the run trains. The kernel drops the lock when the process ends, however it ends,
so a killed run never leaves a stale lock behind. A second ``vitsam train`` on the folder (a new
run or ``--resume``) fails at once with a one-line error naming the folder and the process that
holds it (pid, host and start time, which the holder writes into the lock file). The file stays
in place (see ``vitsam.io.locked``) and does not make a folder count as used. ``flock`` is POSIX;
on network file systems it is only as good as the server's lock support.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .checkpoint import CheckpointError

LOCK_FILE = ".vitsam-train.lock"


class RunFolderBusy(CheckpointError):
    """Another process trains in this run folder."""


def _holder(fd: int) -> str | None:
    """The holder's identity as written in lock file ``fd``, or None while it is not there."""
    try:
        info = json.loads(os.pread(fd, 4096, 0))
        return f"pid {info['pid']} on {info['host']}, since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _busy(run_dir: Path, fd: int, wait_s: float = 1.0) -> str:
    """The one-line error for a folder whose lock file ``fd`` another process holds.

    The holder writes its identity just after taking the lock, so a process that lost a race
    by microseconds waits up to ``wait_s`` seconds to be able to name it.
    """
    deadline = time.monotonic() + wait_s
    who = _holder(fd)
    while who is None and time.monotonic() < deadline:
        time.sleep(0.01)
        who = _holder(fd)
    if who is None:  # a holder that cannot write (read-only handle, full disk)
        who = "a process that did not write its name"
    return (f"run folder {run_dir} is in use by another `vitsam train` ({who}); wait for it "
            "to end or stop it, or train in another folder")


@contextmanager
def hold(run_dir: Path, remove_if_unused: bool = False) -> Iterator[None]:
    """Train in the existing folder ``run_dir`` while the block runs, or raise ``RunFolderBusy``.

    ``remove_if_unused``: the caller made the folder; if the block fails before anything but
    the lock file was written there, the folder is removed again.
    """
    path = run_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:  # another user's lock file: flock works on a read-only handle
        fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunFolderBusy(_busy(run_dir, fd)) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                      "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        except OSError:  # read-only handle or full disk: the lock holds all the same
            pass
        try:
            yield
        except BaseException:
            if remove_if_unused and all(p.name == LOCK_FILE for p in run_dir.iterdir()):
                path.unlink(missing_ok=True)
                run_dir.rmdir()
            raise
    finally:
        os.close(fd)  # releases the lock


def raise_if_busy(run_dir: Path) -> None:
    """Raise ``RunFolderBusy`` if a process holds ``run_dir`` (creates nothing)."""
    try:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDONLY)
    except OSError:  # no lock file (or no folder): nobody trains there
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RunFolderBusy(_busy(run_dir, fd)) from None
    finally:
        os.close(fd)
