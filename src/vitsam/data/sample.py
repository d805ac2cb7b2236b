"""Seeded random subsets of a split (for clean train accuracy and analyses)."""
from __future__ import annotations

import torch

from .tensors import ImageFiles, ImageTensors


def random_subset(split: ImageTensors | ImageFiles, n: int, seed: int = 0) -> ImageTensors | ImageFiles:
    """``min(n, len(split))`` items drawn without replacement, fixed by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(split), generator=g)[: min(n, len(split))]
    return split.subset(idx)
