"""Studies: the paper's comparisons as presets of presets.

A study is a grid of cells (each a ``RunConfig`` built from a run preset plus overrides) and the
stages run on every cell's run folder after training (analyses, corruption accuracy,
throughput). Scales size the same grid for a budget:

    smoke  seconds: the presets' smoke sizes on sklearn's 8x8 digits (CI)
    cpu    2 CPU cores: CIFAR-10, 200 images per class, small matched models (see CPU_REASONING)
    gpu    one GPU: full CIFAR-10 with the c10 presets
    paper  the paper's ImageNet recipes (set --root to an ImageFolder tree)

Cell names are ``<family>-<method>[-f<fraction>]-s<seed>``; the method is ``vanilla``, ``sam``,
``aug`` (strong augmentation: RandAugment + Mixup), ``sam-aug``, or one of the cheaper SAM
variants ``looksam``, ``sam-on`` and ``random`` (``vitsam.optim.variants``, at their defaults:
LookSAM k = 5, alpha = 0.7; SAM on a random fifth of the steps, the same expected cost), or
adversarial training ``at`` and ``sam-at`` (FGSM-RS, ``vitsam.optim.adversarial``). A cell on the whole training
set has no fraction in its name, so ``augment``'s fraction-1 vanilla and SAM cells are ``main``'s
cells and a study folder holding both trains them once.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

from ..config import ConfigError, RunConfig, apply_overrides
from ..presets import get_preset

SCALES = ("smoke", "cpu", "gpu", "paper")
FAMILIES = ("resnet", "vit", "mixer")
METHODS = ("vanilla", "sam", "aug", "sam-aug")
VARIANT_METHODS = ("looksam", "sam-on", "random")  # each its optim.sam_variant
AT_METHODS = ("at", "sam-at")  # adversarial training (FGSM-RS), alone and with SAM
SAM_METHODS = ("sam", "sam-aug", *VARIANT_METHODS, "sam-at")
FRACTIONS = (1.0, 0.5, 0.25, 0.1)

# Why the cpu scale looks the way it does (measured on the shared CIFAR-10, one thread a run):
# SAM helps once a model fits its training data; a ViT that still underfits pays SAM's cost
# without its benefit. On 2 cores an hour buys about a dozen 4-12 minute runs, so the training
# set is cut to 2,000 images (200 per class). Patch 8 (16 tokens of a 32 px image) rather than 4
# (64 tokens) makes a ViT step 3-4x cheaper. With pad-crop + flip that ViT reached only 66%
# clean training accuracy after 100 epochs (42% test), so the cpu scale trains without
# augmentation, where it memorises its 2,000 images within 60 epochs (100% train): the paper's
# regime of a ViT without strong augmentation converging to a sharp minimum. The Mixer uses the
# same patches and width; the ResNet-18 is cut to one block per stage at 1/4 width (0.31M
# parameters, against the ViT's 1.2M and the Mixer's 0.83M: the widest ResNet that costs about
# what the ViT costs per step). rho follows the paper's ordering (Mixer > ViT > ResNet).
CPU_REASONING = (
    "CIFAR-10 at 200 images per class (2,000 training images, full 10,000-image test set), "
    "60 epochs, no augmentation, batch 128; ViT d128 L6 patch 8 (1.2M), Mixer d128 L6 patch 8 "
    "(0.83M), ResNet-18 with one block per stage at 1/4 width (0.31M); chosen so that vanilla "
    "ViT reaches 100% training accuracy, the regime where SAM can show its effect")

_CPU_MODEL = {
    "vit": {"patch_size": 8, "depth": 6, "embed_dim": 128, "num_heads": 4},
    "mixer": {"patch_size": 8, "num_blocks": 6, "embed_dim": 128},
    "resnet": {"width": 16, "layers": [1, 1, 1, 1]},
}
_CPU_RHO = {"vit": 0.1, "mixer": 0.2, "resnet": 0.05}
CPU_IMAGES = 2000  # training images at fraction 1 (CIFAR-10 has 50,000)


@dataclass(frozen=True)
class Cell:
    """One run of a study: its folder name, config and the coordinates it fills in a table."""

    name: str
    config: RunConfig
    family: str
    method: str
    seed: int
    fraction: float = 1.0

    def key(self) -> tuple[str, str, float]:
        """The table row this cell is a seed of."""
        return (self.family, self.method, self.fraction)


@dataclass(frozen=True)
class StageSettings:
    """How much each post-training stage measures at one scale (analysis ``--set`` settings)."""

    batches: int = 4
    batch_size: int = 64
    hessian: tuple[str, ...] = ("hessian.k=1", "hessian.trace_probes=0", "hessian.tol=0.01")
    ntk: tuple[str, ...] = ("ntk.num_inputs=64",)
    ntk_seeds: int = 3  # re-initialisations per cell; cell seed s uses seeds n*s .. n*s+n-1
    corrupt_limit: int | None = 1000  # test images in the study's shared -C set
    corrupt_params: str = "cifar-c"
    corruptions: tuple[str, ...] | None = None  # None: all 15
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)
    landscape: tuple[str, ...] = ("landscape.dims=1", "landscape.steps=11", "landscape.max_batches=2")
    # Per block: lambda_max and a Hutchinson trace of each block's Hessian (and of the whole one,
    # so that the blocks' traces can be checked against it).
    blocks: tuple[str, ...] = ("hessian.per_block=true", "hessian.k=1", "hessian.tol=0.01",
                               "hessian.trace_probes=8")
    trajectory: tuple[str, ...] = ("trajectory.steps=15",)
    # Transfer: each cell's last checkpoint fine-tuned on another dataset (vitsam finetune's
    # recipe: SGD, momentum 0.9, lr 0.01, new head) with these overrides, at the source's size.
    transfer_data: str = "mnist5k"
    transfer: tuple[str, ...] = ("train.epochs=10", "train.eval_every_epochs=10",
                                 "train.ckpt_every_epochs=10", "train.threads=1",
                                 "data.augment=none")
    # robust: PGD at the cell's training radius (8/255 for cells trained without an attack)
    attack_steps: int = 20
    attack_restarts: int = 1
    attack_samples: int | None = 1000


@dataclass(frozen=True)
class Study:
    """A named grid of cells with the stages to run on each cell after training."""

    name: str
    description: str
    grid: Callable[[str, Sequence[int]], list[Cell]]
    stages: tuple[str, ...]
    columns: tuple[str, ...]
    settings: Callable[[str], StageSettings] = field(default=lambda scale: StageSettings())
    reuses: str | None = None  # a study whose cells (same name and config) may be reused
    notes: dict[str, str] = field(default_factory=dict)  # scale -> its own SCALE_NOTES line


def _base(family: str, method: str, scale: str) -> RunConfig:
    sam = method in SAM_METHODS
    if scale == "smoke":
        # The presets' smoke sizes on sklearn's 8x8 digits (patch 4: 4 tokens), so that a
        # whole grid with its analyses runs in seconds.
        cfg = get_preset(f"mnist-{family}{'-sam' if sam else ''}", smoke_size=True)
        kw = dict(cfg.model.kwargs)
        if family != "resnet":
            kw["patch_size"] = 4
        cfg = replace(cfg, model=replace(cfg.model, kwargs=kw),
                      data=replace(cfg.data, source="digits", img_size=8, train_fraction=0.25),
                      train=replace(cfg.train, train_eval_samples=100))
    elif scale == "paper":
        model = {"vit": "vit-b16", "mixer": "mixer-b16", "resnet": "resnet152"}[family]
        cfg = get_preset(f"in1k-{model}{'-sam' if sam else ''}")
    else:
        cfg = get_preset(f"c10-{family}{'-sam' if sam else ''}")
    if scale == "cpu":
        kw = dict(cfg.model.kwargs)
        kw.update(_CPU_MODEL[family])
        cfg = replace(cfg, model=replace(cfg.model, kwargs=kw),
                      optim=replace(cfg.optim, rho=_CPU_RHO[family]),
                      data=replace(cfg.data, train_fraction=CPU_IMAGES / 50000, augment="none"),
                      train=replace(cfg.train, epochs=60, threads=1, eval_every_epochs=10,
                                    ckpt_every_epochs=10))
    if method in ("aug", "sam-aug"):
        cfg = replace(cfg, data=replace(cfg.data, augment="strong"))
    if method in VARIANT_METHODS:
        cfg = replace(cfg, optim=replace(cfg.optim, sam_variant=method))
    if method in AT_METHODS:
        cfg = _adversarial(cfg, family, scale)
    return cfg


def _cell(family: str, method: str, seed: int, scale: str, fraction: float = 1.0) -> Cell:
    cfg = _base(family, method, scale)
    if fraction != 1.0:
        cfg = replace(cfg, data=replace(cfg.data, train_fraction=cfg.data.train_fraction * fraction))
    name = f"{family}-{method}" + (f"-f{fraction:g}" if fraction != 1.0 else "") + f"-s{seed}"
    cfg = replace(cfg, name=name, train=replace(cfg.train, seed=seed))
    return Cell(name, cfg, family, method, seed, fraction)


def _main_grid(scale: str, seeds: Sequence[int]) -> list[Cell]:
    return [_cell(f, m, s, scale) for f in FAMILIES for m in ("vanilla", "sam") for s in seeds]


def _final_eval_only(cell: Cell) -> Cell:
    """``cell`` evaluating the test set once, at its last step. The data-size table reads only
    final accuracies, and at the cpu scale one pass over the 10,000 test images costs about
    what 10 epochs of 2,000 training images do, so six evaluations would cost as much as the
    training of a 1/10 cell. Cells shared with ``main`` keep their schedule (and fingerprint)."""
    t = cell.config.train
    return replace(cell, config=replace(cell.config, train=replace(t, eval_every_epochs=t.epochs)))


def _augment_grid(scale: str, seeds: Sequence[int]) -> list[Cell]:
    fracs = FRACTIONS if scale != "smoke" else (1.0, 0.5)
    cells = [_cell(f, m, s, scale, fr) for fr in fracs for f in FAMILIES for m in METHODS
             for s in seeds]
    return [c if (c.fraction == 1.0 and c.method in ("vanilla", "sam")) else _final_eval_only(c)
            for c in cells]


def _inside_grid(scale: str, seeds: Sequence[int]) -> list[Cell]:
    return [_cell(f, m, s, scale) for f in ("vit", "mixer") for m in ("vanilla", "sam")
            for s in seeds]


def _sharpness_grid(scale: str, seeds: Sequence[int]) -> list[Cell]:
    cells = []
    for f in ("vit", "resnet"):
        for m in ("vanilla", "sam"):
            for s in seeds:
                c = _cell(f, m, s, scale)
                # Its own folder name: the checkpoint settings differ from main's cells.
                c = replace(c, name=f"{f}-{m}-ckpts-s{s}", config=replace(
                    c.config, name=f"{f}-{m}-ckpts-s{s}"))
                t = c.config.train
                # A checkpoint every tenth of the run, all kept: the curvature curve's points.
                every = (1 / 45) if scale == "smoke" else t.epochs / 10  # smoke: every step
                cells.append(replace(c, config=replace(c.config, train=replace(
                    t, ckpt_every_epochs=every, keep_checkpoints=1000))))
    return cells


NOISE_RATE = 0.2


def _noise_grid(scale: str, seeds: Sequence[int]) -> list[Cell]:
    """main's cells with a fifth of the training labels replaced (symmetric noise, the data
    seed's draw: every cell sees the same wrong labels)."""
    cells = []
    for c in _main_grid(scale, seeds):
        name = f"{c.family}-{c.method}-noise{NOISE_RATE:g}-s{c.seed}"
        cfg = replace(c.config, name=name, data=replace(c.config.data, label_noise=NOISE_RATE))
        cells.append(replace(c, name=name, config=cfg))
    return cells


