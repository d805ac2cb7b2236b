"""Named experiment presets: the paper's ImageNet recipes and small-scale studies.

Every preset also has a "smoke" size (``get_preset(name, smoke=True)``): a depth-1, narrow
version of the same model trained for a few steps on a slice of MNIST-5k, for tests.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import replace
from typing import Callable

from .config import ConfigError, ModelConfig, RunConfig, TrainConfig
from .data import DataConfig
from .models import MODELS
from .optim.factory import OptimConfig

# SAM radius per model from the paper (Table 8); ResNets use 0.05. Models the paper does not
# list take the value of the nearest listed sibling (same width, closest patch size).
PAPER_RHO = {"vit-s32": 0.05, "vit-s16": 0.1, "vit-b32": 0.15, "vit-b16": 0.2,
             "mixer-b32": 0.35, "mixer-b16": 0.6}
NEAREST_RHO = {"vit-s14": "vit-s16", "vit-s8": "vit-s16", "mixer-s32": "mixer-b32",
               "mixer-s16": "mixer-b16", "mixer-s8": "mixer-b16", "mixer-b8": "mixer-b16"}


def paper_rho(model: str) -> float:
    """SAM's rho for a paper model (0.05 for ResNets)."""
    if MODELS[model].family == "resnet":
        return 0.05
    return PAPER_RHO.get(model, PAPER_RHO.get(NEAREST_RHO.get(model, ""), 0.05))


def _imagenet(model: str, sam: bool) -> RunConfig:
    fam = MODELS[model].family
    data = DataConfig(source="imagefolder", root=None, img_size=224, augment="basic")
    if fam == "resnet":
        # The standard 90-epoch ResNet recipe, scaled linearly to batch 4096 (lr 0.1 per 256).
        optim = OptimConfig(name="sgd", lr=1.6, weight_decay=1e-4, momentum=0.9, sam=sam,
                            rho=paper_rho(model))
        train = TrainConfig(epochs=90, batch_size=4096, warmup_epochs=5, decay="cosine",
                            clip_norm=None, label_smoothing=0.0, eval_every_epochs=1)
    else:
        optim = OptimConfig(name="adamw", lr=3e-3, weight_decay=0.3, sam=sam, rho=paper_rho(model))
        train = TrainConfig(epochs=300, batch_size=4096, warmup_steps=10_000, decay="linear",
                            clip_norm=1.0, eval_every_epochs=1)
    tag = "-sam" if sam else ""
    desc = (f"Paper ImageNet recipe for {model}{' with SAM (rho=%g)' % optim.rho if sam else ''}; "
            "set data.root to an ImageFolder tree with train/ and val/")
    return RunConfig(name=f"in1k-{model}{tag}", description=desc, data=data,
                     model=ModelConfig(model), optim=optim, train=train)


# MNIST-5k studies: sizes cut so that the four demo runs fit ten minutes on 2 CPU cores. Patch 7
# (16 tokens) rather than 4 (49 tokens): on 4,000 digits and a few hundred steps a patch-4 ViT
# barely leaves chance level, while patch 7 learns and costs a third. The digits are centred,
# so these runs use no augmentation (random shifts are what a ViT of this size cannot absorb
# in so few steps; that is the convolution's inductive bias at work).
_SMALL_VIT = {"patch_size": 7, "depth": 4, "embed_dim": 96, "num_heads": 3}
_SMALL_MIXER = {"patch_size": 7, "num_blocks": 4, "embed_dim": 96}
_SMALL_RESNET = {"width": 16, "layers": [1, 1, 1, 1]}


def _small(prefix: str, data: DataConfig, family: str, sam: bool, epochs: float,
           batch: int) -> RunConfig:
    if family == "resnet":
        model = ModelConfig("resnet18-c", dict(_SMALL_RESNET) if prefix == "mnist" else {})
        optim = OptimConfig(name="sgd", lr=0.1, weight_decay=5e-4, sam=sam, rho=0.05)
        train = TrainConfig(epochs=epochs, batch_size=batch, warmup_epochs=1, decay="cosine",
                            clip_norm=None)
    else:
        name, kw = ("vit-t4", _SMALL_VIT) if family == "vit" else ("mixer-t4", _SMALL_MIXER)
        model = ModelConfig(name, dict(kw) if prefix == "mnist" else {})
        # The paper's smallest radii (ViT-S/32 0.05) suit the MNIST runs, which are far from
        # converged after 15 epochs; CIFAR-10 runs take ViT-S/16's 0.1 and Mixer 0.2.
        rho = 0.05 if prefix == "mnist" else (0.1 if family == "vit" else 0.2)
        optim = OptimConfig(name="adamw", lr=1e-3, weight_decay=0.05, sam=sam, rho=rho)
        train = TrainConfig(epochs=epochs, batch_size=batch, warmup_epochs=1, decay="cosine",
                            clip_norm=1.0)
    tag = "-sam" if sam else ""
    what = {"mnist": "embedded MNIST-5k (4,000 train / 1,000 test)",
            "c10": "CIFAR-10 JPEGs from ../shared/data (or data.source=cifar10 data.root=...)"}
    return RunConfig(name=f"{prefix}-{family}{tag}",
                     description=f"{model.name} {'+ SAM ' if sam else ''}on {what[prefix]}",
                     data=data, model=model, optim=optim, train=train)


