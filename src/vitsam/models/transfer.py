"""Weights of one model carried into another of the same architecture built for other data.

``transfer_weights(src, dst, keep_head)`` copies every tensor of ``src`` into ``dst`` and adapts
the three that depend on the data rather than on the architecture:

* the classifier (``dst.get_classifier()``, timm's; ``head`` of a ViT or Mixer, ``fc`` /
  ``head.fc`` of a ResNet) keeps ``dst``'s fresh initialisation unless ``keep_head`` (same
  classes in the same order), so a new class count needs nothing else;
* a ViT's absolute position embedding (``pos_embed``, (1, prefix + H*W, D)) is resampled to
  ``dst``'s patch grid with timm's ``resample_abs_pos_embed`` (bicubic, antialiased; the class
  token's position is kept as it is), which returns the table unchanged at the same grid;
* the first convolution, when the data has another number of channels, goes through timm's
  ``adapt_input_conv`` (RGB -> grey sums the colour filters; other counts repeat and rescale).

Anything else that differs (another depth or width, a Mixer's token-mixing MLPs, which are sized
for one number of patches) is a one-line ``TransferError`` naming the tensor.
"""
from __future__ import annotations

from typing import Any

import torch
from timm.layers import resample_abs_pos_embed
from timm.models import adapt_input_conv
from torch import nn


class TransferError(ValueError):
    """A source model whose weights cannot be carried into the target model."""


def resample_pos_embed(pos: torch.Tensor, grid: tuple[int, int], prefix_tokens: int) -> torch.Tensor:
    """(1, prefix + h*w, D) -> (1, prefix + grid[0]*grid[1], D) (square source grid).

    Identity when the grid is unchanged; otherwise the patch positions are interpolated
    bicubically (antialiased when shrinking) and the prefix (class token) positions kept.
    """
    side = int(round((pos.shape[1] - prefix_tokens) ** 0.5))
    if side * side != pos.shape[1] - prefix_tokens:
        raise TransferError(f"position embedding of {pos.shape[1]} positions is not {prefix_tokens} "
                            "+ a square grid; it cannot be resampled")
    return resample_abs_pos_embed(pos, new_size=list(grid), old_size=[side, side],
                                  num_prefix_tokens=prefix_tokens, interpolation="bicubic",
                                  antialias=True)


def classifier_keys(model: nn.Module) -> set[str]:
    """State-dict names of the classifier's tensors (timm's ``get_classifier()``)."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Module):
        return set()
    for name, mod in model.named_modules():
        if mod is head and name:
            return {f"{name}.{k}" for k in head.state_dict()}
    return set()


def _first_conv(model: nn.Module) -> str | None:
    """The state-dict name of the first Conv2d's weight (the one that sees the image)."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            return f"{name}.weight"
    return None


def transfer_weights(src: nn.Module, dst: nn.Module, keep_head: bool) -> dict[str, Any]:
    """Copy ``src``'s weights into ``dst`` in place (see the module docstring).

    Returns what was adapted: ``{"head": "kept" | "new", "pos_embed": [old grid, new grid] or
    None, "in_chans": [old, new] or None}``.
    """
    s, d = src.state_dict(), dst.state_dict()
    head = classifier_keys(dst)
    conv = _first_conv(dst)
    extra = sorted(set(s) - set(d) - head)
    if extra:
        raise TransferError(f"the source model has {extra[0]}, which the new model does not; "
                            "the architectures differ")
    out: dict[str, Any] = {"head": "kept" if keep_head else "new", "pos_embed": None,
                           "in_chans": None}
    new: dict[str, torch.Tensor] = {}
    for key, want in d.items():
        if key in head and not keep_head:
            continue
        if key not in s:
            raise TransferError(f"the source model has no {key}; the architectures differ")
        have = s[key]
        if have.shape == want.shape:
            new[key] = have
        elif key.split(".")[-1] == "pos_embed" and have.ndim == 3 and have.shape[-1] == want.shape[-1]:
            prefix = int(getattr(dst, "num_prefix_tokens", 1))
            grid = tuple(dst.patch_embed.grid_size)
            new[key] = resample_pos_embed(have, grid, prefix)
            out["pos_embed"] = [int(round((have.shape[1] - prefix) ** 0.5)), list(grid)]
        elif key == conv and have.ndim == 4 and have.shape[0] == want.shape[0] \
                and have.shape[2:] == want.shape[2:]:
            new[key] = adapt_input_conv(want.shape[1], have, base_chans=have.shape[1])
            out["in_chans"] = [have.shape[1], want.shape[1]]
        elif key in head:
            raise TransferError(f"the classifier {key} is {tuple(have.shape)} in the source and "
                                f"{tuple(want.shape)} in the new model; it can only be kept for "
                                "the same classes")
        else:
            why = (" (a Mixer's token-mixing MLPs are sized for one number of patches: fine-tune "
                   "it at the source's image size)" if "mlp_tokens" in key else "")
            raise TransferError(f"{key} is {tuple(have.shape)} in the source model and "
                                f"{tuple(want.shape)} in the new one{why}")
    with torch.no_grad():
        for key, t in new.items():
            d[key].copy_(t)
    return out