def _variants_grid(scale: str, seeds: Sequence[int]) -> list[Cell]:
    return [_cell(f, m, s, scale) for f in ("vit", "mixer")
            for m in ("vanilla", "sam", *VARIANT_METHODS) for s in seeds]


# Adversarial training (FGSM with random start, Wong et al. 2020: about 2 passes a step, 3 with
# SAM), robust accuracy under PGD at the training radius. MNIST-like digits take the radius 0.1
# (the usual 0.3 is beyond models this small trained this briefly); CIFAR-10 the usual 8/255.
ADV_EPS = {"smoke": 0.1, "cpu": 8 / 255, "gpu": 8 / 255, "paper": 4 / 255}
# cpu scale: about 30 minutes on this 2-core machine for all six cells and their PGD
# evaluations. Measured (bench/bench_adversarial.py --quick, one
# thread, batch 128, the machine shared, load 6-8; docs/benchmarks.md), CPU ms per step
# vanilla / AT / SAM+AT: ViT 335 / 660 / 1058, Mixer 238 / 429 / 587, ResNet 285 / 520 / 755
# (wall ms about twice that under that load). Main's 60 epochs of 2,000 images (900 steps)
# would cost 6-33 minutes a cell, so these cells train 1,000 images (100 per class) for 30
# epochs: 210 steps, 1.5-8 minutes a cell, about 14 minutes of steps in CPU time for the six
# (26 at the measured wall times) plus about a minute a cell besides (measured, same load:
# the final evaluation on the 10,000 test images 8-43 s, PGD-10 on 500 of them 11 s): about 32
# minutes one cell at a time under that load; ``--workers 2`` roughly halves it. At this budget AT reaches little robustness: the numbers compare AT and SAM+AT at a
# tiny budget, not the literature's CIFAR-10 robust accuracies.
ADV_CPU = {"images": 1000, "epochs": 30}
ADVERSARIAL_REASONING = (
    f"CIFAR-10 at {ADV_CPU['images'] // 10} images per class ({ADV_CPU['images']:,} training "
    f"images, full 10,000-image test set), {ADV_CPU['epochs']} epochs of FGSM-RS adversarial "
    "training at eps 8/255 (step 1.25 eps), no augmentation, batch 128; main's cpu-scale models "
    "and SAM radii; PGD-10 at 8/255 on 500 test images; half main's images and epochs because an "
    "AT step costs about 2x a plain one and SAM+AT 2.5-3.2x (docs/benchmarks.md)")


