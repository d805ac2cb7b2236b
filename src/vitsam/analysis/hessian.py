"""Hessian spectrum of the training loss: top eigenvalues, trace and spectral density.

The operator is the Hessian of the *sample-weighted mean loss over all given batches*,
``H = sum_b (n_b / N) * hess(loss_b)``, applied to flat parameter vectors of length P (all
parameters with ``requires_grad``, in ``model.parameters()`` order). Everything is matrix-free:
Hessian-vector products (HVPs) go through autograd, one batch at a time.

Memory bound (beyond one batch's autograd graph): Lanczos keeps its basis of at most
``max_iter`` vectors plus ``k`` Ritz vectors and three work vectors of P floats, i.e.
``(max_iter + k + 3) * P * 4`` bytes in float32; the basis can live on the CPU when the model is
on a GPU (``basis_device="cpu"``). Power iteration keeps ``k + 3`` vectors. With a single batch
the gradient graph is cached between HVPs (as a training step would hold it), which saves the
forward and first backward pass of every HVP; with several batches nothing is cached unless
asked for, so only one batch's graph is alive at a time.

Measured on CPU (see docs/benchmarks.md): without caching, double backward and torch.func's
forward-over-reverse ``jvp(grad)`` cost the same on ViT (within run-to-run noise) and double
backward is 5-13 % cheaper on MLP-Mixer and ResNet; only double backward can reuse a cached
graph (25-30 % cheaper again). ``backend="auto"`` therefore uses double backward for every
family; ``"func"`` stays available. Lanczos reaches the same residual with 1.4-4.5x fewer HVPs
than power iteration (far fewer for k > 1), so it is the default method. Its default stopping
test is the Ritz residual; ``stop="change"`` (PyHessian's test) stops 30-40 % earlier (top-1
at tol 1e-3: 1e-4 to 1e-3 relative error) but can stop on a plateau far from the answer
(MLP-Mixer at tol 1.5e-3: 5e-2 off), so it is opt-in.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from vitsam.models.attention import math_attention

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

METHODS = ("lanczos", "power")
STOPS = ("residual", "change")
BACKENDS = ("auto", "autograd", "func")
STARTS = ("gradient", "random")


# --------------------------------------------------------------------------------------------
# Model state: analysis mode in, everything restored out.
# --------------------------------------------------------------------------------------------
def _quiet(progress: bool | None) -> bool | None:
    """tqdm ``disable`` value: None lets tqdm hide the bar when stderr is not a terminal."""
    return None if progress is None else not progress


def _is_stochastic(module: nn.Module) -> bool:
    """Dropout-like modules, kept in eval mode even for train-mode statistics."""
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return True
    name = type(module).__name__
    return "DropPath" in name or "DropBlock" in name


@contextmanager
def analysis_state(model: nn.Module, train_mode: bool = False) -> Iterator[nn.Module]:
    """Run ``model`` in analysis mode, then restore its modes, buffers, flags and RNG state.

    Inside: eval mode (or train mode for normalisation statistics with dropout-like modules
    still off when ``train_mode``), explicit softmax attention (the fused CPU kernel has no
    double backward or forward-mode rule). On exit every module's ``training`` flag, every
    buffer (BatchNorm running statistics move in train mode), the fused-attention flags and the
    CPU/CUDA RNG states are put back.
    """
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        with math_attention(model):
            model.train(train_mode)
            if train_mode:
                for m in model.modules():
                    if _is_stochastic(m):
                        m.eval()
            yield model
    finally:
        for m, mode in modes:
            m.training = mode
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


# --------------------------------------------------------------------------------------------
# The Hessian as a linear operator on flat parameter vectors.
# --------------------------------------------------------------------------------------------
def _check_batches(batches: Iterable[Batch]) -> list[Batch]:
    out = list(batches)
    if not out:
        raise ValueError("no batches given: pass a non-empty list of (inputs, targets) pairs")
    for i, b in enumerate(out):
        if not (isinstance(b, (tuple, list)) and len(b) == 2):
            raise ValueError(f"batch {i} is not an (inputs, targets) pair; pass a list of pairs")
        x, y = b
        if not (torch.is_tensor(x) and torch.is_tensor(y)):
            raise ValueError(f"batch {i}: inputs and targets must be tensors")
        if x.shape[0] == 0 or x.shape[0] != y.shape[0]:
            raise ValueError(
                f"batch {i}: inputs ({tuple(x.shape)}) and targets ({tuple(y.shape)}) must have "
                "the same non-zero first dimension"
            )
    return out


class HessianOperator:
    """Hessian of the sample-weighted mean loss over ``batches`` as a matrix-free operator.

    ``matvec(v)`` maps a flat vector (P,) to ``H v`` (P,), with P the number of trainable
    parameters. ``loss_fn(outputs, targets)`` must return the batch *mean* (a scalar), as
    ``nn.CrossEntropyLoss()`` does; batch b then gets weight ``n_b / N``. The model must already
    be in the wanted mode (see ``analysis_state``); the operator never changes the weights.

    backend: ``"autograd"`` (double backward), ``"func"`` (torch.func ``jvp`` over ``grad``,
    forward-over-reverse) or ``"auto"`` (double backward: as fast as torch.func or faster on
    CPU for the three families, and the only one that can cache the graph).
    cache_graph: keep each batch's gradient graph between products (default: only when there
    is a single batch).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Iterable[Batch],
        backend: str = "auto",
        cache_graph: bool | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown HVP backend {backend!r}; choose one of {BACKENDS}")
        self.model = model
        self.loss_fn = loss_fn
        self.batches = _check_batches(batches)
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.named:
            raise ValueError("the model has no parameter with requires_grad=True")
        dtypes = {p.dtype for _, p in self.named}
        if len(dtypes) != 1:
            raise ValueError(
                f"parameters mix dtypes {sorted(map(str, dtypes))}; cast the model to one dtype"
            )
        self.params = [p for _, p in self.named]
        self.shapes = [p.shape for p in self.params]
        self.numels = [p.numel() for p in self.params]
        self.size = sum(self.numels)
        self.device = self.params[0].device
        self.dtype = self.params[0].dtype
        self.backend = "autograd" if backend == "auto" else backend
        if self.backend == "func" and model.training:
            raise ValueError(
                "backend='func' cannot run train-mode statistics (BatchNorm updates its buffers in "
                "place inside the transform); use backend='autograd'"
            )
        self.sizes = [int(x.shape[0]) for x, _ in self.batches]
        self.num_samples = sum(self.sizes)
        self.cache_graph = (len(self.batches) == 1) if cache_graph is None else cache_graph
        self._graphs: dict[int, tuple[torch.Tensor, ...]] = {}
        self.num_hvps = 0
        self._grad_dir: torch.Tensor | None = None

    # flat <-> per-parameter views
    def unflatten(self, v: torch.Tensor) -> list[torch.Tensor]:
        return [t.view(s) for t, s in zip(torch.split(v, self.numels), self.shapes)]

    def flatten(self, ts: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.reshape(-1) for t in ts])

    def _loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = self.loss_fn(out, y)
        if loss.dim() != 0:
            raise ValueError(
                f"loss_fn returned shape {tuple(loss.shape)}; it must return the batch-mean scalar "
                "(e.g. nn.CrossEntropyLoss(reduction='mean'))"
            )
        return loss

    def _grad_graph(self, i: int, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if i in self._graphs:
            return self._graphs[i]
        with torch.enable_grad():
            loss = self._loss(self.model(x), y)
            grads = torch.autograd.grad(
                loss, self.params, create_graph=True, allow_unused=True, materialize_grads=True
            )
        if self.cache_graph:
            self._graphs[i] = grads
        return grads

    def _hvp_autograd(self, i: int, x: torch.Tensor, y: torch.Tensor, vs: list[torch.Tensor]):
        grads = self._grad_graph(i, x, y)
        # Gradients that do not depend on the parameters (e.g. a loss linear in them) have no
        # graph: their Hessian rows are zero.
        live = [j for j, g in enumerate(grads) if g.requires_grad]
        out = [torch.zeros_like(v) for v in vs]
        if live:
            hv = torch.autograd.grad(
                [grads[j] for j in live],
                self.params,
                grad_outputs=[vs[j] for j in live],
                retain_graph=self.cache_graph,
                allow_unused=True,
                materialize_grads=True,
            )
            out = list(hv)
        return out

    def _hvp_func(self, x: torch.Tensor, y: torch.Tensor, vs: list[torch.Tensor]):
        names = [n for n, _ in self.named]
        primals = {n: p.detach() for n, p in self.named}
        tangents = dict(zip(names, vs))

        def loss_of(params: dict[str, torch.Tensor]) -> torch.Tensor:
            return self._loss(torch.func.functional_call(self.model, params, (x,)), y)

        _, hv = torch.func.jvp(torch.func.grad(loss_of), (primals,), (tangents,))
        return [hv[n] for n in names]

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``H v`` for a flat vector v of shape (P,) on the model's device."""
        if v.shape != (self.size,):
            raise ValueError(f"vector has shape {tuple(v.shape)}, expected ({self.size},)")
        vs = self.unflatten(v.to(self.device, self.dtype))
        total = torch.zeros(self.size, device=self.device, dtype=self.dtype)
        for i, ((x, y), n) in enumerate(zip(self.batches, self.sizes)):
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            if self.backend == "func":
                hv = self._hvp_func(x, y, vs)
            else:
                hv = self._hvp_autograd(i, x, y, vs)
            total.add_(self.flatten([h.detach() for h in hv]), alpha=n / self.num_samples)
        self.num_hvps += 1
        return total

    def loss(self) -> float:
        """Sample-weighted mean loss over all batches (no graph kept)."""
        total = 0.0
        with torch.no_grad():
            for (x, y), n in zip(self.batches, self.sizes):
                out = self.model(x.to(self.device))
                total += float(self._loss(out, y.to(self.device))) * n
        return total / self.num_samples

    def gradient(self) -> torch.Tensor:
        """Flat gradient (P,) of the mean loss over all batches (reuses cached graphs)."""
        total = torch.zeros(self.size, device=self.device, dtype=self.dtype)
        for i, ((x, y), n) in enumerate(zip(self.batches, self.sizes)):
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            if self.cache_graph and self.backend == "autograd":
                grads = [g.detach() for g in self._grad_graph(i, x, y)]
            else:
                with torch.enable_grad():
                    loss = self._loss(self.model(x), y)
                    grads = torch.autograd.grad(loss, self.params, allow_unused=True,
                                                materialize_grads=True)
            total.add_(self.flatten(grads), alpha=n / self.num_samples)
        return total

    def start_vector(self, gen: torch.Generator, start: str) -> torch.Tensor:
        """Start vector for the eigen-solvers, shape (P,).

        ``"random"``: Gaussian. ``"gradient"``: normalised gradient plus a normalised Gaussian
        vector. The loss gradient lies largely in the top Hessian eigenspace (Gur-Ari et al.,
        2018), which saves Krylov steps; the random half keeps the start from being orthogonal
        to an eigenvector when the gradient vanishes or misses it.
        """
        if start not in STARTS:
            raise ValueError(f"unknown start vector {start!r}; choose one of {STARTS}")
        r = self.random_vector(gen)
        r = r / r.norm()
        if start == "random":
            return r
        if self._grad_dir is None:  # computed once, reused by deflated power runs
            g = self.gradient()
            gn = float(g.norm())
            self._grad_dir = g / gn if gn > 0 and math.isfinite(gn) else torch.zeros_like(g)
        return r + self._grad_dir

    def random_vector(self, gen: torch.Generator, kind: str = "gaussian") -> torch.Tensor:
        """Random (P,) vector drawn on the CPU (same numbers on every device), then moved."""
        if kind == "rademacher":
            v = torch.randint(0, 2, (self.size,), generator=gen).to(self.dtype) * 2 - 1
        else:
            v = torch.randn(self.size, generator=gen, dtype=self.dtype)
        return v.to(self.device)


# --------------------------------------------------------------------------------------------
# Eigen-solvers on a generic symmetric operator.
# --------------------------------------------------------------------------------------------
@dataclass
class EigenResult:
    """Top-k eigenpairs of the Hessian, largest first.

    eigenvalues: list of k floats (loss units per parameter unit squared); eigenvectors: (k, P)
    unit vectors or None; residuals: ``||H v - theta v|| / |theta|`` per pair (Lanczos: the
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


def _tridiag(alpha: Sequence[float], beta: Sequence[float]) -> np.ndarray:
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
    bar = tqdm(total=steps, desc=desc, disable=_quiet(progress), leave=False)
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

    bar = tqdm(total=k * max_iter, desc="hessian power", disable=_quiet(progress), leave=False)
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
    """The k largest Hessian eigenvalues of the mean loss over all ``batches`` (one operator).

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
    while the estimate is still far off (docs/benchmarks.md: 5e-2 on an MLP-Mixer). The residual test stays the default because analyses compare lambda_max between
    runs (SAM vs not) and need an error they can trust; use ``"change"`` to match PyHessian's
    semantics or for quick estimates.

    method: ``"lanczos"`` (default; full reorthogonalisation, at most ``max_iter`` HVPs in
    total, returns the largest *algebraic* eigenvalues) or ``"power"`` (power iteration with
    deflation, up to ``max_iter`` HVPs per eigenvalue; it converges to the largest
    *magnitude* eigenvalues, which coincide unless negative curvature dominates).
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
    return EigenResult(vals, vecs, res, op.num_hvps, ok, method, op.backend,
                       time.perf_counter() - t0, stop)


# --------------------------------------------------------------------------------------------
# Trace (Hutchinson) and spectral density (stochastic Lanczos quadrature).
# --------------------------------------------------------------------------------------------
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
        for i in tqdm(range(probes), desc="hessian trace", disable=_quiet(progress), leave=False):
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

    Each of ``runs`` Lanczos runs (``steps`` HVPs, Rademacher start) yields nodes theta_i and
    weights tau_i = (first component of the i-th eigenvector of T)^2; the density is
    ``mean_runs sum_i tau_i N(t; theta_i, sigma^2)`` on ``num_points`` grid points spanning
    the nodes with margin, ``sigma = sigma_rel * (max node - min node)``.
    """
    if steps < 2 or runs < 1 or num_points < 2 or not sigma_rel > 0:
        raise ValueError("need steps >= 2, runs >= 1, num_points >= 2 and sigma_rel > 0")
    gen = torch.Generator().manual_seed(seed)
    nodes: list[np.ndarray] = []
    weights: list[np.ndarray] = []
    with analysis_state(model, train_mode):
        op = HessianOperator(model, loss_fn, batches, backend, cache_graph)
        for r in range(runs):
            v0 = op.random_vector(gen, "rademacher")
            alpha, beta, _, _ = lanczos(op.matvec, v0, steps, None, basis_device, progress,
                                        desc=f"hessian slq {r + 1}/{runs}")
            theta, s = np.linalg.eigh(_tridiag(alpha, beta))
            nodes.append(theta)
            weights.append(s[0, :] ** 2)
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# Analysis plug-in.
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HessianConfig:
    """Settings of the Hessian analysis (loss: cross-entropy on the given batches).

    k eigenvalues by ``method`` to tolerance ``tol`` under the ``stop`` test (``"residual"``
    or ``"change"``, see ``top_eigenvalues``) within ``max_iter`` HVPs;
    ``trace_probes`` Hutchinson probes (0 skips the trace); ``density`` runs SLQ with
    ``density_steps`` Lanczos steps; ``train_mode`` uses batch statistics in normalisation.
    """

    k: int = 1
    method: str = "lanczos"
    tol: float = 1e-3
    stop: str = "residual"
    max_iter: int = 100
    trace_probes: int = 20
    density: bool = False
    density_steps: int = 80
    train_mode: bool = False
    seed: int = 0
    backend: str = "auto"

    def __post_init__(self) -> None:
        # Fail when the settings are given, before a run and its data are loaded.
        _validate(self.k, self.tol, self.max_iter, self.method, self.stop)
        if self.trace_probes < 0 or self.density_steps < 1:
            raise ValueError("trace_probes must be >= 0 and density_steps >= 1, got "
                             f"{self.trace_probes} and {self.density_steps}")


def run(model: nn.Module, data: Iterable[Batch], cfg: HessianConfig = HessianConfig()) -> dict:
    """Top eigenvalues (and trace, density) of the cross-entropy Hessian over all of ``data``.

    data: list of (x (B, C, H, W) normalised float, y (B,) int64) batches, treated as one
    dataset. Returns a JSON-serialisable dict with the settings next to the numbers.
    """
    batches = _check_batches(data)
    if cfg.trace_probes == 1 or cfg.trace_probes < 0:
        raise ValueError(f"trace_probes must be 0 (skip) or >= 2, got {cfg.trace_probes}")
    loss_fn = nn.CrossEntropyLoss()
    common = dict(backend=cfg.backend, train_mode=cfg.train_mode, seed=cfg.seed)
    eig = top_eigenvalues(model, loss_fn, batches, k=cfg.k, method=cfg.method, tol=cfg.tol,
                          stop=cfg.stop, max_iter=cfg.max_iter, progress=None, **common)
    with analysis_state(model, cfg.train_mode):
        op = HessianOperator(model, loss_fn, batches, "autograd", cache_graph=False)
        loss = op.loss()
    out: dict = {
        "analysis": "hessian",
        "config": asdict(cfg),
        "loss_fn": "cross_entropy(mean)",
        "num_samples": op.num_samples,
        "num_params": op.size,
        "loss": loss,
        "top_eigenvalues": eig.eigenvalues,
        "lambda_max": eig.eigenvalues[0],
        "residuals": eig.residuals,
        "converged": eig.converged,
        "num_hvps": eig.num_hvps,
        "backend": eig.backend,
        "seconds": eig.seconds,
    }
    if cfg.trace_probes > 0:
        tr = trace(model, loss_fn, batches, probes=cfg.trace_probes, progress=None, **common)
        out["trace"] = {"estimate": tr.estimate, "stderr": tr.stderr, "probes": tr.probes,
                        "probe_distribution": "rademacher"}
    if cfg.density:
        dens = spectral_density(model, loss_fn, batches, steps=cfg.density_steps,
                                progress=None, **common)
        out["density"] = asdict(dens)
    return out


def figures(results: dict | Sequence[tuple[str, dict]], out_dir: str | Path) -> list[Path]:
    """Spectral density (if computed) and top-eigenvalue plots; a list of (label, result)
    overlays several runs. Returns the written PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [("", results)] if isinstance(results, dict) else list(results)
    out_dir = Path(out_dir)
    paths: list[Path] = []
    with_density = [(lab, r["density"]) for lab, r in runs if "density" in r]
    if with_density:
        paths.append(plot_density(with_density, out_dir / "hessian_density.png"))
    fig, ax = plt.subplots(figsize=(5.0, 3.5))
    for i, (lab, r) in enumerate(runs):
        vals = r["top_eigenvalues"]
        ax.plot(range(1, len(vals) + 1), vals, "o-", label=lab or None)
    ax.set_xlabel("rank")
    ax.set_ylabel("Hessian eigenvalue")
    ax.set_yscale("symlog")
    ax.set_title("Top Hessian eigenvalues")
    if any(lab for lab, _ in runs):
        ax.legend(fontsize=8)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    p = out_dir / "hessian_top_eigenvalues.png"
    fig.savefig(p, dpi=130)
    plt.close(fig)
    paths.append(p)
    return paths
