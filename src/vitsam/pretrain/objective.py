"""What a pre-training run changes in vitsam's training engine (``vitsam.train.engine``).

The engine's loop, checkpoints, resume, signals and logging are the supervised run's; a run
whose config sets ``pretrain.objective`` holds a ``Pretraining`` that

* builds the model: the zoo model without its classifier inside ``ContrastiveNet``, its spec
  carrying a ``contrastive`` record so every checkpoint rebuilds it from its folder alone;
* turns each training batch (N images, labels ignored) into the stacked two views (2N) and
  their positives as targets (``batch``);
* evaluates at eval times with a kNN vote on frozen features (``evaluate``: ``knn_acc``);
* scores the run at its end with the linear probe (``final``): ``test_acc`` / ``train_acc`` of
  ``final.json`` are the probe's, beside ``probe_acc`` and ``knn_acc``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..data.sample import random_subset
from ..models import check_forward, create_model
from .probe import features, knn_accuracy, linear_probe
from .simclr import build_contrastive, contrastive_spec, feature_dim, positives
from .views import ViewSpec, step_generator, two_views


def build_model(spec: dict[str, Any]) -> nn.Module:
    """The ``ContrastiveNet`` of a spec with a ``contrastive`` record (random weights)."""
    enc = create_model(spec["name"], num_classes=spec["num_classes"], img_size=spec["img_size"],
                       in_chans=spec["in_chans"], **spec.get("kwargs", {}))
    return build_contrastive(enc, spec["contrastive"])


@dataclass
class Pretraining:
    """The engine's hooks for a run with ``cfg.pretrain.objective`` set (module docstring)."""

    cfg: Any  # RunConfig
    views: ViewSpec
    rank: int = 0

    @classmethod
    def create(cls, cfg: Any, hflip: bool, rank: int) -> "Pretraining":
        p = cfg.pretrain
        return cls(cfg, ViewSpec(p.crop_min, hflip and p.hflip, p.jitter, p.jitter_p, p.gray_p),
                   rank)

    def spec(self, spec: dict[str, Any]) -> dict[str, Any]:
        return {**spec, "contrastive": contrastive_spec(self.cfg.pretrain)}

    def model(self, spec: dict[str, Any], device: torch.device) -> nn.Module:
        net = build_model(spec).to(device)
        # One-line errors for encoders that cannot take the data's images (as supervised runs).
        check_forward(net.encoder, spec["name"], feature_dim(net.encoder), spec["img_size"],
                      spec["in_chans"])
        return net

    def batch(self, x: torch.Tensor, y: torch.Tensor, step: int,
              bundle: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Step ``step``'s (0-based) images (N, ...) -> two views (2N, ...) and positives (2N,)."""
        gen = step_generator(self.cfg.train.seed, step, self.rank)
        both = two_views(x, bundle.mean, bundle.std, self.views, gen)
        return both, positives(x.shape[0], x.device)

    def _features(self, tr: Any, split: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return features(tr.model.encoder, split, tr.bundle, tr.device)

    def evaluate(self, tr: Any) -> dict[str, float]:
        """kNN accuracy: ``knn_samples`` training images as the bank, as many test queries."""
        p, b, seed = self.cfg.pretrain, tr.bundle, self.cfg.train.seed
        bank = self._features(tr, random_subset(b.train, p.knn_samples, seed))
        query = self._features(tr, random_subset(b.test, p.knn_samples, seed))
        return {"knn_acc": knn_accuracy(*bank, *query, b.num_classes, p.knn_k)}

    def final(self, tr: Any) -> dict[str, Any]:
        """The linear probe (and kNN) on ``probe_train_samples`` / ``probe_test_samples``."""
        p, b, seed = self.cfg.pretrain, tr.bundle, self.cfg.train.seed
        train = b.train if p.probe_train_samples is None else \
            random_subset(b.train, p.probe_train_samples, seed)
        test = b.test if p.probe_test_samples is None else \
            random_subset(b.test, p.probe_test_samples, seed)
        tf, ty = self._features(tr, train)
        qf, qy = self._features(tr, test)
        probe = linear_probe(tf, ty, qf, qy, b.num_classes, p.probe_l2)
        knn = knn_accuracy(tf, ty, qf, qy, b.num_classes, p.knn_k)
        return {"objective": p.objective, "test_acc": probe["test_acc"],
                "train_acc": probe["train_acc"], "probe_acc": probe["test_acc"], "knn_acc": knn,
                "probe": {**probe, "train_images": len(ty), "test_images": len(qy),
                          "l2": p.probe_l2, "feature_dim": int(tf.shape[1])}}