def _adversarial(cfg: RunConfig, family: str, scale: str) -> RunConfig:
    train = replace(cfg.train, adversarial="fgsm", adv_eps=ADV_EPS[scale])
    data = cfg.data
    if scale == "cpu":
        train = replace(train, epochs=ADV_CPU["epochs"], eval_every_epochs=ADV_CPU["epochs"],
                        ckpt_every_epochs=10)
        data = replace(data, train_fraction=ADV_CPU["images"] / 50000)
    return replace(cfg, train=train, data=data)


def _adversarial_grid(scale: str, seeds: Sequence[int]) -> list[Cell]:
    return [_cell(f, m, s, scale) for f in FAMILIES for m in AT_METHODS for s in seeds]


# The demo: the paper's story in minutes on 2 cores. The ViT pair trains long enough to fit its
# 4,000 digits (a ViT that still underfits shows SAM as a cost, not as the paper's gain); the
# ResNet pair keeps the preset's 15 epochs, where it already fits. The table reads lambda_max
# beside the accuracies (one cheap Lanczos run per model).
DEMO_EPOCHS = {"vit": 40, "resnet": 15}
DEMO_RHO = {"vit": 0.1, "resnet": 0.05}


def _demo_grid(scale: str, seeds: Sequence[int]) -> list[Cell]:
    cells = []
    for fam in ("vit", "resnet"):
        for m in ("vanilla", "sam"):
            for s in seeds:
                name = f"mnist-{fam}{'-sam' if m == 'sam' else ''}"
                cfg = get_preset(name, smoke_size=scale == "smoke")
                if scale != "smoke":
                    cfg = replace(cfg, optim=replace(cfg.optim, rho=DEMO_RHO[fam]),
                                  train=replace(cfg.train, epochs=DEMO_EPOCHS[fam], seed=s))
                cell = f"{name}-s{s}"
                cells.append(Cell(cell, replace(cfg, name=cell), fam, m, s))
    return cells


