"""Build the base optimiser (AdamW or SGD-Nesterov), optionally wrapped in SAM.

Weight decay is not applied to biases, normalisation weights, position embeddings and class
tokens (every 1-D parameter, plus tokens/embeddings by name), as in the paper's recipes, nor
to what the model's own ``no_weight_decay()`` names (timm models: relative-position tables,
position embeddings, ...). Those names are matched as timm's ``param_groups_weight_decay``
matches them: ``fnmatch`` patterns on the full parameter name; a name of a module also covers
the parameters inside it.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..data.errors import shown

NO_DECAY_NAMES = ("pos_embed", "cls_token", "dist_token", "reg_token")
OPTIMIZERS = ("adamw", "sgd")


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser settings. ``sam=True`` wraps the base optimiser in SAM with radius ``rho``;
    ``sam_variant`` picks a cheaper SAM (``vitsam.optim.variants`` states their costs)."""

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9  # SGD only (Nesterov)
    beta1: float = 0.9  # AdamW only
    beta2: float = 0.999
    sam: bool = False
    rho: float = 0.05
    adaptive: bool = False
    m: int | None = None  # m-sharpness chunk size on one device; None = whole batch
    sync_perturbation: bool = False  # DDP: perturb with the all-reduced gradient
    reuse_randomness: bool = True  # second SAM pass reuses the first pass's dropout masks
    # Cheaper SAM (vitsam.optim.variants, with sam=true): full | looksam | sam-on | random
    sam_variant: str = "full"
    looksam_k: int = 5  # LookSAM: a SAM step every k steps
    looksam_alpha: float = 0.7  # LookSAM: weight of the reused orthogonal gradient part
    looksam_scope: str = "tensor"  # LookSAM: norms per parameter tensor | global (variants.py)
    sam_prob: float = 0.2  # random: probability that a step is a SAM step (0.2: LookSAM k=5's cost)
    sam_seed: int = 0  # random: seed of the steps' draws
    fused: bool | str = "auto"  # fused AdamW/SGD kernel: auto (on CUDA) | true | false


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: decayed matrices/filters, and undecayed 1-D params, tokens, embeddings and
    whatever ``model.no_weight_decay()`` names (see the module docstring)."""
    skip = no_weight_decay_names(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.split(".")[-1] in NO_DECAY_NAMES or _listed(name, skip):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """The names (or patterns) the model's ``no_weight_decay()`` returns; empty without one."""
    fn = getattr(model, "no_weight_decay", None)
    return {str(n) for n in fn()} if callable(fn) else set()


def _listed(name: str, patterns: set[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pat) or name.startswith(pat + ".") for pat in patterns)


def validate(cfg: OptimConfig) -> None:
    """Raise a one-line ValueError for impossible settings."""
    if cfg.name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {shown(cfg.name)}; choose one of {', '.join(OPTIMIZERS)}")
    if not cfg.lr > 0:
        raise ValueError(f"optim.lr must be > 0, got {cfg.lr}")
    if cfg.weight_decay < 0:
        raise ValueError(f"optim.weight_decay must be >= 0, got {cfg.weight_decay}")
    if cfg.sam and not cfg.rho > 0:
        raise ValueError(f"optim.rho must be > 0 with SAM, got {cfg.rho}; or set optim.sam=false")
    if not 0 <= cfg.momentum < 1:
        raise ValueError(f"optim.momentum must be in [0, 1), got {cfg.momentum}")
    for key in ("beta1", "beta2"):
        if not 0 <= getattr(cfg, key) < 1:
            raise ValueError(f"optim.{key} must be in [0, 1), got {getattr(cfg, key)}")
    if cfg.m is not None and cfg.m < 1:
        raise ValueError(f"optim.m must be a positive number of samples or null, got {cfg.m}")
    from .variants import LOOKSAM_SCOPES, SAM_VARIANTS

    if cfg.sam_variant not in SAM_VARIANTS:
        raise ValueError(f"unknown optim.sam_variant {shown(cfg.sam_variant)}; choose one of "
                         f"{', '.join(SAM_VARIANTS)}")
    if cfg.sam_variant != "full" and not cfg.sam:
        raise ValueError(f"optim.sam_variant={cfg.sam_variant} needs optim.sam=true")
    if cfg.looksam_k < 1:
        raise ValueError(f"optim.looksam_k must be >= 1 (a SAM step every k steps), got {cfg.looksam_k}")
    if not cfg.looksam_alpha >= 0:
        raise ValueError(f"optim.looksam_alpha must be >= 0, got {cfg.looksam_alpha}")
    if cfg.looksam_scope not in LOOKSAM_SCOPES:
        raise ValueError(f"unknown optim.looksam_scope {shown(cfg.looksam_scope)}; choose one of "
                         f"{', '.join(LOOKSAM_SCOPES)}")
    if not 0 <= cfg.sam_prob <= 1:
        raise ValueError(f"optim.sam_prob must be in [0, 1] (the share of SAM steps), got {cfg.sam_prob}")
    if cfg.sam_seed < 0:
        raise ValueError(f"optim.sam_seed must be >= 0, got {cfg.sam_seed}")
    if not is_switch(cfg.fused):
        raise ValueError(f"optim.fused must be auto, true or false, got {shown(cfg.fused)}")


def is_switch(value: object) -> bool:
    """True for the values of an auto/true/false setting: ``"auto"``, True, False."""
    return value is True or value is False or value == "auto"


def use_fused(setting: bool | str, device: torch.device | str) -> bool:
    """Whether ``optim.fused`` turns on torch's fused optimiser kernel on ``device``: ``auto``
    on CUDA only. torch's fused AdamW also runs on the CPU (``true``); there its measured gain
    was within the noise of a shared machine (docs/benchmarks.md), so ``auto`` leaves it off."""
    if setting == "auto":
        return torch.device(device).type == "cuda"
    return bool(setting)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The configured optimiser over ``model``'s parameters (SAM-wrapped if ``cfg.sam``).

    ``optim.fused`` (``use_fused``) is resolved on the device of the model's parameters.
    """
    validate(cfg)
    groups = param_groups(model, cfg.weight_decay)
    first = next(model.parameters(), None)
    fused = use_fused(cfg.fused, first.device if first is not None else "cpu")
    if cfg.name == "adamw":
        base_cls: type[torch.optim.Optimizer] = torch.optim.AdamW
        kwargs: dict[str, Any] = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2)}
    else:
        base_cls = torch.optim.SGD
        kwargs = {"lr": cfg.lr, "momentum": cfg.momentum, "nesterov": True}
    if fused:  # same update as the for-each kernel, to float rounding (tests/test_fastpath.py)
        kwargs["fused"] = True
    if cfg.sam:
        from . import variants
        from .sam import SAM

        sam = dict(rho=cfg.rho, adaptive=cfg.adaptive)
        if cfg.sam_variant == "looksam":
            return variants.LookSAM(groups, base_cls, **sam, k=cfg.looksam_k, alpha=cfg.looksam_alpha,
                                    scope=cfg.looksam_scope, **kwargs)
        if cfg.sam_variant == "random":
            return variants.RandomSAM(groups, base_cls, **sam, prob=cfg.sam_prob, seed=cfg.sam_seed,
                                      **kwargs)
        if cfg.sam_variant == "sam-on":
            return variants.SAMOn(variants.norm_only_groups(model, groups, cfg.rho), base_cls, **sam,
                                  **kwargs)
        return SAM(groups, base_cls, **sam, **kwargs)
    return base_cls(groups, **kwargs)
