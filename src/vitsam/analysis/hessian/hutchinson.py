"""Hutchinson estimate of the Hessian trace with Rademacher probes.

Each probe z (entries +-1) gives the unbiased sample ``z^T H z``; the estimate is their mean
and its standard error ``std(samples, ddof=1) / sqrt(probes)``. The variance of one sample is
``2 * sum_{i != j} H_ij^2``, so diagonal-heavy Hessians need few probes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from vitsam.analysis.state import analysis_state
from vitsam.progress import progress_bar

from .operator import Batch, HessianOperator, LossFn, _quiet


@dataclass
class TraceResult:
    """Hutchinson trace estimate with its standard error (std of probes / sqrt(probes))."""

    estimate: float
    stderr: float
    probes: int
    samples: list[float] = field(repr=False)


def trace(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    probes: int = 50,
    rel_tol: float | None = None,
    min_probes: int = 10,
    backend: str = "auto",
    train_mode: bool = False,
    seed: int = 0,
    cache_graph: bool | None = None,
    progress: bool | None = False,
) -> TraceResult:
    """Hutchinson estimate of tr(H) with Rademacher probes z: mean of ``z^T H z``.

    Uses ``probes`` HVPs, or stops earlier once ``stderr <= rel_tol * |estimate|`` (after at
    least ``min_probes``). The estimator is unbiased; its standard error is reported.
    """
    if not (isinstance(probes, int) and probes >= 2):
        raise ValueError(
            f"probes must be an integer >= 2 (a standard error needs two), got {probes!r}"
        )
    gen = torch.Generator().manual_seed(seed)
    samples: list[float] = []
    with analysis_state(model, train_mode):
        op = HessianOperator(model, loss_fn, batches, backend, cache_graph)
        for i in progress_bar(range(probes), desc="hessian trace", disable=_quiet(progress), leave=False):
            z = op.random_vector(gen, "rademacher")
            samples.append(float(z @ op.matvec(z)))
            if rel_tol is not None and i + 1 >= max(min_probes, 2):
                est, err = _mean_stderr(samples)
                if err <= rel_tol * abs(est):
                    break
    est, err = _mean_stderr(samples)
    return TraceResult(est, err, len(samples), samples)


def _mean_stderr(samples: Sequence[float]) -> tuple[float, float]:
    a = np.asarray(samples, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1) / math.sqrt(len(a)))