# Contrastive pre-training (vitsam.pretrain): SimCLR with and without SAM, scored by the
# linear probe on frozen features (final.json's probe_acc). The cpu scale reuses main's
# models, data slice (2,000 CIFAR-10 training images) and radii. Measured on this shared
# 2-core machine (other users' jobs running, load 4-7), one thread a run, batch 128 (256
# views), `python bench/bench_pretrain_step.py`: a step costs 0.8 s (ResNet), 0.9-1.6 s (ViT),
# 0.5-0.7 s (Mixer) plain and 2.1-2.6, 1.7-2.6, 1.1-1.2 s with SAM, so one epoch (15 steps)
# of all six cells is 110-140 s of compute. 15 epochs (225 steps) and the probes (features of
# 2,000 training and 2,000 test images: 2-5 s a cell, L-BFGS: 0.2-2 s) make 28-35
# minutes of compute: about 15-20 minutes of wall time with --workers 2 on an idle machine.
CONTRASTIVE_EPOCHS = 15
CONTRASTIVE_REASONING = (
    f"CIFAR-10 at 200 images per class (2,000 unlabelled training images), SimCLR for "
    f"{CONTRASTIVE_EPOCHS} epochs at batch 128 (256 views), main's cpu-scale models and radii; "
    "scored by a linear probe fitted on the 2,000 training images' frozen features and tested "
    "on 2,000 test images; sized to about 30 minutes of compute on 2 cores")
