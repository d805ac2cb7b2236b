"""Train/eval mode switches that give every module its own mode back.

``model.train(was_training)`` restores one flag for the whole tree, so a block a user froze in
eval mode (or a dropout a caller switched off) comes back in train mode. Every analysis,
evaluation and check that switches modes goes through ``restore_modes`` / ``eval_mode`` instead,
which save and restore the ``training`` flag of each module separately.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn


@contextmanager
def restore_modes(*models: nn.Module) -> Iterator[None]:
    """Save the ``training`` flag of every module of ``models``; put each back on exit."""
    saved = [(m, m.training) for model in models for m in model.modules()]
    try:
        yield
    finally:
        for m, mode in saved:
            m.training = mode


@contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Run ``models`` in eval mode; on exit every module's own mode is restored."""
    with restore_modes(*models):
        for model in models:
            model.eval()
        yield
