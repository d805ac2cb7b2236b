"""Batched training augmentation on the device.

Per-image PIL work would dominate a CPU at 32 px, so crops and flips act on whole uint8 batches
with one indexing op. All random numbers come from an explicit ``torch.Generator`` on the CPU
(so results do not depend on the device); torchvision's v2 transforms, which draw from the
global RNG, run inside ``torch.random.fork_rng`` seeded from that generator, leaving the global
RNG as it was.

torchvision's ``v2.RandAugment`` called on a batch tensor picks one pair of ops for the whole
batch, while the paper augments per example. Calling it image by image costs one dispatch per
image and op (about 0.5 ms each at 32 px, some 15% of a small ViT's training step), so
``rand_augment`` draws each image's ops and signs itself (the same distribution: each round a
uniform op out of the 14, a fair sign for the signed ones) and applies every (op, sign) group
of images as one batched torchvision call: at most 2 x 23 calls per batch, whatever its size.
The ops and their magnitudes are torchvision's (``v2.RandAugment``, 31 magnitude bins).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

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


RANDAUG_BINS = 31
RANDAUG_OP_NAMES = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate",
                    "Brightness", "Color", "Contrast", "Sharpness", "Posterize", "Solarize",
                    "AutoContrast", "Equalize")
_SIGNED = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
           "Contrast", "Sharpness"}


def randaug_magnitude(op: str, magnitude: int, height: int, width: int,
                      bins: int = RANDAUG_BINS) -> float:
    """The strength of ``op`` at bin ``magnitude`` of ``bins`` for an H x W image, as
    torchvision's RandAugment defines it (shear as a slope, translation in px, rotation in
    degrees, enhancement factors as 1 + m, posterize bits, solarize threshold as a fraction)."""
    t = magnitude / (bins - 1)  # torch.linspace(lo, hi, bins)[magnitude] = lo + t * (hi - lo)
    if op in ("ShearX", "ShearY"):
        return 0.3 * t
    if op == "TranslateX":
        return 150.0 / 331.0 * width * t
    if op == "TranslateY":
        return 150.0 / 331.0 * height * t
    if op == "Rotate":
        return 30.0 * t
    if op in ("Brightness", "Color", "Contrast", "Sharpness"):
        return 0.9 * t
    if op == "Posterize":
        return float(8 - round(magnitude / ((bins - 1) / 4)))
    if op == "Solarize":
        return 1.0 - t
    return 0.0


def randaug_op(x: Tensor, op: str, m: float) -> Tensor:
    """Apply RandAugment's ``op`` with signed strength ``m`` to every image of uint8
    (B, C, H, W) ``x`` at once (zero fill, nearest interpolation: torchvision's defaults)."""
    near = v2.InterpolationMode.NEAREST
    if op in ("ShearX", "ShearY"):
        shear = [math.degrees(math.atan(m)), 0.0] if op == "ShearX" else [0.0, math.degrees(math.atan(m))]
        return TF.affine(x, angle=0.0, translate=[0, 0], scale=1.0, shear=shear,
                         interpolation=near, fill=None, center=[0, 0])
    if op in ("TranslateX", "TranslateY"):
        move = [int(m), 0] if op == "TranslateX" else [0, int(m)]
        return TF.affine(x, angle=0.0, translate=move, scale=1.0, shear=[0.0, 0.0],
                         interpolation=near, fill=None)
    if op == "Rotate":
        return TF.rotate(x, angle=m, interpolation=near, fill=None)
    if op == "Brightness":
        return TF.adjust_brightness(x, brightness_factor=1.0 + m)
    if op == "Color":
        return TF.adjust_saturation(x, saturation_factor=1.0 + m)
    if op == "Contrast":
        return TF.adjust_contrast(x, contrast_factor=1.0 + m)
    if op == "Sharpness":
        return TF.adjust_sharpness(x, sharpness_factor=1.0 + m)
    if op == "Posterize":
        return TF.posterize(x, bits=int(m))
    if op == "Solarize":
        return TF.solarize(x, threshold=255.0 * m)
    if op == "AutoContrast":
        return TF.autocontrast(x)
    if op == "Equalize":
        return TF.equalize(x)
    return x  # Identity


def rand_augment(x: Tensor, seed: int, num_ops: int = RANDAUG_OPS, magnitude: int = RANDAUG_MAGNITUDE) -> Tensor:
    """RandAugment(num_ops, magnitude) on uint8 (B, C, H, W), independently per image; seeded.

    Per round, draws from a generator seeded with ``seed``: an op index per image (B,), then a
    sign coin per image (B,); the global RNG is not touched.
    """
    gen = torch.Generator().manual_seed(int(seed))
    b, h, w = x.shape[0], x.shape[-2], x.shape[-1]
    out = x.clone()
    for _ in range(num_ops):
        which = torch.randint(len(RANDAUG_OP_NAMES), (b,), generator=gen)
        negative = torch.rand(b, generator=gen) <= 0.5
        for k, op in enumerate(RANDAUG_OP_NAMES):
            if op == "Identity":
                continue
            m = randaug_magnitude(op, magnitude, h, w)
            for neg in ((False, True) if op in _SIGNED else (None,)):
                mask = which == k if neg is None else (which == k) & (negative == neg)
                idx = mask.nonzero().flatten()
                if len(idx):
                    out[idx] = randaug_op(out[idx], op, -m if neg else m)
    return out


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
