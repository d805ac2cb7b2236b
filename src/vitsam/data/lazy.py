"""Large images (more than 64 px): decoded per batch by a DataLoader with per-image v2 transforms.

Training crops are the paper's Inception crop (``v2.RandomResizedCrop``, area 5-100 %, aspect
3/4-4/3); evaluation applies the run's one preprocessing (``vitsam.data.preprocess``: shorter
side to ``img_size / 0.875``, centre crop ``img_size``; images already at ``img_size`` as they are). Each training sample carries its own seed (drawn from the epoch generator), so the
crops do not depend on the number of workers and the global RNG is never touched. Flips,
RandAugment and Mixup then run batched on the device (see ``augment``).
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from .augment import INCEPTION_RATIO, INCEPTION_SCALE, seeded_global_rng
from .decode import load_pil
from .errors import DataError
from .preprocess import EVAL_CROP_FRACTION, EvalView
from .tensors import ImageFiles


def train_transform(img_size: int) -> v2.Compose:
    """PIL image -> uint8 (C, img_size, img_size) Inception crop."""
    return v2.Compose([
        v2.RandomResizedCrop(img_size, scale=INCEPTION_SCALE, ratio=INCEPTION_RATIO, antialias=True),
        v2.PILToTensor(),
    ])


def eval_transform(img_size: int, crop_pct: float = EVAL_CROP_FRACTION) -> v2.Compose:
    """PIL image -> uint8 (C, img_size, img_size) by ``preprocess.eval_view`` (shorter side to
    img_size / crop_pct, centre crop)."""
    return v2.Compose([v2.PILToTensor(), EvalView(img_size, crop_pct)])


class _FileDataset(Dataset):
    """Items are ``index`` or ``(index, seed)``; returns (uint8 image, label, error message or "")."""

    def __init__(self, files: ImageFiles, transform: v2.Compose, img_size: int) -> None:
        self.files, self.transform, self.img_size = files, transform, img_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[Tensor, int, str]:
        idx, seed = item if isinstance(item, tuple) else (item, None)
        label = int(self.files.labels[idx])
        try:
            im = load_pil(self.files.paths[idx], self.files.mode)
        except DataError as err:
            # reported by the main process as one line, not as a worker traceback
            chans = 1 if self.files.mode == "L" else 3
            return torch.zeros(chans, self.img_size, self.img_size, dtype=torch.uint8), label, str(err)
        if seed is None:
            return self.transform(im), label, ""
        with seeded_global_rng(seed):
            return self.transform(im), label, ""


def file_batches(files: ImageFiles, batches: Sequence[Sequence], transform: v2.Compose,
                 img_size: int, pin_memory: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
    """Decode ``batches`` (lists of items) of ``files``: yields uint8 (B, C, S, S), int64 (B,) on CPU.

    ``pin_memory`` (for a CUDA consumer): batches come in page-locked memory, so the caller's
    ``.to(device, non_blocking=True)`` copies asynchronously while the next batch decodes.
    """
    loader = DataLoader(
        _FileDataset(files, transform, img_size), batch_sampler=batches, num_workers=files.workers,
        pin_memory=pin_memory,
        # the loader draws a base seed even when unused; a private generator keeps the global RNG untouched
        generator=torch.Generator().manual_seed(0),
    )
    for x, y, errs in loader:
        bad = [e for e in errs if e]
        if bad:
            raise DataError(bad[0]) from None
        yield x, y