CONTRASTIVE_PROBE_TEST = 2000


def _contrastive_grid(scale: str, seeds: Sequence[int]) -> list[Cell]:
    cells = []
    for fam in FAMILIES:
        for sam in (False, True):
            for s in seeds:
                c = _cell(fam, "sam" if sam else "vanilla", s, scale)
                method = "simclr-sam" if sam else "simclr"
                name = f"{fam}-{method}-s{s}"
                cfg = c.config
                pre = replace(cfg.pretrain, objective="simclr")
                data = replace(cfg.data, augment="none")
                t = replace(cfg.train, label_smoothing=0.0)
                if scale == "cpu":
                    t = replace(t, epochs=CONTRASTIVE_EPOCHS, eval_every_epochs=5,
                                ckpt_every_epochs=5)
                    pre = replace(pre, knn_samples=1000, probe_train_samples=None,
                                  probe_test_samples=CONTRASTIVE_PROBE_TEST)
                cfg = replace(cfg, name=name, pretrain=pre, data=data, train=t)
                cells.append(Cell(name, cfg, fam, method, s))
    return cells


def _settings(scale: str) -> StageSettings:
    if scale == "smoke":
        return StageSettings(batches=1, batch_size=16,
                             hessian=("hessian.k=1", "hessian.trace_probes=0", "hessian.tol=0.05",
                                      "hessian.max_iter=8"),
                             ntk=("ntk.num_inputs=8",), ntk_seeds=2, corrupt_limit=16,
                             corrupt_params="cifar-c", corruptions=("gaussian_noise", "contrast"),
                             severities=(1, 3),
                             landscape=("landscape.dims=1", "landscape.steps=3",
                                        "landscape.max_batches=1"),
                             blocks=("hessian.per_block=true", "hessian.k=1", "hessian.tol=0.05",
                                     "hessian.max_iter=8", "hessian.trace_probes=2"),
                             trajectory=("trajectory.steps=3", "trajectory.max_batches=1"),
                             transfer=("train.epochs=1", "data.train_fraction=0.02", "train.batch_size=16",
                                       "train.train_eval_samples=50", "data.augment=none"),
                             attack_steps=3, attack_restarts=1, attack_samples=32)
    if scale == "cpu":
        return StageSettings(batches=4, batch_size=64, corrupt_limit=500, attack_steps=10,
                             attack_samples=500)
    return StageSettings(batches=8, batch_size=128, corrupt_limit=None, attack_restarts=2,
                         attack_samples=None)


