"""Containers: in-memory uint8 image tensors, lazy image-file lists, and the data bundle.

Image ids: a split read from a folder carries, per image, its path relative to the split's
folder in POSIX form (``"cat/0000.jpg"``), so labels keyed by file (ReaL-style label sets) find
the right image whether the split is held in memory or read from the folder; sources without
files (embedded sets, CIFAR pickles) use the image's index in the source's own order
(``"0"``, ``"1"``, ...). Ids are unique within a split; ``None`` where a split has none (training
splits).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .config import DataConfig
from .errors import DataError


def _check_ids(ids: list[str] | None, n: int) -> list[str] | None:
    if ids is None:
        return None
    ids = [str(i) for i in ids]
    if len(ids) != n:
        raise DataError(f"ids must have one entry per image ({n}), got {len(ids)}")
    return ids


def _pick(ids: list[str] | None, idx: Tensor) -> list[str] | None:
    return None if ids is None else [ids[i] for i in torch.as_tensor(idx).tolist()]


@dataclass
class ImageTensors:
    """Small images held in memory: ``images`` uint8 (N, C, H, W), ``labels`` int64 (N,),
    optional ``ids`` (N,) (see the module docstring)."""

    images: Tensor
    labels: Tensor
    ids: list[str] | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise DataError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.ndim != 1 or self.labels.numel() != self.images.shape[0]:
            raise DataError(f"labels must be (N,) with N={self.images.shape[0]}, got {tuple(self.labels.shape)}")
        self.labels = self.labels.long()
        self.ids = _check_ids(self.ids, self.images.shape[0])

    def __len__(self) -> int:
        return int(self.labels.numel())

    def subset(self, idx: Tensor) -> "ImageTensors":
        """The images at ``idx`` (int64 indices), copied."""
        return ImageTensors(self.images[idx].contiguous(), self.labels[idx].clone(), _pick(self.ids, idx))


@dataclass
class ImageFiles:
    """Large images decoded lazily: file ``paths``, ``labels`` int64 (N,), PIL ``mode`` ("RGB"/"L"),
    optional ``ids`` (N,) (see the module docstring).

    ``workers`` DataLoader processes decode them (0 = in the calling process).
    """

    paths: list[str]
    labels: Tensor
    mode: str = "RGB"
    workers: int = 2
    ids: list[str] | None = None

    def __post_init__(self) -> None:
        self.ids = _check_ids(self.ids, len(self.paths))

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, idx: Tensor) -> "ImageFiles":
        """The files at ``idx`` (int64 indices)."""
        return ImageFiles([self.paths[i] for i in idx.tolist()], self.labels[idx].clone(), self.mode,
                          self.workers, _pick(self.ids, idx))


@dataclass
class DataBundle:
    """A ready data set: splits, class names, normalisation and sizes.

    ``mean``/``std`` are per channel on the 0-1 scale. ``native_size`` is the shorter side of the
    stored images (of the first training image for lazy file lists); ``img_size`` is the resolved
    model input size. ``hflip`` says whether ``basic`` augmentation flips horizontally.
    ``crop_pct``: the evaluation preprocessing's crop fraction (``vitsam.data.preprocess``): 1.0
    for images held in memory, 0.875 for large-image folders. ``skipped``: (path relative to the
    data root, reason) of each unreadable file left out under ``bad_files=skip``. ``noisy``: the
    training samples whose labels ``data.label_noise`` replaced (``vitsam.data.noise``).
    """

    train: ImageTensors | ImageFiles
    test: ImageTensors | ImageFiles
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    in_chans: int
    native_size: int
    img_size: int
    name: str
    description: str
    hflip: bool
    config: DataConfig
    crop_pct: float = 1.0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    noisy: Any = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def augment(self) -> str:
        return self.config.augment
