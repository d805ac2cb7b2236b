"""Model state for derivative-based analyses (Hessian, NTK): analysis mode in, all restored out."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from vitsam.models.attention import math_attention
from vitsam.models.modes import restore_modes


def is_stochastic(module: nn.Module) -> bool:
    """Dropout-like modules, kept in eval mode even for train-mode statistics."""
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return True
    name = type(module).__name__
    return "DropPath" in name or "DropBlock" in name


@contextmanager
def analysis_state(model: nn.Module, train_mode: bool = False) -> Iterator[nn.Module]:
    """Run ``model`` in analysis mode, then restore its modes, buffers, flags and RNG state.

    Inside: eval mode (or train mode for normalisation statistics with dropout-like modules
    still off when ``train_mode``), explicit softmax attention (the fused CPU kernel has no
    double backward or forward-mode rule). On exit every module's ``training`` flag, every
    buffer (BatchNorm running statistics move in train mode), the fused-attention flags and the
    CPU/CUDA RNG states are put back.
    """
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        with restore_modes(model), math_attention(model):
            model.train(train_mode)
            if train_mode:
                for m in model.modules():
                    if is_stochastic(m):
                        m.eval()
            yield model
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
