"""Sharpness-Aware Minimization (Foret et al., 2021) wrapped around any PyTorch optimiser.

Update rule, for the loss L at weights w with clean gradient g = dL/dw:

    eps    = rho * g / ||g||_2                    (||.||_2 over all perturbed parameters)
    eps    = rho * w^2 * g / ||w * g||_2          (adaptive=True, ASAM's elementwise |w| scaling)
    g_sam  = dL/dw evaluated at w + eps
    w      <- base_optimizer_step(w, g_sam)       (taken from the *restored* weights w)

The weights are restored bit-exactly: the old values are saved before the perturbation and
copied back, never recovered by subtracting eps (which would drift by float rounding). A zero
gradient norm gives eps = 0. bf16/fp16 parameters are perturbed through fp32 copies: w + eps is
computed in fp32 and rounded once; entries whose |eps| is below half a bf16 ulp of w still
round back to w, which is why fp32 parameters with a bf16 autocast forward are preferred.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch.optim import Optimizer

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _norm_dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    """float32 for reductions, float64 when any tensor is float64 (keeps double precision exact)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of all ``tensors`` concatenated, as a float32 (float64) scalar tensor, no host sync.

    One fused per-tensor reduction (``torch._foreach_norm``) then one norm of the stacked
    per-tensor norms. An empty list gives 0.
    """
    if not tensors:
        return torch.zeros(())
    norms = torch._foreach_norm(tensors, 2, dtype=_norm_dtype(tensors))
    device = norms[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))


def foreach_cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """Cosine between the concatenations of ``a`` and ``b`` (same shapes pairwise), float32.

    The dot product comes from the polarisation identity a.b = (|a|^2 + |b|^2 - |a-b|^2) / 2,
    so only fused norm reductions run. Returns NaN when either side is zero.
    """
    if len(a) != len(b):
        raise ValueError(f"foreach_cosine needs equally long lists, got {len(a)} and {len(b)}")
    if not a:
        return torch.tensor(float("nan"))
    na, nb = global_norm(a), global_norm(b)
    dt = _norm_dtype(a + b)
    nd = global_norm(torch._foreach_sub([t.to(dt) for t in a], [t.to(dt) for t in b]))
    dot = 0.5 * (na.square() + nb.square() - nd.square())
    denom = na * nb
    return torch.where(denom > 0, dot / denom, torch.full_like(dot, float("nan"))).clamp(-1.0, 1.0)


class SAM(Optimizer):
    """SAM around ``base_optimizer_cls``; the two optimisers share ``param_groups``.

    ``first_step``: w -> w + eps with eps = rho * g / ||g||_2 (adaptive: rho * w^2 g / ||w g||_2),
    the norm taken over all parameters of groups with rho > 0. ``second_step``: copy the saved w
    back exactly and step the base optimiser with the gradient computed at w + eps.

    Use either ``step(closure)`` or the explicit two-pass form::

        loss_fn(model(x), y).backward()
        sam.first_step(zero_grad=True)     # w -> w + eps
        loss_fn(model(x), y).backward()
        sam.second_step(zero_grad=True)    # w + eps -> w, then the base optimiser steps

    ``cancel()`` instead of the second step abandons a step (weights restored exactly, no
    optimiser step), e.g. when a loss or gradient is not finite.

    Each param group may set its own ``rho`` (``rho=0``: never perturbed) and ``adaptive``.
    An LR scheduler attached to the SAM object drives the base optimiser (shared groups).
    ``state_dict()`` is the base optimiser's state dict (momenta, Adam moments, groups incl.
    ``rho``), so it also loads into a plain optimiser of the base class and vice versa.

    Logging signals (float32 scalar tensors, no host sync): ``last_grad_norm`` (clean gradient,
    all parameters), ``last_eps_norm`` (the perturbation), ``last_grad_cosine`` (clean vs.
    perturbed gradient, NaN if ``track_cosine=False``, which saves one gradient copy).
    """

    variant = "full"  # the cheaper variants (``vitsam.optim.variants``) name themselves
    needs_clean = False  # first_step keeps a copy of the clean gradient even without the cosine

    def __init__(self, params: Iterable[Any], base_optimizer_cls: type[Optimizer], rho: float = 0.05,
                 adaptive: bool = False, *, track_cosine: bool = True, **base_kwargs: Any) -> None:
        if not (isinstance(base_optimizer_cls, type) and issubclass(base_optimizer_cls, Optimizer)):
            raise ValueError(f"base_optimizer_cls must be an optimizer class such as torch.optim.SGD, "
                             f"got {base_optimizer_cls!r}")
        if issubclass(base_optimizer_cls, SAM):
            raise ValueError("base_optimizer_cls cannot be SAM itself; pass e.g. torch.optim.AdamW")
        _check_rho(rho)
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **base_kwargs))
        self.base_optimizer = base_optimizer_cls(self.param_groups, **base_kwargs)
        # Same list object: schedulers and add_param_group see one set of groups.
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self.track_cosine = track_cosine
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] = []  # (param, old value) while perturbed
        self._clean: list[tuple[torch.Tensor, torch.Tensor]] = []  # (param, clean gradient copy)
        self._eps: list[tuple[torch.Tensor, torch.Tensor]] = []  # (param, perturbation)
        self._eps_is_grad = False  # eps is a positive multiple of the whole clean gradient
        self._bufs: dict[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] = {}
        self._pending = False  # first_step done, second_step not yet
        nan = torch.tensor(float("nan"))
        self.last_grad_norm = nan
        self.last_eps_norm = nan
        self.last_grad_cosine = nan

    def __getstate__(self) -> dict[str, Any]:
        # Optimizer.__getstate__ keeps only defaults/state/groups; deepcopy/pickle need the base too.
        return {**super().__getstate__(), "base_optimizer": self.base_optimizer,
                "track_cosine": self.track_cosine}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._saved, self._clean, self._eps, self._pending = [], [], [], False
        self._eps_is_grad, self._bufs = False, {}
        nan = torch.tensor(float("nan"))
        self.last_grad_norm = self.last_eps_norm = self.last_grad_cosine = nan

    # -- param groups ---------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to SAM and the base optimiser (``rho``/``adaptive`` default to SAM's)."""
        base = getattr(self, "base_optimizer", None)
        if base is None:  # during SAM.__init__, before the base optimiser exists
            super().add_param_group(param_group)
        else:
            param_group.setdefault("rho", self.defaults["rho"])
            param_group.setdefault("adaptive", self.defaults["adaptive"])
            base.add_param_group(param_group)
        _check_rho(param_group["rho"])

    @property
    def perturbed(self) -> bool:
        """True between ``first_step`` and ``restore``/``second_step``."""
        return bool(self._saved)

    def plan_step(self) -> bool:
        """Whether the coming step perturbs (two passes); full SAM always does. The variants
        in ``vitsam.optim.variants`` perturb on some steps only (``train_step`` asks this)."""
        return True

    # -- the two passes -------------------------------------------------------------------
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move every parameter with a gradient from w to w + eps (see module docstring)."""
        if self._saved:
            raise RuntimeError("SAM.first_step called twice; call second_step() or restore() in between")
        params, grads, flags = [], [], []  # flags: (rho, adaptive) per parameter
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("SAM does not support sparse gradients; use dense embeddings")
                params.append(p)
                grads.append(p.grad)
                flags.append((float(group["rho"]), bool(group["adaptive"])))
        if not params:
            raise RuntimeError("SAM.first_step found no gradients; call loss.backward() first")

        norms = torch._foreach_norm(grads, 2, dtype=_norm_dtype(grads))
        device = norms[0].device
        norms = [n.to(device) for n in norms]
        self.last_grad_norm = torch.linalg.vector_norm(torch.stack(norms))
        # The cosine needs the clean gradient in the second step. When every parameter is
        # perturbed with one rho and no |w| scaling, eps is a positive multiple of it and is
        # kept anyway; otherwise the gradient is copied.
        self._eps_is_grad = len({f for f in flags}) == 1 and flags[0][0] > 0 and not flags[0][1]
        need_copy = self.needs_clean or (self.track_cosine and not self._eps_is_grad)
        self._clean = list(zip(params, [g.clone() for g in grads])) if need_copy else []
        self._pending = True

        idx = [i for i, (rho, _) in enumerate(flags) if rho > 0]
        if idx:
            self._perturb([params[i] for i in idx], [grads[i] for i in idx],
                          [norms[i] for i in idx], [flags[i] for i in idx])
        else:
            self.last_eps_norm = torch.zeros((), device=device)
        if zero_grad:
            self.zero_grad(set_to_none=True)

    def _buffers(self, params: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Reusable (saved weights, perturbation) buffers per parameter: fp32 for bf16/fp16
        parameters, the parameter's dtype otherwise. Reusing them avoids allocating (and on the
        CPU page-faulting) two parameter-sized copies every step."""
        olds, epss = [], []
        for p in params:
            buf = self._bufs.get(p)
            dtype = torch.float32 if p.dtype in _LOW_PRECISION else p.dtype
            if buf is None or buf[0].shape != p.shape or buf[0].dtype != dtype or buf[0].device != p.device:
                buf = (torch.empty_like(p, dtype=dtype), torch.empty_like(p, dtype=dtype))
                self._bufs[p] = buf
            olds.append(buf[0])
            epss.append(buf[1])
        return olds, epss

    def _perturb(self, params: list[torch.Tensor], grads: list[torch.Tensor],
                 grad_norms: list[torch.Tensor], flags: list[tuple[float, bool]]) -> None:
        device = grad_norms[0].device
        olds, eps = self._buffers(params)
        torch._foreach_copy_(olds, [p.detach() for p in params])  # exact (fp32 masters for bf16)
        # Per-parameter term whose norm sets the scale: g, or |w| * g for adaptive groups.
        term_norms = list(grad_norms)
        ada = [k for k, (_, adaptive) in enumerate(flags) if adaptive]
        if ada:
            terms = [olds[k].abs() * grads[k].to(olds[k].dtype) for k in ada]
            for k, n in zip(ada, torch._foreach_norm(terms, 2, dtype=grad_norms[0].dtype)):
                term_norms[k] = n.to(device)
        total = torch.linalg.vector_norm(torch.stack(term_norms))
        # Zero norm -> no perturbation instead of 0/0.
        inv = torch.where(total > 0, 1.0 / total, torch.zeros_like(total))
        scales = {rho: inv * rho for rho in {r for r, _ in flags}}
        for e, g, (rho, _) in zip(eps, grads, flags):  # one pass each, into the reused buffers
            # bf16/fp16 gradients are widened first: the product is rounded once, in fp32.
            torch.mul(g.to(e.dtype), scales[rho].to(g.device), out=e)
        eps_norms = [n * (inv * rho) for n, (rho, _) in zip(term_norms, flags)]
        if ada:
            torch._foreach_mul_([eps[k] for k in ada], [olds[k].square() for k in ada])
            for k, n in zip(ada, torch._foreach_norm([eps[k] for k in ada], 2)):
                eps_norms[k] = n.to(device)
        self.last_eps_norm = torch.linalg.vector_norm(torch.stack(eps_norms))
        low = [k for k, p in enumerate(params) if p.dtype in _LOW_PRECISION]
        high = [k for k, p in enumerate(params) if p.dtype not in _LOW_PRECISION]
        if high:
            torch._foreach_add_([params[k] for k in high], [eps[k] for k in high])
        for k in low:
            params[k].copy_(olds[k] + eps[k])  # fp32 sum, one rounding to the parameter dtype
        self._saved = list(zip(params, olds))
        self._eps = list(zip(params, eps))

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the saved weights back (exactly); no optimiser step. No-op when not perturbed."""
        if self._saved:
            params, olds = zip(*self._saved)
            torch._foreach_copy_(list(params), list(olds))
        self._saved = []

    @torch.no_grad()
    def cancel(self) -> None:
        """Abandon the step begun by ``first_step``: weights copied back exactly, no optimiser
        step, nothing pending (a non-finite loss or gradient; ``vitsam.optim.steps``)."""
        self.restore()
        self._clean, self._eps, self._pending = [], [], False

    @torch.no_grad()
    def base_step(self) -> None:
        """Step the base optimiser with the current gradients at the current weights."""
        if self._saved:
            raise RuntimeError("SAM.base_step called while perturbed; call restore() first")
        self.base_optimizer.step()
        self._opt_called = True  # tells an attached LR scheduler that an optimiser step happened
        self._clean, self._eps = [], []
        self._pending = False

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Record the gradient cosine, restore w exactly, then step the base optimiser."""
        if not self._pending:
            raise RuntimeError("SAM.second_step called without first_step")
        self.last_grad_cosine = self._cosine()
        self.restore()
        self.base_step()
        if zero_grad:
            self.zero_grad(set_to_none=True)

    def _cosine(self) -> torch.Tensor:
        if not self.track_cosine:
            return torch.tensor(float("nan"))
        if self._eps_is_grad:  # eps = c * g with c > 0: cos(g, g') = cos(eps, g')
            pairs = [(e, p.grad) for p, e in self._eps if p.grad is not None]
            if not pairs:
                return torch.tensor(float("nan"))
            dot = torch.stack([torch.dot(a.reshape(-1), b.reshape(-1).to(a.dtype)) for a, b in pairs])
            denom = self.last_eps_norm * global_norm([b for _, b in pairs]).to(dot.device)
            cos = dot.sum().to(denom.dtype) / denom
            return torch.where(denom > 0, cos, torch.full_like(cos, float("nan"))).clamp(-1.0, 1.0)
        pairs = [(c, p.grad) for p, c in self._clean if p.grad is not None]
        if not pairs:
            return torch.tensor(float("nan"))
        clean, pert = zip(*pairs)
        return foreach_cosine(list(clean), list(pert))

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """Full SAM step from the current weights; returns the loss at the perturbed weights.

        Contract: ``closure`` runs forward + ``backward`` on one batch and returns the loss; it
        zeroes nothing. Every call runs it exactly twice, in this order: gradients are zeroed,
        the closure gives the clean gradient at w, ``first_step`` moves to w + eps, the closure
        gives the gradient at w + eps, ``second_step`` restores w and steps the base optimiser.
        Gradients left over from anything before the call (an earlier step's second pass, the
        caller's own backward) are discarded, never used as the clean gradient. The perturbed
        gradients stay in ``p.grad`` afterwards, as after any optimiser step.
        """
        if closure is None:
            raise ValueError("SAM.step needs a closure that runs forward and backward and returns the "
                             "loss; or call first_step() and second_step() around your own passes")
        closure = torch.enable_grad()(closure)
        self.zero_grad(set_to_none=True)
        closure()
        self.first_step(zero_grad=True)
        loss = closure()
        self.second_step()
        return loss

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The base optimiser's state dict (its state plus the shared groups with rho/adaptive)."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from ``state_dict()`` (or from a plain base optimiser)."""
        self.restore()
        self._clean = []
        self._pending = False
        self.base_optimizer.load_state_dict(state_dict)
        # load_state_dict builds new group dicts: re-share them and fill SAM keys if absent.
        self.param_groups = self.base_optimizer.param_groups
        for group in self.param_groups:
            group.setdefault("rho", self.defaults["rho"])
            group.setdefault("adaptive", self.defaults["adaptive"])
            _check_rho(group["rho"])


def _check_rho(rho: Any) -> None:
    if not isinstance(rho, (int, float)) or isinstance(rho, bool) or not rho >= 0:
        raise ValueError(f"SAM rho must be a number >= 0 (0 = no perturbation), got {rho!r}")
