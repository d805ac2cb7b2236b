"""SIGINT and SIGTERM during training: finish the step, write a checkpoint, say how to resume.

While ``graceful(run_dir)`` is active (the training loop), the first SIGINT (Ctrl-C) or SIGTERM
(a cluster's pre-emption) is only recorded: the loop finishes the optimiser step in progress,
writes a checkpoint of it and raises ``Interrupted``, whose message is the command that
resumes; ``vitsam`` exits with ``Interrupted.status`` = 128 + the signal number (130 for SIGINT,
143 for SIGTERM). A signal during an evaluation stops the run after the next step. A second
signal ends the process at once, with the same status and no new checkpoint: every file of a run
is written atomically, so the previous checkpoint stays whole and the resume starts from it.

Outside the loop (building the data, the final evaluation) Python's defaults apply: Ctrl-C
raises KeyboardInterrupt, SIGTERM ends the process; a resume redoes that part. A signal the
process was started ignoring (a script's background job ignores SIGINT) stays ignored, and off
the main thread, where Python cannot set handlers, ``graceful`` changes nothing.
"""
from __future__ import annotations

import os
import shlex
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_received: int | None = None  # the first signal of the active ``graceful`` block
_run_dir: Path | None = None


class Interrupted(KeyboardInterrupt):
    """Training stopped at a signal after writing a checkpoint; the message says how to resume."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def status(self) -> int:
        """The exit status of a process ended by this signal's default action, as shells show it."""
        return 128 + self.signum

    def __reduce__(self) -> tuple[Any, ...]:  # crosses process pools (study workers) whole
        return type(self), (str(self), self.signum)


def resume_command(run_dir: str | Path) -> str:
    """The command that continues the run in ``run_dir``."""
    return f"vitsam train --resume {shlex.quote(str(run_dir))}"


def _handle(signum: int, frame: Any) -> None:
    global _received
    name = signal.Signals(signum).name
    if _received is not None:
        # os.write, not print: the handler may run while the main thread is inside a print.
        os.write(2, f"\nvitsam: {name} again: stopping now; `{resume_command(_run_dir)}` "
                    f"continues from the last checkpoint\n".encode())
        os._exit(128 + signum)
    _received = signum
    os.write(2, f"\nvitsam: {name}: finishing this step and writing a checkpoint "
                f"({name} again stops at once)\n".encode())


@contextmanager
def graceful(run_dir: str | Path) -> Iterator[None]:
    """SIGINT and SIGTERM only set a flag (``requested``) while the block runs."""
    global _received, _run_dir
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received, _run_dir = None, Path(run_dir)
    old: dict[int, Any] = {}
    try:
        for sig in SIGNALS:
            if signal.getsignal(sig) is not signal.SIG_IGN:
                old[sig] = signal.signal(sig, _handle)
        yield
    finally:
        for sig, handler in old.items():  # None: a handler set outside Python
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        _received = None


def requested() -> bool:
    """True once a signal asked the run to stop."""
    return _received is not None


def received() -> int | None:
    """The signal that asked the run to stop, or None."""
    return _received


def mark(signum: int) -> None:
    """Stop as if ``signum`` had arrived here: another process of the same run received it
    (``vitsam.train.distributed``), and all of them stop after the same step."""
    global _received
    if _received is None:
        _received = signum


def stop_if_requested(run_dir: str | Path, step: int, checkpoint: str) -> None:
    """Raise ``Interrupted`` if a signal asked to stop (the checkpoint of ``step`` is written)."""
    if _received is None:
        return
    name = signal.Signals(_received).name
    raise Interrupted(f"stopped by {name} after step {step}, checkpoint {checkpoint} written; "
                      f"`{resume_command(run_dir)}` continues the run", _received)
