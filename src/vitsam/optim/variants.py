"""Cheaper SAM: LookSAM, SAM-ON and SAM on a random subset of steps (``optim.sam_variant``).

Cost model, in forward-backward passes (F/B) per optimiser step, against the base optimiser's 1
(plus O(#params) vector work, small beside a pass for these models):

    full     2 F/B every step (Foret et al., 2021; ``vitsam.optim.sam``).
    looksam  Liu et al., 2022. Every k-th step is a SAM step (2 F/B) that also stores the part
             of the perturbed gradient g_s orthogonal to the clean gradient g, per parameter
             tensor i (``looksam_scope=tensor``, the default and the authors' code):
                 g_v,i = g_s,i - (g_i . g_s,i / |g_i|^2) g_i;
             the k - 1 steps in between take 1 F/B and step with
                 g_i + alpha * (|g_i| / |g_v,i|) * g_v,i     (|.|: L2 norms of tensor i).
             ``looksam_scope=global`` takes the dot products and norms over all parameters at
             once (the paper's formula read literally). That scope does not train behind a
             zero-initialised head: at the start only the head has a clean gradient, the rest
             of the network gets g_v scaled by the head's |g| (250x its own gradient in the
             cpu-scale Mixer), and AdamW's per-coordinate normalisation turns that stale
             direction into full-size steps (docs/results.md: the Mixer stays at ln 10).
             Mean (k + 1) / k F/B per step (1.2 at k = 5), plus three vector passes over the
             parameters in between and one gradient copy on SAM steps. k = 1 is full SAM.
    sam-on   Mueller et al., 2023 ("SAM-ON"): eps is SAM's formula restricted to the
             normalisation layers' weights and biases (LayerNorm, BatchNorm, GroupNorm, ...),
             eps = rho * g_N / |g_N|, and 0 on every other parameter. Still 2 F/B per step (the
             backward at w + eps runs through the whole network): it saves only the perturbation's
             vector work, and is there for its accuracy, not its speed. The authors tune rho for
             it separately from SAM's.
    random   SAM on a random subset of steps, each step perturbing with probability p and
             stepping the base optimiser on the clean gradient otherwise: expected 1 + p F/B per
             step (p = 0.2 costs what LookSAM at k = 5 does). The draw of step t is a pure
             function of (seed, t), so a resumed run draws the same steps.

The step counter t counts the optimiser steps *taken*: a step skipped for a non-finite loss or
gradient (``vitsam.optim.steps``) changes nothing here either, so it is retried with the same
plan. Counters and LookSAM's stored direction are part of ``state_dict()`` (key ``variant``),
which is how checkpoints resume them exactly. Under DistributedDataParallel every process makes
the same plan (it depends only on t); LookSAM's direction comes from the all-reduced perturbed
gradient and each process's own clean gradient, so without ``sync_perturbation`` the processes
average their directions (one all-reduce every k steps) to keep the weights identical.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.optim import Optimizer

from .sam import SAM, _norm_dtype, global_norm

SAM_VARIANTS = ("full", "looksam", "sam-on", "random")
LOOKSAM_SCOPES = ("tensor", "global")
_NORMS: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm, _BatchNorm, _InstanceNorm,
                                       *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))


class ScheduledSAM(SAM):
    """SAM perturbing on the steps ``wants_perturbation`` picks; a plain step in between.

    ``plan_step()`` tells ``train_step`` which kind the coming step is; a perturbed step is
    SAM's (``first_step`` / ``second_step``), another one is one forward-backward,
    ``reuse_gradient`` and ``base_step``. ``steps_taken`` and ``perturbed_steps`` count the
    optimiser steps taken (a cancelled step counts in neither).
    """

    def __init__(self, params: Iterable[Any], base_optimizer_cls: type[Optimizer], rho: float = 0.05,
                 adaptive: bool = False, **kwargs: Any) -> None:
        super().__init__(params, base_optimizer_cls, rho, adaptive, **kwargs)
        self.steps_taken = 0
        self.perturbed_steps = 0

    def wants_perturbation(self) -> bool:
        """Whether step ``steps_taken`` is a SAM step (pure function of the saved state)."""
        raise NotImplementedError

    def plan_step(self) -> bool:
        return self.wants_perturbation()

    @torch.no_grad()
    def reuse_gradient(self, params: list[torch.Tensor], grad_norm: torch.Tensor) -> None:
        """Turn the clean gradients in ``params``' ``.grad`` into this step's update direction
        (in place) on a step without perturbation; ``grad_norm``: their global L2 norm."""

    @torch.no_grad()
    def base_step(self) -> None:
        perturbed = self._pending  # set by first_step: this step was a SAM step
        super().base_step()
        self.steps_taken += 1
        self.perturbed_steps += int(perturbed)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """One step of the schedule: SAM's ``step(closure)`` (two closure calls) on a perturbed
        step, else one closure call, ``reuse_gradient`` and the base optimiser's step."""
        if closure is None or self.plan_step():
            return super().step(closure)
        self.zero_grad(set_to_none=True)
        loss = torch.enable_grad()(closure)()
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        self.reuse_gradient(params, global_norm([p.grad for p in params]))
        self.base_step()
        return loss

    # -- checkpoints ----------------------------------------------------------------------
    def _variant_state(self) -> dict[str, Any]:
        return {"name": self.variant, "steps_taken": self.steps_taken,
                "perturbed_steps": self.perturbed_steps}

    def _load_variant_state(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.variant:
            raise ValueError(f"optimizer state of SAM variant {state.get('name')!r} cannot load "
                             f"into {self.variant!r}")
        self.steps_taken = int(state["steps_taken"])
        self.perturbed_steps = int(state["perturbed_steps"])

    def state_dict(self) -> dict[str, Any]:
        """SAM's (the base optimiser's) state dict plus ``variant``: the counters (and more)."""
        return {**super().state_dict(), "variant": self._variant_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load ``state_dict()``'s output; one without ``variant`` (full SAM, the base
        optimiser) starts the schedule from step 0."""
        state_dict = dict(state_dict)
        variant = state_dict.pop("variant", None)
        super().load_state_dict(state_dict)
        if variant is None:
            self.steps_taken = self.perturbed_steps = 0
            self._reset_variant()
        else:
            self._load_variant_state(variant)

    def _reset_variant(self) -> None:
        """Forget what the schedule stored (a state without ``variant`` was loaded)."""

    def __getstate__(self) -> dict[str, Any]:
        keep = ("steps_taken", "perturbed_steps", *self._config_keys())
        return {**super().__getstate__(), **{k: self.__dict__[k] for k in keep}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._reset_variant()

    def _config_keys(self) -> tuple[str, ...]:
        return ()


class LookSAM(ScheduledSAM):
    """LookSAM (Liu et al., 2022): SAM every ``k`` steps, its orthogonal gradient part reused
    with weight ``alpha`` in between (module docstring for the formulas and cost)."""

    variant = "looksam"
    needs_clean = True  # g_v needs the clean gradient beside the perturbed one

    def __init__(self, params: Iterable[Any], base_optimizer_cls: type[Optimizer], rho: float = 0.05,
                 adaptive: bool = False, *, k: int = 5, alpha: float = 0.7, scope: str = "tensor",
                 **kwargs: Any) -> None:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"LookSAM k must be a whole number of steps >= 1, got {k!r}")
        if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha >= 0):
            raise ValueError(f"LookSAM alpha must be a number >= 0, got {alpha!r}")
        if scope not in LOOKSAM_SCOPES:
            raise ValueError(f"LookSAM scope must be one of {', '.join(LOOKSAM_SCOPES)}, got {scope!r}")
        super().__init__(params, base_optimizer_cls, rho, adaptive, **kwargs)
        self.k, self.alpha, self.scope = k, float(alpha), scope
        self._reset_variant()

    def _config_keys(self) -> tuple[str, ...]:
        return ("k", "alpha", "scope")

    def _reset_variant(self) -> None:
        self.direction: dict[torch.Tensor, torch.Tensor] = {}  # param -> g_v part
        self.direction_norm: torch.Tensor | None = None  # global |g_v|, None: nothing stored yet
        self.tensor_norms: dict[torch.Tensor, torch.Tensor] = {}  # param -> |g_v,i|
        self._next: dict[torch.Tensor, torch.Tensor] = {}  # g_v of the step under way

    def wants_perturbation(self) -> bool:
        return self.steps_taken % self.k == 0 or self.direction_norm is None

    @torch.no_grad()
    def observe(self, clean: list[torch.Tensor], perturbed: list[torch.Tensor],
                params: list[torch.Tensor]) -> list[torch.Tensor]:
        """g_v = g_s - (g . g_s / |g|^2) g from the clean (g) and perturbed (g_s) gradients of
        ``params`` (equal shapes pairwise), per tensor or over all of them (``scope``), kept
        until this step is taken (``base_step``); a zero g gives g_v = g_s. Returns the new
        g_v tensors (for averaging across processes)."""
        if not clean:
            self._next = {}
            return []
        dt = _norm_dtype(list(clean) + list(perturbed))
        g = [c.to(dt) for c in clean]
        gs = [s.to(dt) for s in perturbed]
        dots = torch.stack([torch.dot(a.reshape(-1), b.reshape(-1)).to(g[0].device) for a, b in zip(g, gs)])
        ggs = torch.stack([n.to(g[0].device) for n in torch._foreach_norm(g, 2)]).square()
        if self.scope == "global":
            dots, ggs = dots.sum().expand(len(g)), ggs.sum().expand(len(g))
        coefs = torch.where(ggs > 0, dots / torch.where(ggs > 0, ggs, 1), torch.zeros_like(dots))
        gv = [s - coefs[i].to(s.device) * a for i, (a, s) in enumerate(zip(g, gs))]
        self._next = dict(zip(params, gv))
        return gv

    def _store(self, direction: dict[torch.Tensor, torch.Tensor]) -> None:
        """Keep ``direction`` (param -> g_v) for the steps in between, with its norms."""
        self.direction = direction
        values = list(direction.values())
        norms = torch._foreach_norm(values, 2) if values else []
        self.tensor_norms = dict(zip(direction.keys(), norms))
        self.direction_norm = global_norm(values) if values else None

    @torch.no_grad()
    def base_step(self) -> None:
        if self._pending and self._next:
            self._store(self._next)
        self._next = {}
        super().base_step()

    @torch.no_grad()
    def cancel(self) -> None:
        super().cancel()
        self._next = {}

    @torch.no_grad()
    def reuse_gradient(self, params: list[torch.Tensor], grad_norm: torch.Tensor) -> None:
        """g <- g + alpha * (|g| / |g_v|) * g_v on the parameters with a stored g_v part, the
        norms per tensor or over all parameters (``scope``; ``grad_norm``: the global |g|)."""
        if self.direction_norm is None:
            return
        held = [p for p in params if p in self.direction]
        if self.scope == "global":
            n = self.direction_norm
            scale = torch.where(n > 0, self.alpha * grad_norm.to(n.device, n.dtype) / n, torch.zeros_like(n))
            scales = [scale] * len(held)
        else:
            gnorms = torch._foreach_norm([p.grad for p in held], 2) if held else []
            scales = []
            for p, gn in zip(held, gnorms):
                n = self.tensor_norms[p]
                scales.append(torch.where(n > 0, self.alpha * gn.to(n.device, n.dtype) / n, torch.zeros_like(n)))
        for p, scale in zip(held, scales):
            d = self.direction[p]
            p.grad.add_((d * scale.to(d.device)).to(p.grad.dtype))

    def _variant_state(self) -> dict[str, Any]:
        index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        return {**super()._variant_state(), "k": self.k, "alpha": self.alpha, "scope": self.scope,
                "direction": {index[p]: d for p, d in self.direction.items()}}

    def _load_variant_state(self, state: dict[str, Any]) -> None:
        super()._load_variant_state(state)
        params = [p for g in self.param_groups for p in g["params"]]
        self._reset_variant()
        stored = state.get("direction") or {}
        for i, d in stored.items():
            i = int(i)
            if not 0 <= i < len(params) or tuple(d.shape) != tuple(params[i].shape):
                raise ValueError(f"LookSAM state holds a direction for parameter {i} of shape "
                                 f"{tuple(d.shape)}, which this model does not have")
            self.direction[params[i]] = d.to(params[i].device)
        self._store(self.direction)


class RandomSAM(ScheduledSAM):
    """SAM on each step with probability ``prob``, the base optimiser on the clean gradient
    otherwise; step t's draw is seeded by (``seed``, t)."""

    variant = "random"

    def __init__(self, params: Iterable[Any], base_optimizer_cls: type[Optimizer], rho: float = 0.05,
                 adaptive: bool = False, *, prob: float = 0.2, seed: int = 0, **kwargs: Any) -> None:
        if not (isinstance(prob, (int, float)) and not isinstance(prob, bool) and 0 <= prob <= 1):
            raise ValueError(f"random SAM's probability must be in [0, 1], got {prob!r}")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"random SAM's seed must be an int >= 0, got {seed!r}")
        super().__init__(params, base_optimizer_cls, rho, adaptive, **kwargs)
        self.prob, self.seed = float(prob), seed

    def _config_keys(self) -> tuple[str, ...]:
        return ("prob", "seed")

    def wants_perturbation(self) -> bool:
        return perturbs(self.seed, self.steps_taken, self.prob)


