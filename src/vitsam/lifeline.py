"""Worker processes that end with the process that started them.

A pool worker busy with a long task (a study's cell) does not look at its task queue until the
task is done, so when its parent dies (SIGKILL, the out-of-memory killer: signals that reach
the parent alone) it keeps training and writing into the cell's folder, where a re-run of the
same command then writes too. ``exit_with_parent``, a pool initializer, starts a thread that
watches the parent and ends the worker once the parent is gone: SIGTERM first (a run stops as
on pre-emption wherever it handles that; otherwise SIGTERM ends it at once), SIGKILL if it is
still there ``grace_s`` seconds later. Every file the worker writes is written atomically, so
ending it anywhere leaves the folder resumable.
"""
from __future__ import annotations

import os
import signal
import threading
import time

POLL_S = 0.5  # how often the worker looks at its parent; the worker ends within about this


def _watch(parent: int, grace_s: float) -> None:
    while os.getppid() == parent:
        time.sleep(POLL_S)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace_s)
    os.kill(os.getpid(), signal.SIGKILL)


def exit_with_parent(parent: int, grace_s: float = 30.0) -> None:
    """Make this process end when the process ``parent`` (its parent's pid) is gone."""
    threading.Thread(target=_watch, args=(parent, grace_s), name="vitsam-lifeline",
                     daemon=True).start()
