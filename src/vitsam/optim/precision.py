"""Autocast for the training passes, with the CPU's 16-bit attention path chosen for speed."""
from __future__ import annotations

from contextlib import ExitStack, nullcontext
from typing import ContextManager

import torch


def autocast(device: torch.device, dtype: torch.dtype | None) -> ContextManager:
    """Autocast to ``dtype`` (None: none). On the CPU with a 16-bit dtype, attention also takes
    SDPA's math path: PyTorch's CPU flash-attention backward in bf16 is about 10x slower than in
    fp32 (2.1 s against 0.19 s over 3 steps of the 32 px ViT of bench_train_loop on a 2-core
    AMX Xeon), while the math path's batched matmuls run on the bf16 units (docs/benchmarks.md)."""
    if dtype is None:
        return nullcontext()
    cast = torch.autocast(device_type=device.type, dtype=dtype)
    if device.type != "cpu":
        return cast
    from torch.nn.attention import SDPBackend, sdpa_kernel

    stack = ExitStack()
    stack.enter_context(sdpa_kernel(SDPBackend.MATH))
    stack.enter_context(cast)
    return stack
