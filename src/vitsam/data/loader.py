"""Training and evaluation batches: normalised float tensors on the device.

Training batches are a pure function of (data, seed, epoch): a ``torch.Generator`` seeded from
(seed, epoch) draws the shuffle order and one seed per batch, and each batch's augmentation draws
come from its own generator, so a resumed run sees exactly the batches it would have seen (and can
jump to batch k without computing the earlier ones); the global RNG is never used.

Several processes (``shard=(rank, world)``, ``vitsam.train.distributed``): batch k of the epoch is
the same global batch whatever the number of processes, and rank r reads and augments only its
contiguous slice of it, rows ``[m * r // world, m * (r + 1) // world)`` of a batch of m images.
Crops and flips are drawn for the whole global batch in ``augment_uint8``'s order and sliced, so
with ``augment`` none or basic the slices of all ranks, put together, are exactly the batch one
process sees. RandAugment and Mixup (``strong``) act on each slice with seeds drawn from the
batch's generator and the slice's first row: Mixup pairs images within a process's slice, as
data-parallel training on separate devices does.
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from . import lazy
from .augment import AUGMENTS_WITH_CROP, augment_uint8, crop_padding, draw_seed, hflip_where, mixup
from .augment import pad_crop, rand_augment
from .config import AUGMENTS
from .errors import DataError
from .preprocess import EVAL_CROP_FRACTION, IN_MEMORY_CROP_FRACTION, eval_view
from .tensors import DataBundle, ImageFiles, ImageTensors


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator seeded from (seed, epoch) through numpy's SeedSequence hashing."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF]).generate_state(2, np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


def normalise(x: Tensor, mean: Sequence[float], std: Sequence[float], img_size: int) -> Tensor:
    """uint8 (B, C, H, W) -> float32 (B, C, img_size, img_size), ``(x / 255 - mean) / std`` per channel.

    Images not yet at ``img_size`` go through ``preprocess.eval_view`` with crop fraction 1
    (shorter side to ``img_size``, centre crop), as the in-memory test split does.
    """
    if len(mean) != x.shape[1] or len(std) != x.shape[1]:
        raise DataError(f"mean/std have {len(mean)}/{len(std)} entries for {x.shape[1]} channels; pass per-channel stats")
    x = eval_view(x, img_size, IN_MEMORY_CROP_FRACTION).float()
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1) * 255.0
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1) * 255.0
    return (x - m) / s


def _check_batch_size(n: int, batch_size: int, drop_last: bool) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
    if drop_last and batch_size > n:
        raise DataError(f"batch_size {batch_size} exceeds the {n} training images, so drop_last leaves no "
                        "batch; lower batch_size or raise train_fraction")


def steps_per_epoch(bundle: DataBundle, batch_size: int, drop_last: bool = True) -> int:
    """Optimiser steps in one epoch of ``train_batches`` with this ``batch_size``."""
    n = len(bundle.train)
    _check_batch_size(n, batch_size, drop_last)
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def train_batches(
    bundle: DataBundle,
    batch_size: int,
    *,
    epoch: int,
    seed: int,
    device: str | torch.device = "cpu",
    augment: str | None = None,
    drop_last: bool = True,
    start_batch: int = 0,
    shard: tuple[int, int] = (0, 1),
) -> Iterator[tuple[Tensor, Tensor]]:
    """One epoch of shuffled, augmented training batches.

    Yields x float32 (B, C, img_size, img_size) normalised with the bundle's stats, and y int64 (B,)
    or, with ``augment="strong"`` (Mixup), float32 (B, num_classes) soft targets summing to 1.
    ``augment`` defaults to the bundle's config. Small images: pad-and-crop (pad = size/8) and,
    when ``bundle.hflip``, a horizontal flip, at native size, then resize to ``img_size``. Large
    images: Inception crop per image, then the flip.

    The epoch generator fixes the order and one seed per batch, so ``start_batch=k`` yields
    exactly the batches k, k+1, ... of the full epoch without computing the first k (resuming).
    ``shard=(rank, world)``: only this process's slice of every batch (the module docstring);
    ``batch_size`` stays the global batch.
    """
    augment = bundle.config.augment if augment is None else augment
    if augment not in AUGMENTS:
        raise DataError(f"unknown augment {augment!r}; choose one of {', '.join(AUGMENTS)}")
    data, n = bundle.train, len(bundle.train)
    _check_batch_size(n, batch_size, drop_last)
    gen = epoch_generator(seed, epoch)
    perm = torch.randperm(n, generator=gen)
    stop = n - n % batch_size if drop_last else n
    starts = range(0, stop, batch_size)
    batch_seeds = torch.randint(0, 2**62, (len(starts),), generator=gen).tolist()
    if not 0 <= start_batch <= len(starts):
        raise DataError(f"start_batch must be in [0, {len(starts)}] for this epoch, got {start_batch}")
    strong, crops = augment == "strong", augment in AUGMENTS_WITH_CROP
    rank, world = _check_shard(shard)
    spans = [(s, min(s + batch_size, stop)) for s in starts]  # global batch k: rows [a, b) of perm
    part = [(a + (b - a) * rank // world, a + (b - a) * (rank + 1) // world) for a, b in spans]

    if isinstance(data, ImageFiles):
        sample_seeds = torch.randint(0, 2**62, (n,), generator=gen).tolist()
        order = perm.tolist()
        batches = [[(order[i], sample_seeds[i]) for i in range(lo, hi)]
                   for lo, hi in part[start_batch:]]
        tf = (lazy.train_transform(bundle.img_size) if crops
              else lazy.eval_transform(bundle.img_size, bundle.crop_pct))
        source = lazy.file_batches(data, batches, tf, bundle.img_size, _pin(device))
        pad = 0
    elif isinstance(data, ImageTensors):
        source = ((data.images[perm[lo:hi]], data.labels[perm[lo:hi]])
                  for lo, hi in part[start_batch:])
        pad = crop_padding(min(data.images.shape[-2:])) if crops else 0
    else:
        raise DataError(f"bundle.train must be ImageTensors or ImageFiles, got {type(data).__name__}")

    for b, (xb, yb) in enumerate(source, start=start_batch):
        bgen = torch.Generator().manual_seed(batch_seeds[b])
        x = xb.to(device, non_blocking=True)
        y = yb.to(device, non_blocking=True)
        flip = crops and bundle.hflip
        if world == 1:
            x = augment_uint8(x, bgen, pad=pad, hflip=flip, randaugment=strong)
        else:
            x = _augment_slice(x, bgen, spans[b], part[b], pad=pad, hflip=flip, randaugment=strong)
        x = normalise(x, bundle.mean, bundle.std, bundle.img_size)
        if strong:
            seed = draw_seed(bgen)
            x, y = mixup(x, y, bundle.num_classes, seed if world == 1 else _slice_seed(seed, part[b][0]))
        yield x, y


def _pin(device: str | torch.device) -> bool:
    """Decoded batches in pinned memory when they go to a GPU (non-blocking copies)."""
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def _check_shard(shard: tuple[int, int]) -> tuple[int, int]:
    rank, world = (int(v) for v in shard)
    if world < 1 or not 0 <= rank < world:
        raise DataError(f"shard must be (rank, world) with 0 <= rank < world, got {tuple(shard)}")
    return rank, world


def _slice_seed(seed: int, first_row: int) -> int:
    """A seed for one slice of a batch: the batch's seed hashed with the slice's first row."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, seed >> 32, first_row]).generate_state(2, np.uint64)
    return int(state[0] >> np.uint64(2))


