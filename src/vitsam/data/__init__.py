"""Data layer: sources, the uint8 tensor cache, batched augmentation and batch iterators.

Entry points: ``build_data(DataConfig(...)) -> DataBundle``, then ``train_batches`` /
``eval_batches`` / ``steps_per_epoch``.
"""
from __future__ import annotations

from .build import build_data, channel_stats
from .config import DataConfig, resolve_cache_dir
from .errors import DataError
from .loader import epoch_generator, eval_batches, normalise, steps_per_epoch, train_batches
from .split import stratified_fraction, stratified_split
from .tensors import DataBundle, ImageFiles, ImageTensors

__all__ = [
    "DataBundle", "DataConfig", "DataError", "ImageFiles", "ImageTensors", "build_data", "channel_stats",
    "epoch_generator", "eval_batches", "normalise", "resolve_cache_dir", "steps_per_epoch",
    "stratified_fraction", "stratified_split", "train_batches",
]
