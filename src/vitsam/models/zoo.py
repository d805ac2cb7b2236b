"""The paper's model zoo by name, built on timm.

Widths, depths and patch sizes follow the paper's Table 1 (ViT-S/B, Mixer-S/B) and the BiT-style
ResNet-v2 it compares against (pre-activation, weight-standardised convolutions, GroupNorm).
Small-image variants (patch 4, or a 3x3 stem without max-pool) let the same study run on 28-64 px
data. Any other timm model name is passed through to ``timm.create_model``.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import timm
import torch
from timm.layers import GroupNormAct, StdConv2d
from timm.models.mlp_mixer import MlpMixer
from timm.models.resnet import BasicBlock, ResNet
from timm.models.resnetv2 import ResNetV2
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .modes import eval_mode


class ModelError(ValueError):
    """An unknown model name or arguments that do not fit the model."""


@dataclass(frozen=True)
class ModelInfo:
    """One named architecture: its family, timm arguments and the image size it is meant for."""

    name: str
    family: str  # "vit" | "mixer" | "resnet"
    args: dict[str, Any]
    img_size: int
    description: str
    builder: Callable[..., nn.Module] = field(repr=False, default=None)  # type: ignore[assignment]


def _vit(num_classes: int, img_size: int, in_chans: int, **kw: Any) -> nn.Module:
    patch = kw.get("patch_size", 16)
    if img_size % patch:
        raise ModelError(f"img_size {img_size} is not divisible by patch size {patch}; "
                         f"choose an image size that is a multiple of {patch}")
    kw.setdefault("mlp_ratio", 4.0)
    return VisionTransformer(img_size=img_size, num_classes=num_classes, in_chans=in_chans,
                             class_token=True, global_pool="token", **kw)


def _mixer(num_classes: int, img_size: int, in_chans: int, **kw: Any) -> nn.Module:
    patch = kw.get("patch_size", 16)
    if img_size % patch:
        raise ModelError(f"img_size {img_size} is not divisible by patch size {patch}; "
                         f"choose an image size that is a multiple of {patch}")
    return MlpMixer(img_size=img_size, num_classes=num_classes, in_chans=in_chans, **kw)


def _bit_resnet(num_classes: int, img_size: int, in_chans: int, small_stem: bool = False,
                **kw: Any) -> nn.Module:
    model = ResNetV2(num_classes=num_classes, in_chans=in_chans, stem_type="fixed",
                     conv_layer=StdConv2d, norm_layer=partial(GroupNormAct, num_groups=32), **kw)
    if small_stem:
        stem_chs = model.stem.conv.out_channels
        model.stem.conv = StdConv2d(in_chans, stem_chs, kernel_size=3, stride=1, padding=1)
        model.stem.pad = nn.Identity()
        model.stem.pool = nn.Identity()
    return model


def _cifar_resnet(num_classes: int, img_size: int, in_chans: int, width: int = 64,
                  layers: tuple[int, ...] = (2, 2, 2, 2), **kw: Any) -> nn.Module:
    """BatchNorm ResNet with a 3x3 stride-1 stem and no max-pool (the usual CIFAR ResNet)."""
    if width < 2 or width % 2:
        raise ModelError(f"width must be an even integer >= 2, got {width!r}")
    chans = tuple(width * 2**i for i in range(len(layers)))
    # timm's 'deep' stem sizes the stem output (and bn1) as 2 * stem_width; its convolutions
    # are then replaced by the single 3x3 stride-1 convolution of the CIFAR ResNet.
    model = ResNet(BasicBlock, layers=tuple(layers), num_classes=num_classes, in_chans=in_chans,
                   channels=chans, stem_type="deep", stem_width=width // 2, **kw)
    model.conv1 = nn.Conv2d(in_chans, width, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def _registry() -> dict[str, ModelInfo]:
    reg: dict[str, ModelInfo] = {}

    def add(name: str, family: str, builder: Callable[..., nn.Module], img: int, desc: str,
            **args: Any) -> None:
        reg[name] = ModelInfo(name, family, args, img, desc, builder)

    vit_widths = {"t": (192, 12, 3), "s": (384, 12, 6), "b": (768, 12, 12)}
    for size, patches in (("s", (32, 16, 14, 8)), ("b", (32, 16))):
        dim, depth, heads = vit_widths[size]
        for p in patches:
            add(f"vit-{size}{p}", "vit", _vit, 224, f"ViT-{size.upper()}/{p} (paper)",
                patch_size=p, embed_dim=dim, depth=depth, num_heads=heads)
    mixer_widths = {"t": (256, 8), "s": (512, 8), "b": (768, 12)}
    for size, patches in (("s", (32, 16, 8)), ("b", (32, 16, 8))):
        dim, depth = mixer_widths[size]
        for p in patches:
            add(f"mixer-{size}{p}", "mixer", _mixer, 224, f"Mixer-{size.upper()}/{p} (paper)",
                patch_size=p, embed_dim=dim, num_blocks=depth)
    for depth, layers in ((50, [3, 4, 6, 3]), (101, [3, 4, 23, 3]), (152, [3, 8, 36, 3])):
        for wf in (1, 2):
            name = f"resnet{depth}" + ("x2" if wf == 2 else "")
            add(name, "resnet", _bit_resnet, 224,
                f"BiT ResNet-v2 {depth}x{wf} (paper; GroupNorm, weight standardisation)",
                layers=layers, width_factor=wf)
    # Small-image variants (28-64 px): patch 4, or a 3x3 stem without max-pool.
    for size in ("t", "s"):
        dim, depth, heads = vit_widths[size]
        add(f"vit-{size}4", "vit", _vit, 32, f"ViT-{size.upper()}/4 for small images",
            patch_size=4, embed_dim=dim, depth=depth, num_heads=heads)
        dim, depth = mixer_widths[size]
        add(f"mixer-{size}4", "mixer", _mixer, 32, f"Mixer-{size.upper()}/4 for small images",
            patch_size=4, embed_dim=dim, num_blocks=depth)
    add("resnet18-c", "resnet", _cifar_resnet, 32,
        "ResNet-18 with BatchNorm, 3x3 stem, no max-pool (small images)", layers=[2, 2, 2, 2])
    add("resnet26v2-c", "resnet", _bit_resnet, 32,
        "BiT ResNet-v2 26 (GroupNorm, WS) with 3x3 stem, no max-pool (small images)",
        layers=[2, 2, 2, 2], small_stem=True)
    return reg


MODELS: dict[str, ModelInfo] = _registry()


def create_model(name: str, num_classes: int = 1000, img_size: int = 224, in_chans: int = 3,
                 **kwargs: Any) -> nn.Module:
    """Build a model by vitsam name (see ``MODELS``) or any timm name, randomly initialised.

    ``kwargs`` override the named architecture's arguments (e.g. ``depth=1, embed_dim=64`` for a
    ViT, ``num_blocks=1`` for a Mixer, ``width=16`` for ``resnet18-c``). Input (B, in_chans,
    img_size, img_size) -> logits (B, num_classes).
    """
    for key, val in (("num_classes", num_classes), ("img_size", img_size), ("in_chans", in_chans)):
        if not isinstance(val, int) or val <= 0:
            raise ModelError(f"{key} must be a positive integer, got {val!r}")
    info = MODELS.get(name)
    if info is None:
        if timm.is_model(name):
            return _timm_model(name, num_classes, img_size, in_chans, kwargs)
        close = difflib.get_close_matches(name, list(MODELS), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        shown = repr(name) if len(repr(name)) <= 60 else repr(name)[:57] + "..."  # a damaged file: huge
        raise ModelError(f"unknown model {shown}{hint}; run `vitsam models` for the list, "
                         "or give any timm model name")
    args = {**info.args, **kwargs}
    try:
        return info.builder(num_classes, img_size, in_chans, **args)
    except ModelError:
        raise
    except _BUILD_ERRORS as exc:
        raise ModelError(f"cannot build model {name!r} with {_show(kwargs)}: "
                         f"{_first_line(exc)}; change model.kwargs") from None


# What architecture constructors (timm's included) raise for arguments that do not fit, e.g.
# ``assert dim % num_heads == 0`` or a negative depth.
_BUILD_ERRORS = (TypeError, ValueError, AssertionError, RuntimeError, ZeroDivisionError,
                 IndexError, KeyError)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _show(kwargs: dict[str, Any]) -> str:
    """The arguments for a one-line message (a long value, e.g. from a damaged file, shortened)."""
    def short(v: Any) -> str:
        text = repr(v)
        return text if len(text) <= 60 else text[:57] + "..."

    return ", ".join(f"{k}={short(v)}" for k, v in kwargs.items()) if kwargs else "its defaults"


def _timm_model(name: str, num_classes: int, img_size: int, in_chans: int,
                kwargs: dict[str, Any]) -> nn.Module:
    """A timm architecture; ``img_size`` is passed to those whose constructor takes it (ViTs,
    Swin, ...), since their position embeddings or windows are sized from it."""
    common = {"pretrained": False, "num_classes": num_classes, "in_chans": in_chans}
    try:
        if "img_size" not in kwargs:
            try:
                return timm.create_model(name, img_size=img_size, **common, **kwargs)
            except TypeError as exc:
                if "img_size" not in str(exc):
                    raise
        return timm.create_model(name, **common, **kwargs)
    except _BUILD_ERRORS as exc:
        raise ModelError(f"cannot build timm model {name!r} for {in_chans}-channel "
                         f"{img_size}px images with {_show(kwargs)}: "
                         f"{_first_line(exc)}") from None


def check_forward(model: nn.Module, name: str, num_classes: int, img_size: int,
                  in_chans: int) -> None:
    """Run a zero batch (2, in_chans, img_size, img_size) through ``model`` (eval mode, no
    gradients, RNG untouched) and check it returns logits (2, num_classes).

    Architectures that cannot take the data's images (too small for their down-sampling, a
    fixed input size) then fail here, in one line, instead of deep inside the first step.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    try:
        with eval_mode(model), torch.no_grad():
            out = model(torch.zeros(2, in_chans, img_size, img_size, device=device))
    except _BUILD_ERRORS as exc:
        native = MODELS[name].img_size if name in MODELS else \
            (getattr(model, "pretrained_cfg", None) or {}).get("input_size", [None, None])[-1]
        hint = f" (it is meant for {native}px)" if native else ""
        raise ModelError(f"model {name!r} cannot take {in_chans}-channel {img_size}px images"
                         f"{hint}: {_first_line(exc)}; set data.img_size to a size it accepts "
                         "or choose another model") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"model {name!r} returns {got} for a batch of 2 images, not logits "
                         f"(2, {num_classes}); choose a classification model")


def count_params(model: nn.Module) -> int:
    """Number of parameters (all, trainable or not)."""
    return sum(p.numel() for p in model.parameters())


def model_family(name: str) -> str:
    """'vit' | 'mixer' | 'resnet' | 'other' for a model name."""
    if name in MODELS:
        return MODELS[name].family
    for fam in ("vit", "mixer", "resnet"):
        if fam in name:
            return fam
    return "other"
