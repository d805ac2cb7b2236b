"""The one evaluation preprocessing: a decoded uint8 image -> the uint8 view the model sees.

Rule (``eval_view``): an image that is already ``img_size`` x ``img_size`` is used as it is; any
other is resized (bilinear, antialiased, torchvision on uint8) so that its shorter side is
``round(img_size / crop_pct)``, then centre-cropped to ``img_size`` x ``img_size``. Non-square
images are therefore cropped, never squashed. Normalisation (``(x / 255 - mean) / std``) is the
only step after it.

``crop_pct`` belongs to the run: 1.0 for sources held in memory (images up to 64 px: the shorter
side goes to ``img_size``, identity at the native size) and ``EVAL_CROP_FRACTION`` (0.875) for
large-image folders (the usual ImageNet evaluation crop). The run folder records it
(``data.json``, see ``vitsam.data.record``) and every route applies it through this module: the
test split (cached tensors and lazily decoded files), second test folders, class-mapped
folders, ReaL images, corruption sets and ``vitsam.eval.metrics.preprocess``. So the same file
gives the same model input whichever way it comes in.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from .errors import DataError

EVAL_CROP_FRACTION = 0.875  # large-image folders
IN_MEMORY_CROP_FRACTION = 1.0  # sources held in memory (<= 64 px)
INTERPOLATION = "bilinear, antialiased (torchvision, uint8)"


def check_crop_pct(crop_pct: float) -> float:
    """``crop_pct`` as a float in (0, 1], or a one-line DataError."""
    if isinstance(crop_pct, bool) or not isinstance(crop_pct, (int, float)) or not 0 < crop_pct <= 1:
        raise DataError(f"crop_pct must be a number in (0, 1], got {repr(crop_pct)[:60]}")
    return float(crop_pct)


def resize_side(img_size: int, crop_pct: float) -> int:
    """The shorter side an image is resized to before the centre crop: round(img_size / crop_pct)."""
    return max(int(img_size), round(int(img_size) / check_crop_pct(crop_pct)))


def eval_view(x: Tensor, img_size: int, crop_pct: float = IN_MEMORY_CROP_FRACTION) -> Tensor:
    """uint8 (C, H, W) or (B, C, H, W) -> uint8 (..., img_size, img_size) by the rule above."""
    if x.dtype != torch.uint8 or x.ndim not in (3, 4):
        raise DataError(f"eval_view needs uint8 (C, H, W) or (B, C, H, W), got {x.dtype} {tuple(x.shape)}")
    if not isinstance(img_size, int) or img_size < 1:
        raise DataError(f"img_size must be a positive integer, got {img_size!r}")
    side = resize_side(img_size, crop_pct)
    if tuple(x.shape[-2:]) == (img_size, img_size):
        return x
    if min(x.shape[-2:]) != side:
        x = TF.resize(x, [side], interpolation=InterpolationMode.BILINEAR, antialias=True)
    return TF.center_crop(x, [img_size, img_size])


def fit_to(x: Tensor, size: tuple[int, int]) -> Tensor:
    """uint8 (..., C, H, W) resized to cover ``size = (H', W')`` and centre-cropped to it.

    For a square ``size`` this is ``eval_view(x, H', 1.0)``; used where images of a folder must
    share one stored size (the tensor cache).
    """
    h, w = int(size[0]), int(size[1])
    if tuple(x.shape[-2:]) == (h, w):
        return x
    if h == w:
        return eval_view(x, h, IN_MEMORY_CROP_FRACTION)
    ih, iw = x.shape[-2:]
    scale = max(h / ih, w / iw)
    x = TF.resize(x, [max(h, round(ih * scale)), max(w, round(iw * scale))],
                  interpolation=InterpolationMode.BILINEAR, antialias=True)
    return TF.center_crop(x, [h, w])


@dataclass(frozen=True)
class EvalView:
    """``eval_view`` as a picklable transform (DataLoader workers): uint8 (C, H, W) -> (C, S, S)."""

    img_size: int
    crop_pct: float = IN_MEMORY_CROP_FRACTION

    def __call__(self, x: Tensor) -> Tensor:
        return eval_view(x, self.img_size, self.crop_pct)


def describe(img_size: int, crop_pct: float) -> dict:
    """JSON description of the preprocessing (what a run folder and result files record)."""
    return {"img_size": int(img_size), "crop_pct": check_crop_pct(crop_pct),
            "resize_shorter_side_to": resize_side(img_size, crop_pct), "crop": "centre",
            "interpolation": INTERPOLATION,
            "rule": "images already img_size x img_size are used as they are"}
