"""The Hessian of a mean loss over batches as a matrix-free operator on flat vectors (P,)."""
from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

BACKENDS = ("auto", "autograd", "func")
STARTS = ("gradient", "random")


def _quiet(progress: bool | None) -> bool | None:
    """tqdm ``disable`` value: None lets tqdm hide the bar when stderr is not a terminal."""
    return None if progress is None else not progress


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
    parameters; ``matmat(V)`` maps b vectors (b, P) to their b products (b, P) in one pass.
    ``loss_fn(outputs, targets)`` must return the batch *mean* (a scalar), as
    ``nn.CrossEntropyLoss()`` does; batch b then gets weight ``n_b / N``. The model must already
    be in the wanted mode (see ``analysis_state``); the operator never changes the weights.

    backend: ``"autograd"`` (double backward), ``"func"`` (torch.func ``jvp`` over ``grad``,
    forward-over-reverse) or ``"auto"`` (double backward: as fast as torch.func or faster on
    CPU for the three families, and the only one that can cache the graph).
    cache_graph: keep each batch's gradient graph between products (default: only when there
    is a single batch).
    params: names of the parameters to differentiate (default: every trainable one); the
    operator is then the diagonal block of the Hessian for those parameters, P their size.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Iterable[Batch],
        backend: str = "auto",
        cache_graph: bool | None = None,
        params: Sequence[str] | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown HVP backend {backend!r}; choose one of {BACKENDS}")
        self.model = model
        self.loss_fn = loss_fn
        self.batches = _check_batches(batches)
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.named:
            raise ValueError("the model has no parameter with requires_grad=True")
        if params is not None:
            wanted, have = set(params), {n for n, _ in self.named}
            if not wanted or not wanted <= have:
                missing = sorted(wanted - have)[:3] or ["(none given)"]
                raise ValueError(f"params: no trainable parameter {missing[0]!r} in the model; "
                                 "give names from model.named_parameters()")
            self.named = [(n, p) for n, p in self.named if n in wanted]
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
        self.num_hvps = 0  # Hessian-vector products (a matmat of b vectors counts b)
        self.num_passes = 0  # calls of matvec or matmat
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

    def _hvp_autograd(self, i: int, x: torch.Tensor, y: torch.Tensor, vs: list[torch.Tensor],
                      batched: bool = False):
        """Per-parameter ``H v`` by double backward; with ``batched`` every ``vs`` entry has a
        leading dimension b and one vmapped backward (``is_grads_batched``) gives all b."""
        grads = self._grad_graph(i, x, y)
        # Gradients that do not depend on the parameters (e.g. a loss linear in them) have no
        # graph: their Hessian rows are zero.
        live = [j for j, g in enumerate(grads) if g.requires_grad]
        if not live:
            return [torch.zeros_like(v) for v in vs]
        hv = torch.autograd.grad(
            [grads[j] for j in live],
            self.params,
            grad_outputs=[vs[j] for j in live],
            retain_graph=self.cache_graph,
            allow_unused=True,
            is_grads_batched=batched,
        )
        # Parameters the live gradients do not reach: zero rows (materialize_grads would give
        # them the parameter's shape, without the batch dimension).
        return [torch.zeros_like(v) if h is None else h for h, v in zip(hv, vs)]

    def _hvp_func(self, x: torch.Tensor, y: torch.Tensor, vs: list[torch.Tensor],
                  batched: bool = False):
        names = [n for n, _ in self.named]
        primals = {n: p.detach() for n, p in self.named}
        tangents = dict(zip(names, vs))

        def loss_of(params: dict[str, torch.Tensor]) -> torch.Tensor:
            return self._loss(torch.func.functional_call(self.model, params, (x,)), y)

        def hvp(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return torch.func.jvp(torch.func.grad(loss_of), (primals,), (t,))[1]

        hv = torch.func.vmap(hvp)(tangents) if batched else hvp(tangents)
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
        self.num_passes += 1
        return total

    def matmat(self, vs: torch.Tensor) -> torch.Tensor:
        """``H v`` for each row of vs (b, P): the (b, P) products of ``matvec``, in one pass.

        Each batch's gradient graph is built once for all b vectors, and one vmapped double
        backward (``is_grads_batched``; ``vmap`` over ``jvp(grad)`` for the func backend)
        applies H to all of them, with the same weights n_b / N as ``matvec``. Counts b HVPs
        (``num_hvps``) and one pass (``num_passes``). Peak memory grows with b: the backward
        holds b copies of every activation-sized intermediate.
        """
        if vs.dim() != 2 or vs.shape[1] != self.size or vs.shape[0] == 0:
            raise ValueError(f"vectors have shape {tuple(vs.shape)}, expected (b, {self.size}) "
                             "with b >= 1")
        b = vs.shape[0]
        vs = vs.to(self.device, self.dtype)
        parts = [t.reshape(b, *s) for t, s in zip(torch.split(vs, self.numels, dim=1), self.shapes)]
        total = torch.zeros(b, self.size, device=self.device, dtype=self.dtype)
        for i, ((x, y), n) in enumerate(zip(self.batches, self.sizes)):
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            if self.backend == "func":
                hv = self._hvp_func(x, y, parts, batched=True)
            else:
                hv = self._hvp_autograd(i, x, y, parts, batched=True)
            flat = torch.cat([h.detach().reshape(b, -1) for h in hv], dim=1)
            total.add_(flat, alpha=n / self.num_samples)
        self.num_hvps += b
        self.num_passes += 1
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
