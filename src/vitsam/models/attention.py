"""Explicit (non-fused) attention and capture of attention probabilities.

timm decides per module, when it is built, whether attention runs through the fused
``scaled_dot_product_attention`` kernel (``module.fused_attn``). The fused CPU kernel has no
double backward, so Hessian-vector products fail through it, and it never materialises the
probabilities, so hooks see nothing. Both context managers below switch the *built* modules to
timm's explicit path ``softmax(q k^T * scale) @ v`` for their duration; the numerics are the same
up to float rounding.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Named submodules that carry timm's ``fused_attn`` switch, in forward order."""
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "fused_attn")]


@contextmanager
def math_attention(model: nn.Module) -> Iterator[nn.Module]:
    """Run every attention module of ``model`` on the explicit softmax path, then restore."""
    mods = attention_modules(model)
    saved = [m.fused_attn for _, m in mods]
    try:
        for _, m in mods:
            m.fused_attn = False
        yield model
    finally:
        for (_, m), flag in zip(mods, saved):
            m.fused_attn = flag


@contextmanager
def capture_attention(model: nn.Module, detach: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Capture attention probabilities of every timm attention module during forward passes.

    Yields a dict filled on each forward: ``{module_name: probs}`` with probs of shape
    (batch, heads, tokens, tokens), rows summing to 1. The probabilities are taken from the input
    of the module's ``attn_drop`` submodule, which in timm's explicit path receives exactly
    ``softmax(q k^T * scale)``. Hooks are removed and the fused flags restored on exit.
    """
    captured: dict[str, torch.Tensor] = {}
    handles = []
    with math_attention(model):
        for name, mod in attention_modules(model):
            drop = getattr(mod, "attn_drop", None)
            if drop is None:
                continue

            def hook(_m: nn.Module, inputs: tuple, _out: torch.Tensor, key: str = name) -> None:
                captured[key] = inputs[0].detach() if detach else inputs[0]

            handles.append(drop.register_forward_hook(hook))
        try:
            yield captured
        finally:
            for h in handles:
                h.remove()
