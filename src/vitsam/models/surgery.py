"""Structural edits of MLP blocks: physically removing hidden units, and re-creating pruned shapes.

An "MLP" here is any module shaped like timm's ``Mlp`` (``fc1 -> act -> drop1 -> norm -> fc2``)
with ``nn.Linear`` layers: ``blocks[i].mlp`` of a ViT, ``blocks[i].mlp_tokens`` and
``blocks[i].mlp_channels`` of an MLP-Mixer. Removing hidden unit ``j`` deletes row ``j`` of
``fc1`` (weight and bias) and column ``j`` of ``fc2``'s weight; ``fc2``'s bias is shared by all
units and stays.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn


class SurgeryError(ValueError):
    """A module that cannot be resized, or indices / sizes that do not fit it."""


def is_mlp(module: nn.Module) -> bool:
    """True for a timm-``Mlp``-like module whose ``fc1`` / ``fc2`` are ``nn.Linear``."""
    return (isinstance(getattr(module, "fc1", None), nn.Linear)
            and isinstance(getattr(module, "fc2", None), nn.Linear)
            and hasattr(module, "act"))


def mlp_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Named MLP submodules of ``model`` (see ``is_mlp``), in registration (= forward) order."""
    return [(name, mod) for name, mod in model.named_modules() if is_mlp(mod)]


def mlp_hidden_sizes(model: nn.Module) -> dict[str, int]:
    """``{module_path: hidden units}`` of every MLP, the ``mlp_hidden`` entry of a model spec."""
    return {name: mod.fc1.out_features for name, mod in mlp_modules(model)}


def _check_resizable(mlp: nn.Module, where: str) -> None:
    if not is_mlp(mlp):
        raise SurgeryError(f"{where} is not an MLP with nn.Linear fc1/act/fc2 "
                           f"(got {type(mlp).__name__}); only ViT/Mixer MLP blocks can be resized")
    if mlp.fc1.out_features != mlp.fc2.in_features:
        raise SurgeryError(f"{where}: fc1 has {mlp.fc1.out_features} outputs but fc2 takes "
                           f"{mlp.fc2.in_features} inputs; the MLP is inconsistent")
    norm = getattr(mlp, "norm", None)
    # A norm over the hidden units couples them, so removing one would change all the others.
    if norm is not None and not isinstance(norm, nn.Identity):
        raise SurgeryError(f"{where} normalises its hidden units ({type(norm).__name__}); "
                           "removing units would change the others, so it cannot be resized")


def _linear_like(ref: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    """A new Linear with ``ref``'s dtype, device, bias flag and trainability."""
    with warnings.catch_warnings():
        # A zero-width layer (every unit removed) is legal; its no-op init warning is noise.
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        lin = nn.Linear(in_features, out_features, bias=ref.bias is not None,
                        device=ref.weight.device, dtype=ref.weight.dtype)
    lin.requires_grad_(ref.weight.requires_grad)
    return lin


def shrink_mlp(mlp: nn.Module, keep: torch.Tensor) -> None:
    """Keep only hidden units ``keep`` of ``mlp``, in place, with physically smaller Linears.

    ``keep``: 1-D integer tensor of distinct unit indices in ``[0, hidden)`` (any order; the new
    units follow that order). ``fc1`` (in, H) -> (in, K) and ``fc2`` (H, out) -> (K, out), weights
    and biases copied, so the output equals the full MLP's with the other units' activations set
    to zero.
    """
    _check_resizable(mlp, "shrink_mlp target")
    hidden = mlp.fc1.out_features
    keep = torch.as_tensor(keep)
    if keep.ndim != 1 or keep.dtype.is_floating_point or keep.dtype == torch.bool:
        raise SurgeryError(f"keep must be a 1-D integer index tensor, got dtype {keep.dtype} "
                           f"and shape {tuple(keep.shape)}; use e.g. torch.nonzero(mask)[:, 0]")
    keep = keep.to(torch.long)
    if keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= hidden):
        raise SurgeryError(f"keep indices must lie in [0, {hidden}), got range "
                           f"[{int(keep.min())}, {int(keep.max())}]")
    if keep.unique().numel() != keep.numel():
        raise SurgeryError("keep contains repeated indices; each hidden unit can be kept once")
    fc1, fc2 = mlp.fc1, mlp.fc2
    idx = keep.to(fc1.weight.device)
    new1 = _linear_like(fc1, fc1.in_features, keep.numel())
    new2 = _linear_like(fc2, keep.numel(), fc2.out_features)
    with torch.no_grad():
        new1.weight.copy_(fc1.weight[idx])
        if fc1.bias is not None:
            new1.bias.copy_(fc1.bias[idx])
        new2.weight.copy_(fc2.weight[:, idx])
        if fc2.bias is not None:
            new2.bias.copy_(fc2.bias)
    mlp.fc1, mlp.fc2 = new1, new2


def resize_mlp_hidden(model: nn.Module, hidden: dict[str, int]) -> nn.Module:
    """Give each named MLP ``hidden[path]`` hidden units (fresh weights), in place; returns model.

    Used to rebuild a pruned model before loading its state dict: the model is created at full
    size, then resized here so every tensor shape matches the checkpoint.
    """
    for path, units in hidden.items():
        try:
            mlp = model.get_submodule(path)
        except AttributeError:
            raise SurgeryError(f"model has no submodule {path!r}; the mlp_hidden entry does not "
                               "match this architecture") from None
        _check_resizable(mlp, path)
        if not isinstance(units, int) or isinstance(units, bool) or units < 0:
            raise SurgeryError(f"hidden size for {path!r} must be an integer >= 0, got {units!r}")
        if units == mlp.fc1.out_features:
            continue
        fc1, fc2 = mlp.fc1, mlp.fc2
        mlp.fc1 = _linear_like(fc1, fc1.in_features, units)
        mlp.fc2 = _linear_like(fc2, units, fc2.out_features)
    return model
