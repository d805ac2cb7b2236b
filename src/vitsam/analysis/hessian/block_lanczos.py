"""Block Lanczos with full reorthogonalisation: b vectors per step, one batched product each.

Each step applies the operator to a block of b orthonormal vectors at once (``matmat``,
(b, P) -> (b, P)), so a step costs one pass over the data for b products. After m steps the
basis Q (mb, P) spans the block Krylov space of the start block and ``T = Q H Q^T`` is block
tridiagonal: diagonal blocks ``A_j = Q_j H Q_j^T`` and sub-diagonal blocks ``R_j`` from the QR
``W_j = R_j^T Q_{j+1}`` of the part of ``H Q_j`` orthogonal to the basis. A Ritz pair
(theta, y = s Q) of T has the residual ``||H y - theta y|| = ||R_m s_last||``, s_last the last b
entries of s: exact in exact arithmetic, as ``beta_m |s_m|`` is for single-vector Lanczos.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from vitsam.progress import progress_bar

from .operator import _quiet


def _orthonormalise(w: torch.Tensor, basis: torch.Tensor, scale: float,
                    gen: torch.Generator) -> tuple[torch.Tensor, np.ndarray]:
    """QR of a block w (b, P) already orthogonal to ``basis`` (n, P): ``w = R^T Q``.

    Returns Q (b, P) orthonormal and orthogonal to the basis, and R (b, b) upper triangular
    (float64). Gram-Schmidt twice, column by column: a column whose remainder is below
    ``1e-10 * scale`` (the block lost rank: the Krylov space is invariant along it) gets
    R[i, i] = 0 and a fresh random direction orthogonal to everything so far, so that
    ``w = R^T Q`` stays exact and the basis keeps growing, as single-vector Lanczos restarts.
    """
    b = w.shape[0]
    q = torch.zeros_like(w)
    r = np.zeros((b, b))
    for i in range(b):
        v = w[i]
        for _ in range(2):
            c = q[:i] @ v
            v = v - q[:i].T @ c
            r[:i, i] += c.double().cpu().numpy()
        norm = float(v.norm())
        if norm > 1e-10 * scale:
            r[i, i] = norm
            q[i] = v / norm
            continue
        v = torch.randn(w.shape[1], generator=gen, dtype=w.dtype).to(w.device)
        for _ in range(2):
            v = v - basis.T @ (basis @ v)
            v = v - q[:i].T @ (q[:i] @ v)
        norm = float(v.norm())
        if norm > 0:  # zero only when the basis already spans the whole space
            q[i] = v / norm
    return q, r


def block_lanczos(
    matmat: Callable[[torch.Tensor], torch.Tensor],
    v0: torch.Tensor,
    max_products: int,
    stop: Callable[[np.ndarray, np.ndarray, np.ndarray], bool] | None = None,
    basis_device: torch.device | str | None = None,
    progress: bool | None = False,
    desc: str = "block lanczos",
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """Block Lanczos with full reorthogonalisation on a symmetric operator.

    v0: start block (b, P) of b linearly independent vectors (orthonormalised here).
    Runs at most ``max_products // b`` steps (each ``matmat`` of b vectors; never more than
    P // b) and stops early when ``stop(ritz_values, ritz_vectors_of_T, R)`` is true (checked
    after every step; R (b, b) is the last QR factor, so the Ritz residuals are the column
    norms of ``R @ s[-b:]``). seed: random directions that replace a block's lost rank.
    Returns ``(T (mb, mb) float64, R (b, b), Q (mb, P))`` with Q the orthonormal basis on
    ``basis_device``.
    """
    if v0.dim() != 2:
        raise ValueError(f"start block has shape {tuple(v0.shape)}, expected (b, P)")
    b, size = v0.shape
    dev = v0.device if basis_device is None else torch.device(basis_device)
    steps = max(1, min(max_products, size) // b)
    basis = torch.empty(steps * b, size, dtype=v0.dtype, device=dev)
    gen = torch.Generator().manual_seed(seed)
    t = np.zeros((steps * b, steps * b))
    q, _ = _orthonormalise(v0.to(dev), basis[:0], float(v0.norm(dim=1).max()), gen)
    r = np.zeros((b, b))
    m = 0
    bar = progress_bar(total=steps, desc=desc, disable=_quiet(progress), leave=False)
    for j in range(steps):
        n, m = j * b, (j + 1) * b
        basis[n:m] = q
        w = matmat(q.to(v0.device)).to(dev)
        # Block classical Gram-Schmidt twice against the whole basis keeps Q orthonormal to
        # working precision (no spurious copies of converged Ritz values).
        qb = basis[:m]
        c = qb @ w.T
        w = w - c.T @ qb
        c2 = qb @ w.T
        w = w - c2.T @ qb
        a = (c + c2)[n:m].double().cpu().numpy()
        t[n:m, n:m] = 0.5 * (a + a.T)  # symmetric in exact arithmetic
        scale = float(np.max(np.abs(np.diag(t)[:m]))) or 1.0
        q, r = _orthonormalise(w, qb, scale, gen)
        bar.update(1)
        if j + 1 < steps:
            t[m:m + b, n:m] = r
            t[n:m, m:m + b] = r.T
        if stop is not None and j + 1 < steps:
            theta, s = np.linalg.eigh(t[:m, :m])
            if stop(theta, s, r):
                break
    bar.close()
    return t[:m, :m], r, basis[:m]
