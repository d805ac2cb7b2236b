"""The GPU fast path: ``torch.compile``, channels_last ResNets and device-resident uint8 data.

Each is a setting that changes speed, not results (to float rounding: tests/test_fastpath.py):

- ``train.compile=true``: the module the optimiser steps drive is ``torch.compile(model)``
  (``train.compile_backend``, ``train.compile_mode``). The compiled wrapper shares the plain
  model's parameters and buffers, and checkpoints, evaluation and the analyses keep using the
  plain model, so saved weights carry the plain module's keys (no ``_orig_mod.`` prefix) and
  a compiled run resumes exactly like an uncompiled one. Under DDP the compiled model is
  wrapped (DDP stays outermost, where ``vitsam.optim.steps`` looks for it).
- ``train.channels_last``: ResNet weights and inputs in NHWC order, which cuDNN's convolution
  kernels prefer on tensor-core GPUs; ``auto`` = ResNets on CUDA (ViTs and Mixers have one
  convolution, the patch embedding, and gain nothing).
- ``data.resident``: a cached split (``ImageTensors``, uint8) copied once to the training
  device, so each batch is gathered, augmented and normalised there; the augmentation's random
  draws still come from CPU generators, so batches are the same as the default path's.
- ``optim.fused`` lives with the optimiser (``vitsam.optim.factory.use_fused``).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ..config import ConfigError, RunConfig, TrainConfig
from ..data.tensors import DataBundle, ImageFiles, ImageTensors
from ..optim.factory import is_switch

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
RESIDENT_SHARE = 0.25  # data.resident=auto: at most this share of the free GPU memory


def validate_fastpath(cfg: RunConfig) -> None:
    """One-line ConfigErrors for the fast-path settings."""
    t = cfg.train
    if not is_switch(t.channels_last):
        raise ConfigError(f"train.channels_last must be auto, true or false, got {t.channels_last!r}")
    if t.compile_mode is not None and t.compile_mode not in COMPILE_MODES:
        raise ConfigError(f"train.compile_mode must be one of {', '.join(COMPILE_MODES)} or none, "
                          f"got {t.compile_mode!r}")
    if t.compile_mode is not None and t.compile_backend != "inductor":
        raise ConfigError(f"train.compile_mode={t.compile_mode} is an option of the inductor "
                          f"backend, not of train.compile_backend={t.compile_backend}; set one")
    if t.compile and t.compile_backend != "inductor":
        import torch._dynamo

        known = torch._dynamo.list_backends(exclude_tags=())
        if t.compile_backend not in known:
            raise ConfigError(f"train.compile_backend={t.compile_backend!r} is not a torch.compile "
                              f"backend; choose one of inductor, {', '.join(sorted(known))}")


def use_channels_last(setting: bool | str, family: str, device: torch.device) -> bool:
    """Whether ``train.channels_last`` puts the model and its inputs in NHWC memory order."""
    if setting == "auto":
        return family == "resnet" and device.type == "cuda"
    return bool(setting)


def compile_model(model: nn.Module, t: TrainConfig) -> nn.Module:
    """``torch.compile(model)`` with the run's backend and mode (the module docstring)."""
    if t.compile_backend == "inductor":
        return torch.compile(model, mode=t.compile_mode)
    return torch.compile(model, backend=t.compile_backend)


def resident_bytes(bundle: DataBundle) -> int:
    """Bytes the images of a cached bundle take (train + test); 0 for image-file splits."""
    return sum(s.images.numel() for s in (bundle.train, bundle.test) if isinstance(s, ImageTensors))


def use_resident(setting: bool | str, bundle: DataBundle, device: torch.device) -> bool:
    """Whether ``data.resident`` keeps the bundle's uint8 images on ``device``.

    ``true`` with image files (a data set too large to cache) is a ConfigError; ``auto`` is on
    for cached data on CUDA taking at most ``RESIDENT_SHARE`` of the GPU's free memory.
    """
    if setting is False:
        return False
    cached = isinstance(bundle.train, ImageTensors)
    if setting is True:
        if not cached:
            raise ConfigError("data.resident=true needs images cached in memory, but this data "
                              "set is read from image files (too large to cache); set "
                              "data.resident=auto or false")
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if resident_bytes(bundle) > free:
                raise ConfigError(f"data.resident=true: the images take "
                                  f"{resident_bytes(bundle) / 2**30:.1f} GiB, more than the "
                                  f"{free / 2**30:.1f} GiB free on {device}; set data.resident=false")
        return True
    if not (cached and device.type == "cuda"):
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return resident_bytes(bundle) <= RESIDENT_SHARE * free


def resident_bundle(bundle: DataBundle, device: torch.device) -> DataBundle:
    """The bundle with its cached images on ``device`` (labels and ids stay where they are:
    they are small and also read on the host)."""
    def move(split: Any) -> Any:
        if isinstance(split, ImageFiles):
            return split
        return ImageTensors(split.images.to(device), split.labels, split.ids)

    return replace(bundle, train=move(bundle.train), test=move(bundle.test))
