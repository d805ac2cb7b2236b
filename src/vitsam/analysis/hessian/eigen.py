"""Top Hessian eigenvalues by Lanczos (largest by value) or power iteration (by magnitude).

Lanczos returns the k largest *algebraic* eigenvalues. Power iteration with deflation converges
to the k eigenvalues of largest *magnitude*, which are a different set when negative curvature
dominates (e.g. a spectrum {-13.4, 7.5, ...} gives -13.4 first). Both routes list what they
found sorted by value, largest first, and say which set it is (``selection``), so
``eigenvalues[0]`` is always the largest eigenvalue found and ``lambda_max_is_largest`` says
whether it is known to be the Hessian's largest.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from vitsam.analysis.state import analysis_state
from vitsam.progress import progress_bar

from .lanczos import _tridiag, lanczos
from .operator import Batch, HessianOperator, LossFn, _quiet

METHODS = ("lanczos", "power")
STOPS = ("residual", "change")
# What the k eigenvalues of each method are: the k largest by value, or by absolute value.
SELECTIONS = {"lanczos": "largest_algebraic", "power": "largest_magnitude"}


@dataclass
class EigenResult:
    """Top-k eigenpairs of the Hessian, sorted by value, largest first.

    eigenvalues: list of k floats (loss units per parameter unit squared), descending by value;
    which k they are is ``selection``: ``"largest_algebraic"`` (Lanczos: the k largest
    eigenvalues) or ``"largest_magnitude"`` (power iteration: the k of largest |value|).
    lambda_max_is_largest: ``eigenvalues[0]`` is the Hessian's largest eigenvalue (always for
    Lanczos; for power iteration only when a non-negative eigenvalue was found, since a larger
    eigenvalue would also be larger in magnitude). eigenvectors: (k, P) unit vectors in the
    same order, or None; residuals: ``||H v - theta v|| / |theta|`` per pair (Lanczos: the
    standard Ritz estimate ``beta_m * |s_m|``, exact in exact arithmetic with full
    reorthogonalisation), reported whatever the stopping test; num_hvps: Hessian-vector
    products used; converged: the ``stop`` test was met (or the Krylov space was exhausted).
    """

    eigenvalues: list[float]
    eigenvectors: torch.Tensor | None
    residuals: list[float]
    num_hvps: int
    converged: bool
    method: str
    backend: str
    seconds: float = 0.0
    stop: str = "residual"
    selection: str = "largest_algebraic"
    lambda_max_is_largest: bool = True


def _rel_scale(theta: np.ndarray) -> np.ndarray:
    """|theta| floored so that relative tests still work for exact zero eigenvalues."""
    return np.maximum(np.abs(theta), 1e-12 * np.max(np.abs(theta)) + 1e-300)


def _lanczos_top(op: HessianOperator, k: int, tol: float, max_iter: int, v0: torch.Tensor,
                 basis_device, return_vectors: bool, progress: bool, stop_test: str):
    prev: list[np.ndarray] = []  # the wanted Ritz values of the previous step (change test)
    hit = [False]

    def stop(theta: np.ndarray, s: np.ndarray, b: float) -> bool:
        if len(theta) < k:
            return False
        if stop_test == "residual":
            res = b * np.abs(s[-1, -k:])
            hit[0] = bool(np.all(res <= tol * _rel_scale(theta)[-k:]))
            return hit[0]
        top = theta[-k:]
        if prev:
            # Against the previous values, as a between-iterations change is defined.
            hit[0] = bool(np.all(np.abs(top - prev[0]) <= tol * _rel_scale(prev[0])))
        prev[:] = [top.copy()]
        return hit[0]

    alpha, beta, last_b, basis = lanczos(op.matvec, v0, max_iter, stop, basis_device, progress,
                                         desc="hessian lanczos")
    theta, s = np.linalg.eigh(_tridiag(alpha, beta))
    order = np.argsort(theta)[::-1][:k]
    vals = theta[order]
    res = last_b * np.abs(s[-1, order]) / _rel_scale(theta)[order]
    vecs = None
    if return_vectors:
        coeff = torch.as_tensor(s[:, order].T.copy(), dtype=basis.dtype, device=basis.device)
        vecs = coeff @ basis
    # A Krylov space that filled up (or became invariant) holds exact eigenpairs: residual ~ 0.
    converged = len(vals) == k and (hit[0] or bool(np.all(res <= tol)))
    return [float(x) for x in vals], vecs, [float(r) for r in res], converged


def _power_top(op: HessianOperator, k: int, tol: float, max_iter: int,
               make_start: Callable[[], torch.Tensor], return_vectors: bool, progress: bool,
               stop_test: str):
    found: list[torch.Tensor] = []
    vals: list[float] = []
    res_list: list[float] = []
    converged = True

    def deflate(w: torch.Tensor) -> torch.Tensor:
        for u in found:
            w = w - (u @ w) * u
        return w

    bar = progress_bar(total=k * max_iter, desc="hessian power", disable=_quiet(progress), leave=False)
    for _ in range(k):
        v = deflate(make_start())
        v = v / v.norm()
        theta, rel, ok = math.nan, math.inf, False
        for _ in range(max_iter):
            w = deflate(op.matvec(v))
            last, theta = theta, float(v @ w)
            rel = float((w - theta * v).norm()) / max(abs(theta), 1e-30)
            bar.update(1)
            if stop_test == "residual":
                ok = rel <= tol
            else:  # nan on the first step: no change to measure yet
                ok = abs(theta - last) <= tol * max(abs(last), 1e-30)
            if ok:
                break
            v = w / w.norm()
        converged &= ok
        found.append(v)
        vals.append(theta)
        res_list.append(rel)
    bar.close()
    vecs = torch.stack(found) if return_vectors else None
    return vals, vecs, res_list, converged


def _validate(k: int, tol: float, max_iter: int, method: str, stop: str) -> None:
    if not (isinstance(k, int) and k >= 1):
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol!r}")
    if not (isinstance(max_iter, int) and max_iter >= 1):
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
    if method not in METHODS:
        raise ValueError(f"unknown eigen-solver {method!r}; choose one of {METHODS}")
    if stop not in STOPS:
        raise ValueError(f"unknown stopping test {stop!r}; choose one of {STOPS}")


def top_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    k: int = 1,
    method: str = "lanczos",
    tol: float = 1e-3,
    stop: str = "residual",
    max_iter: int = 100,
    return_eigenvectors: bool = False,
    backend: str = "auto",
    train_mode: bool = False,
    seed: int = 0,
    start: str = "gradient",
    cache_graph: bool | None = None,
    basis_device: torch.device | str | None = None,
    progress: bool | None = False,
) -> EigenResult:
    """The k largest Hessian eigenvalues of the mean loss over all ``batches`` (one operator),
    by value (Lanczos) or by magnitude (power iteration); sorted by value, largest first.

    batches: list of (x (B, ...), y (B,)) pairs of any sizes; the HVP is the size-weighted sum
    of per-batch HVPs, so the result is the spectrum of the full-data Hessian.

    stop: the convergence test, met by every wanted eigenvalue theta.
    ``"residual"`` (default): ``||H v - theta v|| <= tol * |theta|`` (ARPACK's test). It
    certifies the pair itself: an eigenvalue of H lies within ``tol |theta|`` of theta, the
    error shrinks with the squared residual (about ``tol**2 |theta| / relative gap``), and a
    slowly converging run cannot pass it by stalling. ``"change"``:
    ``|theta - theta_prev| <= tol * |theta_prev|`` between two consecutive Lanczos steps /
    power iterations (PyHessian's test). 30-40 % fewer HVPs, but it bounds only the progress
    of one step, not the error: where convergence stalls (close top eigenvalues) it stops
    while the estimate is still far off (docs/benchmarks.md: 5e-2 on an MLP-Mixer). The
    residual test stays the default because analyses compare lambda_max between
    runs (SAM vs not) and need an error they can trust; use ``"change"`` to match PyHessian's
    semantics or for quick estimates.

    method: ``"lanczos"`` (default; full reorthogonalisation, at most ``max_iter`` HVPs in
    total, returns the largest *algebraic* eigenvalues) or ``"power"`` (power iteration with
    deflation, up to ``max_iter`` HVPs per eigenvalue; it converges to the largest
    *magnitude* eigenvalues, which coincide unless negative curvature dominates). Either way
    the result lists them by value and names the set in ``selection``.
    start: ``"gradient"`` (default; gradient plus random direction, fewer HVPs) or
    ``"random"``, see ``HessianOperator.start_vector``; ``seed`` fixes the random part.
    Model mode, buffers, weights and RNG state are unchanged afterwards.
    """
    _validate(k, tol, max_iter, method, stop)
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    with analysis_state(model, train_mode):
        op = HessianOperator(model, loss_fn, batches, backend, cache_graph)
        if k > op.size:
            raise ValueError(f"k={k} exceeds the number of parameters ({op.size})")
        if method == "lanczos":
            v0 = op.start_vector(gen, start)
            vals, vecs, res, ok = _lanczos_top(op, k, tol, max_iter, v0, basis_device,
                                               return_eigenvectors, progress, stop)
        else:
            vals, vecs, res, ok = _power_top(op, k, tol, max_iter,
                                             lambda: op.start_vector(gen, start),
                                             return_eigenvectors, progress, stop)
    # Power iteration finds eigenvalues in order of magnitude; list every route by value.
    order = sorted(range(len(vals)), key=lambda i: -vals[i])
    vals, res = [vals[i] for i in order], [res[i] for i in order]
    if vecs is not None:
        vecs = vecs[torch.as_tensor(order, device=vecs.device)]
    selection = SELECTIONS[method]
    # A larger eigenvalue than a non-negative one found by magnitude would have been found first.
    certain = selection == "largest_algebraic" or vals[0] >= 0
    return EigenResult(vals, vecs, res, op.num_hvps, ok, method, op.backend,
                       time.perf_counter() - t0, stop, selection, certain)
