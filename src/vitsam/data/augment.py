"""Batched training augmentation on the device.

Per-image PIL work would dominate a CPU at 32 px, so crops and flips act on whole uint8 batches
with one indexing op. All random numbers come from an explicit ``torch.Generator`` on the CPU
(so results do not depend on the device); torchvision's v2 transforms, which draw from the
global RNG, run inside ``torch.random.fork_rng`` seeded from that generator, leaving the global
RNG as it was.

torchvision's ``v2.RandAugment`` called on a batch tensor picks one pair of ops for the whole
batch, so RandAugment is applied image by image here (still on uint8 tensors, no PIL): each
image gets its own two ops and signs, as in the paper's per-example augmentation.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms import v2

from .errors import DataError

RANDAUG_OPS, RANDAUG_MAGNITUDE, MIXUP_ALPHA = 2, 15, 0.5
AUGMENTS_WITH_CROP = ("basic", "strong")  # strong = basic + RandAugment + Mixup
INCEPTION_SCALE, INCEPTION_RATIO = (0.05, 1.0), (3 / 4, 4 / 3)


def crop_padding(size: int) -> int:
    """Pad for pad-and-crop: size/8, i.e. the usual 4 px at 32 px (1 px for 8 px digits)."""
    return max(1, round(size / 8))


def draw_seed(gen: torch.Generator) -> int:
    """A 62-bit seed drawn from ``gen``."""
    return int(torch.randint(0, 2**62, (1,), generator=gen))


@contextmanager
def seeded_global_rng(seed: int) -> Iterator[None]:
    """Run a block with the global CPU RNG seeded to ``seed``; restore its state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(int(seed))
        yield


def pad_crop(x: Tensor, offsets: Tensor, pad: int) -> Tensor:
    """Zero-pad ``x`` (B, C, H, W) by ``pad`` px per side and crop (H, W) at ``offsets``.

    offsets: int64 (B, 2) = (top, left) in padded coordinates, each in [0, 2 * pad]; offset
    (pad, pad) returns the image unchanged. One gather for the whole batch.
    """
    if x.ndim != 4:
        raise DataError(f"pad_crop needs a (B, C, H, W) batch, got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    offsets = offsets.to(x.device).long()
    if offsets.shape != (b, 2) or offsets.min() < 0 or offsets.max() > 2 * pad:
        raise DataError(f"offsets must be int (B, 2) in [0, {2 * pad}], got shape {tuple(offsets.shape)}")
    xp = F.pad(x, (pad, pad, pad, pad))
    dev = x.device
    rows = offsets[:, 0, None] + torch.arange(h, device=dev)  # (B, H)
    cols = offsets[:, 1, None] + torch.arange(w, device=dev)  # (B, W)
    bi = torch.arange(b, device=dev)[:, None, None, None]
    ci = torch.arange(c, device=dev)[None, :, None, None]
    return xp[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


def hflip_where(x: Tensor, flip: Tensor) -> Tensor:
    """Mirror the images of ``x`` (B, C, H, W) left-right where ``flip`` (B,) bool is true."""
    return torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)


def rand_augment(x: Tensor, seed: int, num_ops: int = RANDAUG_OPS, magnitude: int = RANDAUG_MAGNITUDE) -> Tensor:
    """RandAugment(num_ops, magnitude) on uint8 (B, C, H, W), independently per image; seeded."""
    ra = v2.RandAugment(num_ops=num_ops, magnitude=magnitude)
    with seeded_global_rng(seed):
        return torch.stack([ra(img) for img in x]) if len(x) else x


def mixup(x: Tensor, y: Tensor, num_classes: int, seed: int, alpha: float = MIXUP_ALPHA) -> tuple[Tensor, Tensor]:
    """Mixup of float ``x`` (B, C, H, W) with its batch rolled by one; ``y`` int64 (B,) ->
    soft targets float (B, num_classes), rows summing to 1. One Beta(alpha, alpha) weight per batch."""
    with seeded_global_rng(seed):
        return v2.MixUp(alpha=alpha, num_classes=num_classes)(x, y)


def augment_uint8(x: Tensor, gen: torch.Generator, *, pad: int, hflip: bool, randaugment: bool) -> Tensor:
    """Random pad-and-crop (if ``pad`` > 0), flip (if ``hflip``) and RandAugment on a uint8 batch.

    Draws, in this order, from ``gen``: crop offsets (B, 2), flip coins (B,), a RandAugment seed.
    """
    b = x.shape[0]
    if pad > 0:
        x = pad_crop(x, torch.randint(0, 2 * pad + 1, (b, 2), generator=gen), pad)
    if hflip:
        x = hflip_where(x, torch.rand(b, generator=gen) < 0.5)
    if randaugment:
        x = rand_augment(x, draw_seed(gen))
    return x
