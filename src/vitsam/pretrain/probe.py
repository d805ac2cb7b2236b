"""Frozen-feature evaluation of an encoder: a linear probe and a k-nearest-neighbour vote.

The linear probe is multinomial logistic regression on features computed once (eval mode, no
augmentation) and cached: standardised with the training features' mean and standard
deviation, fitted by full-batch L-BFGS (strong-Wolfe line search, float64, zero
initialisation) on the mean cross-entropy plus ``l2 * |W|^2 / 2``. The objective is convex and
the start fixed, so a probe is a deterministic function of the features: no learning rate, no
epochs, no seed to tune, which is why it is preferred here to a few epochs of SGD or Adam.

kNN (Wu et al., 2018): cosine similarity to a bank of training features, the k most similar
vote for their labels with weight exp(sim / 0.07); cheap enough to run at every evaluation of
a pre-training run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data import eval_batches
from ..models.modes import eval_mode

KNN_TEMPERATURE = 0.07


@torch.no_grad()
def features(encoder: nn.Module, split: Any, bundle: Any, device: torch.device | str,
             batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(features float32 (n, F) on the CPU, labels int64 (n,)) of every image of ``split``,
    preprocessed as evaluation preprocesses the bundle's test split."""
    feats, labels = [], []
    with eval_mode(encoder):
        for x, y in eval_batches(split, batch_size, bundle.mean, bundle.std, bundle.img_size,
                                 device, bundle.crop_pct):
            feats.append(encoder(x).float().cpu())
            labels.append(y.cpu())
    return torch.cat(feats), torch.cat(labels)


def linear_probe(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor,
                 test_y: torch.Tensor, num_classes: int, l2: float = 1e-4,
                 max_iter: int = 200) -> dict[str, float]:
    """Fit the probe on (train_f (n, F), train_y (n,)) and score it; returns ``train_acc``,
    ``test_acc`` (fractions), ``train_loss`` (the objective without the penalty) and ``iters``."""
    if len(train_f) == 0 or len(test_f) == 0:
        raise ValueError("the linear probe needs at least one training and one test image")
    mu = train_f.double().mean(0)
    sd = train_f.double().std(0, unbiased=False).clamp(min=1e-6)
    a = (train_f.double() - mu) / sd
    b = (test_f.double() - mu) / sd
    w = torch.zeros(a.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, bias], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")
    calls = 0

    def closure() -> torch.Tensor:
        nonlocal calls
        calls += 1
        opt.zero_grad()
        loss = F.cross_entropy(a @ w + bias, train_y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        train_logits, test_logits = a @ w + bias, b @ w + bias
        return {"train_acc": float((train_logits.argmax(1) == train_y).double().mean()),
                "test_acc": float((test_logits.argmax(1) == test_y).double().mean()),
                "train_loss": float(F.cross_entropy(train_logits, train_y)), "iters": calls}


def knn_accuracy(bank_f: torch.Tensor, bank_y: torch.Tensor, query_f: torch.Tensor,
                 query_y: torch.Tensor, num_classes: int, k: int = 20) -> float:
    """Share of queries whose similarity-weighted vote among their k nearest bank features
    (cosine) is their label."""
    bank = F.normalize(bank_f.float(), dim=1)
    hits = 0
    for q, y in zip(query_f.split(1024), query_y.split(1024)):
        sim = F.normalize(q.float(), dim=1) @ bank.t()
        top, idx = sim.topk(min(k, bank.shape[0]), dim=1)
        votes = torch.zeros(len(q), num_classes).scatter_add_(
            1, bank_y[idx], (top / KNN_TEMPERATURE).exp())
        hits += int((votes.argmax(1) == y).sum())
    return hits / max(1, len(query_y))


def probe_run(run_dir: str | Path, data: str | None = None, root: str | None = None,
              checkpoint: str = "last", train_samples: int | None = 10000,
              test_samples: int | None = None, l2: float = 1e-4, knn_k: int = 20,
              device: str = "cpu", seed: int = 0) -> dict[str, Any]:
    """Linear probe and kNN of the frozen features of a run's model: a pre-training run's
    encoder, or any other run's model without its classifier. ``data``/``root``: another data
    source (default: the run's own). ``train_samples``/``test_samples``: a seeded subset of
    each split (None: all). The result is merged into ``<run_dir>/probe.json`` under
    ``<source>:<checkpoint>`` and returned."""
    from dataclasses import replace

    from ..data import build_data
    from ..io import merge_json
    from ..train.checkpoint import load_run
    from ..data.sample import random_subset
    from .simclr import headless

    for name, v in (("--train-samples", train_samples), ("--test-samples", test_samples)):
        if v is not None and v < 1:
            raise ValueError(f"{name} must be >= 1 (or left out for all images), got {v}")
    if l2 < 0 or knn_k < 1:
        raise ValueError(f"--l2 must be >= 0 and --knn-k >= 1, got {l2} and {knn_k}")
    run = load_run(run_dir, checkpoint, device=device, classifier=False)
    pretrained = isinstance(run.model_spec.get("contrastive"), dict)
    encoder = run.model.encoder if pretrained else headless(run.model)
    dc = run.data_config()
    if data or root:
        dc = replace(dc, **({"source": data} if data else {}), **({"root": root} if root else {}))
    bundle = build_data(dc)
    if bundle.in_chans != int(run.model_spec["in_chans"]):
        raise ValueError(f"{dc.source} has {bundle.in_chans}-channel images, the model of "
                         f"{run_dir} takes {run.model_spec['in_chans']}; probe it on data like "
                         "its own")
    train = bundle.train if train_samples is None else random_subset(bundle.train, train_samples, seed)
    test = bundle.test if test_samples is None else random_subset(bundle.test, test_samples, seed)
    tf, ty = features(encoder, train, bundle, device)
    qf, qy = features(encoder, test, bundle, device)
    res = {**linear_probe(tf, ty, qf, qy, bundle.num_classes, l2),
           "knn_acc": knn_accuracy(tf, ty, qf, qy, bundle.num_classes, knn_k),
           "train_images": len(ty), "test_images": len(qy), "feature_dim": int(tf.shape[1]),
           "l2": l2, "knn_k": knn_k, "data": dc.source, "checkpoint": run.checkpoint.name,
           "step": run.step, "encoder": "pre-trained" if pretrained else "classifier removed"}
    merge_json(Path(run_dir) / "probe.json", {f"{dc.source}:{run.checkpoint.name}": res},
               "probe file")
    return res