MAIN_COLUMNS = ("params", "ntk_kappa_init", "lambda_max", "test_acc", "corrupt_acc",
                "train_images_per_s")

STUDIES: dict[str, Study] = {
    "main": Study("main", "The paper's first table: {ResNet, ViT, Mixer} x {vanilla, SAM} at "
                  "matched size: NTK kappa at init, Hessian lambda_max, clean and corruption "
                  "accuracy, training images/s", _main_grid,
                  ("hessian", "ntk", "corruptions"), MAIN_COLUMNS, _settings),
    "augment": Study("augment", "The paper's data-size table: {ResNet, ViT, Mixer} x {vanilla, "
                     "SAM, AUG, SAM+AUG} x training fraction {1, 1/2, 1/4, 1/10}, with SAM's "
                     "gain against training-set size", _augment_grid, ("hessian",),
                     ("test_acc", "train_acc", "lambda_max"), _settings, reuses="main"),
    "inside": Study("inside", "Inside the models: activation sparsity per block and class-token "
                    "attention, vanilla vs SAM (reuses main's cells)", _inside_grid,
                    ("sparsity", "attention", "landscape"),
                    ("test_acc", "active_pct", "attention_entropy"),
                    _settings, reuses="main"),
    "demo": Study("demo", "ViT and ResNet, each with and without SAM, on the embedded MNIST-5k "
                  "digits, with Hessian lambda_max beside the accuracies (`vitsam demo`)",
                  _demo_grid, ("hessian",), ("test_acc", "train_acc", "lambda_max",
                                             "lambda_max_loss", "train_images_per_s"),
                  lambda scale: replace(_settings(scale), batches=2, batch_size=128)
                  if scale != "smoke" else _settings(scale)),
    "sharpness": Study("sharpness", "lambda_max and SAM's logged sharpness at every saved "
                       "checkpoint, against training steps", _sharpness_grid,
                       ("sharpness",), ("test_acc", "lambda_max_last", "lambda_max_matched",
                                        "matched_step"), _settings),
    "noise": Study("noise", f"Label noise: main's grid with {NOISE_RATE:g} of the training labels "
                   "replaced (symmetric), tested on clean labels; how many wrong labels each "
                   "model memorised", _noise_grid, ("hessian",),
                   ("test_acc", "train_acc", "noisy_memorised", "noisy_true", "lambda_max"),
                   _settings),
    "geometry": Study("geometry", "Where the curvature sits and how training moves: lambda_max "
                      "and trace of the Hessian per block, and the path of training projected on "
                      "its top-2 principal directions over the loss surface (reuses sharpness's "
                      "cells and their checkpoints)", _sharpness_grid, ("blocks", "trajectory"),
                      ("test_acc", "lambda_max", "block_lambda_max", "trajectory_explained"),
                      _settings, reuses="sharpness"),

    "transfer": Study("transfer", "Transfer: each of sharpness's CIFAR-10 cells (vanilla and SAM, "
                      "ViT and ResNet) fine-tuned on MNIST-5k with the same plain SGD recipe; "
                      "does a SAM-trained source transfer better? (reuses sharpness's cells)",
                      _sharpness_grid, ("transfer",), ("test_acc", "lambda_max_last", "transfer_acc",
                                                       "transfer_train_acc"),
                      _settings, reuses="sharpness"),

    "contrastive": Study("contrastive", "SimCLR pre-training of {ResNet, ViT, Mixer}, with and "
                         "without SAM, scored by a linear probe (and kNN) on the frozen "
                         "features; `vitsam probe` and `vitsam finetune` read the cells",
                         _contrastive_grid, (), ("probe_acc", "knn_acc", "probe_train_acc",
                                                 "contrastive_loss", "train_images_per_s"),
                         _settings, notes={"cpu": CONTRASTIVE_REASONING}),
    "sam-variants": Study("sam-variants", "Cheaper SAM: ViT and Mixer x {vanilla, SAM, LookSAM "
                          "(k=5), SAM-ON (normalisation layers only), SAM on a random fifth of "
                          "the steps}: accuracy, Hessian lambda_max and training images/s against "
                          "full SAM (reuses main's vanilla and SAM cells)", _variants_grid,
                          ("hessian",), ("test_acc", "lambda_max", "train_images_per_s"),
                          _settings, reuses="main"),
    "adversarial": Study("adversarial", "Adversarial training: {ResNet, ViT, Mixer} x {AT, "
                         "SAM+AT} (FGSM with random start; SAM's two passes on the adversarial "
                         "batch): clean and PGD robust test accuracy at the training radius",
                         _adversarial_grid, ("robust",),
                         ("test_acc", "robust_clean_acc", "robust_acc", "train_acc",
                          "adv_train_acc", "train_images_per_s"), _settings,
                         notes={"cpu": ADVERSARIAL_REASONING}),
}