def perturbs(seed: int, step: int, prob: float) -> bool:
    """Random SAM's draw for optimiser step ``step`` (0-based): u ~ U[0, 1) from numpy's
    generator seeded with (seed, step), perturb when u < prob (prob 1: always, 0: never)."""
    return bool(np.random.default_rng([seed, step]).random() < prob)


class SAMOn(SAM):
    """SAM-ON (Mueller et al., 2023): SAM whose perturbed groups hold only normalisation-layer
    parameters; build its groups with :func:`norm_only_groups`."""

    variant = "sam-on"


def normalization_params(model: nn.Module) -> set[int]:
    """ids of the weights and biases of ``model``'s normalisation layers: torch's LayerNorm,
    GroupNorm, BatchNorm, InstanceNorm (and RMSNorm), their subclasses (timm's
    ``LayerNorm2d``, ``GroupNormAct``, ``BatchNormAct2d``) and any other module whose class
    name ends in ``Norm`` (timm's ``RmsNorm``)."""
    ids = set()
    for m in model.modules():
        if isinstance(m, _NORMS) or type(m).__name__.endswith("Norm"):
            ids.update(id(p) for p in m.parameters(recurse=False))
    return ids


def norm_only_groups(model: nn.Module, groups: list[dict[str, Any]], rho: float) -> list[dict[str, Any]]:
    """``groups`` split so that normalisation parameters have ``rho`` and all others rho = 0
    (never perturbed); each group keeps its other settings. A one-line ValueError when the
    model has no normalisation parameter to perturb."""
    norm = normalization_params(model)
    out = []
    for g in groups:
        for keep, r in ((True, rho), (False, 0.0)):
            ps = [p for p in g["params"] if (id(p) in norm) == keep]
            if ps:
                out.append({**g, "params": ps, "rho": r})
    if not any(g["rho"] > 0 for g in out):
        raise ValueError(f"optim.sam_variant=sam-on: {type(model).__name__} has no trainable "
                         "normalisation-layer parameters to perturb; use optim.sam_variant=full")
    return out
