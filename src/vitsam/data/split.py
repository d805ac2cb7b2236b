"""Seeded, stratified train/test splits and training-set fractions.

Both use their own ``torch.Generator`` (never the global RNG) and draw one permutation per class in
ascending class order, so the same labels and seed give the same indices on every machine.
Per-class counts are computed exactly (``vitsam.exact``): ``train_fraction`` 0.35 of a class of
90 keeps 32 images (31.5, halves up), not the 31 of the float product 31.499999999999996.
"""
from __future__ import annotations

import math
from fractions import Fraction

import torch
from torch import Tensor

from ..exact import half_up, scaled
from .errors import DataError


def _class_permutations(labels: Tensor, seed: int) -> list[tuple[int, Tensor]]:
    """``[(class, its indices in a seeded random order)]`` for every class present."""
    labels = torch.as_tensor(labels).long()
    if labels.ndim != 1:
        raise DataError(f"labels must be 1-D (N,), got shape {tuple(labels.shape)}")
    gen = torch.Generator().manual_seed(int(seed))
    out = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        out.append((c, idx[torch.randperm(idx.numel(), generator=gen)]))
    return out


def stratified_split(labels: Tensor, n_test: int, seed: int) -> tuple[Tensor, Tensor]:
    """Split indices of ``labels`` (N,) into (train, test), test holding exactly ``n_test``.

    Each class gives ``n_test * n_c / N`` test images, rounded by largest remainder so the total
    is exact. Returns two sorted int64 index tensors that partition ``range(N)``.
    """
    labels = torch.as_tensor(labels).long()
    n = labels.numel()
    if not 0 < n_test < n:
        raise DataError(f"n_test must be between 1 and {n - 1} for {n} images, got {n_test}")
    perms = _class_permutations(labels, seed)
    quotas = [Fraction(n_test * p.numel(), n) for _, p in perms]
    counts = [math.floor(q) for q in quotas]
    # hand the remaining slots to the largest fractional parts (ties: lower class first)
    order = sorted(range(len(perms)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[: n_test - sum(counts)]:
        counts[i] += 1
    test = torch.cat([p[:k] for (_, p), k in zip(perms, counts)])
    train = torch.cat([p[k:] for (_, p), k in zip(perms, counts)])
    return train.sort().values, test.sort().values


def stratified_fraction(labels: Tensor, fraction: float, seed: int) -> Tensor:
    """Sorted indices of a seeded subset keeping ``round(fraction * n_c)`` images of each class.

    ``fraction`` in (0, 1], taken as the decimal it is written as; exact halves round up (a
    class of 90 at 0.35 keeps 32). Same labels and seed -> same subset.
    """
    if not 0.0 < fraction <= 1.0:
        raise DataError(f"train_fraction must be in (0, 1], got {fraction}")
    labels = torch.as_tensor(labels).long()
    if fraction == 1.0:
        return torch.arange(labels.numel())
    keep = [p[: scaled(fraction, p.numel(), half_up)] for _, p in _class_permutations(labels, seed)]
    idx = torch.cat(keep)
    if idx.numel() == 0:
        raise DataError(f"train_fraction {fraction} keeps no training image; raise train_fraction")
    return idx.sort().values