SCALE_NOTES = {
    "smoke": "smoke scale: the presets' smoke sizes (depth 1, 3 steps) on sklearn's 8x8 digits; "
             "the numbers test the pipeline, not the paper",
    "cpu": CPU_REASONING,
    "gpu": "gpu scale: the c10 presets (ViT-T/4, Mixer-T/4, ResNet-18) on full CIFAR-10",
    "paper": "paper scale: the paper's ImageNet recipes",
}


def get_study(name: str) -> Study:
    """The study ``name``; a one-line error with close names otherwise."""
    if name not in STUDIES:
        close = difflib.get_close_matches(name, list(STUDIES), n=2)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown study {name!r}{hint}; choose from {', '.join(STUDIES)}")
    return STUDIES[name]


def study_cells(study: Study, scale: str, seeds: Sequence[int],
                only: Sequence[str] | None = None, data: str | None = None,
                root: str | None = None) -> list[Cell]:
    """The cells of ``study`` at ``scale`` with ``--data/--root`` applied (the key=value
    overrides are applied per cell by ``cell_overrides``, so one cell's failure stays its own)."""
    if scale not in SCALES:
        raise ConfigError(f"unknown scale {scale!r}; choose from {', '.join(SCALES)}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds must list distinct integers, got {list(seeds)}")
    cells = study.grid(scale, seeds)
    if only:
        names = {c.name for c in cells}
        unknown = [o for o in only if o not in names]
        if unknown:
            close = difflib.get_close_matches(unknown[0], sorted(names), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"--only: no cell {unknown[0]!r} in {study.name} at {scale} scale"
                              f"{hint}; cells: {', '.join(sorted(names))}")
        cells = [c for c in cells if c.name in set(only)]
    out = []
    for c in cells:
        cfg = c.config
        if data or root:
            extra = ([f"data.source={data}"] if data else []) + ([f"data.root={root}"] if root else [])
            cfg = apply_overrides(cfg, extra)
        out.append(replace(c, config=cfg))
    return out


def cell_overrides(cell: Cell, overrides: Sequence[str]) -> RunConfig:
    """The cell's config with the study's key=value overrides (raises ConfigError per cell)."""
    return apply_overrides(cell.config, list(overrides))


def describe(cells: Sequence[Cell]) -> list[dict[str, Any]]:
    """JSON rows of the grid (for study.json)."""
    return [{"name": c.name, "family": c.family, "method": c.method, "seed": c.seed,
             "fraction": c.fraction} for c in cells]
