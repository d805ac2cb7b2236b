"""Lanczos with full reorthogonalisation on a symmetric matrix-free operator."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from vitsam.progress import progress_bar

from .operator import _quiet


def _tridiag(alpha: Sequence[float], beta: Sequence[float]) -> np.ndarray:
    """The (m, m) tridiagonal Lanczos matrix T from its diagonal and off-diagonal."""
    m = len(alpha)
    t = np.diag(np.asarray(alpha, dtype=np.float64))
    if m > 1:
        off = np.asarray(beta[: m - 1], dtype=np.float64)
        t += np.diag(off, 1) + np.diag(off, -1)
    return t


def lanczos(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    v0: torch.Tensor,
    max_steps: int,
    stop: Callable[[np.ndarray, np.ndarray, float], bool] | None = None,
    basis_device: torch.device | str | None = None,
    progress: bool | None = False,
    desc: str = "lanczos",
) -> tuple[np.ndarray, np.ndarray, float, torch.Tensor]:
    """Lanczos with full reorthogonalisation on a symmetric operator.

    v0: start vector (P,). Runs at most ``max_steps`` products and stops early when
    ``stop(ritz_values, ritz_vectors_of_T, beta)`` is true (checked after every step) or when
    the Krylov space becomes invariant. Returns ``(alpha (m,), beta (m,), last_beta, Q (m, P))``
    where Q holds the orthonormal basis on ``basis_device``.
    """
    dev = v0.device if basis_device is None else torch.device(basis_device)
    size = v0.numel()
    steps = min(max_steps, size)
    basis = torch.empty(steps, size, dtype=v0.dtype, device=dev)
    q = v0 / v0.norm()
    alpha: list[float] = []
    beta: list[float] = []
    m = 0
    bar = progress_bar(total=steps, desc=desc, disable=_quiet(progress), leave=False)
    for j in range(steps):
        basis[j] = q.to(dev)
        w = matvec(q).to(dev)
        m = j + 1
        # Classical Gram-Schmidt twice against the whole basis keeps Q orthonormal to working
        # precision, so no spurious copies of converged Ritz values appear.
        q_block = basis[:m]
        c = q_block @ w
        w = w - q_block.T @ c
        c2 = q_block @ w
        w = w - q_block.T @ c2
        alpha.append(float(c[j] + c2[j]))
        b = float(w.norm())
        beta.append(b)
        bar.update(1)
        if m == steps:
            break
        theta, s = np.linalg.eigh(_tridiag(alpha, beta)) if stop is not None else (None, None)
        if stop is not None and stop(theta, s, b):
            break
        scale = max(abs(a) for a in alpha) or 1.0
        if b <= 1e-10 * scale:
            if stop is None:
                break  # invariant Krylov space: the quadrature is exact
            # The start vector lay in an invariant subspace holding fewer eigenvalues than
            # wanted: continue from a fresh direction orthogonal to it (T becomes block
            # diagonal because this beta is zero).
            w = torch.randn(size, generator=torch.Generator().manual_seed(m), dtype=v0.dtype)
            w = w.to(dev)
            for _ in range(2):
                w = w - q_block.T @ (q_block @ w)
            beta[-1], b = 0.0, float(w.norm())
            q = (w / b).to(v0.device)
            continue
        q = (w / b).to(v0.device)
    bar.close()
    return np.asarray(alpha), np.asarray(beta), beta[-1], basis[:m]
