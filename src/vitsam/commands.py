"""Sub-commands that drive the analysis and evaluation packages: eval, analyze, prune, corrupt."""
from __future__ import annotations

from typing import Any, Callable


def register_all() -> list[Callable[[Any], None]]:
    """Functions that each add one sub-command to the ``vitsam`` parser."""
    return []
