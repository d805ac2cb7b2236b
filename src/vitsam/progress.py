"""Progress bars: ``progress_bar`` makes every bar vitsam shows.

On a terminal a bar redraws itself in place (tqdm's own bar; in a notebook, tqdm's widget).
Anywhere else (CI, ``nohup``, a cluster log: standard error is not a terminal) a redraw would
write a carriage return and the whole line again several times a second, which fills a log with
kilobytes of one line. There a bar writes one plain line (no ``\\r``) at most every
``VITSAM_PROGRESS_INTERVAL`` seconds (default 30; a number of seconds > 0), the first when it
starts and a last one when it finishes, so a bar of T seconds writes at most T / interval + 2 lines.

``disable`` follows tqdm: True hides the bar, False shows it, None shows it only on a terminal.
"""
from __future__ import annotations

import os
import sys
from typing import Any, TextIO

from tqdm.auto import tqdm as auto_tqdm
from tqdm.std import tqdm as std_tqdm

ENV = "VITSAM_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 30.0


def line_interval() -> float:
    """Seconds between two progress lines in a log: ``$VITSAM_PROGRESS_INTERVAL`` or 30."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return DEFAULT_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        from .config import ConfigError  # here: the command line checks this before importing torch

        raise ConfigError(f"{ENV} must be a number of seconds > 0 between progress lines in a log "
                          f"(e.g. 30), got {raw!r}")
    return value


class LineBar(std_tqdm):
    """A tqdm bar for logs: whole lines ending in a newline, at most one per ``interval`` seconds."""

    def __init__(self, iterable: Any = None, desc: str | None = None, total: float | None = None, *,
                 interval: float = DEFAULT_INTERVAL, **kwargs: Any) -> None:
        self._interval = interval
        self._last_line: float | None = None
        self._shown: tuple | None = None  # (n, postfix, desc) of the last line
        self._final = False
        kwargs.pop("dynamic_ncols", None)  # no terminal to measure
        lead = "{desc}: " if desc else ""
        known = total is not None or hasattr(iterable, "__len__")
        kwargs.setdefault("bar_format", lead + ("{percentage:3.0f}% {n_fmt}/{total_fmt} "
                                                "[{elapsed}<{remaining}, {rate_fmt}{postfix}]"
                                                if known else "{n_fmt} [{elapsed}, {rate_fmt}{postfix}]"))
        # tqdm's own rate limit and its monitor thread at the same pace (the monitor refreshes
        # bars idle for maxinterval, which must not come faster than the lines).
        kwargs["mininterval"] = interval
        kwargs["maxinterval"] = interval
        super().__init__(iterable, desc, total, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg == "":  # tqdm clearing its line: a log has nothing to clear
            return False
        now = self._time()
        if not self._final and self._last_line is not None and now - self._last_line < self._interval:
            return False
        self.fp.write((self.__str__() if msg is None else msg) + "\n")
        getattr(self.fp, "flush", lambda: None)()
        self._last_line, self._shown = now, self._state()
        return True

    def _state(self) -> tuple:
        return self.n, self.postfix, self.desc

    def clear(self, nolock: bool = False) -> None:
        """Nothing to clear in a log."""

    def close(self) -> None:
        if not getattr(self, "disable", True) and self.leave is not False and self._shown != self._state():
            self._final = True
            self.display()
        self.leave = False  # tqdm's close would end the (already ended) line once more
        super().close()


def _is_terminal(file: TextIO) -> bool:
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


def progress_bar(iterable: Any = None, *, disable: bool | None = False, file: TextIO | None = None,
                 **kwargs: Any) -> std_tqdm:
    """A tqdm bar (same arguments as ``tqdm``) that suits where its output goes: a live bar on a
    terminal or in a notebook, one line per ``VITSAM_PROGRESS_INTERVAL`` seconds elsewhere."""
    out = file if file is not None else sys.stderr
    terminal = _is_terminal(out)
    if disable is None:
        disable = not terminal
    if disable or terminal or _in_notebook():
        return auto_tqdm(iterable, disable=bool(disable), file=file, **kwargs)
    return LineBar(iterable, file=out, interval=line_interval(), **kwargs)


def _in_notebook() -> bool:
    """True when tqdm.auto chose its notebook widget (which never writes to standard error)."""
    return "tqdm.notebook" in {c.__module__ for c in auto_tqdm.__mro__}
