"""Adversarial examples for training and evaluation: L-inf PGD-k and FGSM with random start.

Units: ``eps`` and ``step_size`` are in pixel units of the un-normalised image in [0, 1]
(8/255 is eight grey levels). The data pipeline normalises images before the model sees them
(``vitsam.data.loader.normalise``: ``x = (pixel - mean) / std`` per channel), so the attack
takes the normalised batch with the run's ``mean``/``std``, recovers the pixels
``x * std + mean``, keeps the perturbation ``delta`` (pixel units) inside the eps ball and the
perturbed pixels inside [0, 1], and returns ``x + delta / std``: exactly ``x`` when
``delta = 0`` (eps 0), so AT at eps 0 trains as vanilla does, bit for bit.

PGD-k (Madry et al. 2018): ``delta`` starts uniform in [-eps, eps], then k times
``delta <- project(delta + step_size * sign(grad_delta loss))``. FGSM-RS (Wong et al. 2020,
"Fast is better than free") is one such step from the random start with step 1.25 eps.

Why a few lines of our own instead of torchattacks in the training loop: the attack must run
on the step's micro-batches (BatchNorm normalises each with its own batch statistics) under
the step's autocast dtype, leave BatchNorm running statistics, parameter gradients and the
global torch RNG untouched, and draw its random start from a generator that is a pure function
of (seed, key): a run resumed from a checkpoint then draws the same starts (no state to save)
and is bit-identical to one never interrupted. torchattacks draws from the global RNG, calls
``model.eval()`` and has no autocast or micro-batches. ``vitsam eval --attack autoattack``
uses torchattacks (``vitsam.eval.attacks``), where none of this matters.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .precision import autocast

ATTACKS = ("none", "pgd", "fgsm")
FGSM_STEP = 1.25  # FGSM-RS step in units of eps (Wong et al. 2020)
PGD_STEP = 2.5  # PGD step size in units of eps / steps (Madry et al. 2018)


def default_step_size(kind: str, eps: float, steps: int) -> float:
    """Pixel-unit step of ``kind`` when none is given: FGSM-RS 1.25 eps, PGD-k 2.5 eps / k."""
    return FGSM_STEP * eps if kind == "fgsm" else PGD_STEP * eps / steps


def generator_seed(seed: int, key: int) -> int:
    """The random-start generator's seed for (run seed, key): a hash, so that nearby keys
    (consecutive steps) give unrelated streams; 63 bits, as ``torch.Generator`` takes."""
    digest = hashlib.sha256(f"vitsam-attack:{int(seed)}:{int(key)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass(frozen=True)
class Attack:
    """An L-inf attack in pixel units of [0, 1] images, on inputs normalised by mean/std.

    kind: ``pgd`` or ``fgsm`` (one step). eps: the radius. step_size: None = the default of
    the kind (``default_step_size``). steps: PGD iterations (FGSM: always 1). mean, std: the
    per-channel statistics the inputs were normalised with. seed: the random starts' seed
    (each call's ``key`` picks its draw). random_start: False starts from delta = 0.
    """

    kind: str
    eps: float
    mean: Sequence[float]
    std: Sequence[float]
    steps: int = 1
    step_size: float | None = None
    seed: int = 0
    random_start: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ATTACKS[1:]:
            raise ValueError(f"attack must be one of {', '.join(ATTACKS[1:])}, got {self.kind!r}")
        if not 0 <= self.eps <= 1:
            raise ValueError(f"attack eps must be in [0, 1] (pixel units), got {self.eps}")
        if self.steps < 1:
            raise ValueError(f"attack steps must be >= 1, got {self.steps}")
        if self.step_size is not None and not self.step_size > 0:
            raise ValueError(f"attack step size must be > 0, got {self.step_size}")
        if len(self.mean) != len(self.std) or any(s <= 0 for s in self.std):
            raise ValueError("attack mean/std must be per-channel, with std > 0")

    @property
    def iterations(self) -> int:
        return 1 if self.kind == "fgsm" else self.steps

    @property
    def alpha(self) -> float:
        """The pixel-unit step size in use."""
        if self.step_size is not None:
            return float(self.step_size)
        return default_step_size(self.kind, self.eps, self.iterations)

    def perturb(self, model: nn.Module, criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                x: torch.Tensor, y: torch.Tensor, key: int = 0, micro_batch: int | None = None,
                autocast_dtype: torch.dtype | None = None,
                scaler: torch.amp.GradScaler | None = None) -> torch.Tensor:
        """The adversarial batch (B, C, H, W), normalised like ``x``, detached.

        x: (B, C, H, W) normalised inputs; y: (B,) labels or (B, K) soft targets, as
        ``criterion`` takes them. ``key``: which random start (training: the step). The model
        runs in the mode it is in (the caller decides), on micro-batches of ``micro_batch``
        samples, with BatchNorm running statistics frozen; every iteration replays the RNG
        state of the call, so dropout and stochastic depth draw the masks the next forward
        pass (the training step's) draws. Parameter gradients are not touched.
        """
        from .steps import frozen_running_stats  # steps imports this module

        net = model.module if isinstance(model, DistributedDataParallel) else model
        dev = x.device
        shape = (1, -1) + (1,) * (x.ndim - 2)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=dev).view(shape)
        std = torch.tensor(self.std, dtype=torch.float32, device=dev).view(shape)
        x = x.detach()
        pixels = x.float() * std + mean
        # The feasible deltas of each pixel: inside the eps ball and keeping pixels in [0, 1].
        lo = torch.clamp(-pixels, min=-self.eps, max=0.0)
        hi = torch.clamp(1.0 - pixels, min=0.0, max=self.eps)
        if self.random_start and self.eps > 0:
            gen = torch.Generator(device=dev)
            gen.manual_seed(generator_seed(self.seed, key))
            delta = (torch.rand(x.shape, generator=gen, device=dev) * 2 - 1) * self.eps
        else:
            delta = torch.zeros_like(pixels)
        delta = self.project(delta, lo, hi)
        if self.eps == 0:
            return x.clone()
        alpha = self.alpha
        spans = [(a, min(a + (micro_batch or x.shape[0]), x.shape[0]))
                 for a in range(0, x.shape[0], micro_batch or x.shape[0])]
        cpu_state, dev_state = torch.get_rng_state(), _device_rng(dev)
        devices = [dev_state[0]] if dev_state is not None else []
        with torch.random.fork_rng(devices=devices, device_type=dev.type if devices else "cuda"), \
                frozen_running_stats(net):
            for _ in range(self.iterations):
                torch.set_rng_state(cpu_state)
                if dev_state is not None:
                    torch.get_device_module(dev.type).set_rng_state(dev_state[1], dev_state[0])
                grads = []
                for a, b in spans:
                    d = delta[a:b].clone().requires_grad_(True)
                    with autocast(dev, autocast_dtype):
                        loss = criterion(net((x[a:b] + d / std).to(x.dtype)), y[a:b])
                    if scaler is not None and scaler.is_enabled():
                        loss = scaler.scale(loss)  # fp16: keep small input gradients from underflowing
                    grads.append(torch.autograd.grad(loss, [d])[0])
                delta = self.project(delta + alpha * torch.cat(grads).sign(), lo, hi)
        return (x + (delta / std).to(x.dtype)).detach()

    def project(self, delta: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """``delta`` clamped to the feasible box [lo, hi], then to [-eps, eps] (which holds even
        where the clean pixel sits a rounding error outside [0, 1])."""
        return torch.clamp(torch.minimum(torch.maximum(delta, lo), hi), -self.eps, self.eps).detach()


def _device_rng(device: torch.device) -> tuple[int, torch.Tensor] | None:
    if device.type == "cpu":
        return None
    mod = torch.get_device_module(device.type)
    idx = device.index if device.index is not None else mod.current_device()
    return idx, mod.get_rng_state(idx)


def training_attack(train: "object", mean: Sequence[float], std: Sequence[float]) -> Attack | None:
    """The attack a run's ``train`` config asks for (None for ``train.adversarial=none``)."""
    kind = getattr(train, "adversarial")
    if kind == "none":
        return None
    return Attack(kind, float(train.adv_eps), tuple(float(m) for m in mean),
                  tuple(float(s) for s in std), steps=int(train.adv_steps),
                  step_size=train.adv_step_size, seed=int(train.seed))
