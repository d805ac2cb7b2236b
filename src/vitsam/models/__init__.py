"""Model zoo (built on timm), model specs, and the hooks the analyses need."""
from __future__ import annotations

from typing import Any

from torch import nn

from .zoo import (MODELS, ModelError, ModelInfo, check_forward, count_params, create_model,
                  model_family)

__all__ = ["MODELS", "ModelError", "ModelInfo", "build_from_spec", "check_forward", "count_params",
           "create_model", "make_spec", "model_family"]


def make_spec(name: str, num_classes: int, img_size: int, in_chans: int,
              kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON description a checkpoint stores so the model can be rebuilt from it alone."""
    return {"name": name, "num_classes": num_classes, "img_size": img_size,
            "in_chans": in_chans, "kwargs": dict(kwargs or {})}


def build_from_spec(spec: dict[str, Any]) -> nn.Module:
    """Rebuild a (randomly initialised) model of exactly the shapes a checkpoint describes.

    ``spec["mlp_hidden"]`` (written for pruned models) resizes the named MLPs before the
    weights are loaded. ``spec["contrastive"]`` (pre-training runs) builds the model without
    its classifier inside ``vitsam.pretrain.simclr.ContrastiveNet``.
    """
    if spec.get("contrastive"):
        from ..pretrain.objective import build_model

        try:
            return build_model(spec)
        except KeyError as exc:
            raise ModelError(f"model spec lacks {exc}; the checkpoint's state.json is "
                             "incomplete") from None
    try:
        model = create_model(spec["name"], num_classes=spec["num_classes"],
                             img_size=spec["img_size"], in_chans=spec["in_chans"],
                             **spec.get("kwargs", {}))
    except KeyError as exc:
        raise ModelError(f"model spec lacks {exc}; the checkpoint's state.json is incomplete") from None
    if spec.get("mlp_hidden"):
        from .surgery import resize_mlp_hidden

        resize_mlp_hidden(model, spec["mlp_hidden"])
    return model