def _augment_slice(x: Tensor, gen: torch.Generator, batch: tuple[int, int], part: tuple[int, int],
                   *, pad: int, hflip: bool, randaugment: bool) -> Tensor:
    """``augment_uint8`` of rows ``part`` of the global batch ``batch`` (x holds only those rows):
    the same draws, in the same order, for the whole batch, sliced; RandAugment per slice."""
    (a, b), (lo, hi) = batch, part
    rows = slice(lo - a, hi - a)
    if pad > 0:
        x = pad_crop(x, torch.randint(0, 2 * pad + 1, (b - a, 2), generator=gen)[rows], pad)
    if hflip:
        x = hflip_where(x, (torch.rand(b - a, generator=gen) < 0.5)[rows])
    if randaugment:
        x = rand_augment(x, _slice_seed(draw_seed(gen), lo))
    return x


def eval_batches(
    tensors_or_dataset: ImageTensors | ImageFiles,
    batch_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    img_size: int,
    device: str | torch.device = "cpu",
    crop_pct: float | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Batches in order, no augmentation: x float32 (B, C, img_size, img_size) normalised, y int64 (B,).

    Every image goes through ``preprocess.eval_view(x, img_size, crop_pct)`` (shorter side to
    ``img_size / crop_pct``, centre crop; images already at ``img_size`` as they are).
    ``crop_pct`` is the run's (``DataBundle.crop_pct``); None takes the default of the split's
    kind: 1.0 for images held in memory, 0.875 for image files.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
    data = tensors_or_dataset
    n = len(data)
    if isinstance(data, ImageFiles):
        crop = EVAL_CROP_FRACTION if crop_pct is None else crop_pct
        batches = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
        source = lazy.file_batches(data, batches, lazy.eval_transform(img_size, crop), img_size,
                                   _pin(device))
    elif isinstance(data, ImageTensors):
        crop = IN_MEMORY_CROP_FRACTION if crop_pct is None else crop_pct
        source = ((data.images[s:s + batch_size], data.labels[s:s + batch_size]) for s in range(0, n, batch_size))
    else:
        raise DataError(f"eval_batches needs ImageTensors or ImageFiles, got {type(data).__name__}")
    for xb, yb in source:
        x = eval_view(xb.to(device, non_blocking=True), img_size, crop)
        yield normalise(x, mean, std, img_size), yb.to(device, non_blocking=True)
