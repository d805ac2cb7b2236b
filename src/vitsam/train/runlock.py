"""One vitsam process per output folder: a run folder (train, prune) or a study folder.

``hold(folder)`` takes an exclusive, non-blocking ``flock`` on a lock file in ``folder``
(``<run>/.vitsam-train.lock`` for a run folder, whichever command writes it;
``<study>/.vitsam-study.lock`` for a study folder) for as long as the command writes there. The
kernel drops the lock when the process ends, however it ends, so a killed process never leaves a
stale lock behind. A second process on the folder (``vitsam train`` or ``--resume``, ``vitsam
prune --out``, ``vitsam study --out``) fails at once with a one-line error naming the folder, the
command that holds it and its process (pid, host and start time, which the holder writes into
the lock file). The file stays in place (see ``vitsam.io.locked``) and does not make a folder
count as used. ``flock`` is POSIX; on network file systems it is only as good as the server's
lock support.
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

from .. import faults
from .checkpoint import CheckpointError

LOCK_FILE = ".vitsam-train.lock"  # a run folder's; the name predates prune's use of it
STUDY_LOCK_FILE = ".vitsam-study.lock"
_KIND = {LOCK_FILE: "run folder", STUDY_LOCK_FILE: "study folder"}


class RunFolderBusy(CheckpointError):
    """Another process writes into this run (or study) folder."""


def _holder(fd: int) -> str | None:
    """The holder's identity as written in lock file ``fd`` (``vitsam train`` (pid ...)), or None
    while it is not there. Lock files written before the command was recorded are training's."""
    try:
        info = json.loads(os.pread(fd, 4096, 0))
        return (f"`{info.get('command', 'vitsam train')}` "
                f"(pid {info['pid']} on {info['host']}, since {info['since']})")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _busy(folder: Path, fd: int, wait_s: float = 1.0, lock_file: str = LOCK_FILE) -> str:
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
        who = "vitsam process (a process that did not write its name)"
    return (f"{_KIND.get(lock_file, 'folder')} {folder} is in use by another {who}; wait for "
            "it to end or stop it, or choose another folder")


@contextmanager
def hold(folder: Path, remove_if_unused: bool = False, command: str = "vitsam train",
         lock_file: str = LOCK_FILE) -> Iterator[None]:
    """Write into the existing folder ``folder`` while the block runs, or raise ``RunFolderBusy``.

    ``command``: what the lock file names as the holder (``vitsam prune``). ``remove_if_unused``:
    the caller made the folder; if the block fails before anything but the lock file was written
    there, the folder is removed again.
    """
    folder = Path(folder)
    path = folder / lock_file
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:  # another user's lock file: flock works on a read-only handle
        fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunFolderBusy(_busy(folder, fd, lock_file=lock_file)) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                      "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                                      "command": command}).encode(), 0)
        except OSError:  # read-only handle or full disk: the lock holds all the same
            pass
        try:
            faults.point("folder")
            yield
        except BaseException:
            if remove_if_unused and all(p.name == lock_file for p in folder.iterdir()):
                path.unlink(missing_ok=True)
                folder.rmdir()
            raise
    finally:
        os.close(fd)  # releases the lock


def raise_if_busy(folder: Path, lock_file: str = LOCK_FILE) -> None:
    """Raise ``RunFolderBusy`` if a process holds ``folder`` (creates nothing)."""
    folder = Path(folder)
    try:
        fd = os.open(folder / lock_file, os.O_RDONLY)
    except OSError:  # no lock file (or no folder): nobody writes there
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RunFolderBusy(_busy(folder, fd, lock_file=lock_file)) from None
    finally:
        os.close(fd)
