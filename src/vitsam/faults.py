"""Test-only fault points: make a process pause or fail at a named moment, so that a test can
kill it exactly there (docs/reliability.md).

``VITSAM_FAULT`` holds comma-separated entries ``<action>_at:<point>[@<n>]``; each acts the n-th
time (default: the first) this process reaches ``point``:

- ``pause_at``: write ``vitsam-fault: paused at <point> #<n> (pid <pid>)`` to standard error and
  wait for a signal. SIGKILL ends the process there; a handled signal (SIGINT, SIGTERM during
  training) lets it go on, as it would have without the pause.
- ``enospc_at``: raise ``OSError(ENOSPC)``, as a full disk does.

Points: ``step`` (an optimiser step after its update, before its scheduler step), ``ckpt_write``
(a checkpoint half written: weights written, optimiser state and state.json not yet), ``eval``
(an evaluation during training, before it starts), ``restore`` (a resume that has copied the old
log aside but not yet rewritten metrics.jsonl), ``finish`` (the final evaluation, before it
starts), ``folder`` (a train, prune or study process that has just taken its output folder's lock,
before it writes there; ``vitsam.train.runlock``). Unset, ``point`` costs one environment look-up.
"""
from __future__ import annotations

import errno
import os
import signal

POINTS = ("step", "ckpt_write", "eval", "restore", "finish", "folder")
ACTIONS = ("pause", "enospc")

_parsed: tuple[str, dict[tuple[str, int], str]] = ("", {})
_counts: dict[str, int] = {}


def _plan(text: str) -> dict[tuple[str, int], str]:
    """{(point, n): action} of a ``VITSAM_FAULT`` value."""
    plan = {}
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        action, sep, where = entry.partition("_at:")
        name, _, n = where.partition("@")
        if not sep or action not in ACTIONS or name not in POINTS or not (n or "1").isdigit():
            raise ValueError(f"VITSAM_FAULT entry {entry!r} is not <action>_at:<point>[@<n>] "
                             f"with action one of {', '.join(ACTIONS)} and point one of "
                             f"{', '.join(POINTS)}")
        plan[(name, int(n or 1))] = action
    return plan


def point(name: str) -> None:
    """Mark that this process reached fault point ``name`` (one of ``POINTS``)."""
    global _parsed
    text = os.environ.get("VITSAM_FAULT", "")
    if not text:
        return
    if text != _parsed[0]:  # a new plan starts its counts afresh
        _parsed = (text, _plan(text))
        _counts.clear()
    n = _counts[name] = _counts.get(name, 0) + 1
    action = _parsed[1].get((name, n))
    if action == "pause":
        os.write(2, f"vitsam-fault: paused at {name} #{n} (pid {os.getpid()})\n".encode())
        signal.pause()
    elif action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
