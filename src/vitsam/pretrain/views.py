"""SimCLR's two random views of a batch, drawn for the whole batch at once on its device.

Per image and view, independently (Chen et al., 2020, appendix A, at small-image strength):
a random resized crop (area fraction ~ U[crop_min, 1], aspect ratio log-uniform in
[3/4, 4/3], bilinear, back to the input size), a horizontal flip (p = 0.5, where the data
allows flips), colour jitter with probability ``jitter_p`` (brightness, contrast and saturation
factors ~ U[1 - 0.8 s, 1 + 0.8 s], s = ``jitter``, applied in that fixed order; hue is left
out, it needs a per-pixel HSV round trip) and grey-scale with probability ``gray_p`` (colour
only). Crops and flips are one ``affine_grid``/``grid_sample`` call; the jitter is arithmetic on
the batch, so a view costs a few tensor ops whatever the batch size.

All draws come from a CPU ``torch.Generator`` seeded from (seed, step, rank): a resumed run
draws the views it would have drawn, and the global RNG is not touched.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

_GREY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale


@dataclass(frozen=True)
class ViewSpec:
    """The strength of the two-view augmentation (``PretrainConfig``'s view keys)."""

    crop_min: float = 0.2
    hflip: bool = True
    jitter: float = 0.5
    jitter_p: float = 0.8
    gray_p: float = 0.2


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """The CPU generator of the views of optimiser step ``step`` (0-based) on process ``rank``."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step), int(rank), 0x51C]
                                   ).generate_state(2, np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


def _crop_theta(n: int, spec: ViewSpec, gen: torch.Generator) -> Tensor:
    """(n, 2, 3) affine maps from output to input coordinates ([-1, 1] both): a random crop of
    area fraction ~ U[crop_min, 1] and aspect log-uniform in [3/4, 4/3], mirrored when flipped."""
    area = spec.crop_min + (1 - spec.crop_min) * torch.rand(n, generator=gen)
    logr = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * torch.rand(n, generator=gen)
    ratio = logr.exp()
    w = (area * ratio).sqrt().clamp(max=1.0)  # crop width / image width
    h = (area / ratio).sqrt().clamp(max=1.0)
    cx = (1 - w) * (2 * torch.rand(n, generator=gen) - 1)  # centre, keeping the crop inside
    cy = (1 - h) * (2 * torch.rand(n, generator=gen) - 1)
    flip = torch.rand(n, generator=gen) < 0.5
    sx = torch.where(flip & spec.hflip, -w, w)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, cx, h, cy
    return theta


def _grey(x: Tensor) -> Tensor:
    w = torch.tensor(_GREY, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _jitter(x: Tensor, spec: ViewSpec, gen: torch.Generator) -> Tensor:
    """Brightness, contrast, saturation (colour only) on [0, 1] images (B, C, H, W), each image
    with probability ``jitter_p``; the factors of the others are 1."""
    n, c = x.shape[:2]
    on = (torch.rand(n, generator=gen) < spec.jitter_p).float()
    lo, hi = 1 - 0.8 * spec.jitter, 1 + 0.8 * spec.jitter

    def factor() -> Tensor:
        f = lo + (hi - lo) * torch.rand(n, generator=gen)
        return (1 + on * (f.clamp(min=0) - 1)).to(x.device).view(n, 1, 1, 1)

    fb, fc, fs = factor(), factor(), factor()
    x = (x * fb).clamp(0, 1)
    grey = _grey(x) if c == 3 else x
    x = (grey.mean((1, 2, 3), keepdim=True) + fc * (x - grey.mean((1, 2, 3), keepdim=True))).clamp(0, 1)
    if c == 3:
        g = _grey(x)
        x = (g + fs * (x - g)).clamp(0, 1)
    return x


def view(x01: Tensor, spec: ViewSpec, gen: torch.Generator) -> Tensor:
    """One random view of [0, 1] images (B, C, H, W), same shape; draws from ``gen`` in the order
    crop and flip, jitter, grey-scale."""
    n, c = x01.shape[:2]
    theta = _crop_theta(n, spec, gen).to(x01.device, x01.dtype)
    grid = F.affine_grid(theta, list(x01.shape), align_corners=False)
    out = F.grid_sample(x01, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    out = _jitter(out, spec, gen)
    gray = torch.rand(n, generator=gen) < spec.gray_p
    if c == 3 and bool(gray.any()):
        out = torch.where(gray.to(out.device).view(n, 1, 1, 1), _grey(out).expand_as(out), out)
    return out


def two_views(x: Tensor, mean: Sequence[float], std: Sequence[float], spec: ViewSpec,
              gen: torch.Generator) -> Tensor:
    """Normalised images (N, C, H, W) -> (2N, C, H, W): view one of every image, then view two,
    drawn independently and normalised again with the same ``mean``/``std``."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    x01 = (x * s + m).clamp(0, 1)
    both = torch.cat([view(x01, spec, gen), view(x01, spec, gen)])
    return (both - m) / s
