"""Containers: in-memory uint8 image tensors, lazy image-file lists, and the data bundle."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .config import DataConfig
from .errors import DataError


@dataclass
class ImageTensors:
    """Small images held in memory: ``images`` uint8 (N, C, H, W), ``labels`` int64 (N,)."""

    images: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise DataError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.ndim != 1 or self.labels.numel() != self.images.shape[0]:
            raise DataError(f"labels must be (N,) with N={self.images.shape[0]}, got {tuple(self.labels.shape)}")
        self.labels = self.labels.long()

    def __len__(self) -> int:
        return int(self.labels.numel())

    def subset(self, idx: Tensor) -> "ImageTensors":
        """The images at ``idx`` (int64 indices), copied."""
        return ImageTensors(self.images[idx].contiguous(), self.labels[idx].clone())


@dataclass
class ImageFiles:
    """Large images decoded lazily: file ``paths``, ``labels`` int64 (N,), PIL ``mode`` ("RGB"/"L").

    ``workers`` DataLoader processes decode them (0 = in the calling process).
    """

    paths: list[str]
    labels: Tensor
    mode: str = "RGB"
    workers: int = 2

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, idx: Tensor) -> "ImageFiles":
        """The files at ``idx`` (int64 indices)."""
        return ImageFiles([self.paths[i] for i in idx.tolist()], self.labels[idx].clone(), self.mode, self.workers)


@dataclass
class DataBundle:
    """A ready data set: splits, class names, normalisation and sizes.

    ``mean``/``std`` are per channel on the 0-1 scale. ``native_size`` is the shorter side of the
    stored images (of the first training image for lazy file lists); ``img_size`` is the resolved
    model input size. ``hflip`` says whether ``basic`` augmentation flips horizontally.
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

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def augment(self) -> str:
        return self.config.augment
