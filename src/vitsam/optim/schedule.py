"""Learning-rate schedule: linear warm-up, then cosine or linear decay (per optimiser step)."""
from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

DECAYS = ("cosine", "linear", "constant")


def lr_factor(step: int, total_steps: int, warmup_steps: int, decay: str = "cosine",
              final_factor: float = 0.0) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based) of ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if decay == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif decay == "linear":
        shape = 1.0 - progress
    else:
        raise ValueError(f"unknown lr decay {decay!r}; choose one of {', '.join(DECAYS)}")
    return final_factor + (1.0 - final_factor) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                    decay: str = "cosine") -> LambdaLR:
    """A LambdaLR on ``optimizer`` (works on SAM itself: it shares the base param_groups)."""
    if decay not in DECAYS:
        raise ValueError(f"unknown lr decay {decay!r}; choose one of {', '.join(DECAYS)}")
    return LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup_steps, decay))