def _at(cfg: RunConfig, eps: float) -> RunConfig:
    """``cfg`` with adversarial training: FGSM with random start (Wong et al. 2020) at radius
    ``eps`` (pixel units; MNIST digits 0.1, CIFAR-10 8/255), SAM's passes on the adversarial batch."""
    train = replace(cfg.train, adversarial="fgsm", adv_eps=eps)
    return replace(cfg, name=cfg.name + "-at", train=train,
                   description=f"{cfg.description}, adversarially trained (FGSM-RS, eps {eps:.4g})")


def _registry() -> dict[str, Callable[[], RunConfig]]:
    reg: dict[str, Callable[[], RunConfig]] = {}
    mnist = DataConfig(source="mnist5k", augment="none")
    c10 = DataConfig(source="cifar10-shared", augment="basic")
    for fam in ("vit", "mixer", "resnet"):
        for sam in (False, True):
            tag = "-sam" if sam else ""
            reg[f"mnist-{fam}{tag}"] = (lambda f=fam, s=sam: _small("mnist", mnist, f, s, 15, 128))
            reg[f"c10-{fam}{tag}"] = (lambda f=fam, s=sam: _small("c10", c10, f, s, 100, 128))
    for fam in ("vit", "mixer", "resnet"):
        for sam in (False, True):
            tag = "-sam" if sam else ""
            reg[f"mnist-{fam}{tag}-at"] = (lambda f=fam, s=sam: _at(_small("mnist", mnist, f, s, 15, 128), 0.1))
            reg[f"c10-{fam}{tag}-at"] = (lambda f=fam, s=sam: _at(_small("c10", c10, f, s, 100, 128), 8 / 255))
    for model, info in MODELS.items():
        if info.img_size == 224:
            for sam in (False, True):
                reg[f"in1k-{model}{'-sam' if sam else ''}"] = (
                    lambda m=model, s=sam: _imagenet(m, s))
    return reg


PRESETS: dict[str, Callable[[], RunConfig]] = _registry()


def smoke(cfg: RunConfig) -> RunConfig:
    """The smoke size of a preset: depth 1, narrow, 3 steps on 200 MNIST-5k digits."""
    info = MODELS.get(cfg.model.name)
    fam = info.family if info else "other"
    kw = dict(cfg.model.kwargs)
    patch = int(kw.get("patch_size", (info.args.get("patch_size", 4) if info else 4)))
    if fam == "vit":
        kw.update(depth=1, embed_dim=32, num_heads=2)
    elif fam == "mixer":
        kw.update(num_blocks=1, embed_dim=32)
    elif cfg.model.name == "resnet18-c":
        kw.update(width=8, layers=[1, 1, 1, 1])
    elif fam == "resnet":  # BiT ResNet-v2: GroupNorm(32) needs bottleneck widths of 32
        kw.update(layers=[1, 1, 1, 1], channels=[128, 128, 128, 128], stem_chs=32)
    img = patch * max(2, math.ceil(28 / patch)) if fam in ("vit", "mixer") else 28
    data = DataConfig(source="mnist5k", img_size=img, train_fraction=0.05,
                      augment=cfg.data.augment, seed=cfg.data.seed)
    train = replace(cfg.train, epochs=1, batch_size=32, max_steps=3, warmup_steps=1,
                    log_every_steps=1, train_eval_samples=200, precision="fp32")
    return replace(cfg, name=cfg.name + "-smoke", data=data,
                   model=ModelConfig(cfg.model.name, kw), train=train)


def get_preset(name: str, smoke_size: bool = False) -> RunConfig:
    """The preset ``name`` (its smoke size if ``smoke_size``)."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown preset {name!r}{hint}; run `vitsam presets` for the list")
    cfg = PRESETS[name]()
    return smoke(cfg) if smoke_size else cfg
