"""Data configuration: which source, at what size, with which augmentation."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError

SOURCES = ("mnist5k", "digits", "cifar10-shared", "imagefolder", "cifar10", "cifar100")
AUGMENTS = ("none", "basic", "strong")
BAD_FILES = ("error", "skip")
DEFAULT_CACHE_DIR = "~/.cache/vitsam"
CACHE_ENV = "VITSAM_CACHE"


@dataclass(frozen=True)
class DataConfig:
    """Settings of one data set.

    source: ``mnist5k`` (embedded MNIST subset, default), ``digits`` (sklearn 8x8 digits),
    ``cifar10-shared`` (the CIFAR-10 JPEG tarball: ``root``, else in ``$VITSAM_DATA`` or
    ``../shared/data``), ``imagefolder``
    (``root/train/<class>/*`` and ``root/<val_split>/<class>/*``), ``cifar10`` / ``cifar100``
    (the python-pickle folders). ``img_size=None`` keeps the native size of the source (224 for
    large-image folders). ``train_fraction`` keeps a seeded, stratified share of the training set:
    ``train_fraction x n`` images of each class of n, the product taken exactly as written, halves
    up (``vitsam.data.split.stratified_fraction``).
    ``augment``: ``none``, ``basic`` (crop + flip) or ``strong`` (basic + RandAugment(2, 15) +
    Mixup(0.5)). ``cache_dir`` is replaced by ``$VITSAM_CACHE`` when left at its default.
    ``workers``: DataLoader worker processes for large-image folders (0 = decode in-process).
    ``bad_files``: what to do with image files of a folder source that cannot be read
    (``vitsam.data.scan``): ``error`` stops before training and names them all, ``skip`` leaves
    them out and lists them in the run folder.
    ``label_noise``: the share of training labels replaced, seeded by ``seed``
    (``vitsam.data.noise``; the test labels stay clean), ``label_noise_kind``: ``symmetric``
    (another class, uniformly) or ``pair`` (the next class).
    ``resident``: keep a cached (in-memory uint8) training and test split on the training
    device, so batches are gathered and augmented there with no copy per batch: ``auto`` on
    CUDA when the images take at most a quarter of the free GPU memory, ``true``, ``false``
    (``vitsam.train.fastpath``).
    """

    source: str = "mnist5k"
    root: str | None = None
    img_size: int | None = None
    train_fraction: float = 1.0
    augment: str = "basic"
    seed: int = 0
    cache_dir: str = DEFAULT_CACHE_DIR
    val_split: str = "val"
    workers: int = 2
    bad_files: str = "error"
    label_noise: float = 0.0
    label_noise_kind: str = "symmetric"
    resident: bool | str = "auto"

    def __post_init__(self) -> None:
        def _r(v: object) -> str:  # a value as typed, cut short: a hostile config holds megabytes
            text = repr(v)
            return text if len(text) <= 60 else text[:57] + "..."

        if self.source not in SOURCES:
            raise DataError(f"unknown data source {_r(self.source)}; choose one of {', '.join(SOURCES)}")
        if self.augment not in AUGMENTS:
            raise DataError(f"unknown augment {_r(self.augment)}; choose one of {', '.join(AUGMENTS)}")
        if not (0.0 < float(self.train_fraction) <= 1.0):
            raise DataError(f"train_fraction must be in (0, 1], got {self.train_fraction}")
        if self.img_size is not None and (not isinstance(self.img_size, int) or self.img_size < 1):
            raise DataError(f"img_size must be a positive integer or None, got {_r(self.img_size)}")
        if not isinstance(self.workers, int) or self.workers < 0:
            raise DataError(f"workers must be a non-negative integer, got {_r(self.workers)}")
        if self.bad_files not in BAD_FILES:
            raise DataError(f"bad_files must be one of {', '.join(BAD_FILES)}, got {_r(self.bad_files)}")
        if isinstance(self.label_noise, bool) or not isinstance(self.label_noise, (int, float)) \
                or not 0.0 <= self.label_noise < 1.0:
            raise DataError(f"label_noise must be a number in [0, 1), got {_r(self.label_noise)}")
        if self.label_noise_kind not in ("symmetric", "pair"):
            raise DataError("label_noise_kind must be one of symmetric, pair, got "
                            f"{_r(self.label_noise_kind)}")
        if not (self.resident is True or self.resident is False or self.resident == "auto"):
            raise DataError(f"resident must be auto, true or false, got {_r(self.resident)}")
        check_split_name(self.val_split)


def check_split_name(name: str, key: str = "val_split") -> str:
    """``name`` if it names one folder inside the data root (no separators, not ``..``)."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
        raise DataError(f"{key} {name!r} must be the name of one folder inside the data root "
                        "(e.g. val or test), not a path")
    return name


def resolve_cache_dir(cache_dir: str = DEFAULT_CACHE_DIR) -> Path:
    """The cache folder: ``$VITSAM_CACHE`` when ``cache_dir`` is the default, else ``cache_dir``."""
    if cache_dir == DEFAULT_CACHE_DIR and os.environ.get(CACHE_ENV):
        cache_dir = os.environ[CACHE_ENV]
    return Path(cache_dir).expanduser()
