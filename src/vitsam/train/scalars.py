"""A run's scalar log: ``metrics.jsonl`` always, TensorBoard event files when asked.

``train.tensorboard=true`` mirrors every numeric field of every record (training intervals and
evaluations) as a TensorBoard scalar at its optimiser step, under ``<run>/tensorboard`` (``tensorboard
--logdir runs``). TensorBoard is an optional extra (``pip install -e ".[tensorboard]"``); the JSON
log stays the record that resumes, reports and studies read.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..io import append_jsonl

_SKIP = ("step", "epoch")  # the x axis, not scalars


def check_tensorboard() -> None:
    """A one-line error when TensorBoard is asked for but not installed."""
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        raise ConfigError("train.tensorboard=true needs the tensorboard package: "
                          "pip install tensorboard (or the [tensorboard] extra)") from None


class ScalarLog:
    """Appends records to ``metrics.jsonl``; mirrors them to TensorBoard when enabled."""

    def __init__(self, run_dir: Path, tensorboard: bool = False,
                 purge_step: int | None = None, enabled: bool = True) -> None:
        """``purge_step``: on resume, TensorBoard drops its events from that step on (they are
        logged again), as the JSON log does. ``enabled=False`` writes nothing (the processes of
        a distributed run other than rank 0)."""
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        self.enabled = enabled
        if tensorboard and enabled:
            check_tensorboard()
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"),
                                        purge_step=purge_step)

    def write(self, rec: dict[str, Any]) -> None:
        """One record (must hold ``step``) to the JSON log and, if enabled, TensorBoard."""
        if not self.enabled:
            return
        append_jsonl(self.path, rec)
        if self.writer is None:
            return
        for key, val in rec.items():
            if key in _SKIP or isinstance(val, bool) or not isinstance(val, (int, float)):
                continue
            if math.isfinite(val):
                tag = f"test/{key[5:]}" if key.startswith("test_") else f"train/{key}"
                self.writer.add_scalar(tag, val, int(rec["step"]))
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
