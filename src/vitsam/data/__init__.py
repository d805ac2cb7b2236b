"""Data layer: sources, the uint8 tensor cache, batched augmentation and batch iterators.

Entry points: ``build_data(DataConfig(...)) -> DataBundle``, then ``train_batches`` /
``eval_batches`` / ``steps_per_epoch``; ``eval_view`` is the one evaluation preprocessing and
``save_data_record`` / ``load_data_record`` keep a run's statistics and preprocessing in its folder.
"""
from __future__ import annotations

from .build import build_data, channel_stats
from .config import DataConfig, resolve_cache_dir
from .errors import DataError
from .loader import epoch_generator, eval_batches, normalise, steps_per_epoch, train_batches
from .preprocess import eval_view
from .record import load_data_record, save_data_record
from .split import stratified_fraction, stratified_split
from .tensors import DataBundle, ImageFiles, ImageTensors

__all__ = [
    "DataBundle", "DataConfig", "DataError", "ImageFiles", "ImageTensors", "build_data", "channel_stats",
    "epoch_generator", "eval_batches", "eval_view", "load_data_record", "normalise", "resolve_cache_dir",
    "save_data_record", "steps_per_epoch", "stratified_fraction", "stratified_split", "train_batches",
]
