"""Top Hessian eigenvalues by Lanczos or block Lanczos (largest by value) or power iteration
(by magnitude).

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
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from vitsam.analysis.state import analysis_state
from vitsam.progress import progress_bar

from .block_lanczos import block_lanczos
from .lanczos import _tridiag, lanczos
from .operator import Batch, HessianOperator, LossFn, _quiet

METHODS = ("lanczos", "block-lanczos", "power")
STOPS = ("residual", "change")
# What the k eigenvalues of each method are: the k largest by value, or by absolute value.
SELECTIONS = {"lanczos": "largest_algebraic", "block-lanczos": "largest_algebraic",
              "power": "largest_magnitude"}


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
    reorthogonalisation; block Lanczos: ``||R_m s_last||``), reported whatever the stopping
    test; num_hvps: Hessian-vector products used (a block step of b vectors counts b);
    converged: the ``stop`` test was met (or the Krylov space was exhausted); block_size: the
    vectors per operator pass (1 except for block Lanczos).
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
    block_size: int = 1


def _rel_scale(theta: np.ndarray) -> np.ndarray:
    """|theta| floored so that relative tests still work for exact zero eigenvalues."""
    return np.maximum(np.abs(theta), 1e-12 * np.max(np.abs(theta)) + 1e-300)


def _krylov_stop(k: int, tol: float, stop_test: str,
                 residuals: Callable[[np.ndarray, object], np.ndarray]):
    """The stop callback of (block) Lanczos and a flag saying whether it was met.

    residuals(s[:, -k:], extra): the absolute Ritz residuals of the k wanted pairs from T's
    eigenvectors and the driver's extra argument (beta, or the last R block).
    """
    prev: list[np.ndarray] = []  # the wanted Ritz values of the previous step (change test)
    hit = [False]

    def stop(theta: np.ndarray, s: np.ndarray, extra) -> bool:
        if len(theta) < k:
            return False
        if stop_test == "residual":
            res = residuals(s[:, -k:], extra)
            hit[0] = bool(np.all(res <= tol * _rel_scale(theta)[-k:]))
            return hit[0]
        top = theta[-k:]
        if prev:
            # Against the previous values, as a between-iterations change is defined.
            hit[0] = bool(np.all(np.abs(top - prev[0]) <= tol * _rel_scale(prev[0])))
        prev[:] = [top.copy()]
        return hit[0]

    return stop, hit


def _ritz_top(t: np.ndarray, basis: torch.Tensor, k: int, tol: float, hit: bool,
              return_vectors: bool, residuals: Callable[[np.ndarray], np.ndarray]):
    """The k largest Ritz pairs of the projected matrix t (m, m) on the basis (m, P)."""
    theta, s = np.linalg.eigh(t)
    order = np.argsort(theta)[::-1][:k]
    vals = theta[order]
    res = residuals(s[:, order]) / _rel_scale(theta)[order]
    vecs = None
    if return_vectors:
        coeff = torch.as_tensor(s[:, order].T.copy(), dtype=basis.dtype, device=basis.device)
        vecs = coeff @ basis
    # A Krylov space that filled up (or became invariant) holds exact eigenpairs: residual ~ 0.
    converged = len(vals) == k and (hit or bool(np.all(res <= tol)))
    return [float(x) for x in vals], vecs, [float(r) for r in res], converged


def _lanczos_top(op: HessianOperator, k: int, tol: float, max_iter: int, v0: torch.Tensor,
                 basis_device, return_vectors: bool, progress: bool, stop_test: str):
    stop, hit = _krylov_stop(k, tol, stop_test, lambda s, b: b * np.abs(s[-1]))
    alpha, beta, last_b, basis = lanczos(op.matvec, v0, max_iter, stop, basis_device, progress,
                                         desc="hessian lanczos")
    return _ritz_top(_tridiag(alpha, beta), basis, k, tol, hit[0], return_vectors,
                     lambda s: last_b * np.abs(s[-1]))


def _block_residuals(s: np.ndarray, r: np.ndarray) -> np.ndarray:
    """||R s_last|| per column of s: the Ritz residuals of block Lanczos."""
    return np.linalg.norm(r @ s[-r.shape[0]:], axis=0)


def _block_lanczos_top(op: HessianOperator, k: int, tol: float, max_iter: int,
                       v0: torch.Tensor, basis_device, return_vectors: bool, progress: bool,
                       stop_test: str, seed: int):
    stop, hit = _krylov_stop(k, tol, stop_test, _block_residuals)
    t, r, basis = block_lanczos(op.matmat, v0, max_iter, stop, basis_device, progress,
                                desc="hessian block lanczos", seed=seed)
    return _ritz_top(t, basis, k, tol, hit[0], return_vectors, lambda s: _block_residuals(s, r))


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


def _validate(k: int, tol: float, max_iter: int, method: str, stop: str,
              block_size: int = 1) -> None:
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
    if not (isinstance(block_size, int) and not isinstance(block_size, bool) and block_size >= 1):
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    if method == "block-lanczos" and block_size > max_iter:
        raise ValueError(f"block_size={block_size} exceeds max_iter={max_iter}: one block step "
                         "costs block_size HVPs; raise max_iter or lower block_size")


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
    params: Sequence[str] | None = None,
    block_size: int = 4,
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
    *magnitude* eigenvalues, which coincide unless negative curvature dominates) or
    ``"block-lanczos"`` (``block_size`` vectors per step, each step one batched pass
    ``HessianOperator.matmat``; at most ``max_iter`` HVPs in total, the largest algebraic
    eigenvalues like ``"lanczos"``; more HVPs than single-vector Lanczos, in fewer passes over
    the data, see docs/benchmarks.md). Either way the result lists them by value and names the
    set in ``selection``.
    start: ``"gradient"`` (default; gradient plus random direction, fewer HVPs) or
    ``"random"``, see ``HessianOperator.start_vector``; ``seed`` fixes the random part (block
    Lanczos: the first vector of the start block, the others Gaussian).
    params: restrict to these parameters' diagonal block of the Hessian (see ``HessianOperator``).
    Model mode, buffers, weights and RNG state are unchanged afterwards.
    """
    _validate(k, tol, max_iter, method, stop, block_size)
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    with analysis_state(model, train_mode):
        op = HessianOperator(model, loss_fn, batches, backend, cache_graph, params)
        if k > op.size:
            raise ValueError(f"k={k} exceeds the number of parameters ({op.size})")
        if method == "block-lanczos" and block_size > op.size:
            raise ValueError(f"block_size={block_size} exceeds the number of parameters "
                             f"({op.size})")
        if method == "lanczos":
            v0 = op.start_vector(gen, start)
            vals, vecs, res, ok = _lanczos_top(op, k, tol, max_iter, v0, basis_device,
                                               return_eigenvectors, progress, stop)
        elif method == "block-lanczos":
            v0 = torch.stack([op.start_vector(gen, start)]
                             + [op.random_vector(gen) for _ in range(block_size - 1)])
            vals, vecs, res, ok = _block_lanczos_top(op, k, tol, max_iter, v0, basis_device,
                                                     return_eigenvectors, progress, stop, seed)
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
                       time.perf_counter() - t0, stop, selection, certain,
                       block_size if method == "block-lanczos" else 1)
