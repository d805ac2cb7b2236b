"""Label noise: a seeded fraction of the training labels replaced, the test labels left clean.

``symmetric``: exactly ``round(rate * N)`` training samples, drawn uniformly without
replacement, get a label drawn uniformly from the *other* K - 1 classes, so the share of wrong
labels is the rate itself (definitions that may redraw the true class give an actual rate of
``rate * (K - 1) / K``). ``pair``: the same samples get the next class, ``(y + 1) mod K``, the
class-pair flip of Han et al. (2018, co-teaching), a structured noise that a model can learn as a
rule. Both are fixed by the data seed alone, so every cell of a study with the same seed trains
on the same corrupted labels.

A run keeps the true labels of its noisy samples (``NoisyLabels``) so that training can log how
many of them the model has memorised (predicts the given, wrong label) and how many it still
classifies correctly (predicts the true one): the memorisation that SAM is reported to resist.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

KINDS = ("symmetric", "pair")
_STREAM = 0x6E6F6973  # keeps the noise draw independent of the train_fraction subset's draw


@dataclass(frozen=True)
class NoisyLabels:
    """Which training samples carry a replaced label: ``index`` (M,) int64 into the training
    split, their ``given`` (wrong) labels and their ``true`` labels, both (M,) int64."""

    index: Tensor
    given: Tensor
    true: Tensor
    rate: float
    kind: str


def corrupt_labels(labels: Tensor, num_classes: int, rate: float, kind: str = "symmetric",
                   seed: int = 0) -> tuple[Tensor, NoisyLabels]:
    """``labels`` (N,) int64 with ``round(rate * N)`` of them replaced; returns the new labels
    and the record of the replaced ones. Needs at least two classes."""
    if kind not in KINDS:
        raise ValueError(f"label noise kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if num_classes < 2:
        raise ValueError("label noise needs at least two classes")
    n = int(labels.numel())
    g = torch.Generator().manual_seed(_STREAM + int(seed))
    idx = torch.randperm(n, generator=g)[: int(round(rate * n))].sort().values
    true = labels[idx].clone()
    if kind == "pair":
        given = (true + 1) % num_classes
    else:
        given = (true + torch.randint(1, num_classes, (len(idx),), generator=g)) % num_classes
    out = labels.clone()
    out[idx] = given
    return out, NoisyLabels(idx, given, true, float(rate), kind)
