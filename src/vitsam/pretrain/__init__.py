"""Self-supervised pre-training: SimCLR on any zoo model, plain or with SAM, and the frozen-
feature evaluations of the result (linear probe, kNN).

``vitsam pretrain --objective simclr --preset P`` trains through vitsam's own engine
(``vitsam.train.engine`` with the hooks of ``objective.Pretraining``), so its run folder is
an ordinary one: checkpoints, exact resume, metrics.jsonl, final.json. ``vitsam probe RUN``
fits a linear probe on its frozen features; ``vitsam finetune RUN`` gives its encoder a new
classifier.
"""
from __future__ import annotations

from .simclr import ContrastiveNet, ProjectionHead, nt_xent, nt_xent_logits, positives

__all__ = ["ContrastiveNet", "ProjectionHead", "nt_xent", "nt_xent_logits", "positives",
           "pretrain_config"]


def pretrain_config(preset: str, objective: str = "simclr", smoke: bool = False,
                    overrides: list[str] | None = None):  # -> RunConfig
    """The run preset ``preset`` turned into a pre-training run of ``objective``: its model,
    data and optimiser, the views doing the augmentation (``data.augment=none``), no label
    smoothing, the name prefixed with the objective; then ``overrides``."""
    from dataclasses import replace

    from ..config import apply_overrides
    from ..presets import get_preset

    cfg = get_preset(preset, smoke_size=smoke)
    cfg = replace(cfg, name=f"{objective}-{cfg.name}",
                  description=f"{objective} pre-training: {cfg.description}",
                  data=replace(cfg.data, augment="none"),
                  train=replace(cfg.train, label_smoothing=0.0),
                  pretrain=replace(cfg.pretrain, objective=objective))
    return apply_overrides(cfg, list(overrides or []))
