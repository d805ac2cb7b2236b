"""Hessian eigenvalue density by stochastic Lanczos quadrature (SLQ, Ghorbani et al., 2019).

m Lanczos steps from a start vector z give the Gauss quadrature of the spectral measure
``mu_z = sum_i (u_i^T z)^2 / (z^T z) delta(lambda_i)``: nodes theta_k (eigenvalues of T) and
weights w_k = (first component of T's k-th eigenvector)^2, exact for polynomials of degree up
to 2m - 1: ``sum_k w_k theta_k^j = z^T H^j z / (z^T z)``. For Rademacher z, ``z^T z = P``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from vitsam.analysis.state import analysis_state
from vitsam.io import save_figure

from .lanczos import _tridiag, lanczos
from .operator import Batch, HessianOperator, LossFn


@dataclass
class DensityResult:
    """Eigenvalue density from SLQ: Gaussian-broadened mixture of Ritz nodes.

    grid (G,), density (G,) integrating to about 1 over the grid; nodes/weights: per run the
    Ritz values and their quadrature weights (weights of a run sum to 1); sigma: broadening.
    """

    grid: list[float]
    density: list[float]
    nodes: list[list[float]]
    weights: list[list[float]]
    sigma: float


def check_density(steps: int, runs: int = 1, num_points: int = 1000,
                  sigma_rel: float = 0.01) -> None:
    """Raise ValueError naming the first SLQ setting out of range."""
    for name, val, low in (("steps", steps, 2), ("runs", runs, 1), ("num_points", num_points, 2)):
        if not (isinstance(val, int) and val >= low):
            raise ValueError(f"density {name} must be an integer >= {low}, got {val!r}")
    if not sigma_rel > 0:
        raise ValueError(f"density sigma_rel must be > 0, got {sigma_rel!r}")


def quadrature(matvec: Callable[[torch.Tensor], torch.Tensor], v0: torch.Tensor, steps: int,
               basis_device: torch.device | str | None = None, progress: bool | None = False,
               desc: str = "hessian slq") -> tuple[np.ndarray, np.ndarray]:
    """Gauss quadrature (nodes (m,), weights (m,) summing to 1) of the spectral measure of the
    symmetric operator ``matvec`` seen from ``v0`` (P,), with m <= ``steps`` Lanczos steps
    (fewer when the Krylov space becomes invariant; the quadrature is then exact)."""
    alpha, beta, _, _ = lanczos(matvec, v0, steps, None, basis_device, progress, desc=desc)
    theta, s = np.linalg.eigh(_tridiag(alpha, beta))
    # The first Lanczos vector is v0 / |v0|, so its weights are the first components squared.
    return theta, s[0, :] ** 2


def spectral_density(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    steps: int = 80,
    runs: int = 1,
    num_points: int = 1000,
    sigma_rel: float = 0.01,
    backend: str = "auto",
    train_mode: bool = False,
    seed: int = 0,
    cache_graph: bool | None = None,
    basis_device: torch.device | str | None = None,
    progress: bool | None = False,
) -> DensityResult:
    """Hessian eigenvalue density by stochastic Lanczos quadrature (Ghorbani et al., 2019).

    Each of ``runs`` Lanczos runs (``steps`` HVPs) yields nodes theta_i and weights tau_i
    (see ``quadrature``); run r starts from the r-th Rademacher vector drawn by
    ``HessianOperator.random_vector`` from ``torch.Generator().manual_seed(seed)``. The density is
    ``mean_runs sum_i tau_i N(t; theta_i, sigma^2)`` on ``num_points`` grid points spanning
    the nodes with margin, ``sigma = sigma_rel * (max node - min node)``.
    """
    check_density(steps, runs, num_points, sigma_rel)
    gen = torch.Generator().manual_seed(seed)
    nodes: list[np.ndarray] = []
    weights: list[np.ndarray] = []
    with analysis_state(model, train_mode):
        op = HessianOperator(model, loss_fn, batches, backend, cache_graph)
        for r in range(runs):
            v0 = op.random_vector(gen, "rademacher")
            theta, w = quadrature(op.matvec, v0, steps, basis_device, progress,
                                  desc=f"hessian slq {r + 1}/{runs}")
            nodes.append(theta)
            weights.append(w)
    lo = min(float(n.min()) for n in nodes)
    hi = max(float(n.max()) for n in nodes)
    width = max(hi - lo, 1e-12 * max(abs(hi), 1.0))
    sigma = sigma_rel * width
    grid = np.linspace(lo - 5 * sigma, hi + 5 * sigma, num_points)
    dens = np.zeros_like(grid)
    for th, w in zip(nodes, weights):
        z = (grid[:, None] - th[None, :]) / sigma
        dens += (np.exp(-0.5 * z**2) @ w) / (sigma * math.sqrt(2 * math.pi))
    dens /= len(nodes)
    return DensityResult(grid.tolist(), dens.tolist(), [n.tolist() for n in nodes],
                         [w.tolist() for w in weights], sigma)


def plot_density(results: Sequence[tuple[str, DensityResult | dict]], path: str | Path,
                 log: bool = True) -> Path:
    """Plot one or several densities (label, result) overlaid; log-scale y by default."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label, res in results:
        d = asdict(res) if isinstance(res, DensityResult) else res
        y = np.maximum(np.asarray(d["density"]), 1e-12) if log else np.asarray(d["density"])
        ax.plot(d["grid"], y, label=label, lw=1.2)
    if log:
        ax.set_yscale("log")
        ax.set_ylim(bottom=1e-8)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title("Hessian spectral density (SLQ)")
    if len(results) > 1 or results[0][0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=130)
